"""A run's plan: the config, validated, resolved once into frozen records.

`resolve` reads the config top to bottom (validation, the data, the platform's choices, the
networks and their pairing) and returns a `Plan`; everything below `experiment` takes the plan
or its parts, never the ConfigDict.
"""

import copy
import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from fsp_jax import data, device_data, logs, methods, models, pairing, sources, validation
from fsp_jax import workdir
from fsp_jax.adapters import Student
from fsp_jax.errors import ConfigError, PairingError
from fsp_jax.terms import Phase


@dataclasses.dataclass(frozen=True)
class Loop:
  """What training and evaluation read: batches, seeds, optimizer, periods."""
  batch_size: int       # Global: over all devices and hosts.
  eval_batch_size: int
  seed: int
  weight_decay: float
  momentum: float
  log_every: int
  eval_every: int       # 0: only at the end.
  checkpoint_every: int
  keep_checkpoints: int
  steps_per_call: int
  image_size: int

  def seed_of(self, net: int) -> int:
    """Net `net`'s initialisation's and data order's seed: net k of every method shares it."""
    return self.seed + net - 1


@dataclasses.dataclass(frozen=True, eq=False)
class Row:
  """A method resolved: the network it trains (`network`, named `model`), its phases, its
  settings (JSON: its nets' checkpoints belong to them), and whether it reads the teacher."""
  method: methods.Method
  phases: tuple[Phase, ...]
  settings: dict
  model: str
  network: Student
  uses_teacher: bool
  keeps_teacher_head: bool = False  # It starts from a teacher of the data set's own classes.

  @property
  def name(self) -> str:
    return self.method.name

  @property
  def iterations(self) -> int:
    return sum(phase.steps for phase in self.phases)

  @property
  def learns_fsp_first(self) -> bool:
    """Whether its first stage learns the teacher's FSP matrices: the run then saves the
    student's matrices before and after it, for the report."""
    return self.phases[0].compares_fsp

  @property
  def cached_fsp(self) -> bool:
    return any(phase.cached_fsp for phase in self.phases)


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """The teacher: its network, its checkpoint ('': trained here, as `row`, num_nets times),
  whether any row needs it, and its classes (0: the data set's)."""
  network: Student
  model: str
  checkpoint: str
  num_classes: int
  num_nets: int
  needed: bool
  row: Row


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Everything a run does, resolved from its config."""
  rows: tuple[Row, ...]
  teacher: Teacher
  student: Student       # The student's network alone (what evaluation runs).
  student_model: str
  loop: Loop
  train: Any             # The sources of the training and test splits.
  test: Any
  preprocess: data.Preprocess
  on_device: bool
  workers: int
  dtype: str
  num_nets: int
  config_json: str       # The resolved config, as the workdir records it.

  @property
  def cached_fsp(self) -> bool:
    """Whether a row's phase reads the teacher's cached FSP matrices."""
    return any(row.cached_fsp for row in self.rows)

  @property
  def evaluated(self) -> dict[str, Student]:
    """The networks evaluated, by name: the teacher where needed or trained, the student where
    a row trains it."""
    found = {f'teacher ({self.teacher.model})': self.teacher.network} if (
        self.teacher.needed or any(r.method.network == 'teacher' for r in self.rows)) else {}
    if any(r.method.network != 'teacher' for r in self.rows):
      found[f'student ({self.student_model})'] = self.student
    return found


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, dtype: str):
  return models.get(model_config.model, num_classes, model_config.width, axis_name='batch',
                    dtype=np.dtype(dtype))


def build_student(method: methods.Method, config: ml_collections.ConfigDict, num_classes: int,
                  teacher: Student) -> Student:
  """The network a method trains, with what it adds to the student (FitNet's regressor,
  channel adapters). Raises PairingError, before anything is compiled, when it cannot be
  paired with the teacher."""
  if method.network == 'teacher':
    return Student(build_model(config.teacher, num_classes, config.dtype))
  backbone = build_model(config.student, num_classes, config.dtype)
  if not method.uses_teacher(config):
    return Student(backbone)
  size = config.data.image_size
  mine = pairing.features_of(Student(backbone), size)
  theirs = pairing.features_of(teacher, size)
  try:
    return method.student(config, backbone, mine, theirs)
  except ConfigError:
    raise
  except ValueError as e:
    raise PairingError(f'config.student.model={config.student.model!r} (width '
                       f'{config.student.width}) cannot be paired with config.teacher.model='
                       f'{config.teacher.model!r} (width {config.teacher.width}) for method '
                       f'{method.name!r}: {e}') from e


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
        phase.steps for method in validation.trained(config) for phase in method.phases(config)]
    config.steps_per_call = 1 if platform == 'cpu' else next(
        k for k in (8, 4, 2, 1) if all(p % k == 0 for p in periods))
    why = ('a CPU, where XLA runs convolution gradients in a loop about 20x slower' if
           platform == 'cpu' else 'the largest of 8, 4, 2 that divides the log, eval and '
           'checkpoint periods and every phase')
    said.append(f'steps_per_call={config.steps_per_call} ({why})')
  return config, f'Chosen for this platform ({platform}): {"; ".join(said)}.'


def settings(method: methods.Method, config: ml_collections.ConfigDict,
             phases: tuple[Phase, ...], uses_teacher: bool) -> dict:
  """Everything that decides how a method's nets train (its phases, and whether it uses the
  teacher), as JSON (every key but workdir.NEUTRAL_KEYS): a net's checkpoints belong to these
  settings (and are not resumed under others)."""
  network = dict(config[method.network].to_dict())
  if method.network == 'teacher':
    network.pop('num_nets')
  shared = {key: config[key] for key in ('batch_size', 'weight_decay', 'momentum', 'dtype',
                                         'seed')}
  data_ = {k: v for k, v in config.data.to_dict().items()
           if f'data.{k}' not in workdir.NEUTRAL_KEYS}
  teacher = {k: v for k, v in config.teacher.to_dict().items() if k != 'num_nets'} if (
      uses_teacher) else None
  phases = [{'name': p.name, 'schedule': list(p.schedule), 'max_grad_norm': p.max_grad_norm,
             'terms': [[t.name, list(t.weight), dict(t.options)] for t in p.terms]}
            for p in phases]
  return json.loads(json.dumps({'method': method.name, 'network': network, 'data': data_,
                                'teacher': teacher, 'phases': phases, **shared}))


def _row(config, method: methods.Method, network: Student) -> Row:
  """A method resolved: its phases built once, and what follows from them."""
  phases, uses_teacher = tuple(method.phases(config)), method.uses_teacher(config)
  return Row(method, phases, settings(method, config, phases, uses_teacher),
             config[method.network].model, network, uses_teacher,
             keeps_teacher_head=not config.teacher.num_classes)


def _data(config: ml_collections.ConfigDict):
  """The splits' sources, checked against the config, and the preprocessing; says what they
  are."""
  train = sources.get_source(config.data, config.data.train_split)
  test = sources.get_source(config.data, config.data.eval_split)
  validation.validate_data(config, train, test)
  preprocess = data.get_preprocess(config.data)
  for split, source in ((config.data.train_split, train), (config.data.eval_split, test)):
    logs.say(f'Data, {split} split: {sources.describe(source)}.')
  logs.say(f'Images: {preprocess.describe()}.')
  return train, test, preprocess


def resolve(config: ml_collections.ConfigDict) -> Plan:
  """The config's plan. Raises ConfigError naming the first bad key, or PairingError for a
  student that does not fit the teacher, before anything is compiled."""
  validation.validate(config)
  train, test, preprocess = _data(config)
  config, chosen_line = platform_defaults(config, train, preprocess)
  if chosen_line:
    logs.say(chosen_line)
  chosen = [methods.get(name) for name in validation.method_list(config)]
  classes, c = train.num_classes, config
  teacher = Student(build_model(c.teacher, c.teacher.num_classes or classes, c.dtype))
  rows = tuple(_row(c, m, build_student(m, c, classes, teacher)) for m in chosen)
  needed = not chosen or any(row.uses_teacher for row in rows)
  return Plan(
      rows=rows,
      teacher=Teacher(teacher, c.teacher.model, c.teacher.checkpoint, c.teacher.num_classes,
                      c.teacher.num_nets, needed, _row(c, methods.TEACHER, teacher)),
      student=Student(build_model(c.student, classes, c.dtype)), student_model=c.student.model,
      loop=Loop(c.batch_size, c.eval_batch_size, c.seed, c.weight_decay, c.momentum,
                c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints,
                c.steps_per_call, c.data.image_size),
      train=train, test=test, preprocess=preprocess, on_device=c.data.on_device,
      workers=c.data.workers, dtype=c.dtype, num_nets=c.num_nets,
      config_json=c.to_json_best_effort(indent=1))
