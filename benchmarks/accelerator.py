r"""One command for the day an accelerator is lent: every speed measurement into one JSON.

  python benchmarks/accelerator.py --out=results/benchmark_gpu.json     # ~8 min on one GPU
  python benchmarks/accelerator.py --tiny --out=/tmp/accelerator.json   # ~2 min on a CPU

Runs, each in a process of its own: `steps.py` (the 26 -> 8 pair's steps at float32 and
bfloat16, batch 128 and 512, without the PyTorch reference unless it is installed), `loop.py`
(host time per step and loop / bare call for k = 1, 8, 32 steps per call, host pipeline and
data on the device) and a short real training: Table 3's student alone and FSP student
(`minimize_cifar10.py:cpu`, one net each, its schedules cut to 300 task iterations) on
CIFAR-10 where --cifar10 names it, else the quickstart's digits. --tiny shrinks every size so
that the whole script runs on a CPU in the tests.
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _python(script: str, *args: str) -> None:
  """Runs a script of the checkout in a fresh Python (its own JAX) and fails on an error."""
  subprocess.run([sys.executable, os.path.join(ROOT, script), *args], check=True)


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def step_runs(tiny: bool, folder: str) -> list[dict]:
  """steps.py for every dtype and batch size."""
  torch = importlib.util.find_spec('torch') is not None
  found = []
  for dtype in ('float32', 'bfloat16'):
    for batch in ((8,) if tiny else (128, 512)):
      out = os.path.join(folder, f'steps_{dtype}_{batch}.json')
      _python('benchmarks/steps.py', f'--batch_size={batch}', f'--dtype={dtype}',
              f'--pairs={"resnet8:resnet8" if tiny else "resnet26:resnet8"}',
              f'--repeats={1 if tiny else 10}', f'--out={out}',
              *([] if torch and not tiny else ['--no_torch']))
      found.append(_read(out))
  return found


def loop_run(tiny: bool, folder: str) -> dict:
  out = os.path.join(folder, 'loop.json')
  sizes = (['--steps=32', '--trivial_steps=64', '--resnet_batch=8', '--settings=1:0,8:1',
            '--rounds=1'] if tiny else ['--steps=256', '--trivial_steps=6144'])
  _python('benchmarks/loop.py', *sizes, f'--out={out}')
  return _read(out)


def training_run(tiny: bool, cifar10: str, folder: str) -> dict:
  """A short real training: its command, results table and wall time."""
  workdir = os.path.join(folder, 'training')
  if cifar10 and not tiny:
    config = [f'--config={ROOT}/experiments/configs/minimize_cifar10.py:cpu',
              f'--config.data.root={cifar10}', '--config.methods=scratch,fsp',
              '--config.num_nets=1', '--config.scratch.until=(300,)',
              '--config.scratch.warmup=6', '--config.fsp.stage2.until=(300,)',
              '--config.fsp.stage2.warmup=6', '--config.fsp.stage1.until=(52,76,100)',
              '--config.eval_every=100', '--config.batch_size=128']
  else:
    config = [f'--config={ROOT}/experiments/configs/quickstart.py' + (':tiny' if tiny else '')]
  start = time.time()
  _python('experiments/main.py', *config, f'--workdir={workdir}')
  return {'command': ' '.join(['experiments/main.py', *config]),
          'seconds': time.time() - start, 'rows': _read(os.path.join(workdir, 'results.json'))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the JSON written')
  parser.add_argument('--cifar10', default='', help='an ImageFolder CIFAR-10 for the training')
  parser.add_argument('--tiny', action='store_true', help='CPU-sized, for the tests')
  args = parser.parse_args()
  start = time.time()
  with tempfile.TemporaryDirectory() as folder:
    result = {'machine': f'{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs',
              'tiny': args.tiny, 'steps': step_runs(args.tiny, folder),
              'loop': loop_run(args.tiny, folder),
              'training': training_run(args.tiny, args.cifar10, folder)}
  result['seconds'] = time.time() - start
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'{args.out}: {result["seconds"]:.0f} s in all')


if __name__ == '__main__':
  main()
