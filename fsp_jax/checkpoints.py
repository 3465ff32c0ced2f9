"""Checkpoints of a training phase: the train state and the run's history, saved together.

One Orbax composite checkpoint per saved step holds 'state' (the TrainState) and 'history'
(the run's curves so far, JSON), so a resumed run continues both from the same step. A
checkpoint that cannot be read is reported in one line, moved aside as `<step>.corrupt`
(never deleted) and the previous one used; saving then goes on at once. `save` returns only
once the checkpoint is committed on disk.
"""

import contextlib
import logging
import os

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fsp_jax import logs


@contextlib.contextmanager
def _quiet():
  """Silences Orbax's, TensorStore's and asyncio's loggers (a corrupt file makes them print
  thousands of lines); `--verbosity=1` keeps them."""
  if logging.getLogger().isEnabledFor(logging.INFO):
    yield
    return
  names = ('absl', 'asyncio', 'orbax', 'tensorstore', 'concurrent.futures')
  levels = {name: logging.getLogger(name).level for name in names}
  for name in names:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)


class PhaseCheckpoints:
  """The checkpoints of one phase of one run, in `directory/<step>`."""

  def __init__(self, directory: str, keep: int, where: str):
    self.directory, self.keep, self.where = os.path.abspath(directory), keep, where
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # Synchronous saves: a run killed at any moment loses at most checkpoint_every steps.
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, enable_async_checkpointing=False))

  def restore(self, state, history: dict):
    """(state, history, step) of the newest readable checkpoint, or the given ones and 0."""
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with _quiet():
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(state), history=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (Orbax, TensorStore, OS errors)
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        self._move_aside(step)
        logs.say(f'[{self.where}] checkpoint {step} is unreadable and was moved to '
                 f'{step}.corrupt ({type(e).__name__}: {cause}); using the previous one.')
        continue
      logs.say(f'[{self.where}] resumed from step {step}')
      return restored['state'], restored['history'], step
    logs.say(f'[{self.where}] no checkpoint yet: starting from step 0')
    return state, history, 0

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.directory, f'{step}.corrupt')
      suffix = 1
      while os.path.exists(target):
        target, suffix = os.path.join(self.directory, f'{step}.corrupt{suffix}'), suffix + 1
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved aside {self.directory}/{step}')
    self.manager.close()
    self.manager = self._open()

  def save(self, step: int, state, history: dict) -> None:
    """Writes a checkpoint and returns once it is committed; raises if it was not written."""
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()
    self.manager.reload()
    if not saved or step not in self.manager.all_steps():
      raise RuntimeError(f'[{self.where}] checkpoint {step} was not written to '
                         f'{self.directory} (it has steps {self.manager.all_steps()}).')

  def close(self) -> None:
    self.manager.close()


def load_variables(path: str, model, image_size: int) -> dict:
  """A `fsp_jax.models` network's {'params', 'batch_stats'} from an Orbax checkpoint of them
  (a finished run's model/ folder, or `python -m fsp_jax.convert`'s output)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.clone(axis_name=None).init(
      jax.random.key(0), x, train=False), x)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(os.path.abspath(path), dict(target))
  except Exception as e:  # Orbax raises several kinds for missing or mismatched trees.
    raise ValueError(f'Cannot restore a {type(model).__name__} ({model.stage_sizes} blocks, '
                     f'widths {model.widths}) from {path}: {e}') from e
  return {kind: restored[kind] for kind in ('params', 'batch_stats')}
