"""The config's checks: every key, before anything is built or compiled.

`validate` reads the config top to bottom, raising `errors.ConfigError` naming the first key
that is wrong and what it accepts; `validate_data` then checks it against the data sources it
names, once they are built.
"""

import os

import jax
import ml_collections

from fsp_jax import data, methods, models, schedules, sources
from fsp_jax.errors import fail, is_integer, is_number

DTYPES = ('float32', 'bfloat16')
NORMALIZATIONS = ('cifar', 'imagenet')

# The integer settings and their ranges: step numbers and seeds are int32 on the device; the
# upper bounds of sizes keep a mistyped value from failing late, as an allocation.
INTEGERS = {'num_nets': (1, 1000), 'teacher.num_nets': (1, 1000), 'batch_size': (1, 2**20),
            'eval_batch_size': (1, 2**20), 'log_every': (1, 2**31 - 1),
            'checkpoint_every': (1, 2**31 - 1), 'keep_checkpoints': (1, 2**31 - 1),
            'teacher.width': (1, 64), 'student.width': (1, 64),
            'data.image_size': (1, 4096), 'seed': (0, 2**31 - 1), 'eval_every': (0, 2**31 - 1),
            'teacher.num_classes': (0, 10**6)}


def method_list(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in config.methods.split(',') if m.strip()]


def get(config: ml_collections.ConfigDict, key: str):
  """The value of a dotted key ('fsp.stage1.lrs')."""
  for part in key.split('.'):
    config = config[part]
  return config


def _integer(config, key: str, low: int, high: int) -> None:
  value = get(config, key)
  if not is_integer(value) or not low <= value <= high:
    fail(key, f'expected an integer in [{low}, {high}], got {value!r}.')


def trained(config) -> list[methods.Method]:
  """The methods whose nets the run trains: the table's, and the teacher's where it has no
  checkpoint and is needed."""
  chosen = [methods.get(name) for name in method_list(config)]
  if not config.teacher.checkpoint and (not chosen or any(m.uses_teacher(config)
                                                          for m in chosen)):
    chosen.append(methods.TEACHER)
  return chosen


def _stage_sizes(name: str, image_size: int) -> list[int]:
  """The spatial size of a network's feature maps at the input of each stage, then the last
  stage's output (each stride 2 gives ceil(size / 2))."""
  net = models.get(name, num_classes=1)
  size = image_size if net.stem == 'cifar' else -(-image_size // 4)
  sizes = [size]
  for _ in net.stage_sizes[1:]:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key: types, ranges, names, paths, divisibility; raises ConfigError naming
  it."""
  _check_methods(config)
  _check_numbers(config)
  for method in methods.METHODS.values():
    if method.check:
      method.check(config)
  if not isinstance(config.student.adapter, bool):
    fail('student.adapter', f'expected True or False, got {config.student.adapter!r}.')
  _check_phases(config)
  _check_models(config)
  _check_data(config.data)
  _check_checkpoint(config)
  _check_devices(config)
  _check_teacher_classes(config)


def _check_methods(config) -> None:
  names = method_list(config)
  unknown = [m for m in names if m not in methods.METHODS]
  if unknown:
    fail('methods', f'unknown {unknown}; expected a comma-separated list of '
         f'{", ".join(methods.METHODS)}, or nothing to train the teacher only.')
  twice = sorted({m for m in names if names.count(m) > 1})
  if twice:
    fail('methods', f'names {twice} more than once; each method is one row.')


def _check_numbers(config) -> None:
  """The integers, the seeds, the periods against steps_per_call, the dtype, the optimizer's
  numbers and the schedules."""
  for key, (low, high) in INTEGERS.items():
    _integer(config, key, low, high)
  if config.seed + config.num_nets - 1 > 2**31 - 1:
    fail('seed', f'{config.seed} + {config.num_nets - 1} (net k uses seed + k - 1) exceeds '
         f'the largest seed, {2**31 - 1}.')
  if config.steps_per_call is not None:
    _integer(config, 'steps_per_call', 1, 2**16)
  k = config.steps_per_call or 1
  for key in ('log_every', 'checkpoint_every', 'eval_every'):
    if get(config, key) % k:
      fail(key, f'{get(config, key)} is not a multiple of config.steps_per_call={k}: '
           'the host acts only between calls of that many steps.')
  if config.dtype not in DTYPES:
    fail('dtype', f'unknown {config.dtype!r}; expected one of {", ".join(DTYPES)}.')
  for key in ('weight_decay', 'momentum'):
    value = get(config, key)
    if not is_number(value) or not 0 <= value < 1:
      fail(key, f'expected a number in [0, 1), got {value!r}.')
  for key, sched in schedules.find(config).items():
    schedules.validate(key, sched)


def _check_devices(config) -> None:
  for key in ('batch_size', 'eval_batch_size'):
    devices = jax.device_count()
    if get(config, key) % devices:
      fail(key, f'{get(config, key)} is not divisible by the {devices} devices '
           f'({jax.process_count()} hosts x {jax.local_device_count()} local devices).')


def _check_phases(config) -> None:
  k = config.steps_per_call or 1
  for method in trained(config):
    for phase in method.phases(config):
      if phase.steps % k:
        fail('steps_per_call', f'{k} does not divide the {phase.steps} iterations of '
             f'{method.name}\'s {phase.name} phase; make every phase a multiple of it.')


def _check_models(config) -> None:
  uses_fsp = any(method.compares_fsp(config) for method in trained(config))
  for key in ('teacher.model', 'student.model'):
    try:
      sizes = _stage_sizes(get(config, key), config.data.image_size)
    except ValueError as e:
      fail(key, str(e))
    if uses_fsp and any(size % 2 and size > 1 for size in sizes[:-1]):
      fail('data.image_size', f'{config.data.image_size} gives {key}={get(config, key)!r} '
           f'feature maps of {sizes} pixels at its stages: each stage halves the size, and '
           'FSP pairs a stage\'s input with its output, so every size but the last must be '
           'even (for example, a multiple of 32).')


def _check_checkpoint(config) -> None:
  if config.teacher.checkpoint and not os.path.isdir(config.teacher.checkpoint):
    found = 'is a file' if os.path.exists(config.teacher.checkpoint) else 'does not exist'
    fail('teacher.checkpoint', f'{config.teacher.checkpoint!r} {found}; give the folder of an '
         'Orbax checkpoint of {params, batch_stats}, or leave it empty to train the teacher '
         'first.')


def _check_teacher_classes(config) -> None:
  if config.teacher.num_classes:
    if not config.teacher.checkpoint:
      fail('teacher.num_classes', 'only a teacher loaded from config.teacher.checkpoint may '
           'have its own classes: give the checkpoint (python -m fsp_jax.convert makes one from '
           'torchvision weights), or use 0 to train the teacher here on the data set.')
    uses_logits = [m for m in method_list(config)
                   if 'logits' in methods.get(m).reads_teacher(config)]
    if uses_logits:
      fail('teacher.num_classes', f'methods {uses_logits} distill the teacher\'s logits, which '
           'need the data set\'s classes; set teacher.num_classes=0 or '
           'fitnet.kd_weight=(0.0, 0.0).')


def _check_data(c: ml_collections.ConfigDict) -> None:
  _check_names(c)
  for key in ('classes', 'max_per_class'):
    if c[key] is not None and c.name != 'folder':
      fail(f'data.{key}', f'applies to data.name=\'folder\' only, not {c.name!r}; remove it.')
  if c.classes is not None and (not c.classes or any(
      not isinstance(name, str) or not name for name in c.classes)):
    fail('data.classes', f'expected a tuple of class folder names, got {c.classes!r}.')
  if c.classes is not None and len(set(c.classes)) != len(c.classes):
    twice = sorted({name for name in c.classes if c.classes.count(name) > 1})
    fail('data.classes', f'names {twice} more than once; each class is one label.')
  if not is_integer(c.workers) or not 0 <= c.workers <= 1024:
    fail('data.workers', f'expected an integer in [0, 1024] (worker processes), got '
         f'{c.workers!r}.')
  if c.on_device is not None and not isinstance(c.on_device, bool):
    fail('data.on_device', f'expected True, False or None (the platform\'s choice), got '
         f'{c.on_device!r}.')
  if c.max_per_class is not None and (not is_integer(c.max_per_class) or c.max_per_class < 1):
    fail('data.max_per_class', f'expected an integer >= 1 (or None: all images), got '
         f'{c.max_per_class!r}.')


def _check_names(c: ml_collections.ConfigDict) -> None:
  """The data set, its augmentation and normalisation, its splits, its folder."""
  if c.name not in sources.SOURCES:
    fail('data.name', f'unknown data set {c.name!r}; expected one of '
         f'{", ".join(sources.SOURCES)}.')
  if c.augment not in data.AUGMENTATIONS:
    fail('data.augment', f'unknown {c.augment!r}; expected one of '
         f'{", ".join(data.AUGMENTATIONS)}.')
  if c.normalize not in NORMALIZATIONS:
    fail('data.normalize', f'unknown {c.normalize!r}; expected one of '
         f'{", ".join(NORMALIZATIONS)}.')
  for key in ('train_split', 'eval_split'):
    if not isinstance(c[key], str) or not c[key]:
      fail(f'data.{key}', f'expected a split name, got {c[key]!r}.')
  if c.name == 'digits' and c.image_size % 8:
    fail('data.image_size', f'the digits are 8x8 images upsampled by a whole factor: expected '
         f'a multiple of 8, got {c.image_size}.')
  if c.name in ('folder', 'cub') and not os.path.isdir(c.root):
    fail('data.root', f'folder {c.root!r} does not exist (needed by data.name={c.name!r}).')


def validate_data(config: ml_collections.ConfigDict, train_source, eval_source) -> None:
  """Checks the config against the data it names (sources already built): the splits' classes
  are the same, by name where the sources name them, and at least two."""
  train, test = config.data.train_split, config.data.eval_split
  names = train_source.class_names, eval_source.class_names
  if None not in names and names[0] != names[1]:
    only = [sorted(set(a) - set(b)) for a, b in (names, names[::-1])]
    fail('data', f'the {test!r} split\'s classes are not the {train!r} split\'s: only in '
         f'{train!r}: {only[0] or "none"}; only in {test!r}: {only[1] or "none"}'
         + ('' if any(only) else f' (in another order: {list(names[1])})') + '. Give both '
         'splits the same class folders, or list them in config.data.classes.')
  if eval_source.num_classes != train_source.num_classes:
    fail('data', f'the {test!r} split has {eval_source.num_classes} classes, {train!r} has '
         f'{train_source.num_classes}.')
  if train_source.num_classes < 2:
    fail('data', f'the {train!r} split has {train_source.num_classes} class'
         f'{"" if train_source.num_classes == 1 else "es"}; classifying needs at least two.')
  if config.batch_size > len(train_source):
    fail('batch_size', f'{config.batch_size} exceeds the {len(train_source)} examples of the '
         f'{config.data.train_split!r} split.')
