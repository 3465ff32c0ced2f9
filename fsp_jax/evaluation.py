"""Evaluation: one pass of a step over a split in order, every example once, its outputs
fetched once at the end; on several hosts, each computes its part of every batch. The batches
come from the host pipeline, or, for a split placed on the devices, are gathered there."""

import jax
from jax.experimental import multihost_utils
import numpy as np

from fsp_jax import data, device_data, preemption, steps


def gather_in_order(chunks: list[np.ndarray]) -> np.ndarray:
  """Per-host chunks [per-host batch, ...] -> all examples [N, ...] in global order."""
  x = np.asarray(multihost_utils.process_allgather(np.stack(chunks)))  # [hosts, batches, ...]
  return np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


# Evaluation batches dispatched beyond the oldest one still running: the host prepares the next
# batches while the device works, and fetches every output once, at the end.
EVAL_IN_FLIGHT = 2


def _batches(source, preprocess: data.Preprocess, batch_size: int, placed):
  """Each batch of a pass over source: (the pmapped step's batch [devices, b, ...], this host's
  labels, its mask), read by the host pipeline, or where `placed` holds the split (its
  `device_data.centre_crops`, or its `stored_images`, whose centres are cropped there),
  gathered on the devices from the examples' positions."""
  if placed is None:
    for batch in data.eval_batches(source, preprocess, batch_size):
      yield data.shard(batch, jax.local_device_count()), batch['label'], batch['mask']
    return
  gather = device_data.make_eval_gather(preprocess)
  part = data.host_slice(batch_size, jax.process_index(), jax.process_count())
  for b in range(-(-len(source) // batch_size)):
    indices, mask = data.eval_positions(b, batch_size, part.start, part.stop - part.start,
                                        len(source))
    batch = gather(placed, data.shard(indices, jax.local_device_count()))
    yield batch, batch['label'], mask


def predict(step, variables, source, preprocess: data.Preprocess, batch_size: int,
            interruptible: str = '', placed: device_data.Placed | None = None):
  """One pass of a pmapped step(variables, sharded batch) -> per-example outputs [devices, b,
  ...] over a split in order: (outputs [N, ...] of every example, labels [N]) on every host.
  Batches hold batch_size examples, or the split's whole where that is fewer (rounded up to the
  devices), so a large batch_size pads nothing. `interruptible` (a name for the pass): a signal
  stops the pass within a batch, raising Preempted. `placed`: the split on the devices (see
  `_batches`), where the batches are then gathered.

  variables are replicated over the local devices.
  """
  outputs, labels, masks = [], [], []
  devices = jax.device_count()  # A batch need not be larger than the split, whole per device.
  batch_size = min(batch_size, -(-len(source) // devices) * devices)
  for i, (batch, label, mask) in enumerate(_batches(source, preprocess, batch_size, placed)):
    if interruptible and preemption.requested(sync_point=True):
      raise preemption.stopped(interruptible, f'stopped after {i} of '
                               f'{-(-len(source) // batch_size)} batches, before anything was '
                               'saved')
    outputs.append(step(variables, batch))
    if len(outputs) > EVAL_IN_FLIGHT:  # Bounds the batches queued on the device.
      jax.block_until_ready(outputs[-1 - EVAL_IN_FLIGHT])
    labels.append(label)
    masks.append(mask)
  outputs, labels = jax.device_get((outputs, labels))  # One fetch, after the last dispatch.
  outputs = [jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
             for out in outputs]
  mask = gather_in_order(masks)
  outputs = jax.tree_util.tree_map(lambda *chunks: gather_in_order(list(chunks))[mask],
                                   *outputs)
  return outputs, gather_in_order([np.reshape(label, -1) for label in labels])[mask]


def evaluate(model, variables, source, preprocess: data.Preprocess, batch_size: int,
             interruptible: str = '', placed: device_data.Placed | None = None):
  """Accuracy and loss over a split; its probabilities [N, classes] and labels [N], in order
  (`interruptible`, `placed`: as for predict).

  variables are replicated over the local devices.
  """
  out, labels = predict(steps.make_eval_step(model), variables, source, preprocess, batch_size,
                        interruptible, placed)
  metrics = {'accuracy': float(np.mean(np.argmax(out['probs'], -1) == labels)),
             'loss': float(np.mean(out['loss']))}
  return metrics, out['probs'], labels
