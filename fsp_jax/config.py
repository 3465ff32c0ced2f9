"""Experiment configuration: defaults and validation.

Experiment files in experiments/configs start from `default()` and override what differs.
Each method's section (config.fsp, config.fitnet, ...) comes from its record in `methods`.
`validate` checks every key before anything is compiled, naming the key and what it accepts.
"""

import os

import jax
import ml_collections

from fsp_jax import data, methods, models, schedules, sources
from fsp_jax.schedules import schedule

DTYPES = ('float32', 'bfloat16')
NORMALIZATIONS = ('cifar', 'imagenet')


def default() -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe with ResNet-26 teacher and student (Table 1)."""
  c = ml_collections.ConfigDict()
  c.methods = 'scratch,fsp'     # Comma-separated rows after the teacher's; '': teacher only.
  c.num_nets = 3                # Students per method (Net 1..3 and their ensemble).
  c.seed = 0                    # Net k of every method uses seed + k - 1: paired rows.
  c.batch_size = 128            # Global: over all devices and hosts.
  c.eval_batch_size = 512
  c.weight_decay = 1e-4
  c.momentum = 0.9
  c.dtype = 'float32'           # Computation dtype; parameters stay float32.
  c.log_every = 100
  c.eval_every = 2000           # Test accuracy during training (0: only at the end).
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'       # cifar10, cifar100, caltech_birds2011, folder, cub, digits.
  c.data.root = ''              # For folder and cub.
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # For TFDS.
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.augment = 'cifar'      # cifar, crop_flip or none.
  c.data.normalize = 'cifar'    # cifar or imagenet statistics.
  c.data.workers = 0            # grain worker processes (0: threads of the training process).
  # For data.name='folder' only: a subset of class folders, and the first images of each
  # class of the training split.
  c.data.classes = ml_collections.FieldReference(None, field_type=tuple)
  c.data.max_per_class = ml_collections.FieldReference(None, field_type=int)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = 'resnet26'
  c.teacher.width = 1
  c.teacher.checkpoint = ''     # Orbax {'params', 'batch_stats'}; empty: train it first.
  c.teacher.num_classes = 0     # Outputs of a checkpointed teacher; 0: the data set's.
  c.teacher.num_nets = 3        # Teachers trained when there is no checkpoint.
  c.teacher.schedule = schedule((0.1, 0.01, 0.001), (32_000, 48_000, 64_000))

  c.student = ml_collections.ConfigDict()
  c.student.model = 'resnet26'
  c.student.width = 1
  c.student.adapter = False     # Learned 1x1 conv + BN where stage widths differ.

  for method in methods.METHODS.values():
    if method.section:
      c[method.section] = method.defaults()
  return c


def method_list(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in config.methods.split(',') if m.strip()]


def _fail(key: str, message: str):
  raise ValueError(f'config.{key}: {message}')


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def _integer(config, key: str, low: int) -> None:
  value = _get(config, key)
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    _fail(key, f'expected an integer >= {low}, got {value!r}.')


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
  """Checks every key: types, ranges, names, paths, divisibility; raises ValueError naming it."""
  unknown = [m for m in method_list(config) if m not in methods.METHODS]
  if unknown:
    _fail('methods', f'unknown {unknown}; expected a comma-separated list of '
          f'{", ".join(methods.METHODS)}, or nothing to train the teacher only.')
  for key in ('num_nets', 'teacher.num_nets', 'batch_size', 'eval_batch_size', 'log_every',
              'checkpoint_every', 'keep_checkpoints', 'teacher.width', 'student.width',
              'data.image_size'):
    _integer(config, key, 1)
  for key in ('seed', 'eval_every', 'teacher.num_classes'):
    _integer(config, key, 0)
  if config.dtype not in DTYPES:
    _fail('dtype', f'unknown {config.dtype!r}; expected one of {", ".join(DTYPES)}.')
  for key in ('weight_decay', 'momentum'):
    value = _get(config, key)
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
      _fail(key, f'expected a number in [0, 1), got {value!r}.')
  for key, sched in schedules.find(config).items():
    schedules.validate(key, sched)
  for method in methods.METHODS.values():
    if method.check:
      method.check(config)
  if not isinstance(config.student.adapter, bool):
    _fail('student.adapter', f'expected True or False, got {config.student.adapter!r}.')
  uses_fsp = any(term.name == 'fsp' for name in method_list(config)
                 for phase in methods.METHODS[name].phases(config) for term in phase.terms)
  for key in ('teacher.model', 'student.model'):
    try:
      sizes = _stage_sizes(_get(config, key), config.data.image_size)
    except ValueError as e:
      _fail(key, str(e))
    if uses_fsp and any(size % 2 and size > 1 for size in sizes[:-1]):
      _fail('data.image_size', f'{config.data.image_size} gives {key}={_get(config, key)!r} '
            f'feature maps of {sizes} pixels at its stages: each stage halves the size, and '
            'FSP pairs a stage\'s input with its output, so every size but the last must be '
            'even (for example, a multiple of 32).')
  _validate_data(config.data)
  if config.teacher.checkpoint and not os.path.isdir(config.teacher.checkpoint):
    _fail('teacher.checkpoint', f'{config.teacher.checkpoint!r} does not exist; give an Orbax '
          'checkpoint of {params, batch_stats}, or leave it empty to train the teacher first.')
  for key in ('batch_size', 'eval_batch_size'):
    devices = jax.device_count()
    if _get(config, key) % devices:
      _fail(key, f'{_get(config, key)} is not divisible by the {devices} devices '
            f'({jax.process_count()} hosts x {jax.local_device_count()} local devices).')
  if config.teacher.num_classes:
    if not config.teacher.checkpoint:
      _fail('teacher.num_classes', 'only a teacher loaded from config.teacher.checkpoint may '
            'have its own classes: give the checkpoint (python -m fsp_jax.convert makes one from '
            'torchvision weights), or use 0 to train the teacher here on the data set.')
    uses_logits = [m for m in method_list(config)
                   if m == 'kd' or (m == 'fitnet' and any(config.fitnet.kd_weight))]
    if uses_logits:
      _fail('teacher.num_classes', f'methods {uses_logits} distill the teacher\'s logits, which '
            'need the data set\'s classes; set teacher.num_classes=0 or '
            'fitnet.kd_weight=(0.0, 0.0).')


def _validate_data(c: ml_collections.ConfigDict) -> None:
  if c.name not in sources.SOURCES:
    _fail('data.name', f'unknown data set {c.name!r}; expected one of '
          f'{", ".join(sources.SOURCES)}.')
  if c.augment not in data.AUGMENTATIONS:
    _fail('data.augment', f'unknown {c.augment!r}; expected one of '
          f'{", ".join(data.AUGMENTATIONS)}.')
  if c.normalize not in NORMALIZATIONS:
    _fail('data.normalize', f'unknown {c.normalize!r}; expected one of '
          f'{", ".join(NORMALIZATIONS)}.')
  for key in ('train_split', 'eval_split'):
    if not isinstance(c[key], str) or not c[key]:
      _fail(f'data.{key}', f'expected a split name, got {c[key]!r}.')
  if c.name == 'digits' and c.image_size % 8:
    _fail('data.image_size', f'the digits are 8x8 images upsampled by a whole factor: expected '
          f'a multiple of 8, got {c.image_size}.')
  if c.name in ('folder', 'cub') and not os.path.isdir(c.root):
    _fail('data.root', f'folder {c.root!r} does not exist (needed by data.name={c.name!r}).')
  for key in ('classes', 'max_per_class'):
    if c[key] is not None and c.name != 'folder':
      _fail(f'data.{key}', f'applies to data.name=\'folder\' only, not {c.name!r}; remove it.')
  if c.classes is not None and (not c.classes or any(
      not isinstance(name, str) or not name for name in c.classes)):
    _fail('data.classes', f'expected a tuple of class folder names, got {c.classes!r}.')
  if not isinstance(c.workers, int) or c.workers < 0:
    _fail('data.workers', f'expected an integer >= 0 (worker processes), got {c.workers!r}.')
  if c.max_per_class is not None and (not isinstance(c.max_per_class, int)
                                      or c.max_per_class < 1):
    _fail('data.max_per_class', f'expected an integer >= 1 (or None: all images), got '
          f'{c.max_per_class!r}.')


def validate_data(config: ml_collections.ConfigDict, train_source, eval_source) -> None:
  """Checks the config against the data it names (sources already built)."""
  if eval_source.num_classes != train_source.num_classes:
    _fail('data', f'the {config.data.eval_split!r} split has {eval_source.num_classes} classes, '
          f'{config.data.train_split!r} has {train_source.num_classes}.')
  if config.batch_size > len(train_source):
    _fail('batch_size', f'{config.batch_size} exceeds the {len(train_source)} examples of the '
          f'{config.data.train_split!r} split.')
