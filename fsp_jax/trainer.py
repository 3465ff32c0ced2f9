"""One network of a table through its phases, and the files it leaves.

A *run* trains net k (1, 2, ...) of a row: 'train' for plain training, 'stage1' then
'stage2' for FSP and FitNet (each phase's loop: `phase_loop`). Every phase checkpoints into
its folder of the workdir (see `layout`) and resumes from there; a finished run leaves
result.json, its test-set probabilities (for ensembles) and model/ (its variables, usable as a
teacher).
"""

import contextlib
import dataclasses
import datetime
import os
import time
from typing import Any

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from fsp_jax import checkpoints, data, evaluation, layout as layout_lib, logs, steps
from fsp_jax import workdir as workdir_lib
from fsp_jax.layout import Layout, NetFiles
from fsp_jax.phase_loop import History, PhaseRun, Where, report_eval, train_phase
from fsp_jax.plan import Loop, Row

SNAPSHOT_IMAGES = 256  # Test images whose mean FSP matrices a run saves for the report.


@dataclasses.dataclass(frozen=True)
class Context:
  """What every run of an experiment shares."""
  loop: Loop
  layout: Layout
  train_source: Any
  eval_source: Any
  preprocess: data.Preprocess
  feed: Any  # feed.HostFeed or feed.DeviceFeed: the training split's batches.
  placed_test: Any = None  # The test split's centre crops on the devices (data.on_device).

  def evaluate(self, model, variables, interruptible: str = ''):
    """(metrics, probabilities, labels) of a network (variables replicated) on the test
    split."""
    return evaluation.evaluate(model, variables, self.eval_source, self.preprocess,
                               self.loop.eval_batch_size, interruptible, self.placed_test)


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """Net `net` (1, 2, ...) of a row and, if it needs one, the teacher."""
  row: Row
  net: int
  teacher: Any = None            # The teacher's Student.
  teacher_variables: Any = None  # Replicated over the local devices.

  @property
  def label(self) -> str:
    return f'{self.row.name} net{self.net}'

  @property
  def student(self):
    return self.row.network

  def files(self, layout: Layout) -> NetFiles:
    return layout.net(self.row.name, self.net)


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
      run.student, jax.random.key(ctx.loop.seed_of(run.net)), ctx.loop.image_size)
  if run.row.method.starts_from_teacher:
    variables = start_from(variables, jax_utils.unreplicate(run.teacher_variables),
                           keep_head=run.row.keeps_teacher_head)
  return variables


# Batches whose statistics a random teacher's BatchNorm takes in: at momentum 0.9, 0.9**200
# (1e-9) of its initial statistics remain.
RANDOM_TEACHER_BATCHES = 200


def random_teacher(ctx: Context, run: Run):
  """The teacher's network at its initialisation, drawn from the net's seed (folded with 1, so
  that a student of the teacher's architecture does not start equal to it), its BatchNorm
  statistics set by RANDOM_TEACHER_BATCHES training batches: replicated variables whose FSP
  matrices have the scale of real features."""
  seed = ctx.loop.seed_of(run.net)
  variables = steps.replicate(jax.jit(steps.init_variables, static_argnums=(0, 2))(
      run.teacher, jax.random.fold_in(jax.random.key(seed), 1), ctx.loop.image_size))
  update = steps.make_batch_stats_step(run.teacher)
  for batch in data.train_batches(ctx.train_source, ctx.preprocess, ctx.loop.batch_size, seed,
                                  num_steps=RANDOM_TEACHER_BATCHES):
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
      layout_lib.write_json(files.settings, settings)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'claimed {files.root}')


def _train_phases(ctx: Context, run: Run, writer: logs.Writer) -> tuple[dict, History]:
  """The run's network through all its phases (snapshotting its FSP matrices around the first
  where it learns them): its final variables and history."""
  files = run.files(ctx.layout)
  variables = initial_variables(ctx, run)
  snapshot = FspSnapshot(ctx, run, variables) if run.row.learns_fsp_first else None
  phase_run = PhaseRun(ctx.loop, ctx.feed, run.student, run.teacher, run.teacher_variables,
                       lambda v: ctx.evaluate(run.student, v)[0], writer,
                       ctx.loop.seed_of(run.net))
  history, offset = History(), 0
  for k, phase in enumerate(run.row.phases):
    where = Where(f'{run.label} {phase.name}', phase.name, offset)
    variables, history = train_phase(phase_run, phase, where, files.phase(phase.name),
                                     variables, history)
    offset += phase.steps
    if snapshot and k == 0:
      snapshot.save(variables, files.fsp_matrices)
  return variables, history


def train_net(ctx: Context, run: Run) -> dict:
  """Trains a run through its phases (or finds it done), evaluates it, returns its result."""
  files = run.files(ctx.layout)
  if os.path.exists(files.result):
    return layout_lib.read_json(files.result, 'a finished net\'s result')
  _claim(files, run.row.settings, run.label)
  if run.row.method.random_teacher:
    run = dataclasses.replace(run, teacher_variables=random_teacher(ctx, run))
  iterations = run.row.iterations
  with contextlib.closing(logs.Writer(files.tensorboard)) as writer:
    variables, history = _train_phases(ctx, run, writer)
    evaluated = time.time()
    metrics, probs, labels = ctx.evaluate(run.student, steps.replicate(variables))
    history.eval.append([iterations, metrics['accuracy']])
    report_eval(run.label, iterations, metrics, writer)
  result = {'method': run.row.name, 'net': run.net, 'model': run.row.model, **metrics,
            'iterations': iterations, 'task_iterations': run.row.phases[-1].steps,
            'wall_s': history.train_s + time.time() - evaluated, 'history': history.to_json()}
  _save_net(ctx.layout, files, variables, probs, labels, result)
  return result


def _save_net(layout: Layout, files: NetFiles, variables: dict, probs, labels,
              result: dict) -> None:
  """A finished net's files: its model, test probabilities (and the labels), result.json."""
  intact = f'its last checkpoints in {files.root} are intact'
  with checkpoints.writing(files.model, intact):
    export_model(files.model, variables)
  if jax.process_index() == 0:  # The others' files are the same.
    for path, array in ((files.test_probs, probs.astype(np.float32)),
                        (layout.test_labels, labels)):
      with checkpoints.writing(path, intact):
        np.save(path, array)
    with checkpoints.writing(files.result, intact):
      layout_lib.write_json(files.result, result)
