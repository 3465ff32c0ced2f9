"""Losses against NumPy references of the paper's formulas; gradients reach the student only."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import losses


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _matrices(seed):
  return [_normal(seed, (4, 16, 16)), _normal(seed + 1, (4, 16, 32)), _normal(seed + 2, (4, 32, 64))]


def fsp_l2_reference(student, teacher, weights, normalize='none'):
  """1/N sum_x sum_i lambda_i(x) || G_i^T(x) - G_i^S(x) ||_2^2, with loops over x and i:
  lambda_i(x) = w_i, w_i / (M_i N_i) ('entries') or w_i / ||G_i^T(x)||^2 ('teacher')."""
  batch = student[0].shape[0]
  total = 0.0
  for x in range(batch):
    for g_s, g_t, w in zip(student, teacher, weights):
      g_t, g_s = np.asarray(g_t[x], np.float64), np.asarray(g_s[x], np.float64)
      scale = {'none': 1.0, 'entries': g_t.size, 'teacher': np.sum(g_t**2)}[normalize]
      total += w * np.sum((g_t - g_s)**2) / scale
  return total / batch


@pytest.mark.parametrize('normalize', ['none', 'entries', 'teacher'])
@pytest.mark.parametrize('weights', [None, (0.5, 1.0, 2.0)])
def test_fsp_l2_matches_reference(weights, normalize):
  student, teacher = _matrices(0), _matrices(10)
  expected = fsp_l2_reference(student, teacher, weights or (1.0, 1.0, 1.0), normalize)
  np.testing.assert_allclose(losses.fsp_l2(student, teacher, weights, normalize), expected,
                             rtol=1e-5)


def test_fsp_l2_normalised_is_the_same_for_every_scale():
  """The default loss does not change when both networks' features are scaled (G by c^2)."""
  student, teacher = _matrices(0), _matrices(10)
  for c in (1e-3, 1.0, 1e3):
    np.testing.assert_allclose(losses.fsp_l2([g * c**2 for g in student],
                                             [g * c**2 for g in teacher]),
                               losses.fsp_l2(student, teacher), rtol=1e-5)
  assert 1.0 < float(losses.fsp_l2(student, teacher)) < 10.0  # About 2 per stage here.
  with pytest.raises(ValueError, match="normalize must be one of"):
    losses.fsp_l2(student, teacher, normalize='l1')


def test_fsp_l2_accepts_pytrees():
  student, teacher = _matrices(0), _matrices(10)
  as_dict = lambda gs: {f'stage{k + 1}': g for k, g in enumerate(gs)}
  np.testing.assert_allclose(losses.fsp_l2(as_dict(student), as_dict(teacher)),
                             losses.fsp_l2(student, teacher), rtol=1e-6)


def test_fsp_l2_zero_for_identical_inputs():
  student = _matrices(0)
  assert float(losses.fsp_l2(student, student)) == 0.0


def test_fsp_l2_gradient_reaches_student_only():
  student, teacher = _matrices(0), _matrices(10)
  literal = lambda s, t: losses.fsp_l2(s, t, normalize='none')
  grad_s, grad_t = jax.grad(literal, argnums=(0, 1))(student, teacher)
  batch = student[0].shape[0]
  for g, s, t in zip(grad_s, student, teacher):
    np.testing.assert_allclose(g, 2.0 * (s - t) / batch, rtol=1e-5, atol=1e-6)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grad_t)


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_variants_agree(self):
    student, teacher = _matrices(0), _matrices(10)
    expected = fsp_l2_reference(student, teacher, (1.0, 1.0, 1.0), 'teacher')
    got = self.variant(losses.fsp_l2, n_devices=4)(student, teacher)
    chex.assert_trees_all_close(got, np.float32(expected), rtol=1e-5)


def test_fsp_l2_count_mismatch():
  with pytest.raises(ValueError, match='student has 3 FSP matrices and the teacher 2'):
    losses.fsp_l2(_matrices(0), _matrices(0)[:2])


def test_fsp_l2_shape_mismatch_names_pair_and_adapter():
  student = _matrices(0)
  teacher = [student[0], _normal(1, (4, 16, 64)), student[2]]
  with pytest.raises(ValueError, match=r'FSP matrix 1.*\(4, 16, 32\).*\(4, 16, 64\).*adapter'):
    losses.fsp_l2(student, teacher)


def test_fsp_l2_weight_count():
  with pytest.raises(ValueError, match='Expected 3 weights'):
    losses.fsp_l2(_matrices(0), _matrices(1), weights=(1.0,))


def test_cross_entropy_reference():
  logits, labels = _normal(0, (8, 5)), jnp.arange(8) % 5
  log_p = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             -log_p[np.arange(8), labels].mean(), rtol=1e-5)


def test_kd_loss_reference_and_gradient():
  s, t, tau = _normal(0, (8, 5)), _normal(1, (8, 5)), 3.0
  softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  p_t, p_s = softmax(np.asarray(t) / tau), softmax(np.asarray(s) / tau)
  expected = tau**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
  np.testing.assert_allclose(losses.kd_loss(s, t, tau), expected, rtol=1e-5)
  assert float(losses.kd_loss(t, t, tau)) == pytest.approx(0.0, abs=1e-6)
  grad_t = jax.grad(losses.kd_loss, argnums=1)(s, t, tau)
  assert float(jnp.abs(grad_t).max()) == 0.0


def test_hint_loss_reference_and_shapes():
  r, u = _normal(0, (2, 4, 4, 8)), _normal(1, (2, 4, 4, 8))
  expected = 0.5 * np.sum((np.asarray(r) - np.asarray(u))**2) / 2
  np.testing.assert_allclose(losses.hint_loss(r, u), expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r'\(2, 4, 4, 8\) vs teacher \(2, 4, 4, 16\)'):
    losses.hint_loss(r, jnp.zeros((2, 4, 4, 16)))
  relative = np.mean(np.sum((np.asarray(r) - np.asarray(u))**2, (1, 2, 3)) /
                     np.sum(np.asarray(u)**2, (1, 2, 3)))
  np.testing.assert_allclose(losses.hint_loss(r, u, 'teacher'), relative, rtol=1e-5)
  np.testing.assert_allclose(losses.hint_loss(3 * r, 3 * u, 'teacher'), relative, rtol=1e-5)
  with pytest.raises(ValueError, match="normalize must be one of .'none', 'teacher'., got 'mean'"):
    losses.hint_loss(r, u, 'mean')


def attention_reference(student, teacher):
  """sum_j mean over x and positions of (q_s - q_t)^2, q = normalised channel mean of F^2."""
  total = 0.0
  for f_s, f_t in zip(student, teacher):
    batch, height, width = f_s.shape[:3]
    for x in range(batch):
      maps = []
      for f in (f_s, f_t):
        q = np.mean(np.asarray(f[x], np.float64) ** 2, axis=-1).ravel()
        maps.append(q / np.linalg.norm(q))
      total += np.sum((maps[0] - maps[1]) ** 2) / (batch * height * width)
  return total


def test_attention_transfer_matches_reference_and_spares_the_teacher():
  student = [_normal(0, (3, 8, 8, 4)), _normal(1, (3, 4, 4, 8))]
  teacher = [_normal(2, (3, 8, 8, 16)), _normal(3, (3, 4, 4, 32))]  # Other channel counts.
  np.testing.assert_allclose(losses.attention_transfer(student, teacher),
                             attention_reference(student, teacher), rtol=1e-5)
  assert float(losses.attention_transfer(teacher, teacher)) < 1e-12
  grad_s, grad_t = jax.grad(losses.attention_transfer, argnums=(0, 1))(student, teacher)
  assert all(float(jnp.abs(g).max()) > 0 for g in grad_s)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grad_t)
  with pytest.raises(ValueError, match='differ in batch or spatial size'):
    losses.attention_transfer(student[:1], teacher[1:])
