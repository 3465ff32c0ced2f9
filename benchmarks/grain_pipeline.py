r"""Input pipelines on the same work: fsp_jax's (threads + a prefetch thread) and grain's.

Both produce the same batches: batch s holds the examples `data.train_indices` gives for step
s, each augmented with the RNG seeded by (seed, s, position), as `data.train_batches` does.
grain runs it as a `MapDataset` of positions mapped to examples, batched, read with threads,
and with 0, 1 or 2 worker processes (`mp_prefetch`). Two workloads: the CIFAR-10 JPEG folder
at 32 px (pad, crop, flip) and 224-px crops of 300x250 JPEGs (the CUB recipe: resize the
shorter side, crop, flip). Prints images/s, writes JSON.

  pip install grain
  python benchmarks/grain_pipeline.py --out=results/benchmark_input_cpu.json
"""

import argparse
import functools
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from fsp_jax import data, sources


def ours(source, preprocess, batch_size: int, batches: int, seed: int = 0) -> float:
  """Images/s of data.train_batches behind data.prefetch, after one warm-up batch."""
  iterator = data.prefetch(data.train_batches(source, preprocess, batch_size, seed,
                                              process_index=0, process_count=1))
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


class Example:
  """Position i of the stream -> the example train_batches puts there (a picklable map)."""

  def __init__(self, source, preprocess, batch_size: int, seed: int):
    self.source, self.preprocess = source, preprocess
    self.batch_size, self.seed = batch_size, seed

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

  def __call__(self, i: int) -> dict:
    step, position = divmod(int(i), self.batch_size)
    epoch, within = divmod(step, len(self.source) // self.batch_size)
    image, label = self.source[self._order(epoch)[within * self.batch_size + position]]
    rng = np.random.default_rng([self.seed, step, position])
    return {'image': self.preprocess(image, rng), 'label': np.int32(label)}


def with_grain(source, preprocess, batch_size: int, batches: int, workers: int,
               threads: int) -> float:
  """Images/s of the same batches through grain, after one warm-up batch."""
  import grain  # pylint: disable=g-import-not-at-top
  dataset = grain.MapDataset.range((batches + 1) * batch_size).map(
      Example(source, preprocess, batch_size, 0)).batch(batch_size)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=2 * batch_size))
  if workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(dataset)
  first = next(iterator)
  assert first['image'].shape[0] == batch_size
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def same_batches(source, preprocess, batch_size: int) -> bool:
  """Whether grain's first two batches equal train_batches' (the work is the same)."""
  import grain  # pylint: disable=g-import-not-at-top
  ours_ = data.train_batches(source, preprocess, batch_size, 0, process_index=0, process_count=1)
  theirs = grain.MapDataset.range(2 * batch_size).map(
      Example(source, preprocess, batch_size, 0)).batch(batch_size)
  return all(np.array_equal(next(ours_)['image'], theirs[k]['image']) for k in range(2))


def cub_like(root: str, count: int = 512) -> str:
  """count 300x250 JPEGs of smooth random pictures in an ImageFolder tree (train split)."""
  rng = np.random.default_rng(0)
  for i in range(count):
    path = os.path.join(root, 'train', f'class{i % 8}', f'{i}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    small = rng.integers(0, 256, (25, 30, 3), np.uint8)
    Image.fromarray(small).resize((300, 250), Image.BILINEAR).save(path, quality=90)
  return root


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default='../shared/data/cifar10')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--threads', type=int, default=4, help="grain's reading threads")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain reads its settings from absl flags.
  results = {'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'rows': []}
  with tempfile.TemporaryDirectory() as tmp:
    workloads = {
        'CIFAR-10 JPEGs, 32 px, pad-crop-flip': (
            sources.folder_source(args.data, 'train'), data.Preprocess(32, 'cifar')),
        '300x250 JPEGs, 224-px crops, flip': (
            sources.folder_source(cub_like(tmp), 'train'), data.Preprocess(224, 'crop_flip'))}
    for name, (source, preprocess) in workloads.items():
      row = {'workload': name, 'same_batches': same_batches(source, preprocess, 8),
             'fsp_jax': ours(source, preprocess, args.batch_size, args.batches)}
      for workers in (0, 1, 2):
        row[f'grain_{workers}_workers'] = with_grain(source, preprocess, args.batch_size,
                                                     args.batches, workers, args.threads)
      results['rows'].append(row)
      print(' | '.join(f'{k} {v:.0f}' if isinstance(v, float) else f'{k} {v}'
                       for k, v in row.items()), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
