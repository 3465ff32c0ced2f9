"""Training data held on the accelerators: each step's batch gathered and augmented there.

For a training split that fits in device memory (CIFAR-10 as uint8 is 150 MB), `place` resizes
every image once to its working size (`data.Preprocess.resized`) and copies the split to every
local device. A step's batch is then gathered on the device from the example indices of
`data.train_indices`, the host pipeline's (seed, step) order, and augmented there with the
same augmentation: pad 4 and a crop, or a crop of the resized image, and a flip.
The host places each epoch's order and the crops and flips of its steps once (`Epochs`); the
device finds a step's indices and choices in them from the step in the train state, so that a
call needs nothing new from the host. The choices are the host pipeline's own
(`data.Preprocess.choices` of `data.augmentation_draws`): a net's batches are the same, to the
pixel, whichever path runs them.

Every local device holds the whole split, so that it can gather any example of a global batch
without communicating; a split that does not fit stays on the host (`data.train_batches`).
"""

import functools
import os
from typing import NamedTuple

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax import data
from fsp_jax.errors import fail


class Placed(NamedTuple):
  """A split on every local device: images [devices, N, H, W, 3] uint8, labels [devices, N]
  int32, and where cached, the teacher's FSP matrices [devices, N, M, N'] per stage."""
  images: jax.Array
  labels: jax.Array
  teacher_fsp: tuple | None = None


# The share of one device's memory that the training split may take on it.
MAX_SHARE = 0.25


def device_memory() -> int:
  """Bytes of memory of one local device: its allocator's limit where it reports one (GPUs,
  TPUs), else the host's physical memory (a CPU device's arrays live there)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def copies_in_memory() -> int:
  """How many copies of an array placed on every local device share one `device_memory`: all
  of them on CPU devices (the host's memory), one on an accelerator."""
  return jax.local_device_count() if jax.local_devices()[0].platform == 'cpu' else 1


def split_bytes(source, preprocess: data.Preprocess) -> tuple[int, tuple[int, ...]]:
  """The bytes of a split at its working size, and that size (H, W, 3), from its first image
  alone."""
  shape = preprocess.resized(source[0][0]).shape
  return len(source) * int(np.prod(shape)), shape


def check_fits(source, preprocess: data.Preprocess, eval_source=None) -> None:
  """Raises ValueError, before any image but the first is resized, where the training split at
  its working size (and the evaluation split's centre crops) would take more than MAX_SHARE of
  one device's memory (of the host's, for every local CPU device together: each holds a
  copy)."""
  size, shape = split_bytes(source, preprocess)
  if eval_source is not None:
    size += len(eval_source) * preprocess.image_size ** 2 * 3
  copies, memory = copies_in_memory(), device_memory()
  if size * copies > MAX_SHARE * memory:
    fail('data.on_device', f'the training split is {size / 2**30:.2f} GiB at its '
         f'working size ({len(source):,} images of {shape[1]}x{shape[0]}'
         f'{f", {copies} copies" if copies > 1 else ""}'
         f'{", with the test split" if eval_source is not None else ""}), more than '
         f'{MAX_SHARE:.0%} of a device\'s {memory / 2**30:.1f} GiB. Leave on_device '
         'False for this data set (or lower data.image_size).')


def stored_images(source, preprocess: data.Preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Every example of source at its working size: images [N, H, W, 3] uint8, labels [N].

  Raises ValueError where the resized images differ in shape (a 'crop_flip' split of several
  aspect ratios), which a device array cannot hold.
  """
  images, labels = [], []
  for i in range(len(source)):
    image, label = source[i]
    images.append(preprocess.resized(image))
    labels.append(label)
  shapes = sorted({image.shape for image in images})
  if len(shapes) > 1:
    fail('data.on_device', f'the training images are of {len(shapes)} shapes at '
         f'their working size (for example {shapes[0]} and {shapes[-1]}); a device '
         'array holds one. Leave on_device False for this data set.')
  return np.stack(images), np.asarray(labels, np.int32)


def centre_crops(source, preprocess: data.Preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Every example of source as evaluation takes it, before normalising: the centre crop of
  its working size, images [N, S, S, 3] uint8, and labels [N]."""
  size, images, labels = preprocess.image_size, [], []
  for i in range(len(source)):
    image, label = source[i]
    image = preprocess.resized(image)
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    images.append(image[top:top + size, left:left + size])
    labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)


@functools.cache
def make_eval_gather(preprocess: data.Preprocess):
  """A pmapped (placed, indices [devices, b]) -> {'image', 'label'} [devices, b, ...]: the
  examples of an evaluation batch, from `centre_crops` placed on the devices."""
  return jax.pmap(lambda placed, indices: gather(placed, preprocess, indices, None))


def place(images: np.ndarray, labels: np.ndarray) -> Placed:
  """A split (`stored_images`, `centre_crops`) copied to every local device (the teacher's
  cached matrices join it in `feed.DeviceFeed.with_teacher_fsp`)."""
  return Placed(*jax_utils.replicate((images, labels)))


class Epochs(NamedTuple):
  """What a call's steps read, on every local device: the example orders [devices, E, N] of
  epochs first .. first + E - 1 (`data.epoch_order`), first [devices], each device's positions
  in every global batch [devices, b], the global batch [devices], and the crop and flip of each
  of the device's examples at every step of those epochs [devices, E * steps per epoch, b, 3]
  (`data.Preprocess.choices` of the host pipeline's draws)."""
  orders: np.ndarray
  first: np.ndarray
  positions: np.ndarray
  global_batch: np.ndarray
  choices: np.ndarray


def epochs(preprocess: data.Preprocess, shape: tuple[int, int], num_examples: int,
           global_batch: int, seed: int, start: int, end: int, steps_per_call: int):
  """The `Epochs` of each call of steps start .. end - 1, `steps_per_call` steps a call, on
  the host, for stored images of working shape (H, W): one object for every call that the same
  epochs cover."""
  devices, per_epoch = jax.local_device_count(), data.steps_per_epoch(num_examples, global_batch)
  count = (steps_per_call - 1) // per_epoch + 2  # Epochs that any call's steps can span.
  part = data.host_slice(global_batch, jax.process_index(), jax.process_count())
  positions = np.arange(part.start, part.stop, dtype=np.int32).reshape(devices, -1)
  window = None
  for first in range(start, end, steps_per_call):
    epoch = first // per_epoch
    if window is None or (first + steps_per_call - 1) // per_epoch >= window.first[0] + count:
      orders = np.stack([data.epoch_order(num_examples, seed, e)
                         for e in range(epoch, epoch + count)]).astype(np.int32)
      choices = np.concatenate([_epoch_choices(preprocess, shape, seed, e, per_epoch,
                                               global_batch)
                                for e in range(epoch, epoch + count)])
      window = Epochs(np.broadcast_to(orders, (devices,) + orders.shape), _each(devices, epoch),
                      positions, _each(devices, global_batch),
                      choices[:, positions].transpose(1, 0, 2, 3))
    yield window


@functools.lru_cache(maxsize=4)
def _epoch_choices(preprocess: data.Preprocess, shape: tuple[int, int], seed: int, epoch: int,
                   per_epoch: int, global_batch: int) -> np.ndarray:
  """The crops and flips [per_epoch, global_batch, 3] of an epoch's steps, from the host
  pipeline's draws; kept for the next window, which starts at the epoch that a call straddles
  into it (about 10 us a step, once)."""
  draws = np.concatenate([data.augmentation_draws(seed, step, global_batch)
                          for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)])
  choices = preprocess.choices(draws, [shape]).reshape(per_epoch, global_batch, 3)
  choices.flags.writeable = False
  return choices


def _each(devices: int, value: int) -> np.ndarray:
  return np.full(devices, value, np.int32)


def step_indices(epochs: Epochs, step) -> jnp.ndarray:
  """One device's example indices [b] of a step (epochs holds one device's arrays: inside
  pmap): its part of `data.train_indices`."""
  epoch, position = jnp.divmod(step, epochs.orders.shape[-1] // epochs.global_batch)
  return epochs.orders[epoch - epochs.first, position * epochs.global_batch + epochs.positions]


def step_choices(epochs: Epochs, step) -> jnp.ndarray:
  """One device's crops and flips [b, 3] of a step (inside pmap): its part of the host
  pipeline's."""
  return epochs.choices[step - epochs.first * (epochs.orders.shape[-1] // epochs.global_batch)]


def augment(preprocess: data.Preprocess, images: jnp.ndarray,
            choices: jnp.ndarray | None) -> jnp.ndarray:
  """`data.Preprocess` on the device: images [b, H, W, 3] uint8 at their working size -> float32
  [b, S, S, 3], normalised; each example cropped and flipped as its choices [b, 3] say (top,
  left, flip: `data.Preprocess.choices`), or without choices the centre crop, as the host does
  without draws."""
  size, pad = preprocess.image_size, preprocess.pad
  if choices is None:
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    batch = images[:, top:top + size, left:left + size]
  else:
    images = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, choice):
      crop = jax.lax.dynamic_slice(image, (choice[0], choice[1], 0), (size, size, 3))
      return jnp.where(choice[2] == 1, crop[:, ::-1], crop)

    batch = jax.vmap(one)(images, choices)
  batch = batch.astype(jnp.float32)
  return (batch - jnp.asarray(preprocess.mean, jnp.float32)) / jnp.asarray(preprocess.std,
                                                                             jnp.float32)


def gather(placed: Placed, preprocess: data.Preprocess, indices: jnp.ndarray,
           choices: jnp.ndarray | None) -> dict:
  """One device's part of a step's batch: {'image' [b, S, S, 3], 'label' [b]} (and
  'teacher_fsp' where cached) of the examples at indices [b], cropped and flipped by their
  choices [b, 3] (None: the centre, unflipped); placed holds one device's arrays (inside
  pmap)."""
  batch = {'image': augment(preprocess, placed.images[indices], choices),
           'label': placed.labels[indices]}
  if placed.teacher_fsp is not None:
    batch['teacher_fsp'] = [g[indices] for g in placed.teacher_fsp]
  return batch
