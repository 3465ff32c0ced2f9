r"""Input-pipeline throughput next to the train step's consumption rate.

Reads CIFAR-10 from the ImageFolder copy (JPEG decode + pad/crop/flip + normalise, the
paper's recipe) at batch 128, and times the pmapped ResNet-26 steps that consume it:
plain training (stage 2) and FSP stage 1 (teacher + student forward). Prints images/s of
each and the ratio input / step, which must stay well above 1 for the input never to starve
the step.

  python benchmarks/input_pipeline.py --data=../shared/data/cifar10
"""

import argparse
import time

import jax
import numpy as np

from fsp_jax import data, models, sources
from fsp_jax import steps as steps_lib
from fsp_jax.methods import Phase, Schedule, Student, Term


def input_rate(source, batch_size: int, batches: int) -> float:
  """Images/s of data.train_batches (with the prefetch thread), after one warm-up batch."""
  preprocess = data.Preprocess(32, 'cifar')
  iterator = data.prefetch(data.train_batches(source, preprocess, batch_size, seed=0))
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


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
  parser.add_argument('--batches', type=int, default=50)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  source = sources.folder_source(args.data, 'train')
  pipeline = input_rate(source, args.batch_size, args.batches)
  print(f'machine: {jax.devices()[0].device_kind} x {jax.local_device_count()}, '
        f'batch {args.batch_size}')
  print(f'input pipeline (CIFAR-10 JPEG folder): {pipeline:8.0f} images/s')
  for name, terms in (('stage-2 step (cross-entropy)', ('ce',)),
                      ('stage-1 step (teacher + FSP)', ('fsp',))):
    rate = step_rate(terms, args.batch_size, args.steps)
    print(f'{name:35s} {rate:8.0f} images/s   input / step = {pipeline / rate:.1f}x')


if __name__ == '__main__':
  main()
