"""The rows of a table: one record per method, holding everything that differs between them.

A method trains one network (the student's, or the teacher's own) through phases (`terms.Phase`:
a learning-rate schedule and weighted loss terms). Its record gives the phases, the config
section it owns (defaults and checks), what it adds to the student (FitNet's regressor, channel
adapters), whether it starts from the teacher's weights, and its label and colour in reports.
Adding a method is one record here, and its loss in `losses.py` and `terms.TERMS`.
"""

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from fsp_jax import losses, pairing, schedules
from fsp_jax.adapters import Student
from fsp_jax.errors import fail, is_integer, is_number
from fsp_jax.schedules import Schedule, schedule
from fsp_jax.terms import Phase, Term


@dataclasses.dataclass(frozen=True)
class Method:
  """Everything that makes a row of a table.

  Attributes:
    name: its key in config.methods.
    label, color: its row in tables and its colour in plots.
    phases: config -> (Phase, ...).
    network: 'student' or 'teacher': the config section naming the network it trains.
    starts_from_teacher: its network starts from the teacher's weights (with a new head).
    random_teacher: its loss terms read the teacher's network at its initialisation (net k's
      own draw, BatchNorm statistics from training images) instead of the trained teacher.
    student: (config, backbone, its features, the teacher's features) -> the Student it
      trains; raises ValueError when the pair cannot be distilled.
    section, defaults, check: the config section it owns, that section's defaults, and a
      check of it (config -> None, raising ValueError naming the key).
  """
  name: str
  label: str
  color: str
  phases: Callable[[ml_collections.ConfigDict], tuple[Phase, ...]]
  network: str = 'student'
  starts_from_teacher: bool = False
  random_teacher: bool = False
  student: Callable[..., Student] = pairing.plain
  section: str | None = None
  defaults: Callable[[], Any] | None = None
  check: Callable[[ml_collections.ConfigDict], None] | None = None

  def reads_teacher(self, config) -> set:
    """What its loss terms read of the teacher: a subset of {'logits', 'features'}."""
    return set().union(*(phase.reads_teacher for phase in self.phases(config)))

  def uses_teacher(self, config) -> bool:
    """Whether its steps read the teacher, or it starts from the teacher's weights."""
    return self.starts_from_teacher or bool(self.reads_teacher(config))

  def compares_fsp(self, config) -> bool:
    """Whether a phase compares FSP matrices (stage sizes must then halve evenly)."""
    return any(phase.compares_fsp for phase in self.phases(config))


def _train(sched, *terms, ce_weight: float = 1.0) -> tuple[Phase, ...]:
  return (Phase('train', Schedule.of(sched), (Term('ce', (ce_weight,) * 2),) + terms),)


def fsp_iterations(config) -> int:
  """FSP's iterations in all: its stage 1 and task stage."""
  return Schedule.of(config.fsp.stage1).length + Schedule.of(config.fsp.stage2).length


def stretched(phases: tuple[Phase, ...], total: int) -> tuple[Phase, ...]:
  """A one-phase method's phases with its schedule stretched (or shortened) to `total`
  iterations, its shape kept (schedules.scale)."""
  (phase,) = phases
  sched = ml_collections.ConfigDict(phase.schedule._asdict())
  schedules.scale(sched, total / phase.steps)
  return (dataclasses.replace(phase, schedule=Schedule.of(sched)),)


def matched(method: 'Method', color: str) -> 'Method':
  """`method` (of one phase) for FSP's total iterations: the control for FSP's extra
  iterations at the same budget. It reads the config section of `method`."""
  return dataclasses.replace(
      method, name=f'{method.name}_matched', label=f"{method.label}, FSP's #Iter", color=color,
      phases=lambda c: stretched(method.phases(c), fsp_iterations(c)), section=None,
      defaults=None, check=None)


def _fsp_phases(config, shuffled: bool = False, cache: bool = True) -> tuple[Phase, ...]:
  """FSP's stage 1 and task stage; `shuffled`: on permuted teacher matrices; `cache`: stage 1
  reads the trained teacher's cached matrices where config.fsp.cache says so."""
  c = config.fsp
  options = (('normalize', c.normalize), ('weights', c.stage_weights),
             ('shuffle_seed', c.shuffle_seed if shuffled else None))
  task = (Term('fsp', (c.task_weight,) * 2, options),) if c.task_weight else ()
  return (Phase('stage1', Schedule.of(c.stage1), (Term('fsp', (c.weight,) * 2, options + (
      ('cached', c.cache and cache),)),), c.max_grad_norm),
          Phase('stage2', Schedule.of(c.stage2), (Term('ce'),) + task))


def _fitnet_phases(config) -> tuple[Phase, ...]:
  c = config.fitnet
  # FitNet weighs a KL without the tau^2 of Hinton's kd_loss: divide it back out.
  start, end = (w / c.temperature**2 for w in c.kd_weight)
  kd = (Term('kd', (start, end), (('temperature', c.temperature),)),) if start or end else ()
  hint = Term('hint', (c.weight,) * 2, (('layer', c.hint), ('normalize', c.normalize)))
  return (Phase('stage1', Schedule.of(c.stage1), (hint,), c.max_grad_norm),
          Phase('stage2', Schedule.of(c.stage2), (Term('ce'),) + kd))


def _finite(value) -> bool:
  return is_number(value) and math.isfinite(value)


def _number(config, key: str, low: float, strict: bool) -> None:
  section, name = key.split('.')
  value = config[section][name]
  if not _finite(value) or not (value > low if strict else value >= low):
    fail(key, f'expected a finite number {">" if strict else ">="} {low}, got {value!r}.')


def _check_fsp(config) -> None:
  c = config.fsp
  if c.normalize not in losses.FSP_NORMALIZATIONS:
    fail('fsp.normalize', f'unknown {c.normalize!r}; expected one of '
         f'{", ".join(losses.FSP_NORMALIZATIONS)}.')
  _number(config, 'fsp.weight', 0, strict=True)
  if c.stage_weights is not None and (not isinstance(c.stage_weights, tuple) or any(
      not _finite(w) or w < 0 for w in c.stage_weights)):
    fail('fsp.stage_weights', f'expected a tuple of weights >= 0, one per FSP matrix, or None '
         f'(all equal), got {c.stage_weights!r}.')
  if not is_integer(c.shuffle_seed) or c.shuffle_seed < 0:
    fail('fsp.shuffle_seed', f'expected an integer >= 0, got {c.shuffle_seed!r}.')
  _number(config, 'fsp.task_weight', 0, strict=False)
  _number(config, 'fsp.max_grad_norm', 0, strict=False)
  if not isinstance(c.cache, bool):
    fail('fsp.cache', f'expected True or False, got {c.cache!r}.')


def _check_fitnet(config) -> None:
  _number(config, 'fitnet.temperature', 0, strict=True)
  weights = config.fitnet.kd_weight
  if len(weights) != 2 or any(not _finite(w) or w < 0 for w in weights):
    fail('fitnet.kd_weight', f'expected (start, end) weights >= 0, got {weights!r}.')
  _number(config, 'fitnet.weight', 0, strict=True)
  _number(config, 'fitnet.max_grad_norm', 0, strict=False)
  if config.fitnet.normalize not in losses.HINT_NORMALIZATIONS:
    fail('fitnet.normalize', f'unknown {config.fitnet.normalize!r}; expected one of '
         f'{", ".join(losses.HINT_NORMALIZATIONS)}.')


def _check_kd(config) -> None:
  _number(config, 'kd.temperature', 0, strict=True)
  _number(config, 'kd.weight', 0, strict=False)
  _number(config, 'kd.ce_weight', 0, strict=False)


def _fsp_defaults():
  return ml_collections.ConfigDict({
      'stage1': schedule((1e-3, 1e-4, 1e-5), (11_000, 16_000, 21_000)),
      'stage2': schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000)),
      # The stage-1 loss is weight * losses.fsp_l2: with the 'teacher' normalisation each
      # stage's term is a relative error (of order 1 at the start for most pairs), and the
      # paper's stage-1 rates are 1/100 of its task rates; 100 gives them the task's effect.
      'weight': 100.0,
      # The stage-1 gradient's global norm is clipped to this (0: not clipped): weight * 1,
      # the gradient norm of a relative error of order 1. It acts while a student is far from
      # the teacher, whose first steps would otherwise kill its units (README: the loss).
      'max_grad_norm': 100.0,
      # Relative weights of the stages, one per FSP matrix; None: all equal (the paper).
      'stage_weights': ml_collections.FieldReference(None, field_type=tuple),
      # losses.fsp_l2's normalisation: 'teacher' (each stage's relative error), 'entries' or
      # 'none' (the literal sum, whose scale differs between pairs by orders of magnitude).
      'normalize': 'teacher',
      'shuffle_seed': 0,       # Permutation of the teacher's rows and columns (fsp_shuffled).
      'task_weight': 0.0,      # Optional FSP term added to the stage-2 loss.
      # Stage 1 reads the teacher's FSP matrices, computed once per training image as the
      # paper stored them, instead of running the teacher each step; its images are then not
      # augmented.
      'cache': False})


def _fitnet_defaults():
  return ml_collections.ConfigDict({
      'hint': 'stage2_out',  # Teacher hint and student guided layer (the middle).
      'stage1': schedule((1e-4, 1e-5), (25_000, 35_000)),
      # The hint stage as FSP's stage 1: the loss a relative error ('teacher'; 'none' is
      # FitNets' literal 1/2 ||u_h - r(v_g)||^2) times 100, its gradient's norm clipped to 100,
      # so that the paper's hint rate does not kill the guided layer (README: the loss).
      'normalize': 'teacher',
      'weight': 100.0,
      'max_grad_norm': 100.0,
      'stage2': schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000)),
      'temperature': 3.0,
      # FitNet's lambda, decreased linearly over stage 2; (0, 0) for cross-entropy alone (a
      # teacher of other classes).
      'kd_weight': (4.0, 1.0)})


def _kd_defaults():
  return ml_collections.ConfigDict({
      'schedule': schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000)),
      # ce_weight * cross-entropy + weight * Hinton's tau^2-scaled KL: the weights and
      # temperature of the KD baseline in Tian et al.'s CRD benchmark (RepDistiller), which
      # follow Hinton's advice of a much lower weight on the hard targets.
      'temperature': 4.0,
      'ce_weight': 0.1,
      'weight': 0.9})


def _check_at(config) -> None:
  _number(config, 'at.weight', 0, strict=True)


def _at_defaults():
  return ml_collections.ConfigDict({
      'schedule': schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000)),
      'weight': 500.0})  # The authors' beta / 2, with beta = 1e3 and their mean over positions.


def _task_schedule():
  return schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000))


TEACHER = Method('teacher', 'Teacher', 'black', network='teacher',
                 phases=lambda c: _train(c.teacher.schedule))

_SCRATCH = Method('scratch', 'Student alone', 'tab:gray', lambda c: _train(c.scratch),
                 section='scratch', defaults=_task_schedule)
# Hinton's knowledge distillation.
_KD = Method('kd', 'KD', 'tab:green', lambda c: _train(c.kd.schedule, Term(
    'kd', (c.kd.weight,) * 2, (('temperature', c.kd.temperature),)), ce_weight=c.kd.ce_weight),
             section='kd', defaults=_kd_defaults, check=_check_kd)
# Attention transfer (Zagoruyko & Komodakis, ICLR 2017): cross-entropy and the distance
# between the normalised spatial attention maps of the stage outputs, in one stage.
_AT = Method('at', 'Attention transfer', 'tab:olive', lambda c: _train(c.at.schedule, Term(
    'at', (c.at.weight,) * 2)), student=pairing.at_student, section='at', defaults=_at_defaults,
             check=_check_at)
_TEACHER_SCRATCH = Method('teacher_scratch', 'Teacher net, from scratch', 'tab:brown',
                          lambda c: _train(c.scratch), network='teacher')

METHODS: dict[str, Method] = {m.name: m for m in (
    # The student trained alone: the paper's Teacher* / Student rows.
    _SCRATCH,
    # The control for FSP's extra iterations: the student alone, as long as FSP in all.
    matched(_SCRATCH, 'tab:cyan'),
    # Stage 1 on the teacher's FSP matrices, then the task.
    Method('fsp', 'FSP', 'tab:blue', _fsp_phases, student=pairing.fsp_student, section='fsp',
           defaults=_fsp_defaults, check=_check_fsp),
    # The paper's dagger ablation: the teacher's matrices with permuted rows and columns.
    Method('fsp_shuffled', 'FSP, shuffled (dagger)', 'tab:purple',
           lambda c: _fsp_phases(c, shuffled=True), student=pairing.fsp_student),
    # FSP from the teacher's network untrained: does any target of the teacher's shape help?
    Method('fsp_random', 'FSP, random teacher', 'tab:pink',
           lambda c: _fsp_phases(c, cache=False), student=pairing.fsp_student, random_teacher=True),
    # FitNet: a hint stage (a regressor maps the guided layer to the hint), then KD.
    Method('fitnet', 'FitNet', 'tab:orange', _fitnet_phases, student=pairing.fitnet_student,
           section='fitnet', defaults=_fitnet_defaults, check=_check_fitnet),
    _KD, matched(_KD, 'darkgreen'),
    _AT, matched(_AT, 'goldenrod'),
    # Table 5's teacher rows: its network fine-tuned from its weights (a new classifier for a
    # teacher of other classes), and trained on the task alone with the student's schedule
    # (config.scratch).
    Method('finetune', 'Teacher net, fine-tuned', 'tab:red', lambda c: _train(c.finetune),
           network='teacher', starts_from_teacher=True, section='finetune',
           defaults=lambda: schedule((0.01, 0.001, 0.0001), (11_000, 16_000, 21_000))),
    _TEACHER_SCRATCH, matched(_TEACHER_SCRATCH, 'rosybrown'),
)}


def get(name: str) -> Method:
  if name == TEACHER.name:
    return TEACHER
  if name not in METHODS:
    raise ValueError(f'Unknown method {name!r}; expected one of {", ".join(METHODS)}.')
  return METHODS[name]
