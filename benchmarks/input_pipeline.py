r"""Input-pipeline throughput (grain: threads, then 1 and 2 worker processes) next to the
train step's consumption rate.

Two workloads at batch 128: the CIFAR-10 JPEG folder at 32 px with the paper's augmentation
(decode, pad, crop, flip, normalise) and 224-px crops of 300x250 JPEGs (the CUB recipe: resize
the shorter side, crop, flip). Then the pmapped ResNet-26 steps that consume CIFAR batches:
plain training (stage 2) and FSP stage 1 (teacher + student). Prints images/s and the ratio
input / step (it must stay well above 1 for the input never to starve the step); writes JSON.

  python benchmarks/input_pipeline.py --out=results/benchmark_input_cpu.json
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from fsp_jax import data, models, sources
from fsp_jax import steps as steps_lib
from fsp_jax.adapters import Student
from fsp_jax.schedules import Schedule
from fsp_jax.terms import Phase, Term


def input_rate(source, preprocess, batch_size: int, batches: int, workers: int) -> float:
  """Images/s of data.train_batches, after one warm-up batch (that starts the workers)."""
  iterator = data.train_batches(source, preprocess, batch_size, seed=0,
                                num_steps=batches + 1, workers=workers)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * batch_size / (time.perf_counter() - start)
  iterator.close()
  return rate


def cub_like(root: str, count: int = 512) -> str:
  """count 300x250 JPEGs of smooth random pictures in an ImageFolder tree (train split)."""
  rng = np.random.default_rng(0)
  for i in range(count):
    path = os.path.join(root, 'train', f'class{i % 8}', f'{i}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    small = rng.integers(0, 256, (25, 30, 3), np.uint8)
    Image.fromarray(small).resize((300, 250), Image.BILINEAR).save(path, quality=90)
  return root


def step_rate(terms: tuple[str, ...], batch_size: int, steps: int) -> float:
  """Images/s of the ResNet-26 train step with these loss terms, after compilation."""
  phase = Phase('train', Schedule((1e-3,), (1_000_000,)), tuple(Term(t) for t in terms))
  tx = steps_lib.optimizer(phase.schedule, 1e-4, 0.9)
  student = Student(models.get('resnet26', 10, axis_name='batch'))
  teacher = student if 'fsp' in terms else None
  state = steps_lib.create_train_state(student, jax.random.key(0), 32, tx)
  devices = jax.local_device_count()
  replicate = lambda tree: jax.tree_util.tree_map(lambda x: np.stack([x] * devices), tree)
  teacher_variables = replicate(state.variables())
  state = replicate(jax.device_get(state))
  batch = data.shard({'image': np.random.rand(batch_size, 32, 32, 3).astype(np.float32),
                      'label': np.zeros(batch_size, np.int32)}, devices)
  step = steps_lib.make_train_step(student, teacher, phase, tx)
  state, metrics = step(state, batch, teacher_variables)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, teacher_variables)
  jax.block_until_ready(metrics)
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default='../shared/data/cifar10')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  results = {'machine': f'{platform.machine()}, {os.cpu_count()} cores',
             'device': f'{jax.devices()[0].device_kind} x {jax.local_device_count()}',
             'batch_size': args.batch_size, 'inputs': [], 'steps': {}}
  with tempfile.TemporaryDirectory() as tmp:
    workloads = {
        'CIFAR-10 JPEGs, 32 px, pad-crop-flip': (
            sources.folder_source(args.data, 'train'), data.Preprocess(32, 'cifar')),
        '300x250 JPEGs, 224-px crops, flip': (
            sources.folder_source(cub_like(tmp), 'train'), data.Preprocess(224, 'crop_flip'))}
    for name, (source, preprocess) in workloads.items():
      row = {'workload': name}
      for workers in (0, 1, 2):
        row[f'{workers}_workers'] = input_rate(source, preprocess, args.batch_size,
                                               args.batches, workers)
      results['inputs'].append(row)
      print(' | '.join(f'{k} {v:.0f}' if isinstance(v, float) else f'{k}: {v}'
                       for k, v in row.items()), 'images/s', flush=True)
  cifar = results['inputs'][0]['0_workers']
  for name, terms in (('stage-2 step (cross-entropy)', ('ce',)),
                      ('stage-1 step (teacher + FSP)', ('fsp',))):
    rate = step_rate(terms, args.batch_size, args.steps)
    results['steps'][name] = rate
    print(f'ResNet-26 {name:30s} {rate:8.0f} images/s   CIFAR input (threads) / step = '
          f'{cifar / rate:.1f}x', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
