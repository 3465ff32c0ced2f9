"""FSP matrices against a NumPy loop reference, properties, variants and bad input."""

import chex
from hypothesis import given, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import fsp


def fsp_reference(f1, f2):
  """The paper's formula with plain loops, max-pooling the larger map first."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  h, w = min(f1.shape[1], f2.shape[1]), min(f1.shape[2], f2.shape[2])

  def pool(f):
    kh, kw = f.shape[1] // h, f.shape[2] // w
    return f.reshape(f.shape[0], h, kh, w, kw, f.shape[3]).max(axis=(2, 4))

  f1, f2 = pool(f1), pool(f2)
  out = np.zeros((f1.shape[0], f1.shape[3], f2.shape[3]))
  for b in range(f1.shape[0]):
    for i in range(f1.shape[3]):
      for j in range(f2.shape[3]):
        for s in range(h):
          for t in range(w):
            out[b, i, j] += f1[b, s, t, i] * f2[b, s, t, j]
  return out / (h * w)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize('shape1,shape2', [
    ((2, 4, 4, 3), (2, 4, 4, 5)),      # equal sizes
    ((2, 8, 8, 3), (2, 4, 4, 5)),      # first map larger: max-pooled
    ((3, 2, 2, 4), (3, 6, 4, 2)),      # second map larger, non-square windows
])
def test_matches_loop_reference(shape1, shape2):
  f1, f2 = _normal(0, shape1), _normal(1, shape2)
  np.testing.assert_allclose(fsp.fsp_matrix(f1, f2), fsp_reference(f1, f2), atol=1e-5, rtol=1e-5)


def test_max_pool_rule_differs_from_average_pool():
  f1 = _normal(0, (1, 4, 4, 2))
  f2 = _normal(1, (1, 2, 2, 3))
  avg = jnp.einsum('bhwm,bhwn->bmn', f1.reshape(1, 2, 2, 2, 2, 2).mean((2, 4)), f2) / 4
  got = fsp.fsp_matrix(f1, f2)
  np.testing.assert_allclose(got, fsp_reference(f1, f2), atol=1e-5)
  assert not np.allclose(got, avg, atol=1e-3)


def test_bfloat16_accumulates_in_float32():
  f1 = _normal(0, (2, 8, 8, 4)).astype(jnp.bfloat16)
  f2 = _normal(1, (2, 8, 8, 6)).astype(jnp.bfloat16)
  got = fsp.fsp_matrix(f1, f2)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, fsp_reference(f1.astype(jnp.float32), f2.astype(jnp.float32)),
                             atol=1e-5)


dims = st.integers(1, 4)


@given(batch=dims, size=st.integers(1, 4), factor=st.sampled_from([1, 2]), m=dims, n=dims,
       seed=st.integers(0, 1000))
def test_shape_and_linearity(batch, size, factor, m, n, seed):
  f1 = _normal(seed, (batch, size * factor, size * factor, m))
  g1 = _normal(seed + 1, f1.shape)
  f2 = _normal(seed + 2, (batch, size, size, n))
  g2 = _normal(seed + 3, f2.shape)
  chex.assert_shape(fsp.fsp_matrix(f1, f2), (batch, m, n))
  # Linear in the map that is not pooled; max-pooling is only positively homogeneous.
  np.testing.assert_allclose(fsp.fsp_matrix(f1, f2 + 2.5 * g2),
                             fsp.fsp_matrix(f1, f2) + 2.5 * fsp.fsp_matrix(f1, g2), atol=1e-4)
  f1_small = f1[:, ::factor, ::factor]
  g1_small = g1[:, ::factor, ::factor]
  np.testing.assert_allclose(fsp.fsp_matrix(f1_small + 2.5 * g1_small, f2),
                             fsp.fsp_matrix(f1_small, f2) + 2.5 * fsp.fsp_matrix(g1_small, f2),
                             atol=1e-4)
  np.testing.assert_allclose(fsp.fsp_matrix(3.0 * f1, f2), 3.0 * fsp.fsp_matrix(f1, f2), atol=1e-4)


@given(batch=dims, size=st.integers(1, 5), m=dims, seed=st.integers(0, 1000))
def test_gram_of_itself_is_symmetric_psd(batch, size, m, seed):
  f = _normal(seed, (batch, size, size, m))
  g = np.asarray(fsp.fsp_matrix(f, f), np.float64)
  np.testing.assert_allclose(g, np.swapaxes(g, 1, 2), atol=1e-5)
  assert np.linalg.eigvalsh(g).min() >= -1e-5


@given(size=st.integers(1, 4), window=st.integers(2, 3), seed=st.integers(0, 1000))
def test_pooling_rule(size, window, seed):
  """Pairing with a larger map equals pairing with that map max-pooled by hand."""
  big = _normal(seed, (2, size * window, size * window, 3))
  small = _normal(seed + 1, (2, size, size, 2))
  pooled = big.reshape(2, size, window, size, window, 3).max(axis=(2, 4))
  np.testing.assert_allclose(fsp.fsp_matrix(big, small), fsp.fsp_matrix(pooled, small), atol=1e-5)
  np.testing.assert_allclose(fsp.fsp_matrix(small, big), fsp.fsp_matrix(small, pooled), atol=1e-5)


def test_check_grads():
  f1, f2 = _normal(0, (2, 4, 4, 3)), _normal(1, (2, 2, 2, 2))
  jax.test_util.check_grads(fsp.fsp_matrix, (f1, f2), order=2, modes=('fwd', 'rev'),
                            atol=1e-2, rtol=1e-2)


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_variants_agree(self):
    f1, f2 = _normal(0, (2, 8, 8, 3)), _normal(1, (2, 4, 4, 5))
    got = self.variant(fsp.fsp_matrix, n_devices=4)(f1, f2)
    chex.assert_trees_all_close(got, fsp_reference(f1, f2), atol=1e-5)


def test_fsp_matrices_pairs_stages_in_order():
  features = {f'stage{k}_{p}': _normal(k, (2, 4, 4, k + (p == 'out')))
              for k in (1, 2, 10) for p in ('in', 'out')}
  assert fsp.stage_pairs(features) == [('stage1_in', 'stage1_out'), ('stage2_in', 'stage2_out'),
                                       ('stage10_in', 'stage10_out')]
  shapes = [g.shape for g in fsp.fsp_matrices(features)]
  assert shapes == [(2, 1, 2), (2, 2, 3), (2, 10, 11)]


@pytest.mark.parametrize('shape1,shape2,match', [
    ((4, 4, 3), (2, 4, 4, 3), r'rank 4.*\(4, 4, 3\)'),
    ((2, 4, 4, 3), (3, 4, 4, 3), r'same batch size.*\(2, 4, 4, 3\).*\(3, 4, 4, 3\)'),
    ((2, 6, 6, 3), (2, 4, 4, 3), r'\(2, 6, 6, 3\) and \(2, 4, 4, 3\).*multiple'),
])
def test_bad_input(shape1, shape2, match):
  with pytest.raises(ValueError, match=match):
    fsp.fsp_matrix(jnp.zeros(shape1), jnp.zeros(shape2))


def test_missing_stage_output_is_named():
  with pytest.raises(ValueError, match='stageK_out.*stage1_in'):
    fsp.fsp_matrices({'stage1_in': jnp.zeros((1, 2, 2, 1))})
