"""Loss terms and the phases built from them: what one train step computes.

A phase is a learning-rate schedule and weighted loss terms. A term names a `Loss` in TERMS,
which reads the student's and the teacher's outputs on a batch (`Outputs`) and declares what
it needs: whether it is the task's own loss, what it reads of the teacher, whether it compares
FSP matrices. The trainer, the config checks and the report ask these records, never a name.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from fsp_jax import fsp, losses
from fsp_jax.schedules import Schedule


class Outputs(NamedTuple):
  """What loss terms read: the student's and teacher's outputs on a batch."""
  logits: Any           # [B, classes]
  features: dict        # {'stageK_in': [B, H, W, C], ..., 'hint': regressed hint}
  labels: Any           # [B]
  teacher_logits: Any = None
  teacher_features: dict | None = None
  teacher_fsp: Any = None  # The teacher's FSP matrices, when cached (config.fsp.cache).


def shuffle_fsp(matrices, seed: int) -> list:
  """The paper's dagger ablation: the rows and columns of each [B, M, N] matrix permuted by a
  fixed random permutation."""
  rng = np.random.default_rng(seed)
  return [g[:, rng.permutation(g.shape[1])][:, :, rng.permutation(g.shape[2])]
          for g in matrices]


def stage_outputs(features: dict) -> list:
  """The features at the output of each stage, in order: [[B, H, W, C], ...]."""
  return [features[last] for _, last in fsp.stage_pairs(features)]


def _fsp(out: Outputs, normalize='teacher', weights=None, shuffle_seed=None, cached=False):
  target = out.teacher_fsp if cached else fsp.fsp_matrices(out.teacher_features)
  if shuffle_seed is not None:
    target = shuffle_fsp(target, shuffle_seed)
  return losses.fsp_l2(fsp.fsp_matrices(out.features), target, weights, normalize)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss term's function (Outputs, **options) -> scalar, and what it needs.

  Attributes:
    task: it is the task's own loss (on the labels): a phase with it is evaluated.
    teacher: what it reads of the teacher: 'logits', 'features' or None.
    fsp: it compares FSP matrices (each stage's input with its output).
  """
  fn: Callable[..., Any]
  task: bool = False
  teacher: str | None = None
  fsp: bool = False


TERMS: dict[str, Loss] = {
    'ce': Loss(lambda out: losses.cross_entropy(out.logits, out.labels), task=True),
    'fsp': Loss(_fsp, teacher='features', fsp=True),
    'kd': Loss(lambda out, temperature: losses.kd_loss(out.logits, out.teacher_logits,
                                                       temperature), teacher='logits'),
    'hint': Loss(lambda out, layer, normalize: losses.hint_loss(
        out.features['hint'], out.teacher_features[layer], normalize), teacher='features'),
    'at': Loss(lambda out: losses.attention_transfer(stage_outputs(out.features),
                                                     stage_outputs(out.teacher_features)),
               teacher='features'),
}


@dataclasses.dataclass(frozen=True)
class Term:
  """A loss term: its name in TERMS, its weight at the first and the last step of the phase
  (linear in between), and its options (hashable (key, value) pairs)."""
  name: str
  weight: tuple[float, float] = (1.0, 1.0)
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def loss(self) -> Loss:
    return TERMS[self.name]

  @property
  def cached(self) -> bool:
    """Whether batches bring the teacher's FSP matrices in place of a teacher pass."""
    return bool(dict(self.options).get('cached', False))

  @property
  def needs_teacher_pass(self) -> bool:
    return self.loss.teacher is not None and not self.cached

  def __call__(self, out: Outputs):
    return self.loss.fn(out, **dict(self.options))


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stage of training: `name` ('train', 'stage1', 'stage2': its checkpoint folder), a
  learning-rate schedule, loss terms, and the global norm the loss's gradient is clipped to
  (0: not clipped)."""
  name: str
  schedule: Schedule
  terms: tuple[Term, ...]
  max_grad_norm: float = 0.0

  @property
  def steps(self) -> int:
    return self.schedule.length

  @property
  def needs_teacher_pass(self) -> bool:
    return any(term.needs_teacher_pass for term in self.terms)

  @property
  def cached_fsp(self) -> bool:
    """Whether batches bring the teacher's FSP matrices (config.fsp.cache)."""
    return any(term.cached for term in self.terms)

  @property
  def augment(self) -> bool:
    """Whether its training images are augmented: not where it reads the teacher's cached
    matrices, computed on the images as evaluation takes them."""
    return not self.cached_fsp

  @property
  def evaluates(self) -> bool:
    """Whether it trains on the task, so that test accuracy means something during it."""
    return any(term.loss.task for term in self.terms)

  @property
  def compares_fsp(self) -> bool:
    return any(term.loss.fsp for term in self.terms)

  @property
  def reads_teacher(self) -> set:
    """What its terms read of the teacher: a subset of {'logits', 'features'}."""
    return {term.loss.teacher for term in self.terms} - {None}
