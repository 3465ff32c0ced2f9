"""Pairing a student with the teacher: what each method adds to the student (channel adapters,
FitNet's regressor), and the checks that their features fit, on shapes alone (traced, never
compiled). Each function is a method's `student`: (config, backbone, its features, the
teacher's features) -> the Student it trains, raising ValueError where the pair does not fit.
"""

import flax.linen as nn
import jax
import numpy as np

from fsp_jax import adapters, fsp, losses
from fsp_jax.adapters import Student
from fsp_jax.errors import fail
from fsp_jax.terms import stage_outputs


def plain(config, backbone, mine, theirs) -> Student:
  del config, mine, theirs
  return Student(backbone)


def fsp_student(config, backbone, mine, theirs) -> Student:
  """Channel adapters where widths differ (config.student.adapter); checks the pairing."""
  adapter = ()
  if config.student.adapter:
    adapter = tuple(sorted(adapters.mismatched_widths(mine, theirs).items()))
  student = Student(backbone, adapter=adapter)
  if adapter:
    mine = features_of(student, next(iter(theirs.values())).shape[1])
  matrices = [jax.eval_shape(fsp.fsp_matrices, f) for f in (mine, theirs)]
  weights = config.fsp.stage_weights
  if weights is not None and len(weights) != len(matrices[1]):
    fail('fsp.stage_weights', f'expected {len(matrices[1])} weights, one per FSP '
         f'matrix of these networks, got {weights}.')
  jax.eval_shape(losses.fsp_l2, *matrices)
  return student


def fitnet_student(config, backbone, mine, theirs) -> Student:
  hint = config.fitnet.hint
  if hint not in mine or hint not in theirs:
    fail('fitnet.hint', f'{hint!r} is not a feature of both networks; expected '
         f'one of {sorted(set(mine) & set(theirs))}.')
  return Student(backbone, hint=(hint, theirs[hint].shape[-1]))


def at_student(config, backbone, mine, theirs) -> Student:
  del config
  jax.eval_shape(losses.attention_transfer, stage_outputs(mine), stage_outputs(theirs))
  return Student(backbone)


def features_of(model: nn.Module, image_size: int) -> dict:
  """Shapes of a model's features on [2, S, S, 3]: traced, never compiled."""
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), np.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0][1], x)
