"""Input pipelines: the paper's augmentation, batches and host sharding, read with grain.

Batches are a pure function of (seed, step): grain maps step numbers to batches (a
`MapDataset`), so a run that resumes at step s sees exactly the batches an uninterrupted run
sees, and the pipeline's whole state is the step stored in the checkpoint (grain's iterator
state would be that same position). Each host reads only its own part of every global batch
(see `sources` for what batches are read from) and augments it as a whole; threads, and
optionally worker processes, compute batches ahead of the step.
"""

import dataclasses
import functools
import itertools
import os
import threading
import time
from typing import Any, Iterator

from absl import flags
import grain
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
  """Preprocessing of a batch: images uint8 [H, W, 3] (n of them) -> float32 [n, size, size, 3].

  augment='cifar': pad 4 and random size x size crop, random horizontal flip (the paper);
  'crop_flip': resize the shorter side to size * 8/7, random crop, flip (CUB; eval: centre
  crop); 'none': no augmentation. Always normalised per channel with mean and std. The random
  choices come from draws [n, 3] in [0, 1) (top, left, flip; see `augmentation_draws`); without
  draws (evaluation) nothing is random.
  """
  image_size: int
  augment: str = 'cifar'
  mean: tuple[float, float, float] = CIFAR_STATS[0]
  std: tuple[float, float, float] = CIFAR_STATS[1]

  @property
  def stored_size(self) -> int | None:
    """The shorter side `resized` gives 'crop_flip' images (the crop's room), else None."""
    return round(self.image_size * 8 / 7) if self.augment == 'crop_flip' else None

  def resized(self, image: np.ndarray) -> np.ndarray:
    """An image uint8 [H, W, 3] at its working size, before any random choice: its shorter side
    at `stored_size` for 'crop_flip', image_size x image_size otherwise."""
    size = self.image_size
    if self.augment == 'crop_flip':
      return _resize_shorter(image, self.stored_size)
    if image.shape[:2] == (size, size):
      return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))

  def describe(self) -> str:
    """How images reach the networks, in words."""
    size = self.image_size
    steps = {'cifar': f'resized to {size}x{size} where they are not, padded by 4 and cropped '
                      f'to {size}x{size} at random and flipped in training',
             'crop_flip': f'the shorter side resized to {self.stored_size}, cropped to '
                          f'{size}x{size} (at random, and flipped, in training; the centre in '
                          'evaluation)',
             'none': f'resized to {size}x{size} where they are not'}[self.augment]
    stats = 'ImageNet\'s' if (self.mean, self.std) == IMAGENET_STATS else (
        'CIFAR-10\'s' if (self.mean, self.std) == CIFAR_STATS else 'given')
    return f'{steps}; normalised with {stats} statistics'

  @property
  def pad(self) -> int:
    """Pixels added on every side before the crop ('cifar': 4)."""
    return 4 if self.augment == 'cifar' else 0

  def choices(self, draws: np.ndarray | None, shapes) -> np.ndarray:
    """The crop and flip of each image [n, 3] int32 (top, left of the crop in the padded
    image, flip 0/1), given the images' working shapes [(H, W, ...)] (or one for all) and
    their draws [n, 3]; without draws (evaluation), the centre and no flip. The one definition
    of the augmentation's choices: the host applies them with numpy, the device with jax
    (device_data.augment)."""
    rooms = np.array([(h + 2 * self.pad - self.image_size, w + 2 * self.pad - self.image_size)
                      for h, w, *_ in shapes], np.int64).reshape(-1, 2)
    rooms = np.broadcast_to(rooms, (len(rooms) if draws is None else len(draws), 2))
    if draws is None or self.augment == 'none':
      return np.concatenate([rooms // 2, np.zeros((len(rooms), 1), np.int64)], 1).astype(np.int32)
    crop = (draws[:, :2] * (rooms + 1)).astype(np.int64)  # In 0 .. room.
    return np.concatenate([crop, (draws[:, 2:] < 0.5)], 1).astype(np.int32)

  def __call__(self, images, draws: np.ndarray | None) -> np.ndarray:
    size, pad = self.image_size, self.pad
    images = [self.resized(image) for image in images]
    choices = self.choices(draws, [image.shape for image in images])
    padded = (np.pad(image, ((pad, pad), (pad, pad), (0, 0))) for image in images)
    batch = np.stack([image[top:top + size, left:left + size][:, ::-1 if flip else 1]
                      for image, (top, left, flip) in zip(padded, choices)])
    return (batch.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)


def augmentation_draws(seed: int, step: int, global_batch: int) -> np.ndarray:
  """The random choices [global_batch, 3] in [0, 1) of a training step's augmentation, one row
  per position in the global batch (every host draws them all and takes its rows)."""
  return np.random.default_rng([seed, step]).random((global_batch, 3))


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


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order [num_examples] in which an epoch visits the training examples."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  if global_batch > num_examples:
    raise ValueError(f'The batch size {global_batch} exceeds the {num_examples} training examples.')
  return num_examples // global_batch


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Example indices [global_batch] of a training step: epochs of fresh permutations."""
  epoch, position = divmod(step, steps_per_epoch(num_examples, global_batch))
  return epoch_order(num_examples, seed, epoch)[position * global_batch:
                                                (position + 1) * global_batch]


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Step -> the host's part of its global batch: {'image', 'label', 'index'}, the examples at
  positions first .. first + n - 1, augmented with their rows of the step's draws (where
  `augment`; else as in evaluation)."""
  source: Any
  preprocess: Preprocess
  global_batch: int
  seed: int
  first: int  # The host's first position in every global batch.
  per_host: int
  augment: bool

  def __call__(self, step: int) -> dict:
    part = slice(self.first, self.first + self.per_host)
    indices = train_indices(len(self.source), self.global_batch, self.seed, step)[part]
    images, labels = zip(*(self.source[i] for i in indices))
    draws = augmentation_draws(self.seed, step, self.global_batch)[part]
    return {'image': self.preprocess(images, draws if self.augment else None),
            'label': np.asarray(labels, np.int32), 'index': indices}


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Batch b of a pass -> the host's part {'image', 'label', 'mask'}; positions past the
  split's end repeat example 0, masked."""
  source: Any
  preprocess: Preprocess
  global_batch: int
  first: int
  per_host: int

  def __call__(self, b: int) -> dict:
    indices, mask = eval_positions(b, self.global_batch, self.first, self.per_host,
                                   len(self.source))
    images, labels = zip(*(self.source[i] for i in indices))
    return {'image': self.preprocess(images, None), 'label': np.asarray(labels, np.int32),
            'mask': mask}


def eval_positions(b: int, global_batch: int, first: int, per_host: int,
                   num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """A host's examples [per_host] of batch b of a pass in order, and their mask: positions
  past the split's end read example 0, masked."""
  positions = b * global_batch + first + np.arange(per_host)
  mask = positions < num_examples
  return np.where(mask, positions, 0).astype(np.int32), mask


def _end_with_parent(worker_index: int, worker_count: int) -> None:
  """Run in each worker process: it exits once the process that started it is gone (killed
  with -9, say), instead of living on with its shared memory."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _read(batches: grain.MapDataset, workers: int) -> Iterator[dict]:
  """The elements of batches in order, computed ahead by threads (in worker processes, if
  any); the threads and processes stop when this generator is closed or dropped."""
  threads = min(16, max(2, os.cpu_count() or 1))
  ahead = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (main.py parses them).
      flags.FLAGS.mark_as_parsed()
    ahead = ahead.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                              worker_init_fn=_end_with_parent)
  iterator = iter(ahead)
  try:
    yield from iterator
  finally:
    iterator.close()


def _host_part(global_batch: int, process_index: int | None, process_count: int | None):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return host_slice(global_batch, process_index, process_count)


def train_batches(source, preprocess: Preprocess, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None, num_steps: int = 2**40,
                  workers: int = 0, augment: bool = True) -> Iterator[dict]:
  """Host-local training batches of steps start_step .. num_steps - 1 (endless by default).

  Yields {'image': [global_batch / hosts, S, S, 3] float32, 'label': [...] int32, 'index':
  [...] the examples' positions in source}. The global batch of step s is the same whatever
  start_step, workers and the number of hosts: each example's augmentation is its position's
  row of the step's draws (augment False: the images as evaluation takes them).
  """
  part = _host_part(global_batch, process_index, process_count)
  train_indices(len(source), global_batch, seed, start_step)  # Bad sizes fail here, not later.
  batch = _TrainBatch(source, preprocess, global_batch, seed, part.start, part.stop - part.start,
                      augment)
  return _read(grain.MapDataset.range(start_step, num_steps).map(batch), workers)


def eval_batches(source, preprocess: Preprocess, global_batch: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """One pass over the split in order, padded to whole batches.

  Yields {'image', 'label', 'mask' [n] bool}: padding examples have mask False.
  """
  part = _host_part(global_batch, process_index, process_count)
  batch = _EvalBatch(source, preprocess, global_batch, part.start, part.stop - part.start)
  return _read(grain.MapDataset.range(-(-len(source) // global_batch)).map(batch), 0)


def grouped(batches: Iterator[dict], steps_per_call: int) -> Iterator[dict]:
  """Every `steps_per_call` batches [devices, b, ...] as one [devices, steps_per_call, b, ...]
  (a view where there is one): the inputs of one call of several steps."""
  while group := list(itertools.islice(batches, steps_per_call)):
    yield jax.tree_util.tree_map(
        lambda *xs: np.stack(xs, axis=1) if len(xs) > 1 else xs[0][:, None], *group)


def shard(batch: dict, num_devices: int) -> dict:
  """Reshapes every array [n, ...] to [num_devices, n / num_devices, ...] for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'A host batch of {x.shape[0]} examples cannot be split evenly over '
                       f'{num_devices} local devices; make the batch size a multiple of it.')
    return x.reshape((num_devices, -1) + x.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)
