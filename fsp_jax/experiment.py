"""An experiment: a teacher (trained here or loaded), then every method's nets, then a table.

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

from fsp_jax import checkpoints
from fsp_jax import config as config_lib
from fsp_jax import data, device_data, evaluation, logs, methods, models, preemption, results
from fsp_jax import sources, steps, trainer
from fsp_jax import workdir as workdir_lib
from fsp_jax.adapters import Student
from fsp_jax.errors import ConfigError, PairingError, fail
from fsp_jax.layout import Layout


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, dtype: str):
  return models.get(model_config.model, num_classes, model_config.width, axis_name='batch',
                    dtype=np.dtype(dtype))


def build_student(method: methods.Method, config: ml_collections.ConfigDict, num_classes: int,
                  teacher: Student) -> Student:
  """The network a method trains, with what it adds to the student (FitNet's regressor,
  channel adapters). Raises ValueError, before anything is compiled, when it cannot be paired
  with the teacher."""
  if method.network == 'teacher':
    return Student(build_model(config.teacher, num_classes, config.dtype))
  backbone = build_model(config.student, num_classes, config.dtype)
  if not method.uses_teacher(config):
    return Student(backbone)
  size = config.data.image_size
  mine = methods.features_of(Student(backbone), size)
  theirs = methods.features_of(teacher, size)
  try:
    return method.student(config, backbone, mine, theirs)
  except ConfigError:
    raise
  except ValueError as e:
    raise PairingError(f'config.student.model={config.student.model!r} (width '
                       f'{config.student.width}) cannot be paired with config.teacher.model='
                       f'{config.teacher.model!r} (width {config.teacher.width}) for method '
                       f'{method.name!r}: {e}') from e


# The share of one device's memory that an evaluation batch's computation may take: the
# training split may hold a quarter (device_data.MAX_SHARE), the train state and XLA the rest.
EVAL_SHARE = 0.5


def check_eval_batch(config: ml_collections.ConfigDict, networks: dict[str, Student],
                     examples: int) -> None:
  """Raises ValueError where evaluating one of the networks ({name: network}) on one device's
  part of an evaluation batch over a split of `examples` would take more than EVAL_SHARE of a
  device's memory (of the host's, for every local CPU device together)."""
  devices = jax.device_count()
  per_device = -(-min(config.eval_batch_size, -(-examples // devices) * devices) // devices)
  copies, memory = device_data.copies_in_memory(), device_data.device_memory()
  for name, network in networks.items():
    need = steps.eval_bytes(network, config.data.image_size, per_device)
    if need and need * copies > EVAL_SHARE * memory:
      fits = max(1, int(per_device * EVAL_SHARE * memory / (need * copies))) * devices
      raise ConfigError('eval_batch_size', f'config.eval_batch_size={config.eval_batch_size}: '
                        f'evaluating the {name} on {per_device:,} images per device takes '
                        f'{need / 2**30:.2f} GiB (XLA\'s figure)'
                        f'{f" on each of {copies} devices" if copies > 1 else ""}, more than '
                        f'{EVAL_SHARE:.0%} of a device\'s {memory / 2**30:.1f} GiB; lower it to '
                        f'{fits:,} or less.')


def load_teacher(path: str, teacher: Student, image_size: int) -> dict:
  """The teacher's {'params', 'batch_stats'} from a checkpoint of its network, replicated."""
  variables = checkpoints.load_variables(path, teacher.backbone, image_size)
  return steps.replicate({kind: {'backbone': v} for kind, v in variables.items()})


def teacher_fsp_cache(teacher, variables, source, preprocess, batch_size: int) -> tuple:
  """The teacher's FSP matrices of every example of source, seen as in evaluation (no
  augmentation): a [N, M, N'] float32 array per stage, on every host. A signal stops it within
  a batch (preemption.Preempted).

  variables are replicated over the local devices.
  """
  matrices, _ = evaluation.predict(steps.make_fsp_step(teacher), variables, source,
                                   preprocess, batch_size, interruptible="teacher's FSP matrices")
  return tuple(matrices)


def _cache_key(variables, train_data: dict, preprocess: data.Preprocess, dtype: str) -> str:
  """A digest of what the teacher's cached matrices depend on: its variables (replicated), the
  training split's fingerprint, how images are taken and the computation dtype."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(variables):
    digest.update(np.asarray(leaf[0]).tobytes())
  digest.update(json.dumps([train_data, preprocess.describe(), dtype]).encode())
  return digest.hexdigest()


def _saved_teacher_fsp(ctx: trainer.Context, teacher: Student, variables,
                       train_data: dict) -> tuple:
  """teacher_fsp_cache, read from the workdir where a run computed it from the same teacher,
  training images and dtype; otherwise computed, then saved there by process 0 so that a
  resumed run does not compute it again."""
  path, key, start = ctx.layout.teacher_fsp, _cache_key(
      variables, train_data, ctx.preprocess, ctx.config.dtype), time.time()
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
  cache = teacher_fsp_cache(teacher, variables, ctx.train_source, ctx.preprocess,
                            ctx.config.eval_batch_size)
  logs.say(f"Cached the teacher's FSP matrices of {len(ctx.train_source)} training images in "
           f'{logs.duration(time.time() - start)} ({sum(g.nbytes for g in cache) / 2**20:.0f} '
           f'MiB, saved in {path}).')
  if jax.process_index() == 0:
    with checkpoints.writing(path, 'nothing else was changed'):
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, key=key, **{f'stage{i}': g for i, g in enumerate(cache)})
      os.replace(path + '.tmp', path)
  return cache


def _row(ctx: trainer.Context, method: methods.Method, finished: list[dict]) -> list[dict]:
  """[The table row of finished nets] on process 0, which wrote their files; [] elsewhere."""
  if jax.process_index() != 0:
    return []
  return [results.row_of(ctx.layout, finished, method.settings(ctx.config),
                         len(ctx.eval_source))]


def _teacher_row(ctx: trainer.Context, teacher: Student, variables) -> dict:
  """The row of a teacher loaded from its checkpoint: its test accuracy (process 0 saves its
  test probabilities and the labels, so that the accuracy can be recomputed)."""
  metrics, probs, labels = evaluation.evaluate(teacher, variables, ctx.eval_source,
                                               ctx.preprocess, ctx.config.eval_batch_size,
                                               interruptible="the teacher's test accuracy",
                                               placed=ctx.placed_test)
  if jax.process_index() == 0:
    for path, array in ((ctx.layout.teacher_test_probs, probs.astype(np.float32)),
                        (ctx.layout.test_labels, labels)):
      np.save(path, array)
  return {'method': methods.TEACHER.name, 'model': ctx.config.teacher.model,
          'nets': [metrics['accuracy']], 'avg': metrics['accuracy'], 'ensemble': None,
          'iterations': 0, 'wall_s': 0.0}


def _train_teachers(ctx: trainer.Context, teacher: Student) -> tuple[dict, list[dict]]:
  """Trains config.teacher.num_nets teachers; returns the first one's variables (replicated)
  and their row."""
  config = ctx.config
  runs = [trainer.Run(methods.TEACHER, k, config.teacher.model, teacher)
          for k in range(1, config.teacher.num_nets + 1)]
  rows = _row(ctx, methods.TEACHER, [trainer.train_net(ctx, run) for run in runs])
  return load_teacher(runs[0].files(ctx.layout).model, teacher, config.data.image_size), rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> list[dict]:
  """Runs an experiment; returns the table's rows (process 0 also writes results.md and
  results.json into workdir; other processes return []). Several hosts must share the
  workdir's file system.

  Every input (the config, the data, each student's pairing with the teacher, the teacher's
  checkpoint) is checked before the workdir is bound to the config or anything compiled.
  """
  config_lib.validate(config)
  chosen = [methods.get(name) for name in config_lib.method_list(config)]
  train_source = sources.get_source(config.data, config.data.train_split)
  eval_source = sources.get_source(config.data, config.data.eval_split)
  config_lib.validate_data(config, train_source, eval_source)
  preprocess = data.get_preprocess(config.data)
  for split, source in ((config.data.train_split, train_source),
                        (config.data.eval_split, eval_source)):
    logs.say(f'Data, {split} split: {sources.describe(source)}.')
  logs.say(f'Images: {preprocess.describe()}.')
  config, chosen_line = config_lib.platform_defaults(config, train_source, preprocess)
  if chosen_line:
    logs.say(chosen_line)
  num_classes = train_source.num_classes
  teacher = Student(build_model(config.teacher, config.teacher.num_classes or num_classes,
                                config.dtype))
  students = {m.name: build_student(m, config, num_classes, teacher) for m in chosen}
  needs_teacher = not chosen or any(m.uses_teacher(config) for m in chosen)
  teacher_variables = None
  if needs_teacher and config.teacher.checkpoint:
    try:
      teacher_variables = load_teacher(config.teacher.checkpoint, teacher,
                                       config.data.image_size)
    except ValueError as e:
      raise ConfigError('teacher.checkpoint', f'config.teacher.checkpoint: {e} '
                        'config.teacher.model, .width and .num_classes (0: the data set\'s '
                        'classes) describe the teacher.') from None
  if config.data.on_device:
    device_data.check_fits(train_source, preprocess, eval_source)
  layout = Layout(workdir)
  workdir_lib.create(workdir)
  # The last check, as it compiles: every network evaluated, on one device's part of a batch.
  evaluated = {f'teacher ({config.teacher.model})': teacher} if needs_teacher or any(
      m.network == 'teacher' for m in chosen) else {}
  if any(m.network != 'teacher' for m in chosen):
    evaluated[f'student ({config.student.model})'] = Student(
        build_model(config.student, num_classes, config.dtype))
  cached = any(phase.cached_fsp for m in chosen for phase in m.phases(config))
  check_eval_batch(config, evaluated, max(len(eval_source), len(train_source) if cached else 0))
  stored = device_data.stored_images(train_source, preprocess) if config.data.on_device else None
  with workdir_lib.lock(workdir):
    workdir_lib.bind_config(workdir, config, allow_config_change)
    fingerprints = {'train': sources.fingerprint(train_source),
                    'test': sources.fingerprint(eval_source)}
    workdir_lib.bind_data(workdir, fingerprints, allow_config_change)
    preemption.install_handler()
    if config.steps_per_call > 1 and jax.default_backend() == 'cpu':
      logs.say(f'Note: config.steps_per_call={config.steps_per_call} runs the steps of a call in '
               'a loop, whose convolution gradients XLA:CPU runs about 20x slower '
               '(jax-ml/jax#12868); it is meant for GPUs and TPUs.')
    ctx = trainer.Context(config, layout, train_source, eval_source, preprocess,
                          placed_test=device_data.place(*device_data.centre_crops(
                              eval_source, preprocess)) if config.data.on_device else None)
    rows = []
    if needs_teacher and teacher_variables is None:
      teacher_variables, rows = _train_teachers(ctx, teacher)
    elif needs_teacher and not config.teacher.num_classes:  # Other classes: no accuracy here.
      rows = [_teacher_row(ctx, teacher, teacher_variables)]
    if cached:
      ctx = dataclasses.replace(ctx, teacher_fsp=_saved_teacher_fsp(
          ctx, teacher, teacher_variables, fingerprints['train']))
    if stored is not None:
      ctx = dataclasses.replace(ctx, placed=device_data.place(*stored, ctx.teacher_fsp))
    for method in chosen:
      uses_teacher = method.uses_teacher(config)
      runs = [trainer.Run(method, k, (config.teacher if method.network == 'teacher'
                                      else config.student).model, students[method.name],
                          teacher if uses_teacher else None,
                          teacher_variables if uses_teacher else None)
              for k in range(1, config.num_nets + 1)]
      rows += _row(ctx, method, [trainer.train_net(ctx, run) for run in runs])
    if jax.process_index() != 0:
      return []
    table = results.write(layout, rows)
    logs.say(f'\nResults ({layout.results_md}):\n\n{table}\n')
    return rows
