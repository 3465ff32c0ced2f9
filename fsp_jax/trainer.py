"""One network of a table through its phases: the training loop, its checkpoints and files.

A *run* trains net k (1, 2, ...) of a method: 'train' for plain training, 'stage1' then
'stage2' for FSP and FitNet. Every phase checkpoints into its folder of the workdir (see
`layout`) and resumes from there; a finished run leaves result.json, its test-set
probabilities (for ensembles) and model/ (its variables, usable as a teacher).

The loop never waits for the device between log steps: metrics stay on the device and are
fetched every config.log_every steps and before every checkpoint, where a NaN or Inf stops the
run naming the step and term, before anything non-finite is saved.
"""

import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import time
from typing import Any

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
import optax

from fsp_jax import checkpoints, data, device_data, evaluation, logs, methods, preemption
from fsp_jax import steps
from fsp_jax import workdir as workdir_lib
from fsp_jax.adapters import Student
from fsp_jax import layout as layout_lib
from fsp_jax.layout import Layout, NetFiles
from fsp_jax.terms import Phase

SNAPSHOT_IMAGES = 256  # Test images whose mean FSP matrices a run saves for the report.
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
class Context:
  """What every run of an experiment shares."""
  config: Any
  layout: Layout
  train_source: Any
  eval_source: Any
  preprocess: data.Preprocess  # Augments when given draws (training), not in evaluation.
  teacher_fsp: tuple | None = None  # The teacher's matrices by training example (fsp.cache).
  placed: device_data.Placed | None = None  # The training split on the devices (on_device).
  placed_test: device_data.Placed | None = None  # The test split's centre crops, likewise.


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """Net `net` (1, 2, ...) of a method: its network and, if it needs one, the teacher."""
  method: methods.Method
  net: int
  model_name: str
  student: Student
  teacher: Student | None = None
  teacher_variables: Any = None  # Replicated over the local devices.

  @property
  def label(self) -> str:
    return f'{self.method.name} net{self.net}'

  def seed(self, config) -> int:
    """Its initialisation's and data order's seed: net k of every method shares it."""
    return config.seed + self.net - 1

  def files(self, layout: Layout) -> NetFiles:
    return layout.net(self.method.name, self.net)


def _report_eval(where: str, step: int, metrics: dict, writer: logs.Writer) -> None:
  logs.say(f'[{where}] step {step}: test accuracy {100 * metrics["accuracy"]:.2f}%, '
           f'loss {metrics["loss"]:.4f}')
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})


def _fetched(pending: list[dict]) -> dict[str, np.ndarray]:
  """The pending calls' metrics [devices, k] on the host, each [steps] (device 0's: they are
  averaged over the devices)."""
  host = jax.device_get(pending)
  return {name: np.concatenate([m[name][0] for m in host]) for name in host[0]}


def _check_finite(metrics: dict[str, np.ndarray], first_step: int, where: str,
                  last_saved: str) -> None:
  """Stops the run, naming the step and terms, at the first NaN/Inf in metrics [steps]."""
  finite = np.all([np.isfinite(v) for v in metrics.values()], axis=0)
  if not finite.all():
    i = int(np.argmin(finite))
    bad = {name: float(v[i]) for name, v in metrics.items() if not np.isfinite(v[i])}
    raise FloatingPointError(
        f'[{where}] step {first_step + i}: non-finite '
        + ', '.join(f'{k} = {v}' for k, v in bad.items())
        + f'; {last_saved}. Lower this phase\'s learning rates or check the teacher.')


def _host_batches(ctx: Context, run: Run, phase: Phase, start: int):
  """The host pipeline's training batches from step `start` on, sharded [devices, b, ...]."""
  preprocess, cache = ctx.preprocess, None
  if phase.cached_fsp:  # The un-augmented images the teacher's matrices were computed on.
    preprocess = functools.partial(lambda p, images, draws: p(images, None), ctx.preprocess)
    cache = ctx.teacher_fsp

  def with_teacher_fsp(batch):
    index = batch.pop('index')
    if cache is not None:
      batch['teacher_fsp'] = [g[index] for g in cache]
    return data.shard(batch, jax.local_device_count())

  batches = data.train_batches(ctx.train_source, preprocess, ctx.config.batch_size,
                               run.seed(ctx.config), start_step=start, num_steps=phase.steps,
                               workers=ctx.config.data.workers)
  return map(with_teacher_fsp, batches)


def call_inputs(ctx: Context, run: Run, phase: Phase, start: int):
  """The inputs of every call of the phase from step `start` on, on the local devices."""
  config = ctx.config
  if ctx.placed is not None:
    return _placed_once(device_data.epochs(
        ctx.preprocess, ctx.placed.images.shape[2:4], len(ctx.train_source), config.batch_size,
        run.seed(config), start, phase.steps, config.steps_per_call))
  return _on_devices(data.grouped(_host_batches(ctx, run, phase, start),
                                  config.steps_per_call), ahead=2)


def _sharded_over_local_devices() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))


def _on_devices(inputs, ahead: int):
  """Inputs [devices, ...] placed on the local devices (one device_put each, asynchronous),
  `ahead` of the call that reads them."""
  sharding, placed = _sharded_over_local_devices(), collections.deque()
  for item in inputs:
    placed.append(jax.device_put(item, sharding))
    if len(placed) > ahead:
      yield placed.popleft()
  yield from placed


def _placed_once(inputs):
  """Inputs [devices, ...] on the local devices, each object placed once however many calls
  it serves."""
  sharding, last, placed = _sharded_over_local_devices(), None, None
  for item in inputs:
    if item is not last:
      last, placed = item, jax.device_put(item, sharding)
    yield placed


def phase_optimizer(config, phase: Phase) -> optax.GradientTransformation:
  """A phase's optimizer: its schedule and clipping, the config's weight decay and momentum."""
  return steps.optimizer(phase.schedule, config.weight_decay, config.momentum,
                         phase.max_grad_norm)


def train_phase(ctx: Context, run: Run, phase: Phase, variables: dict, history: History,
                offset: int, writer: logs.Writer) -> tuple[dict, History]:
  """Trains one phase from its latest checkpoint, or from `variables` with a fresh optimizer,
  to its end; returns the network's variables and the run's history.

  offset is the number of steps of earlier phases, for global step numbers in the logs.
  history.train_s sums the run's training seconds over every process that worked on it.
  Raises preemption.Preempted after SIGTERM or SIGINT (once a checkpoint is saved) and
  FloatingPointError on a non-finite loss or gradient (keeping the last good checkpoint).
  """
  config, where = ctx.config, f'{run.label} {phase.name}'
  tx = phase_optimizer(config, phase)
  saved = checkpoints.PhaseCheckpoints(run.files(ctx.layout).phase(phase.name),
                                       config.keep_checkpoints, where)
  state, restored, start = saved.restore(steps.fresh_state(variables, tx), history.to_json())
  history = History.from_json(restored)
  if start >= phase.steps:
    saved.close()
    return state.variables(), history
  began, spent = time.time(), history.train_s  # Earlier phases' and processes'.
  last_saved = f'the last good checkpoint is step {start} in {saved.directory}' if start else \
      'no checkpoint of this phase was saved yet'
  k = config.steps_per_call
  train_step = steps.make_train_step(run.student, run.teacher, phase, tx, (
      ctx.preprocess if ctx.placed is not None else None), k)
  log_due, save_due = Every(config.log_every, phase.steps), Every(config.checkpoint_every,
                                                                  phase.steps)
  # The end of a run is evaluated once, by train_net.
  eval_due = Every(config.eval_every if phase.evaluates else 0, phase.steps, at_end=False)
  try:
    inputs = call_inputs(ctx, run, phase, start)
    replicated = steps.replicate(state)
    progress, pending, deferred = logs.Progress(where, start, phase.steps,
                                                config.batch_size), [], None

    def report(done: int, pending: list[dict], log: bool) -> None:
      """Fetches the pending calls' metrics (the host waits for the device here, and only
      here), checks them, and logs the last step's if `log`."""
      fetched = _fetched(pending)
      _check_finite(fetched, done - len(fetched['loss']) + 1, where, last_saved)
      if log:
        metrics = {name: float(v[-1]) for name, v in fetched.items()}
        rate = progress.report(done, {name: v for name, v in metrics.items() if name != 'lr'})
        writer.scalars(offset + done, {**{f'{phase.name}/{name}': v
                                          for name, v in metrics.items()},
                                       'train/images_per_s': rate})
        history.train.append([offset + done, phase.name, metrics['loss']])

    for first in range(start, phase.steps, k):
      replicated, metrics = train_step(replicated, next(inputs), run.teacher_variables,
                                       ctx.placed)
      if deferred:  # The last call's log step, reported while the device runs this call.
        report(*deferred, log=True)
        deferred = None
      pending.append(metrics)
      done = first + k
      log, save, evaluates = log_due(done), save_due(done), eval_due(done)
      stop = preemption.requested(sync_point=log or save)
      if save or stop or evaluates:
        report(done, pending, log)
        pending = []
      elif log:  # Reported after the next call is dispatched: the device never waits for it.
        deferred, pending = (done, pending), []
      if evaluates:
        result, _, _ = evaluation.evaluate(run.student, replicated.variables(),
                                           ctx.eval_source, ctx.preprocess,
                                           config.eval_batch_size, placed=ctx.placed_test)
        _report_eval(where, offset + done, result, writer)
        history.eval.append([offset + done, result['accuracy']])
      if save or stop:
        history.train_s = spent + time.time() - began
        writer.flush()  # Every checkpoint's steps are in TensorBoard.
        saved.save(done, jax.device_get(jax_utils.unreplicate(replicated)), history.to_json())
        last_saved = f'the last good checkpoint is step {done} in {saved.directory}'
      if stop:
        raise preemption.stopped(where, f'saved a checkpoint at step {done} in {saved.directory}')
  finally:
    saved.close()
  return jax.device_get(jax_utils.unreplicate(replicated)).variables(), history


def start_from(variables: dict, pretrained: dict, keep_head: bool) -> dict:
  """variables with their backbone's from `pretrained`; the classifier head too where
  keep_head (a network of the data set's own classes), else a new one."""
  params = dict(pretrained['params']['backbone'])
  if not keep_head:
    params['head'] = variables['params']['backbone']['head']
  return {'params': {**variables['params'], 'backbone': params},
          'batch_stats': {**variables['batch_stats'],
                          'backbone': pretrained['batch_stats']['backbone']}}


def initial_variables(ctx: Context, run: Run) -> dict:
  """The network's variables before its first phase: drawn from its seed, the backbone from
  the teacher's where the method starts from it."""
  variables = jax.jit(steps.init_variables, static_argnums=(0, 2))(
      run.student, jax.random.key(run.seed(ctx.config)), ctx.config.data.image_size)
  if run.method.starts_from_teacher:
    variables = start_from(variables, jax_utils.unreplicate(run.teacher_variables),
                           keep_head=not ctx.config.teacher.num_classes)
  return variables


# Batches whose statistics a random teacher's BatchNorm takes in: at momentum 0.9, 0.9**200
# (1e-9) of its initial statistics remain.
RANDOM_TEACHER_BATCHES = 200


def random_teacher(ctx: Context, run: Run):
  """The teacher's network at its initialisation, drawn from the net's seed (folded with 1, so
  that a student of the teacher's architecture does not start equal to it), its BatchNorm
  statistics set by RANDOM_TEACHER_BATCHES training batches: replicated variables whose FSP
  matrices have the scale of real features."""
  key = jax.random.fold_in(jax.random.key(run.seed(ctx.config)), 1)
  variables = steps.replicate(jax.jit(steps.init_variables, static_argnums=(0, 2))(
      run.teacher, key, ctx.config.data.image_size))
  update = steps.make_batch_stats_step(run.teacher)
  for batch in data.train_batches(ctx.train_source, ctx.preprocess, ctx.config.batch_size,
                                  run.seed(ctx.config), num_steps=RANDOM_TEACHER_BATCHES):
    variables = update(variables, data.shard({'image': batch['image']},
                                             jax.local_device_count()))
    # One call in flight: on XLA:CPU, dozens of queued calls with a cross-device mean starve
    # its collectives' rendezvous (4 fake devices on 2 cores aborted after 40 s).
    jax.block_until_ready(variables)
  return variables


class FspSnapshot:
  """The mean FSP matrices [M, N] per stage, on the first test images, of the teacher and of
  the student before and after its first stage: the report's heatmaps."""

  def __init__(self, ctx: Context, run: Run, before: dict):
    self.run = run
    self.images = next(data.eval_batches(ctx.eval_source, ctx.preprocess, SNAPSHOT_IMAGES, 0,
                                         1))['image']
    self.matrices = {
        'teacher': self._mean(run.teacher, jax_utils.unreplicate(run.teacher_variables)),
        'before': self._mean(run.student, before)}

  def _mean(self, model, variables) -> list[np.ndarray]:
    return [np.asarray(g) for g in steps.make_mean_fsp(model)(variables, self.images)]

  def save(self, after: dict, path: str) -> None:
    self.matrices['after'] = self._mean(self.run.student, after)
    if jax.process_index() == 0:
      with checkpoints.writing(path, 'the checkpoints of its first stage are intact'):
        np.savez(path, **{f'{when}_{k}': g for when, gs in self.matrices.items()
                          for k, g in enumerate(gs)})


def export_model(path: str, variables: dict) -> None:
  """Saves the network's own variables (the backbone's: no adapter or regressor) to path, an
  Orbax checkpoint that `checkpoints.load_variables` reads, as a teacher or for inference."""
  export = {kind: variables[kind]['backbone'] for kind in ('params', 'batch_stats')}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), export, force=True)
    checkpointer.wait_until_finished()


def save_json(path: str, value) -> None:
  """Process 0 writes value to path atomically (a kill never leaves half a file)."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(value, f)
    os.replace(path + '.tmp', path)


def _claim(files: NetFiles, settings: dict, label: str) -> None:
  """Makes the net's folder hold checkpoints of these settings: a folder of other settings
  (left before --allow_config_change) is moved aside, saying so, and the net starts anew."""
  if jax.process_index() == 0:
    if os.path.exists(files.settings):
      recorded = layout_lib.read_json(files.settings, 'the settings of this net\'s checkpoints')
      changes = workdir_lib.config_changes(recorded, settings)
      if changes:
        changed = ', '.join(changes)
        aside = files.replaced(f'{datetime.datetime.now():%Y%m%d-%H%M%S}')
        os.replace(files.root, aside)
        logs.say(f'[{label}] its checkpoints were made with other settings ({changed}): moved '
                 f'to {aside}; this net starts anew.')
    if not os.path.exists(files.settings):
      os.makedirs(files.root, exist_ok=True)
      save_json(files.settings, settings)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'claimed {files.root}')


def _train_phases(ctx: Context, run: Run, writer: logs.Writer) -> tuple[dict, History]:
  """The run's network through all its phases (snapshotting its FSP matrices around the first
  where it learns them): its final variables and history."""
  config, files = ctx.config, run.files(ctx.layout)
  variables = initial_variables(ctx, run)
  snapshot = FspSnapshot(ctx, run, variables) if run.method.learns_fsp_first(config) else None
  history, offset = History(), 0
  for k, phase in enumerate(run.method.phases(config)):
    variables, history = train_phase(ctx, run, phase, variables, history, offset, writer)
    offset += phase.steps
    if snapshot and k == 0:
      snapshot.save(variables, files.fsp_matrices)
  return variables, history


def train_net(ctx: Context, run: Run) -> dict:
  """Trains a run through its phases (or finds it done), evaluates it, returns its result."""
  config, files = ctx.config, run.files(ctx.layout)
  if os.path.exists(files.result):
    return layout_lib.read_json(files.result, 'a finished net\'s result')
  _claim(files, run.method.settings(config), run.label)
  if run.method.random_teacher:
    run = dataclasses.replace(run, teacher_variables=random_teacher(ctx, run))
  phases = run.method.phases(config)
  iterations = sum(phase.steps for phase in phases)
  with contextlib.closing(logs.Writer(files.tensorboard)) as writer:
    variables, history = _train_phases(ctx, run, writer)
    evaluated = time.time()
    metrics, probs, labels = evaluation.evaluate(run.student, steps.replicate(variables),
                                                 ctx.eval_source, ctx.preprocess,
                                                 config.eval_batch_size, placed=ctx.placed_test)
    history.eval.append([iterations, metrics['accuracy']])
    _report_eval(run.label, iterations, metrics, writer)
  result = {'method': run.method.name, 'net': run.net, 'model': run.model_name, **metrics,
            'iterations': iterations, 'task_iterations': phases[-1].steps,
            'wall_s': history.train_s + time.time() - evaluated, 'history': history.to_json()}
  intact = f'its last checkpoints in {files.root} are intact'
  with checkpoints.writing(files.model, intact):
    export_model(files.model, variables)
  if jax.process_index() == 0:
    for path, array in ((files.test_probs, probs.astype(np.float32)),
                        (ctx.layout.test_labels, labels)):
      with checkpoints.writing(path, intact):
        np.save(path, array)
  with checkpoints.writing(files.result, intact):
    save_json(files.result, result)
  return result
