#!/usr/bin/env bash
# benchmarks/accelerator.py on a machine that reaches no package index, whose python3 already
# has JAX for its accelerator with flax, optax, orbax-checkpoint and chex (and torch, for the
# reference): the project's lent GPU machines. What it lacks travels in .offline/ (ignored by
# git, 13 MB): wheels for CPython 3.12 on x86-64 of grain, array-record, portpicker,
# ml-collections and tensorboardX (not in that image), and of flax, optax, orbax-checkpoint and
# chex (there in unknown versions), each the version a rehearsal ran with that image's jax
# 0.11.2 and its other packages; and CIFAR-10's first 500 training and 100 test images of each
# class (6 MB; the data set itself stays behind).
#
#   bash benchmarks/offline.sh pack [CIFAR10_FOLDER]   # here (default ../shared/data/cifar10)
#   bash benchmarks/offline.sh run OUT [ARGS]          # there: OUT/benchmark_gpu.json and a log
#
# ARGS go to accelerator.py (--tiny rehearses it all on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.offline

case "${1:-}" in
  pack)
    cifar10=${2:-../shared/data/cifar10}
    rm -rf "$bundle"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$bundle/wheels" \
        grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 \
        tensorboardX==2.6.5 flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92
    for split in train:500 test:100; do
      for class in "$cifar10/${split%:*}"/*/; do
        target="$bundle/cifar10/${split%:*}/$(basename "$class")"
        files=("$class"*)  # In name order.
        mkdir -p "$target"
        cp -t "$target" "${files[@]:0:${split#*:}}"
      done
    done
    du -sh "$bundle" ;;
  run)
    out=${2:?'usage: bash benchmarks/offline.sh run OUT [ARGS]'}
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/offline-site "$bundle"/wheels/*.whl
    export PYTHONPATH="/tmp/offline-site:$PWD" PYTHONUNBUFFERED=1
    python3 benchmarks/accelerator.py --cifar10="$bundle/cifar10" \
        --out="$out/benchmark_gpu.json" "${@:3}" 2>&1 | tee "$out/accelerator.log" ;;
  *)
    echo 'usage: bash benchmarks/offline.sh pack [CIFAR10_FOLDER] | run OUT [ARGS]' >&2
    exit 2 ;;
esac
