"""Checkpoints of a training phase: the train state and the run's history, saved together.

One Orbax composite checkpoint per saved step holds 'state' (the TrainState) and 'history'
(the run's curves so far, JSON), so a resumed run continues both from the same step. A
checkpoint that cannot be read is reported in one line, moved aside as `<step>.corrupt`
(never deleted) and the previous one used; saving then goes on at once.

`save` writes host arrays in a background thread while training goes on, one save at a time;
`wait` returns once the save in flight is committed and raises its error. A checkpoint is
committed atomically (Orbax writes a temporary folder and renames it), so a process killed
during a save keeps the checkpoint before it.
"""

import concurrent.futures
import contextlib
import gc
import io
import logging
import os
import time
import traceback

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fsp_jax import layout, logs
from fsp_jax.errors import first_line


# Seconds a failed save waits, its stderr in the debug log, for the writes it left in flight.
_SETTLE_S = 1.0


class _DebugLog(io.TextIOBase):
  """A stderr whose lines go to the debug log."""

  def write(self, text: str) -> int:
    if text.strip():
      logging.getLogger(__name__).debug(text.rstrip())
    return len(text)


@contextlib.contextmanager
def _quiet():
  """Silences Orbax's, TensorStore's and asyncio's loggers (a corrupt file makes them print
  thousands of lines), and sends stderr to the debug log: after a failed write TensorStore's
  threads print a traceback for each write still in flight, into the event loop that Orbax
  has closed. `--verbosity=1` keeps them all."""
  if logging.getLogger().isEnabledFor(logging.INFO):
    yield
    return
  names = ('absl', 'asyncio', 'orbax', 'tensorstore', 'concurrent.futures')
  levels = {name: logging.getLogger(name).level for name in names}
  for name in names:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    with contextlib.redirect_stderr(_DebugLog()):
      yield
  finally:
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)


def _release(error: BaseException) -> None:
  """Drops the locals of the frames that an error (and its causes) passed through, keeping its
  traceback's lines, and collects what they held: the asyncio futures of the writes that failed
  beside it, which log "Future exception was never retrieved" when collected. Called while
  quiet, so that they are not collected later, at the run's exit, into its one-line error."""
  while error is not None:
    traceback.clear_frames(error.__traceback__)
    error = error.__cause__ or error.__context__
  gc.collect()


class WriteError(RuntimeError):
  """A checkpoint or result that could not be written (a full disk, a read-only folder)."""


@contextlib.contextmanager
def writing(path: str, intact: str):
  """Reports a file that cannot be written (a full disk, a read-only folder) as one WriteError
  naming it and what is intact; the traceback stays with --verbosity."""
  try:
    with _quiet():
      yield
  except (OSError, ValueError) as e:  # Orbax reports an OSError as a ValueError.
    cause = first_line(e)
    raise WriteError(f'{path} could not be written: {cause}; {intact}. Free space (or fix the '
                     'folder) and run the same command again.') from e


class PhaseCheckpoints:
  """The checkpoints of one phase of one run, in `directory/<step>`."""

  def __init__(self, directory: str, keep: int, where: str):
    self.directory, self.keep, self.where = os.path.abspath(directory), keep, where
    self.manager = self._open()
    self.step = 0  # The last good checkpoint's step: restored or saved (0: none).
    self._writer = concurrent.futures.ThreadPoolExecutor(1, f'save {where}')
    self._in_flight = None  # The future of the save being written.

  @property
  def last_good(self) -> str:
    """Where a rerun would resume this phase from, in words (once the save in flight ends)."""
    if self._in_flight:
      concurrent.futures.wait([self._in_flight])
    return (f'the last good checkpoint is step {self.step} in {self.directory}' if self.step
            else 'no checkpoint of this phase was saved yet')

  def _open(self) -> ocp.CheckpointManager:
    # Orbax's saves are synchronous, in our writer thread (Orbax's own asynchronous saves
    # print TensorStore's tracebacks on a full disk while the loop trains: BENCHMARKS.md,
    # 2026-12-02). With the processes named, Orbax's barriers go through JAX's coordination
    # service, safe beside the training's collectives; its default barrier is a collective,
    # which a thread must not issue beside the loop's. (Orbax then leaves creating the
    # folder to us.)
    os.makedirs(self.directory, exist_ok=True)
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=False, enable_async_checkpointing=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                active_processes=set(range(jax.process_count())))))

  def restore(self, state, history: dict):
    """(state, history, step) of the newest readable checkpoint, or the given ones and 0."""
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with _quiet():
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(state), history=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (Orbax, TensorStore, OS errors)
        cause = first_line(e, 200, '')
        self._move_aside(step)
        logs.say(f'[{self.where}] checkpoint {step} is unreadable and was moved to '
                 f'{step}.corrupt ({type(e).__name__}: {cause}); using the previous one.')
        continue
      logs.say(f'[{self.where}] resumed from step {step}')
      self.step = step
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
    """Starts writing a checkpoint of host arrays (state, history) in the background, once
    the save before it is committed (raising that one's WriteError)."""
    self.wait()
    self._in_flight = self._writer.submit(self._write, step, state, history)

  def wait(self) -> None:
    """Returns once the save in flight is committed. Raises WriteError in one line where it was
    not written (a full disk, say), naming the file and the intact checkpoint: at the same step
    on every host (the next save, a stop or the phase's end)."""
    if self._in_flight:
      in_flight, self._in_flight = self._in_flight, None
      in_flight.result()

  def _write(self, step: int, state, history: dict) -> None:
    before = self.manager.all_steps()
    try:
      with _quiet():
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))
        self.manager.wait_until_finished()
      committed = os.path.join(self.directory, str(step))  # Renamed from a temporary folder.
      if not saved or not os.path.isdir(committed):
        raise RuntimeError(f'{committed} is not there after the save')
      self.step = step
    except Exception as e:  # pylint: disable=broad-except  (Orbax, TensorStore, OS errors)
      with _quiet():  # Orbax closes its event loop at the first failed write; TensorStore's
        time.sleep(_SETTLE_S)  # other writes in flight then fail into it (see _quiet).
        _release(e)
      cause = first_line(e)
      intact = (f'checkpoint {max(before)} there is intact' if before else
                'no checkpoint of this phase was saved before')
      raise WriteError(f'[{self.where}] checkpoint {step} could not be written to '
                       f'{self.directory}: {cause}; {intact}. Free space (or fix the folder) '
                       'and run the same command again to resume.') from e

  def close(self) -> None:
    """Waits for the save in flight (its error is `wait`'s to raise) and closes."""
    self._writer.shutdown()
    self.manager.close()


def _mismatch(found: dict, expected: dict) -> str | None:
  """What first differs between a checkpoint's tree and the model's, or None: a parameter
  one has and the other lacks (another depth), then a shape (another width, or classes), then
  a dtype."""
  found, expected = layout.flat(found, '/'), layout.flat(expected, '/')
  order = lambda key: (not key.startswith('params/'), key)  # Parameters first, by name.
  missing = sorted(set(expected) - set(found), key=order)
  unexpected = sorted(set(found) - set(expected), key=order)
  if missing:
    return f'it has no {missing[0]} (the model\'s {expected[missing[0]].shape})'
  if unexpected:
    return f'it has {unexpected[0]}, which the model lacks'
  for key in sorted(expected, key=order):
    have, want = tuple(np.shape(found[key])), tuple(expected[key].shape)
    if have != want:
      if key.endswith(('head/kernel', 'head/bias')) and have[:-1] == want[:-1]:
        return (f'its classifier has {have[-1]} classes where the model has {want[-1]} '
                f'({key} {have} against {want})')
      return f'{key} is {have} there and {want} in the model'
    if np.dtype(np.asarray(found[key]).dtype) != np.dtype(expected[key].dtype):
      return f'{key} is {np.asarray(found[key]).dtype} there and {expected[key].dtype} in the model'
  return None


def load_variables(path: str, model, image_size: int) -> dict:
  """A `fsp_jax.models` network's {'params', 'batch_stats'} from an Orbax checkpoint of them
  (a finished run's model/ folder, or `python -m fsp_jax.convert`'s output). A checkpoint that
  cannot be read, or whose tree differs from the model's in any key, shape or dtype, raises
  ValueError naming the path and the first difference."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.clone(axis_name=None).init(
      jax.random.key(0), x, train=False), x)
  target = {kind: target[kind] for kind in ('params', 'batch_stats')}
  described = (f'a {type(model).__name__} of {tuple(model.stage_sizes)} blocks, widths '
               f'{tuple(model.widths)} and {model.num_classes} classes')
  if not os.path.isdir(path):
    raise ValueError(f'{path} is {"a file" if os.path.exists(path) else "absent"}; expected '
                     f'the folder of an Orbax checkpoint of {described}.')
  held = set(os.listdir(path))
  if not held or {'state', 'history'} <= held:  # Anything else: Orbax's own error, below.
    what = 'is empty' if not held else 'is a training checkpoint (a phase\'s step)'
    raise ValueError(f'{path} {what}; a teacher is a finished net\'s model folder, '
                     '<workdir>/<method>/net<k>/model, or `python -m fsp_jax.convert`\'s output.')
  try:
    with _quiet(), ocp.StandardCheckpointer() as checkpointer:
      # Host arrays, whatever devices saved it: jax.Arrays saved on one process otherwise
      # restore only where their topology is found again (not on a multi-host slice).
      saved = checkpointer.metadata(os.path.abspath(path)).item_metadata.tree
      restored = checkpointer.restore(os.path.abspath(path), jax.tree.map(
          lambda leaf: np.empty(leaf.shape, leaf.dtype), saved))
  except Exception as e:  # Orbax raises several kinds for missing or broken files.
    raise ValueError(f'{path} cannot be read as an Orbax checkpoint: {type(e).__name__}: '
                     f'{first_line(e, 300, "")}') from e
  mismatch = _mismatch({kind: restored.get(kind, {}) for kind in target}, target)
  if mismatch:
    raise ValueError(f'{path} does not hold {described}: {mismatch}.')
  return {kind: restored[kind] for kind in target}
