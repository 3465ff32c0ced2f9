"""FSP matrices: the flow of solution procedure between two feature maps.

For feature maps F1 [h, w, m] and F2 [h, w, n] of one image (Yim et al. 2017, eq. 1):

    G[i, j] = sum_{s, t} F1[s, t, i] * F2[s, t, j] / (h * w)        G: [m, n]

When the two maps differ in spatial size, the larger one is max-pooled to the smaller
(the paper's rule). Everything here is a pure function of NHWC arrays.
"""

import re
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def check_real(name: str, x) -> None:
  """Raises ValueError unless x is an array of real floating or integer values."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None or not hasattr(x, 'shape'):
    raise ValueError(f'{name} must be an array, got {type(x).__name__}.')
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f'{name} must hold real floating or integer values, got dtype {dtype}.')


def _check_nhwc(name: str, x: jnp.ndarray) -> None:
  check_real(name, x)
  if x.ndim != 4 or 0 in x.shape[1:]:
    raise ValueError(
        f'{name} must be an NHWC batch of rank 4 [B, H, W, C] with H, W, C >= 1, got shape '
        f'{np.shape(x)}.')


def max_pool_to(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Max-pools x [B, H, W, C] to [B, h, w, C]; H and W must be multiples of h and w."""
  height, width = x.shape[1:3]
  if height % size[0] or width % size[1]:
    raise ValueError(
        f'Cannot max-pool a feature map of spatial size {(height, width)} to {size}: '
        'the larger size must be a multiple of the smaller.')
  window = (height // size[0], width // size[1])
  if window == (1, 1):
    return x
  return nn.max_pool(x, window, strides=window)


def fsp_matrix(f1: jnp.ndarray, f2: jnp.ndarray) -> jnp.ndarray:
  """FSP matrix of two NHWC feature batches.

  Args:
    f1: [B, H, W, M] features at the first layer (input of a stage).
    f2: [B, H', W', N] features at the last layer (output of the stage).

  Returns:
    [B, M, N] float32 (or wider) matrices G = sum_hw f1^T f2 / (h * w), after max-pooling
    the spatially larger map to the smaller one.

  Raises:
    ValueError: ranks are not 4, batch sizes differ, or spatial sizes do not divide.
  """
  _check_nhwc('f1', f1)
  _check_nhwc('f2', f2)
  if f1.shape[0] != f2.shape[0]:
    raise ValueError(
        f'f1 and f2 must have the same batch size, got shapes {f1.shape} and {f2.shape}.')
  size1, size2 = f1.shape[1:3], f2.shape[1:3]
  if not (size1[0] >= size2[0] and size1[1] >= size2[1]) and not (
      size2[0] >= size1[0] and size2[1] >= size1[1]):
    raise ValueError(
        f'Cannot pair feature maps of shapes {f1.shape} and {f2.shape}: one is larger in H, the '
        'other in W. Expected NHWC maps, one at least as large as the other in both (NCHW maps '
        'look like this: transpose them to NHWC).')
  target = (min(size1[0], size2[0]), min(size1[1], size2[1]))
  if any(s[0] % target[0] or s[1] % target[1] for s in (size1, size2)):
    raise ValueError(
        f'Cannot pair feature maps of shapes {f1.shape} and {f2.shape}: the larger spatial '
        'size must be a multiple of the smaller one, to be max-pooled to it.')
  f1, f2 = max_pool_to(f1, target), max_pool_to(f2, target)
  height, width = f1.shape[1:3]
  accum = jnp.promote_types(jnp.result_type(f1, f2), jnp.float32)
  gram = jnp.einsum('bhwm,bhwn->bmn', f1, f2, preferred_element_type=accum)
  return gram / (height * width)


def stage_pairs(features: Mapping[str, jnp.ndarray]) -> list[tuple[str, str]]:
  """The FSP points of a network, ordered by stage: [('stage1_in', 'stage1_out'), ...]."""
  if not isinstance(features, Mapping):
    raise ValueError(f'features must be a mapping {{"stageK_in": [B, H, W, M], "stageK_out": '
                     f'...}}, got {type(features).__name__}.')
  odd = sorted(n for n in features if str(n).startswith('stage') and
               not re.fullmatch(r'stage\d+_(in|out)', str(n)))
  if odd:
    raise ValueError(f'Feature names {odd} are not of the form stageK_in / stageK_out with K an '
                     'integer.')
  stages = sorted(int(name[len('stage'):-len('_in')]) for name in features
                  if name.startswith('stage') and name.endswith('_in'))
  pairs = [(f'stage{k}_in', f'stage{k}_out') for k in stages]
  missing = [last for _, last in pairs if last not in features]
  if not pairs or missing:
    raise ValueError(
        'Expected features named stageK_in and stageK_out for every stage K, got '
        f'{sorted(features)}.')
  return pairs


def fsp_matrices(features: Mapping[str, jnp.ndarray]) -> list[jnp.ndarray]:
  """A network's FSP matrices, one per stage: a list of [B, M_k, N_k].

  Args:
    features: the features a `fsp_jax.models` network returns, {'stageK_in': [B, H, W, M],
      'stageK_out': [B, H', W', N], ...}.
  """
  return [fsp_matrix(features[first], features[last]) for first, last in stage_pairs(features)]
