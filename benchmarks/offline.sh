#!/usr/bin/env bash
# The project on a lent GPU machine: one that reaches no package index, whose python3 already
# has JAX for its accelerator (and torch, for the reference), and that takes at most 64 MiB of
# the working tree. What it lacks travels in .offline/ (ignored by git, 27 MB): wheels for
# CPython 3.12 on x86-64 of grain, array-record, portpicker, ml-collections and tensorboardX
# (not in that image), and of flax, optax, orbax-checkpoint and chex (pinned: the versions a
# rehearsal ran with that image's jax 0.11.2), and all of CIFAR-10 as one archive (55 MB of
# JPEGs, 20 MB packed: their headers are alike).
#
#   bash benchmarks/offline.sh pack [CIFAR10_FOLDER]   # here (default ../shared/data/cifar10)
#   bash benchmarks/offline.sh travel                  # here: results/ stays behind, but for
#                                                      # the teacher and the paper-schedule run
#   bash benchmarks/offline.sh run OUT [ARGS]          # there: OUT/benchmark_gpu.json, a log
#   bash benchmarks/offline.sh paper OUT SECONDS [ARGS]  # there: Table 3 at the paper's
#                                                      # schedule for SECONDS, OUT/paper.tgz
#   bash benchmarks/offline.sh home                    # here, after the calls: results/ back
#
# The committed per-net results (70 MB) alone exceed what travels. `travel` takes every file
# under results/ out of git's index but the teacher's checkpoint and the paper-schedule run
# (they become untracked, and ignored through .git/info/exclude), and prints the size that
# will travel; `home` puts the index back as HEAD has it. Nothing on disk is touched.
# ARGS go to accelerator.py or paper_schedule.py (--tiny rehearses either on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.offline
site=/tmp/offline-site
data=/tmp/offline-cifar10
cut=/tmp/offline-subset  # The benchmarks' 500 training and 100 test images a class.
paper=results/runs/minimize_cifar10_paper  # paper_schedule.py's --out, committed.
keep=(results/teacher_cifar10/model "$paper")
exclude_line=/results/  # offline.sh travel

# The machine's python3 with the wheels, and CIFAR-10 unpacked (once a machine).
setup() {
  if [ ! -d "$site" ]; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$bundle"/wheels/*.whl
  fi
  if [ ! -d "$data/train" ]; then
    mkdir -p "$data" && tar xzf "$bundle/cifar10.tgz" -C "$data"
  fi
  export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
}

# The first $3 images of each class of split $2 of folder $1, into $4 (in name order).
subset() {
  for class in "$1/$2"/*/; do
    files=("$class"*)
    mkdir -p "$4/$2/$(basename "$class")"
    cp -t "$4/$2/$(basename "$class")" "${files[@]:0:$3}"
  done
}

case "${1:-}" in
  pack)
    cifar10=${2:-../shared/data/cifar10}
    rm -rf "$bundle"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$bundle/wheels" \
        grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 \
        tensorboardX==2.6.5 flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92
    tar czf "$bundle/cifar10.tgz" -C "$cifar10" train test
    du -sh "$bundle" ;;
  travel)
    [ -d "$bundle" ] || { echo 'offline.sh travel: run offline.sh pack first' >&2; exit 1; }
    git diff --cached --quiet || { echo 'offline.sh travel: commit or unstage first' >&2; exit 1; }
    git rm -r -q --cached results
    for path in "${keep[@]}"; do [ ! -e "$path" ] || git add -f "$path"; done
    grep -qxF "$exclude_line" .git/info/exclude 2>/dev/null ||
        echo "$exclude_line" >> .git/info/exclude
    bytes=$( (git ls-files -z --cached --others --exclude-standard;
              find "$bundle" -type f -print0) | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
    echo "travels: $((bytes / 1048576)) MiB of 64 (the working tree and $bundle)"
    [ "$bytes" -le $((64 * 1048576)) ] || { echo 'offline.sh travel: over 64 MiB' >&2; exit 1; } ;;
  home)
    sed -i "\|^$exclude_line\$|d" .git/info/exclude
    git reset -q -- results
    git status --short | head ;;
  run)
    out=${2:?'usage: bash benchmarks/offline.sh run OUT [ARGS]'}
    setup
    [ -d "$cut" ] || { subset "$data" train 500 "$cut"; subset "$data" test 100 "$cut"; }
    python3 benchmarks/accelerator.py --cifar10="$cut" \
        --out="$out/benchmark_gpu.json" "${@:3}" 2>&1 | tee "$out/accelerator.log" ;;
  paper)
    out=${2:?'usage: bash benchmarks/offline.sh paper OUT SECONDS [ARGS]'}
    seconds=${3:?'usage: bash benchmarks/offline.sh paper OUT SECONDS [ARGS]'}
    setup
    status=0
    python3 experiments/paper_schedule.py --cifar10="$data" --workdir=/tmp/paper-workdir \
        --out="$paper" --budget_s="$seconds" "${@:4}" 2>&1 | tee "$out/paper.log" || status=$?
    tar czf "$out/paper.tgz" "$paper"  # Back here: tar xzf paper.tgz in the checkout.
    exit $status ;;
  *)
    echo 'usage: bash benchmarks/offline.sh pack [CIFAR10_FOLDER] | travel | run OUT [ARGS] |' \
         'paper OUT SECONDS [ARGS] | home' >&2
    exit 2 ;;
esac
