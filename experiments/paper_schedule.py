r"""Table 3 at the paper's schedule, on an accelerator, resumable across machines.

Rows: the student alone, FSP and shuffled FSP (stage 1 on the teacher's cached matrices, so that
it runs no teacher), the student alone for FSP's total iterations, then KD (it runs the teacher
at every step); minimize_cifar10.py's full schedule (batch 128, the ResNet recipe's 64k task
iterations after FSP's 21k-iteration stage 1) against the committed teacher. Net 1 of every row
is trained before net 2 of any: one call of experiments/main.py per round k trains the missing
nets 1..k of every row.

    python experiments/paper_schedule.py --cifar10=../shared/data/cifar10 \
        --workdir=runs/minimize_cifar10_paper --out=results/runs/minimize_cifar10_paper

After each round, and when stopped (SIGTERM or --budget_s: main.py saves a checkpoint at the next
step), every finished net's files and the newest checkpoint of the net in progress (a few MB)
are copied into --out. A later run, on this machine or another, first copies --out back into
its workdir, so it goes on from that checkpoint. --tiny rehearses it all on a CPU in a minute
(16x16 digits, the teacher trained here, a few steps a phase).

Expected minutes per net on an H200, from the train steps measured there at batch 128
(results/benchmark_gpu.json: ResNet-8 stage 2 73,800 img/s, cached stage 1 64,700, a step
that runs the ResNet-26 teacher 18,000): the student alone 1.9, FSP and shuffled FSP 2.5, the
student for FSP's iterations 2.5, KD 7.6; about 17 a round, 51 for three nets a row, plus
compilation and evaluation. On an H100 (not measured) up to 1.4x that, by memory bandwidth.
On a lent machine (no package index, 64 MiB carried): `bash benchmarks/offline.sh paper OUT
SECONDS` there, after `pack` and `travel` here (see that script); it brings --out back as
OUT/paper.tgz.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 'scratch,fsp,fsp_shuffled,scratch_matched,kd'
NET_FILES = ('result.json', 'settings.json', 'test_probs.npy', 'fsp_matrices.npz')


def command(args, nets: int) -> list[str]:
  """main.py's command for round `nets`."""
  if args.tiny:
    config = [f'--config={ROOT}/experiments/configs/minimize_cifar10.py:tiny',
              '--config.teacher.model=resnet8']
  else:
    config = [f'--config={ROOT}/experiments/configs/minimize_cifar10.py',
              '--config.data.name=folder', f'--config.data.root={args.cifar10}',
              f'--config.teacher.checkpoint={ROOT}/results/teacher_cifar10/model',
              '--config.log_every=400']  # A multiple of 8 steps a call.
  return [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'), *config,
          f'--config.methods={ROWS}', '--config.fsp.cache=True', f'--config.num_nets={nets}',
          f'--workdir={args.workdir}', '--allow_config_change']


def _newest_checkpoint(net: str) -> str | None:
  """The newest checkpoint folder (<phase>/<step>) of an unfinished net, if any: the last
  step of its last phase begun (phases are named in their order: stage1, stage2; train)."""
  found = [(phase, int(step), os.path.join(phase, step)) for phase in os.listdir(net)
           if os.path.isdir(os.path.join(net, phase)) and phase != 'model'
           for step in os.listdir(os.path.join(net, phase)) if step.isdigit()]
  return max(found)[2] if found else None


def carry_out(workdir: str, out: str) -> list[str]:
  """Copies every finished net's files, the newest checkpoint of each unfinished one, the
  workdir's records and its table into out; returns what was copied (net folders)."""
  copied = []
  for method in ROWS.split(','):
    folder = os.path.join(workdir, method)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
      net = os.path.join(folder, name)
      if not name.startswith('net') or not name[3:].isdigit():
        continue
      target = os.path.join(out, method, name)
      if os.path.exists(os.path.join(net, 'result.json')):
        shutil.rmtree(target, ignore_errors=True)  # A checkpoint carried before it finished.
        os.makedirs(target)
        for file in NET_FILES:
          if os.path.exists(os.path.join(net, file)):
            shutil.copy2(os.path.join(net, file), target)
      elif (newest := _newest_checkpoint(net)) is not None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(net, newest), os.path.join(target, newest))
        shutil.copy2(os.path.join(net, 'settings.json'), target)
      else:
        continue
      copied.append(f'{method}/{name}')
  for file in ('config.json', 'data.json', 'results.md', 'results.json', 'test_labels.npy',
               'teacher_test_probs.npy'):
    if os.path.exists(os.path.join(workdir, file)):
      os.makedirs(out, exist_ok=True)
      shutil.copy2(os.path.join(workdir, file), out)
  return copied


def carry_in(out: str, workdir: str) -> None:
  """Copies what carry_out left in out into a workdir that lacks it (a new machine)."""
  if not os.path.isdir(out):
    return
  for root, _, files in os.walk(out):
    for file in files:
      target = os.path.join(workdir, os.path.relpath(os.path.join(root, file), out))
      if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, file), target)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True, help='finished nets and the last checkpoint')
  parser.add_argument('--cifar10', default=os.path.join(ROOT, '..', 'shared', 'data', 'cifar10'))
  parser.add_argument('--nets', type=int, default=3, help='nets per row')
  parser.add_argument('--budget_s', type=float, default=None,
                      help='seconds in all, after which the net in progress is stopped and '
                      'carried out')
  parser.add_argument('--tiny', action='store_true', help='a rehearsal on a CPU')
  args = parser.parse_args()
  carry_in(args.out, args.workdir)
  status, deadline = 0, None if args.budget_s is None else time.time() + args.budget_s
  for nets in range(1, args.nets + 1):
    process = subprocess.Popen(command(args, nets))
    try:
      status = process.wait(timeout=None if deadline is None else max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGTERM)  # A checkpoint at the next step.
      status = process.wait()
    except KeyboardInterrupt:
      status = process.wait()  # main.py got the Ctrl-C too, and saves a checkpoint.
    print(f'Carried into {args.out}: {", ".join(carry_out(args.workdir, args.out))}.', flush=True)
    if status:
      break
  sys.exit(status)


if __name__ == '__main__':
  main()
