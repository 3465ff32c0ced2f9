"""An experiment: a teacher (trained here or loaded), then every row's nets, then a table.

Everything is checked (config, data, the pairing of every student with the teacher, the
teacher's checkpoint) before the workdir is bound or anything compiled. Finished runs and
phases in the workdir are reused, so an interrupted experiment resumes where it stopped.
"""

import dataclasses
import hashlib
import json
import os
import time
import zipfile

import jax
import ml_collections
import numpy as np

from fsp_jax import checkpoints, data, device_data, evaluation, logs, methods, preemption
from fsp_jax import results, sources, steps, trainer
from fsp_jax import layout as layout_lib
from fsp_jax import plan as plan_lib
from fsp_jax import workdir as workdir_lib
from fsp_jax.adapters import Student
from fsp_jax.errors import ConfigError
from fsp_jax.feed import DeviceFeed, HostFeed
from fsp_jax.layout import Layout

# The share of one device's memory that an evaluation batch's computation may take: the
# training split may hold a quarter (device_data.MAX_SHARE), the train state and XLA the rest.
EVAL_SHARE = 0.5


def check_eval_batch(eval_batch_size: int, image_size: int, networks: dict[str, Student],
                     examples: int) -> None:
  """Raises ConfigError where evaluating one of the networks ({name: network}) on one
  device's part of an evaluation batch over a split of `examples` would take more than
  EVAL_SHARE of a device's memory (of the host's, for every local CPU device together)."""
  devices = jax.device_count()
  per_device = -(-min(eval_batch_size, -(-examples // devices) * devices) // devices)
  copies, memory = device_data.copies_in_memory(), device_data.device_memory()
  for name, network in networks.items():
    need = steps.eval_bytes(network, image_size, per_device)
    if need and need * copies > EVAL_SHARE * memory:
      fits = max(1, int(per_device * EVAL_SHARE * memory / (need * copies))) * devices
      raise ConfigError('eval_batch_size', f'config.eval_batch_size={eval_batch_size}: '
                        f'evaluating the {name} on {per_device:,} images per device takes '
                        f'{need / 2**30:.2f} GiB (XLA\'s figure)'
                        f'{f" on each of {copies} devices" if copies > 1 else ""}, more than '
                        f'{EVAL_SHARE:.0%} of a device\'s {memory / 2**30:.1f} GiB; lower it to '
                        f'{fits:,} or less.')


def load_teacher(path: str, teacher: Student, image_size: int) -> dict:
  """The teacher's {'params', 'batch_stats'} from a checkpoint of its network, replicated."""
  variables = checkpoints.load_variables(path, teacher.backbone, image_size)
  return steps.replicate({kind: {'backbone': v} for kind, v in variables.items()})


def teacher_fsp_cache(teacher, variables, source, preprocess, batch_size: int,
                      placed: device_data.Placed | None = None) -> tuple:
  """The teacher's FSP matrices of every example of source, seen as in evaluation (no
  augmentation): a [N, M, N'] float32 array per stage, on every host. A signal stops it within
  a batch (preemption.Preempted). `placed`: the split on the devices (`DeviceFeed.resident`),
  where each batch is then gathered and centre-cropped.

  variables are replicated over the local devices.
  """
  matrices, _ = evaluation.predict(steps.make_fsp_step(teacher), variables, source,
                                   preprocess, batch_size, interruptible="teacher's FSP matrices",
                                   placed=placed)
  return tuple(matrices)


def _cache_key(variables, train_data: dict, preprocess: data.Preprocess, dtype: str) -> str:
  """A digest of what the teacher's cached matrices depend on: its variables (replicated), the
  training split's fingerprint, how images are taken and the computation dtype."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(variables):
    digest.update(np.asarray(leaf[0]).tobytes())
  digest.update(json.dumps([train_data, preprocess.describe(), dtype]).encode())
  return digest.hexdigest()


def _loaded_teacher(teacher: plan_lib.Teacher, image_size: int) -> dict | None:
  """The teacher's variables from config.teacher.checkpoint where a row needs them; None
  where the teacher is trained here or not needed."""
  if not (teacher.needed and teacher.checkpoint):
    return None
  try:
    return load_teacher(teacher.checkpoint, teacher.network, image_size)
  except ValueError as e:
    raise ConfigError('teacher.checkpoint', f'config.teacher.checkpoint: {e} '
                      'config.teacher.model, .width and .num_classes (0: the data set\'s '
                      'classes) describe the teacher.') from None


def _saved_teacher_fsp(ctx: trainer.Context, plan: plan_lib.Plan, variables,
                       train_data: dict) -> tuple:
  """teacher_fsp_cache, read from the workdir where a run computed it from the same teacher,
  training images and dtype; otherwise computed, then saved there by process 0 so that a
  resumed run does not compute it again."""
  path, key, start = ctx.layout.teacher_fsp, _cache_key(
      variables, train_data, ctx.preprocess, plan.dtype), time.time()
  if os.path.exists(path):
    try:
      with np.load(path) as saved:
        if str(saved['key']) == key:
          logs.say(f"Read the teacher's FSP matrices of {len(ctx.train_source)} training "
                   f'images from {path}.')
          return tuple(saved[f'stage{i}'] for i in range(len(saved.files) - 1))
      logs.say(f'{path} holds the matrices of another teacher, training split or dtype: '
               'computing them anew.')
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      logs.say(f'{path} cannot be read ({e}): computing the matrices anew.')
  cache = teacher_fsp_cache(plan.teacher.network, variables, ctx.train_source, ctx.preprocess,
                            ctx.loop.eval_batch_size, ctx.feed.resident)
  logs.say(f"Cached the teacher's FSP matrices of {len(ctx.train_source)} training images in "
           f'{logs.duration(time.time() - start)} ({sum(g.nbytes for g in cache) / 2**20:.0f} '
           f'MiB, saved in {path}).')
  if jax.process_index() == 0:
    with checkpoints.writing(path, 'nothing else was changed'):
      with layout_lib.whole(path, 'wb') as f:
        np.savez(f, key=key, **{f'stage{i}': g for i, g in enumerate(cache)})
  return cache


def _row(ctx: trainer.Context, row: plan_lib.Row, finished: list[dict]) -> list[dict]:
  """[The table row of finished nets] on process 0, which wrote their files; [] elsewhere."""
  if jax.process_index() != 0:
    return []
  return [results.row_of(ctx.layout, finished, row.settings, len(ctx.eval_source))]


def _teacher_row(ctx: trainer.Context, teacher: plan_lib.Teacher, variables) -> dict:
  """The row of a teacher loaded from its checkpoint: its test accuracy (process 0 saves its
  test probabilities and the labels, so that the accuracy can be recomputed)."""
  metrics, probs, labels = ctx.evaluate(teacher.network, variables,
                                        interruptible="the teacher's test accuracy")
  if jax.process_index() == 0:
    for path, array in ((ctx.layout.teacher_test_probs, probs.astype(np.float32)),
                        (ctx.layout.test_labels, labels)):
      np.save(path, array)
  return {'method': methods.TEACHER.name, 'model': teacher.model,
          'nets': [metrics['accuracy']], 'avg': metrics['accuracy'], 'ensemble': None,
          'iterations': 0, 'wall_s': 0.0}


def _teacher(ctx: trainer.Context, teacher: plan_lib.Teacher,
             loaded) -> tuple[dict | None, list]:
  """The teacher's variables (replicated; None where no row needs it) and its rows: trained
  here (teacher.num_nets nets; the first one is the teacher), or loaded and tested on the
  data set where it has the data set's classes."""
  if not teacher.needed:
    return None, []
  if loaded is None:
    runs = [trainer.Run(teacher.row, k) for k in range(1, teacher.num_nets + 1)]
    rows = _row(ctx, teacher.row, [trainer.train_net(ctx, run) for run in runs])
    return load_teacher(runs[0].files(ctx.layout).model, teacher.network,
                        ctx.loop.image_size), rows
  return loaded, [] if teacher.num_classes else [_teacher_row(ctx, teacher, loaded)]


def _context(plan: plan_lib.Plan, layout: Layout, stored) -> trainer.Context:
  """What every run shares; with data.on_device, the splits placed on the devices."""
  feed = DeviceFeed.place(stored, plan.preprocess) if plan.on_device else HostFeed(
      plan.train, plan.preprocess, plan.workers)
  placed_test = device_data.place(*device_data.centre_crops(
      plan.test, plan.preprocess)) if plan.on_device else None
  return trainer.Context(plan.loop, layout, plan.train, plan.test, plan.preprocess, feed,
                         placed_test)


def _runs(plan: plan_lib.Plan, row: plan_lib.Row, teacher_variables) -> list[trainer.Run]:
  teacher = (plan.teacher.network, teacher_variables) if row.uses_teacher else (None, None)
  return [trainer.Run(row, k, *teacher) for k in range(1, plan.num_nets + 1)]


def _bind(plan: plan_lib.Plan, workdir: str, allow_config_change: bool) -> dict:
  """Binds the workdir to the plan's config and data; returns the splits' fingerprints."""
  workdir_lib.bind_config(workdir, plan.config_json, allow_config_change)
  fingerprints = {'train': sources.fingerprint(plan.train),
                  'test': sources.fingerprint(plan.test)}
  workdir_lib.bind_data(workdir, fingerprints, allow_config_change)
  if plan.loop.steps_per_call > 1 and jax.default_backend() == 'cpu':
    logs.say(f'Note: config.steps_per_call={plan.loop.steps_per_call} runs the steps of a call '
             'in a loop, whose convolution gradients XLA:CPU runs about 20x slower '
             '(jax-ml/jax#12868); it is meant for GPUs and TPUs.')
  return fingerprints


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> list[dict]:
  """Runs an experiment; returns the table's rows (process 0 also writes results.md and
  results.json into workdir; other processes return []). Several hosts must share the
  workdir's file system.

  Every input (the config, the data, each student's pairing with the teacher, the teacher's
  checkpoint) is checked before the workdir is bound to the config or anything compiled.
  """
  plan = plan_lib.resolve(config)
  loaded = _loaded_teacher(plan.teacher, plan.loop.image_size)
  if plan.on_device:
    device_data.check_fits(plan.train, plan.preprocess, plan.test)
  layout = Layout(workdir)
  workdir_lib.create(workdir)
  # The last check, as it compiles: every network evaluated, on one device's part of a batch.
  check_eval_batch(plan.loop.eval_batch_size, plan.loop.image_size, plan.evaluated,
                   max(len(plan.test), len(plan.train) if plan.cached_fsp else 0))
  stored = device_data.stored_images(plan.train, plan.preprocess) if plan.on_device else None
  with workdir_lib.lock(workdir):
    fingerprints = _bind(plan, workdir, allow_config_change)
    preemption.install_handler()
    ctx = _context(plan, layout, stored)
    teacher_variables, rows = _teacher(ctx, plan.teacher, loaded)
    if plan.cached_fsp:
      ctx = dataclasses.replace(ctx, feed=ctx.feed.with_teacher_fsp(_saved_teacher_fsp(
          ctx, plan, teacher_variables, fingerprints['train'])))
    for row in plan.rows:
      runs = _runs(plan, row, teacher_variables)
      rows += _row(ctx, row, [trainer.train_net(ctx, run) for run in runs])
    if jax.process_index() != 0:
      return []
    table = results.write(layout, rows)
    logs.say(f'\nResults ({layout.results_md}):\n\n{table}\n')
    return rows
