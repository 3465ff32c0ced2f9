"""Input pipelines: the paper's augmentation, batches, host sharding and prefetching.

Batches are a pure function of (seed, step), so a run that resumes at step s sees exactly the
batches an uninterrupted run sees, and the pipeline's whole state is the step stored in the
checkpoint. Each host reads only its own part of every global batch (see `sources` for what
batches are read from).
"""

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from PIL import Image

AUGMENTATIONS = ('cifar', 'crop_flip', 'none')
# Per-channel mean and standard deviation of the pixels, in [0, 255].
CIFAR_STATS = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
IMAGENET_STATS = ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Per-example preprocessing: image uint8 [H, W, 3] -> float32 [size, size, 3].

  augment='cifar': pad 4 and random size x size crop, random horizontal flip (the paper);
  'crop_flip': resize the shorter side to size * 8/7, random crop, flip (CUB; eval: centre
  crop); 'none': no augmentation. Always normalised per channel with mean and std.
  """
  image_size: int
  augment: str = 'cifar'
  mean: tuple[float, float, float] = CIFAR_STATS[0]
  std: tuple[float, float, float] = CIFAR_STATS[1]

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    size = self.image_size
    if self.augment == 'crop_flip':
      image = _resize_shorter(image, round(size * 8 / 7))
      if rng is None:
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
      else:
        top = rng.integers(image.shape[0] - size + 1)
        left = rng.integers(image.shape[1] - size + 1)
      image = image[top:top + size, left:left + size]
    else:
      if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
      if self.augment == 'cifar' and rng is not None:
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        top, left = rng.integers(9, size=2)
        image = padded[top:top + size, left:left + size]
    if rng is not None and self.augment != 'none' and rng.random() < 0.5:
      image = image[:, ::-1]
    return (image.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)


def _resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
  height, width = image.shape[:2]
  scale = shorter / min(height, width)
  new = (max(shorter, round(width * scale)), max(shorter, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


def get_preprocess(config: ml_collections.ConfigDict) -> Preprocess:
  if config.augment not in AUGMENTATIONS:
    raise ValueError(f'Unknown config.data.augment {config.augment!r}; '
                     f'expected one of {", ".join(AUGMENTATIONS)}.')
  stats = IMAGENET_STATS if config.get('normalize') == 'imagenet' else CIFAR_STATS
  return Preprocess(config.image_size, config.augment, *stats)


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  """The part of every global batch that host process_index reads."""
  if global_batch % process_count:
    raise ValueError(f'The global batch size {global_batch} must be divisible by the number of '
                     f'hosts {process_count}.')
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Example indices [global_batch] of a training step: epochs of fresh permutations."""
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'The batch size {global_batch} exceeds the {num_examples} training examples.')
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * global_batch:(position + 1) * global_batch]


# Decoding (PIL) and NumPy release the GIL: threads read and preprocess examples in parallel.
_POOL = concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1))


def _load(source, indices, preprocess, rngs):
  """Reads and preprocesses examples in parallel threads: {'image': [n, S, S, 3], 'label': [n]}."""
  def one(i, rng):
    image, label = source[i]
    return preprocess(image, rng), label
  examples = list(_POOL.map(one, indices, rngs))
  return {'image': np.stack([e[0] for e in examples]),
          'label': np.asarray([e[1] for e in examples], np.int32)}


def train_batches(source, preprocess: Preprocess, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """Endless host-local training batches from start_step on.

  Yields {'image': [global_batch / hosts, S, S, 3] float32, 'label': [...] int32, 'index':
  [...] the examples' positions in source}. Batch s is the same whatever start_step was;
  augmentation is seeded per (seed, step, position).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  part = host_slice(global_batch, process_index, process_count)
  step = start_step
  while True:
    indices = train_indices(len(source), global_batch, seed, step)[part]
    rngs = [np.random.default_rng([seed, step, p]) for p in range(part.start, part.stop)]
    yield {**_load(source, indices, preprocess, rngs), 'index': indices}
    step += 1


def eval_batches(source, preprocess: Preprocess, global_batch: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """One pass over the split in order, padded to whole batches.

  Yields {'image', 'label', 'mask' [n] bool}: padding examples have mask False.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  part = host_slice(global_batch, process_index, process_count)
  for start in range(0, len(source), global_batch):
    positions = np.arange(start, start + global_batch)[part]
    mask = positions < len(source)
    batch = _load(source, np.where(mask, positions, 0), preprocess, [None] * len(positions))
    batch['mask'] = mask
    yield batch


def shard(batch: dict, num_devices: int) -> dict:
  """Reshapes every array [n, ...] to [num_devices, n / num_devices, ...] for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'A host batch of {x.shape[0]} examples cannot be split evenly over '
                       f'{num_devices} local devices; make the batch size a multiple of it.')
    return x.reshape((num_devices, -1) + x.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs iterator in a background thread, keeping up to size items ready. The thread ends
  with the iterator, or as soon as this generator is closed or dropped (a finished phase)."""
  items: queue.Queue = queue.Queue(maxsize=size)
  stop, done = threading.Event(), object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
    except Exception as e:  # pylint: disable=broad-except
      put(e)
      return
    put(done)

  threading.Thread(target=produce, name='fsp_jax-prefetch', daemon=True).start()
  try:
    while (item := items.get()) is not done:
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
