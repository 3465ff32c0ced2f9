"""Losses: the paper's FSP loss and the baselines it is compared with.

All functions are pure, reduce to a scalar, and average over the batch.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from fsp_jax import fsp


def _leaves(tree: Any, name: str) -> list[jnp.ndarray]:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f'{name} holds no FSP matrices.')
  return leaves


FSP_NORMALIZATIONS = ('none', 'entries', 'teacher')
HINT_NORMALIZATIONS = ('none', 'teacher')


def fsp_l2(student: Any, teacher: Any, weights: Sequence[float] | None = None,
           normalize: str = 'teacher') -> jnp.ndarray:
  """The paper's L_FSP: squared Frobenius distances between FSP matrices, batch mean.

      normalize='teacher' (default):  L = 1/B sum_x sum_i w_i ||G_i^S(x) - G_i^T(x)||^2
                                                               / ||G_i^T(x)||^2
      normalize='none' (literal):     L = 1/B sum_x sum_i w_i ||G_i^S(x) - G_i^T(x)||^2
      normalize='entries':            each term divided by M_i * N_i instead

  Both are the paper's formula: it weights the stages with equal lambda_i but never gives
  their value. 'teacher' takes lambda_i(x) = 1 / ||G_i^T(x)||^2, a constant for the student
  (the teacher is frozen) that makes each term the relative error of stage i's matrix. The
  literal sum grows with the fourth power of the features' scale and with M_i * N_i, so its
  gradients differ by orders of magnitude between networks, image sizes and teachers (and
  overflow at the paper's stage-1 rate); the normalised loss is about 1 per stage at the
  start for all of them.

  Args:
    student: a sequence (or pytree) of [B, M_i, N_i] student FSP matrices.
    teacher: the teacher's matrices, in the same structure; no gradient flows into them.
    weights: w_i, one per matrix; all equal to 1 by default, as in the paper.
    normalize: 'teacher', 'none' or 'entries' (above).

  Returns:
    A scalar float32 loss, averaged over the batch.
  """
  if normalize not in FSP_NORMALIZATIONS:
    raise ValueError(f'normalize must be one of {FSP_NORMALIZATIONS}, got {normalize!r}.')
  student, teacher = _leaves(student, 'student'), _leaves(teacher, 'teacher')
  if len(student) != len(teacher):
    raise ValueError(
        f'The student has {len(student)} FSP matrices and the teacher {len(teacher)}: '
        'pair the same number of stages.')
  if weights is None:
    weights = [1.0] * len(student)
  if len(weights) != len(student):
    raise ValueError(f'Expected {len(student)} weights, one per FSP matrix, got {len(weights)}.')
  total = 0.0
  for i, (g_s, g_t, w) in enumerate(zip(student, teacher, weights)):
    for name, g in (('student', g_s), ('teacher', g_t)):
      fsp.check_real(f'{name} FSP matrix {i}', g)
      if g.ndim != 3:
        raise ValueError(f'{name} FSP matrix {i} must be of rank 3 [B, M, N], got shape '
                         f'{g.shape} (pass fsp.fsp_matrices of the features, not the features).')
    if g_s.shape[0] != g_t.shape[0]:
      raise ValueError(f'FSP matrix {i}: the student\'s batch of {g_s.shape[0]} and the '
                       f'teacher\'s of {g_t.shape[0]} differ; expected the same images.')
    if g_s.shape != g_t.shape:
      raise ValueError(
          f'FSP matrix {i}: student shape {g_s.shape} does not match teacher shape '
          f'{g_t.shape}. Stage widths differ; use a channel adapter on the student '
          '(config.student.adapter=True, or fsp_jax.adapters.ChannelAdapter).')
    g_t = jax.lax.stop_gradient(g_t).astype(jnp.float32)
    term = jnp.sum(jnp.square(g_s.astype(jnp.float32) - g_t), axis=(1, 2))
    if normalize == 'entries':
      term = term / (g_t.shape[1] * g_t.shape[2])
    elif normalize == 'teacher':
      term = term / jnp.maximum(jnp.sum(jnp.square(g_t), axis=(1, 2)), 1e-12)
    total = total + w * term
  return jnp.mean(total)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Softmax cross-entropy of logits [B, C] against integer labels [B], batch mean."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
            temperature: float = 4.0) -> jnp.ndarray:
  """Hinton's knowledge distillation: tau^2 KL(softmax(t / tau) || softmax(s / tau)).

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C]; no gradient flows into them.
    temperature: tau; the tau^2 factor keeps gradient sizes comparable across tau.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  target = jax.nn.softmax(teacher_logits / temperature)
  log_student = jax.nn.log_softmax(student_logits / temperature)
  kl = optax.kl_divergence(log_student, target)
  return temperature ** 2 * jnp.mean(kl)


def hint_loss(regressed: jnp.ndarray, teacher_feature: jnp.ndarray,
              normalize: str = 'none') -> jnp.ndarray:
  """FitNet's hint loss, batch mean.

      normalize='none' (FitNets):  L = 1/B sum_x 1/2 ||u_h(x) - r(v_g(x))||^2
      normalize='teacher':         L = 1/B sum_x ||u_h(x) - r(v_g(x))||^2 / ||u_h(x)||^2

  'teacher' is the relative error, as in `fsp_l2`: about 1 at the start whatever the hint's
  size and scale, where the literal loss is in the thousands (its gradient 2e4 for ResNet-26's
  hint and a fresh ResNet-8 on CIFAR-10).

  Args:
    regressed: [B, H, W, C] student guided-layer feature after the learned regressor r.
    teacher_feature: [B, H, W, C] teacher hint-layer feature u_h; no gradient.
    normalize: 'none' or 'teacher' (above).
  """
  if normalize not in HINT_NORMALIZATIONS:
    raise ValueError(f'normalize must be one of {HINT_NORMALIZATIONS}, got {normalize!r}.')
  if regressed.shape != teacher_feature.shape:
    raise ValueError(
        f'Hint shapes differ: regressed student feature {regressed.shape} vs teacher '
        f'{teacher_feature.shape}; the regressor must map to the teacher width.')
  target = jax.lax.stop_gradient(teacher_feature).astype(jnp.float32)
  axes = tuple(range(1, target.ndim))
  error = jnp.sum(jnp.square(regressed.astype(jnp.float32) - target), axis=axes)
  if normalize == 'teacher':
    return jnp.mean(error / jnp.maximum(jnp.sum(jnp.square(target), axis=axes), 1e-12))
  return 0.5 * jnp.mean(error)


def attention_map(features: jnp.ndarray) -> jnp.ndarray:
  """Zagoruyko & Komodakis' spatial attention: [B, H, W, C] -> [B, H * W], the channel mean of
  the squared activations (p = 2), L2-normalised per example, in float32."""
  q = jnp.mean(jnp.square(features.astype(jnp.float32)), axis=-1).reshape(features.shape[0], -1)
  return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def attention_transfer(student: Sequence[jnp.ndarray],
                       teacher: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): squared L2 distance between the
  normalised attention maps of paired layers, averaged over the batch and the H * W positions
  (as in the authors' code), summed over the pairs.

  Args:
    student, teacher: sequences of [B, H, W, C_s] and [B, H, W, C_t] features (channel counts
      may differ; spatial sizes must agree); no gradient flows into the teacher's.
  """
  if len(student) != len(teacher) or not student:
    raise ValueError(f'Expected the same positive number of student and teacher features, got '
                     f'{len(student)} and {len(teacher)}.')
  total = 0.0
  for i, (f_s, f_t) in enumerate(zip(student, teacher)):
    if f_s.shape[:3] != f_t.shape[:3]:
      raise ValueError(f'Attention pair {i}: student {f_s.shape} and teacher {f_t.shape} differ '
                       'in batch or spatial size.')
    q_t = attention_map(jax.lax.stop_gradient(f_t))
    total = total + jnp.mean(jnp.square(attention_map(f_s) - q_t))
  return total
