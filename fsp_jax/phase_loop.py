"""One phase of a run: the training loop, its metrics and its checkpoints.

The loop never waits for the device between log steps: each call's metrics stay on the device
in a `Metrics` buffer, fetched every log_every steps and before every checkpoint, where a NaN
or Inf stops the run naming the step and term, before anything non-finite is saved. A
checkpoint is written in the background while the next steps run, and committed before the
next one starts, before a stop says it is saved, and before the phase returns.
"""

import dataclasses
import time
from typing import Any, Callable

from flax import jax_utils
import jax
import numpy as np
import optax

from fsp_jax import checkpoints, logs, preemption, steps
from fsp_jax.adapters import Student
from fsp_jax.feed import DeviceFeed, HostFeed
from fsp_jax.plan import Loop
from fsp_jax.terms import Phase


@dataclasses.dataclass(frozen=True)
class Every:
  """Whether a periodic action is due after `step` steps of a phase of `end` steps: every
  `period` steps (never for period 0), and at the end where `at_end`."""
  period: int
  end: int
  at_end: bool = True

  def __call__(self, step: int) -> bool:
    if step == self.end:
      return self.at_end
    return bool(self.period) and step % self.period == 0


@dataclasses.dataclass
class History:
  """A run's curves, saved with each checkpoint and in result.json."""
  train: list = dataclasses.field(default_factory=list)  # [global step, phase, loss]
  eval: list = dataclasses.field(default_factory=list)   # [global step, test accuracy]
  train_s: float = 0.0  # Training seconds, summed over every process that worked on it.

  @classmethod
  def from_json(cls, value: dict) -> 'History':
    return cls(value['train'], value['eval'], value.get('train_s', 0.0))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Where:
  """A phase of a run, as the logs name it, and the global step its step 0 is."""
  label: str     # 'fsp net1 stage1'
  phase: str     # 'stage1'
  offset: int    # Steps of the run's earlier phases.


def report_eval(where: str, step: int, metrics: dict, writer: logs.Writer) -> None:
  logs.say(f'[{where}] step {step}: test accuracy {100 * metrics["accuracy"]:.2f}%, '
           f'loss {metrics["loss"]:.4f}')
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})


def check_finite(metrics: dict[str, np.ndarray], first_step: int, where: str,
                 last_good: Callable[[], str]) -> None:
  """Stops the run, naming the step and terms and where it would resume (`last_good()`), at
  the first NaN/Inf in metrics [steps]."""
  finite = np.all([np.isfinite(v) for v in metrics.values()], axis=0)
  if not finite.all():
    i = int(np.argmin(finite))
    bad = {name: float(v[i]) for name, v in metrics.items() if not np.isfinite(v[i])}
    raise FloatingPointError(
        f'[{where}] step {first_step + i}: non-finite '
        + ', '.join(f'{k} = {v}' for k, v in bad.items())
        + f'; {last_good()}. Lower this phase\'s learning rates or check the teacher.')


class Metrics:
  """The calls' metrics [devices, k] held on the device until due: then fetched once (the
  host waits for the device there, and only there), checked, and the last step's logged."""

  def __init__(self, where: Where, progress: logs.Progress, writer: logs.Writer,
               history: History, saved: checkpoints.PhaseCheckpoints):
    self.where, self.progress, self.writer = where, progress, writer
    self.history, self.saved = history, saved
    self.pending, self.deferred = [], None

  def add(self, metrics: dict) -> None:
    """A call's metrics, once the next call is dispatched: the last call's log step, if
    deferred, is reported now, while the device runs this one."""
    if self.deferred:
      self._report(*self.deferred, log=True)
      self.deferred = None
    self.pending.append(metrics)

  def due(self, done: int, log: bool, now: bool) -> None:
    """After `done` steps: reports the pending calls now (before a checkpoint, an evaluation
    or a stop), or defers a log step until the next call is dispatched."""
    if now:
      self._report(done, self.pending, log)
    elif log:
      self.deferred = (done, self.pending)
    if now or log:
      self.pending = []

  def _report(self, done: int, pending: list[dict], log: bool) -> None:
    host = jax.device_get(pending)  # Device 0's: they are averaged over the devices.
    fetched = {name: np.concatenate([m[name][0] for m in host]) for name in host[0]}
    check_finite(fetched, done - len(fetched['loss']) + 1, self.where.label,
                 lambda: self.saved.last_good)
    if log:
      metrics = {name: float(v[-1]) for name, v in fetched.items()}
      rate = self.progress.report(done, {name: v for name, v in metrics.items() if name != 'lr'})
      step = self.where.offset + done
      self.writer.scalars(step, {**{f'{self.where.phase}/{name}': v
                                    for name, v in metrics.items()},
                                 'train/images_per_s': rate})
      self.history.train.append([step, self.where.phase, metrics['loss']])


def phase_optimizer(phase: Phase, weight_decay: float,
                    momentum: float) -> optax.GradientTransformation:
  """A phase's optimizer: its schedule and clipping, the run's weight decay and momentum."""
  return steps.optimizer(phase.schedule, weight_decay, momentum, phase.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class PhaseRun:
  """What one phase's loop reads: the plan's loop settings, the feed, the networks, the test
  split to evaluate on, the TensorBoard writer."""
  loop: Loop
  feed: HostFeed | DeviceFeed
  student: Student
  teacher: Student | None
  teacher_variables: Any   # Replicated, or None.
  evaluator: Callable[[dict], dict]  # Replicated variables -> metrics on the test split.
  writer: logs.Writer
  seed: int


def train_phase(run: PhaseRun, phase: Phase, where: Where, directory: str, variables: dict,
                history: History) -> tuple[dict, History]:
  """Trains one phase from its latest checkpoint in `directory`, or from `variables` with a
  fresh optimizer, to its end; returns the network's variables and the run's history.

  history.train_s sums the run's training seconds over every process that worked on it.
  Raises preemption.Preempted after SIGTERM or SIGINT (once a checkpoint is saved) and
  FloatingPointError on a non-finite loss or gradient (keeping the last good checkpoint).
  """
  loop = run.loop
  tx = phase_optimizer(phase, loop.weight_decay, loop.momentum)
  saved = checkpoints.PhaseCheckpoints(directory, loop.keep_checkpoints, where.label)
  try:
    state, restored, start = saved.restore(steps.fresh_state(variables, tx), history.to_json())
    history = History.from_json(restored)
    if start < phase.steps:
      state = _steps(run, phase, where, saved, steps.replicate(state), start, history, tx)
    return state.variables(), history
  finally:
    saved.close()


def _steps(run: PhaseRun, phase: Phase, where: Where, saved: checkpoints.PhaseCheckpoints,
           replicated, start: int, history: History, tx):
  """The loop from step `start` to the phase's end: the final state, on the host."""
  loop, k = run.loop, run.loop.steps_per_call
  began, spent = time.time(), history.train_s  # Earlier phases' and processes'.
  train_step = steps.make_train_step(run.student, run.teacher, phase, tx, run.feed, k)
  log_due, save_due = Every(loop.log_every, phase.steps), Every(loop.checkpoint_every,
                                                                phase.steps)
  # The end of a run is evaluated once, by the trainer.
  eval_due = Every(loop.eval_every if phase.evaluates else 0, phase.steps, at_end=False)
  inputs = run.feed.calls(loop.batch_size, run.seed, start, phase.steps, k, phase.augment)
  metrics = Metrics(where, logs.Progress(where.label, start, phase.steps, loop.batch_size),
                    run.writer, history, saved)
  for first in range(start, phase.steps, k):
    replicated, output = train_step(replicated, next(inputs), run.teacher_variables,
                                    run.feed.resident)
    metrics.add(output)
    done = first + k
    log, save, evaluates = log_due(done), save_due(done), eval_due(done)
    stop = preemption.requested(sync_point=log or save)
    metrics.due(done, log, now=save or stop or evaluates)
    if evaluates:
      result = run.evaluator(replicated.variables())
      report_eval(where.label, where.offset + done, result, run.writer)
      history.eval.append([where.offset + done, result['accuracy']])
    if save or stop:
      history.train_s = spent + time.time() - began
      run.writer.flush()  # Every checkpoint's steps are in TensorBoard.
      saved.save(done, jax.device_get(jax_utils.unreplicate(replicated)), history.to_json())
    if stop:
      saved.wait()
      raise preemption.stopped(where.label,
                               f'saved a checkpoint at step {done} in {saved.directory}')
  saved.wait()  # The phase ends with its last checkpoint committed.
  return jax.device_get(jax_utils.unreplicate(replicated))
