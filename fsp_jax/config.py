"""Experiment configuration: the defaults, and reading a config file.

Experiment files in experiments/configs start from `default()` and override what differs.
Each method's section (config.fsp, config.fitnet, ...) comes from its record in `methods`.
`validation` checks every key; `plan.resolve` turns a config into what a run does.
"""

import contextlib
import difflib
import importlib.util
import os
import traceback

import ml_collections

from fsp_jax import methods
from fsp_jax.schedules import schedule


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
  # are then multiples of k. None: chosen for the platform (`plan.platform_defaults`): 1 on a CPU,
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
  # None: chosen for the platform (`plan.platform_defaults`). Either gives the same batches.
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
