"""Experiment configuration: defaults and validation.

Experiment files in experiments/configs start from `default()` and override what differs.
Each method's section (config.fsp, config.fitnet, ...) comes from its record in `methods`.
`validate` checks every key before anything is compiled, naming the key and what it accepts.
"""

import contextlib
import copy
import difflib
import importlib.util
import os
import traceback

import jax
import ml_collections

from fsp_jax import data, device_data, methods, models, schedules, sources
from fsp_jax.errors import fail
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
  # Train steps run per call of the compiled step (a lax.scan): k > 1 spares the host k - 1
  # calls on an accelerator; log_every, eval_every, checkpoint_every and every phase length
  # are then multiples of k. None: chosen for the platform (`platform_defaults`): 1 on a CPU,
  # where XLA runs the convolution gradients in a loop about 20x slower (jax-ml/jax#12868),
  # else the largest of 8, 4, 2 that divides them.
  c.steps_per_call = ml_collections.FieldReference(None, field_type=int)

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
  # The training split on every device, its batches gathered and augmented there
  # (device_data), for splits that fit in device memory; False: the host pipeline (grain);
  # None: chosen for the platform (`platform_defaults`). Either gives the same batches.
  c.data.on_device = ml_collections.FieldReference(None, field_type=bool)
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
  _refuse_bools(c)
  return c


class _Real(ml_collections.FieldReference):
  """A float setting that refuses True and False, which ml_collections would otherwise store
  as 1.0 and 0.0 (so that `max_grad_norm = False` would silently turn clipping off)."""

  def __init__(self, value: float):
    super().__init__(value, field_type=float)

  def set(self, value, type_safe=True):
    if isinstance(value, bool):
      raise TypeError(f'expected a number, got {value} (a bool, which would be read as '
                      f'{float(value)}).')
    super().set(value, type_safe)


def _refuse_bools(config: ml_collections.ConfigDict) -> None:
  """Makes every float leaf of `config` a `_Real`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _refuse_bools(value)
    elif isinstance(value, float):
      config[key] = _Real(value)


def method_list(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in config.methods.split(',') if m.strip()]


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


# The integer settings and their ranges: step numbers and seeds are int32 on the device; the
# upper bounds of sizes keep a mistyped value from failing late, as an allocation.
INTEGERS = {'num_nets': (1, 1000), 'teacher.num_nets': (1, 1000), 'batch_size': (1, 2**20),
            'eval_batch_size': (1, 2**20), 'log_every': (1, 2**31 - 1),
            'checkpoint_every': (1, 2**31 - 1), 'keep_checkpoints': (1, 2**31 - 1),
            'teacher.width': (1, 64), 'student.width': (1, 64),
            'data.image_size': (1, 4096), 'seed': (0, 2**31 - 1), 'eval_every': (0, 2**31 - 1),
            'teacher.num_classes': (0, 10**6)}


def _integer(config, key: str, low: int, high: int) -> None:
  value = _get(config, key)
  if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
    fail(key, f'expected an integer in [{low}, {high}], got {value!r}.')


def _trained(config) -> list[methods.Method]:
  """The methods whose nets the run trains: the table's, and the teacher's where it has no
  checkpoint and is needed."""
  chosen = [methods.get(name) for name in method_list(config)]
  if not config.teacher.checkpoint and (not chosen or any(m.uses_teacher(config)
                                                          for m in chosen)):
    chosen.append(methods.TEACHER)
  return chosen


def platform_defaults(config: ml_collections.ConfigDict, train_source,
                      preprocess: data.Preprocess) -> tuple[ml_collections.ConfigDict, str]:
  """A copy of config with data.on_device and steps_per_call of None (their default) chosen
  for the platform, and a line saying what was chosen and why ('' where nothing was left to
  choose). On a CPU: the host pipeline, 1 step a call. On a GPU or TPU: the training split on
  the devices where it takes at most device_data.MAX_SHARE of one device's memory (measured
  from its first image at its working size), and the largest of 8, 4, 2 steps a call that
  divides the log, eval and checkpoint periods and every phase (config already validated)."""
  if config.data.on_device is not None and config.steps_per_call is not None:
    return config, ''
  config, platform, said = copy.deepcopy(config), jax.default_backend(), []
  if config.data.on_device is None:
    (size, _), memory = (device_data.split_bytes(train_source, preprocess),
                         device_data.device_memory())
    config.data.on_device = platform != 'cpu' and size <= device_data.MAX_SHARE * memory
    why = ('a CPU' if platform == 'cpu' else
           f'the training split at its working size is {size / 2**30:.2f} GiB, '
           f'{"within" if config.data.on_device else "more than"} '
           f'{device_data.MAX_SHARE:.0%} of a device\'s {memory / 2**30:.1f} GiB')
    said.append(f'data.on_device={config.data.on_device} ({why})')
  if config.steps_per_call is None:
    periods = [config.log_every, config.checkpoint_every, config.eval_every] + [
        phase.steps for method in _trained(config) for phase in method.phases(config)]
    config.steps_per_call = 1 if platform == 'cpu' else next(
        k for k in (8, 4, 2, 1) if all(p % k == 0 for p in periods))
    why = ('a CPU, where XLA runs convolution gradients in a loop about 20x slower' if
           platform == 'cpu' else 'the largest of 8, 4, 2 that divides the log, eval and '
           'checkpoint periods and every phase')
    said.append(f'steps_per_call={config.steps_per_call} ({why})')
  return config, f'Chosen for this platform ({platform}): {"; ".join(said)}.'


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
    fail('methods', f'unknown {unknown}; expected a comma-separated list of '
         f'{", ".join(methods.METHODS)}, or nothing to train the teacher only.')
  twice = sorted({m for m in method_list(config) if method_list(config).count(m) > 1})
  if twice:
    fail('methods', f'names {twice} more than once; each method is one row.')
  for key, (low, high) in INTEGERS.items():
    _integer(config, key, low, high)
  if config.seed + config.num_nets - 1 > 2**31 - 1:
    fail('seed', f'{config.seed} + {config.num_nets - 1} (net k uses seed + k - 1) exceeds '
         f'the largest seed, {2**31 - 1}.')
  if config.steps_per_call is not None:
    _integer(config, 'steps_per_call', 1, 2**16)
  k = config.steps_per_call or 1
  for key in ('log_every', 'checkpoint_every', 'eval_every'):
    if _get(config, key) % k:
      fail(key, f'{_get(config, key)} is not a multiple of config.steps_per_call={k}: '
           'the host acts only between calls of that many steps.')
  if config.dtype not in DTYPES:
    fail('dtype', f'unknown {config.dtype!r}; expected one of {", ".join(DTYPES)}.')
  for key in ('weight_decay', 'momentum'):
    value = _get(config, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
      fail(key, f'expected a number in [0, 1), got {value!r}.')
  for key, sched in schedules.find(config).items():
    schedules.validate(key, sched)
  for method in methods.METHODS.values():
    if method.check:
      method.check(config)
  if not isinstance(config.student.adapter, bool):
    fail('student.adapter', f'expected True or False, got {config.student.adapter!r}.')
  chosen = _trained(config)
  for method in chosen:
    for phase in method.phases(config):
      if phase.steps % k:
        fail('steps_per_call', f'{k} does not divide the {phase.steps} iterations of '
             f'{method.name}\'s {phase.name} phase; make every phase a multiple of it.')
  uses_fsp = any(method.compares_fsp(config) for method in chosen)
  for key in ('teacher.model', 'student.model'):
    try:
      sizes = _stage_sizes(_get(config, key), config.data.image_size)
    except ValueError as e:
      fail(key, str(e))
    if uses_fsp and any(size % 2 and size > 1 for size in sizes[:-1]):
      fail('data.image_size', f'{config.data.image_size} gives {key}={_get(config, key)!r} '
           f'feature maps of {sizes} pixels at its stages: each stage halves the size, and '
           'FSP pairs a stage\'s input with its output, so every size but the last must be '
           'even (for example, a multiple of 32).')
  _validate_data(config.data)
  if config.teacher.checkpoint and not os.path.isdir(config.teacher.checkpoint):
    found = 'is a file' if os.path.exists(config.teacher.checkpoint) else 'does not exist'
    fail('teacher.checkpoint', f'{config.teacher.checkpoint!r} {found}; give the folder of an '
         'Orbax checkpoint of {params, batch_stats}, or leave it empty to train the teacher '
         'first.')
  for key in ('batch_size', 'eval_batch_size'):
    devices = jax.device_count()
    if _get(config, key) % devices:
      fail(key, f'{_get(config, key)} is not divisible by the {devices} devices '
           f'({jax.process_count()} hosts x {jax.local_device_count()} local devices).')
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


def _validate_data(c: ml_collections.ConfigDict) -> None:
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
  for key in ('classes', 'max_per_class'):
    if c[key] is not None and c.name != 'folder':
      fail(f'data.{key}', f'applies to data.name=\'folder\' only, not {c.name!r}; remove it.')
  if c.classes is not None and (not c.classes or any(
      not isinstance(name, str) or not name for name in c.classes)):
    fail('data.classes', f'expected a tuple of class folder names, got {c.classes!r}.')
  if c.classes is not None and len(set(c.classes)) != len(c.classes):
    twice = sorted({name for name in c.classes if c.classes.count(name) > 1})
    fail('data.classes', f'names {twice} more than once; each class is one label.')
  if not isinstance(c.workers, int) or isinstance(c.workers, bool) or not 0 <= c.workers <= 1024:
    fail('data.workers', f'expected an integer in [0, 1024] (worker processes), got '
         f'{c.workers!r}.')
  if c.on_device is not None and not isinstance(c.on_device, bool):
    fail('data.on_device', f'expected True, False or None (the platform\'s choice), got '
         f'{c.on_device!r}.')
  if c.max_per_class is not None and (not isinstance(c.max_per_class, int) or isinstance(
      c.max_per_class, bool) or c.max_per_class < 1):
    fail('data.max_per_class', f'expected an integer >= 1 (or None: all images), got '
         f'{c.max_per_class!r}.')


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


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file named 'path' or 'path:arg'; a file that fails to load
  raises ValueError in one line: the file, the line, the error."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: no such config file.')
  module_spec = importlib.util.spec_from_file_location('fsp_jax_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  with _reported(path):
    module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'{path}: defines no get_config(); a config file returns its '
                     'ml_collections.ConfigDict from get_config(arg=None).')
  with _reported(path):
    config = module.get_config(*([arg] if arg else []))
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'{path}: get_config() returned a {type(config).__name__}, expected an '
                     'ml_collections.ConfigDict (start from fsp_jax.config.default()).')
  return config


@contextlib.contextmanager
def _reported(path: str):
  """Whatever running the config file at path raises, as a ValueError in one line: the file,
  the line, the error."""
  try:
    yield
  except SyntaxError as e:
    raise ValueError(f'{e.filename}, line {e.lineno}: SyntaxError: {e.msg}') from None
  except ValueError as e:
    raise ValueError(f'{path}{_line_in(path, e)}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (whatever the file raised)
    raise ValueError(f'{path}{_line_in(path, e)}: {type(e).__name__}: {e}') from None


def _line_in(path: str, error: Exception) -> str:
  """', line N' of the last line of path that the error's traceback passed through."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  return f', line {lines[-1]}' if lines else ''


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises ValueError naming `key` (dotted, 'fsp.stage1.lrs') where the config has no such
  key, with the nearest keys it has."""
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(parts[:depth])
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=3)
      hint = (f'; did you mean {" or ".join(repr(c) for c in close)}?' if close else
              f'; {"config." + where if where else "the config"} has '
              f'{", ".join(known) if known else "no keys below it"}.')
      raise ValueError(f'the config has no key {key!r}{hint}')
    node = node[part]
