"""The feed: what each call of the compiled train step is given, and how a step finds its batch.

Two implementations behind the same two operations:
- `calls(...)`: what each call of a phase is given, on the local devices;
- `batch(given, resident, i, step, augment)` (traced inside the step): step i's batch of the
  call, from what the call was given and what stays on the devices for every call.

`HostFeed` gives each call its steps' batches from the host pipeline (`data.train_batches`),
stacked [devices, steps, b, ...]. `DeviceFeed` keeps the split on the devices
(`device_data.Placed`) and gives a call the `device_data.Epochs` its steps read. Both give the
same batches (to float rounding), with the teacher's cached FSP matrices attached by example
where the feed holds them (`with_teacher_fsp`). A phase that reads them takes its images
un-augmented (`Phase.augment`), as the matrices were computed.
"""

import collections
import dataclasses
from typing import Any, Iterator

from flax import jax_utils
import jax
import numpy as np

from fsp_jax import data, device_data


def _sharded_over_local_devices() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))


def _ahead(inputs, ahead: int):
  """Inputs [devices, ...] placed on the local devices (one device_put each, asynchronous),
  `ahead` of the call that reads them."""
  sharding, placed = _sharded_over_local_devices(), collections.deque()
  for item in inputs:
    placed.append(jax.device_put(item, sharding))
    if len(placed) > ahead:
      yield placed.popleft()
  yield from placed


def _once(inputs):
  """Inputs [devices, ...] on the local devices, each object placed once however many calls
  it serves."""
  sharding, last, placed = _sharded_over_local_devices(), None, None
  for item in inputs:
    if item is not last:
      last, placed = item, jax.device_put(item, sharding)
    yield placed


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity: it keys compiled steps.
class HostFeed:
  """The host pipeline's batches; the teacher's matrices [N, M, N'] per stage, where cached,
  picked by example on the host."""
  source: Any
  preprocess: data.Preprocess
  workers: int = 0
  teacher_fsp: tuple | None = None
  resident = None  # Nothing stays on the devices between calls.

  def with_teacher_fsp(self, teacher_fsp: tuple) -> 'HostFeed':
    return dataclasses.replace(self, teacher_fsp=teacher_fsp)

  def calls(self, batch_size: int, seed: int, start: int, end: int, steps_per_call: int,
            augment: bool) -> Iterator:
    """The batches [devices, steps_per_call, b, ...] of each call of steps start .. end - 1,
    two calls ahead on the local devices."""
    def sharded(batch):
      index = batch.pop('index')
      if self.teacher_fsp is not None:
        batch['teacher_fsp'] = [g[index] for g in self.teacher_fsp]
      return data.shard(batch, jax.local_device_count())

    batches = data.train_batches(self.source, self.preprocess, batch_size, seed,
                                 start_step=start, num_steps=end, workers=self.workers,
                                 augment=augment)
    return _ahead(data.grouped(map(sharded, batches), steps_per_call), ahead=2)

  @staticmethod
  def batch(given: dict, resident, i, step, augment: bool) -> dict:
    """Step i's batch among the call's (one device's arrays: inside pmap)."""
    del resident, step, augment
    return jax.tree_util.tree_map(lambda x: x[i], given)


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceFeed:
  """The training split on every local device (`resident`, with the teacher's matrices where
  cached); each call is given its steps' epochs."""
  num_examples: int
  preprocess: data.Preprocess
  resident: device_data.Placed

  @classmethod
  def place(cls, stored: tuple[np.ndarray, np.ndarray],
            preprocess: data.Preprocess) -> 'DeviceFeed':
    """The split's images at their working size and labels (`device_data.stored_images`)."""
    return cls(len(stored[1]), preprocess, device_data.place(*stored))

  def with_teacher_fsp(self, teacher_fsp: tuple) -> 'DeviceFeed':
    return dataclasses.replace(self, resident=self.resident._replace(
        teacher_fsp=jax_utils.replicate(tuple(teacher_fsp))))

  def calls(self, batch_size: int, seed: int, start: int, end: int, steps_per_call: int,
            augment: bool) -> Iterator:
    """The `device_data.Epochs` of each call of steps start .. end - 1, each placed once."""
    del augment  # Each step applies it (`batch`).
    return _once(device_data.epochs(self.preprocess, self.resident.images.shape[2:4],
                                    self.num_examples, batch_size, seed, start, end,
                                    steps_per_call))

  def batch(self, given: device_data.Epochs, resident: device_data.Placed, i, step,
            augment: bool) -> dict:
    """Step `step`'s batch, gathered and augmented from the resident split (one device's
    arrays: inside pmap)."""
    del i
    return device_data.gather(resident, self.preprocess, device_data.step_indices(given, step),
                              device_data.step_choices(given, step) if augment else None)
