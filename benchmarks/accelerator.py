r"""One command for the day an accelerator is lent: every speed measurement into one JSON.

  python benchmarks/accelerator.py --out=results/benchmark_gpu.json     # meant: < 8 min, 1 GPU
  python benchmarks/accelerator.py --tiny --out=/tmp/accelerator.json   # ~2 min on a CPU
  bash benchmarks/offline.sh run OUT    # on a machine without a package index (see there)

Runs, each in a process of its own and in this order (what matters most first): `loop.py`
(host time per step and loop / bare call for k = 1, 8, 32 steps per call, host pipeline and
data on the device), `steps.py` (the 26 -> 8 pair's steps at float32 and bfloat16, batch 128
and 512, beside the PyTorch reference on the same device where torch is installed) and a short
real training: Table 3's student alone and FSP student (`minimize_cifar10.py:cpu`, one net
each, its schedules cut to 320 task iterations) with the data on the device and 8 steps a
call, then through the host pipeline one step a call, on CIFAR-10 where --cifar10 names it
(a subset will do), else the quickstart's digits. The JSON is rewritten after each run, so a
command cut short keeps what it measured (`complete` says whether all ran). --tiny shrinks
every size so that the whole script runs on a CPU in the tests.
"""

import argparse
import functools
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


def step_run(tiny: bool, folder: str, dtype: str, batch: int) -> dict:
  """steps.py at one dtype and batch size."""
  torch = importlib.util.find_spec('torch') is not None
  out = os.path.join(folder, f'steps_{dtype}_{batch}.json')
  _python('benchmarks/steps.py', f'--batch_size={batch}', f'--dtype={dtype}',
          f'--pairs={"resnet8:resnet8" if tiny else "resnet26:resnet8"}',
          f'--repeats={1 if tiny else 10}', f'--out={out}',
          *([] if torch and not tiny else ['--no_torch']))
  return _read(out)


def loop_run(tiny: bool, folder: str) -> dict:
  out = os.path.join(folder, 'loop.json')
  # On the H200 (2026-12-04) N = 3,072 trivial steps took 262 s of the loop's 321 s; 1,024
  # brings the whole command to about 8 minutes. The emulated accelerator is for CPUs only.
  sizes = (['--steps=32', '--trivial_steps=64', '--resnet_batch=8', '--settings=1:0,8:1',
            '--rounds=1', '--eval_examples=256', '--emulated_steps=256'] if tiny
           else ['--steps=1024', '--trivial_steps=1024', '--emulated_steps=0'])
  _python('benchmarks/loop.py', *sizes, f'--out={out}')
  return _read(out)


# Table 3's two students, cut to a few hundred iterations (multiples of 8 steps a call).
SHORT_CIFAR10 = ['--config.methods=scratch,fsp', '--config.num_nets=1',
                 '--config.batch_size=128', '--config.scratch.until=(320,)',
                 '--config.scratch.warmup=8', '--config.fsp.stage2.until=(320,)',
                 '--config.fsp.stage2.warmup=8', '--config.fsp.stage1.until=(64,96,128)',
                 '--config.eval_every=160', '--config.log_every=32',
                 '--config.checkpoint_every=160']


def training_run(tiny: bool, cifar10: str, folder: str, on_device: bool) -> dict:
  """A short real training (the data on the devices and several steps a call, or the host
  pipeline and one): its command, results table and wall time."""
  workdir = os.path.join(folder, f'training_{"device" if on_device else "host"}')
  if cifar10 and not tiny:
    config, k = [f'--config={ROOT}/experiments/configs/minimize_cifar10.py:cpu',
                 f'--config.data.root={cifar10}', *SHORT_CIFAR10], 8
  else:  # k = 2: the quickstart evaluates every 10 iterations.
    config, k = [f'--config={ROOT}/experiments/configs/quickstart.py' + (
        ':tiny' if tiny else '')] + (['--config.log_every=2'] if tiny else []), 2
  config += [f'--config.data.on_device={on_device}',
             f'--config.steps_per_call={k if on_device else 1}']
  start = time.time()
  _python('experiments/main.py', *config, f'--workdir={workdir}')
  return {'command': ' '.join(['experiments/main.py', *config]), 'on_device': on_device,
          'steps_per_call': k if on_device else 1, 'seconds': time.time() - start,
          'rows': _read(os.path.join(workdir, 'results.json'))}


def runs(tiny: bool, cifar10: str, folder: str) -> list:
  """(key, measure) of every run, in the order they run: the loop, the steps, the trainings."""
  found = [('loop', functools.partial(loop_run, tiny, folder))]
  for batch in ((8,) if tiny else (128, 512)):
    for dtype in ('float32', 'bfloat16'):
      found.append(('steps', functools.partial(step_run, tiny, folder, dtype, batch)))
  for on_device in (True, False):
    found.append(('training', functools.partial(training_run, tiny, cifar10, folder, on_device)))
  return found


def _write(path: str, result: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(path + '.tmp', path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the JSON written')
  parser.add_argument('--cifar10', default='', help='an ImageFolder CIFAR-10 for the training')
  parser.add_argument('--tiny', action='store_true', help='CPU-sized, for the tests')
  args = parser.parse_args()
  start = time.time()
  result = {'machine': f'{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs',
            'tiny': args.tiny, 'complete': False, 'loop': None, 'steps': [], 'training': []}
  with tempfile.TemporaryDirectory() as folder:
    for key, measure in runs(args.tiny, args.cifar10, folder):
      value = measure()
      if isinstance(result[key], list):
        result[key].append(value)
      else:
        result[key] = value
      result['seconds'] = time.time() - start
      _write(args.out, result)
  result['complete'] = True
  _write(args.out, result)
  print(f'{args.out}: {result["seconds"]:.0f} s in all')


if __name__ == '__main__':
  main()
