"""Models: published parameter counts, FSP points, pairing teachers with students."""

import jax
import jax.numpy as jnp
import pytest

from fsp_jax import adapters, fsp, losses, models


def _init_shapes(model, size):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def _param_count(variables):
  return sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))


@pytest.mark.parametrize('name,num_classes,size,millions', [
    ('resnet20', 10, 32, 0.27), ('resnet32', 10, 32, 0.46), ('resnet56', 10, 32, 0.85),
    ('resnet110', 10, 32, 1.7), ('resnet18', 1000, 64, 11.7), ('resnet34', 1000, 64, 21.8),
])
def test_published_parameter_counts(name, num_classes, size, millions):
  count = _param_count(_init_shapes(models.get(name, num_classes=num_classes), size))
  assert round(count / 1e6, 2 if millions < 1 else 1) == millions


def test_width_multiplier():
  count = _param_count(_init_shapes(models.get('resnet32', num_classes=100, width=4), 32))
  # Every convolution has 4 x 4 = 16x the weights of the 0.46M ResNet-32.
  assert round(count / 1e6, 1) == 7.4


@pytest.mark.parametrize('name', ['resnet8', 'resnet14', 'resnet26', 'resnet32'])
def test_cifar_feature_shapes(name):
  model = models.get(name, num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, features = model.apply(variables, x, train=False)
  assert logits.shape == (2, 10)
  assert {k: v.shape for k, v in features.items()} == {
      'stage1_in': (2, 32, 32, 16), 'stage1_out': (2, 32, 32, 16),
      'stage2_in': (2, 32, 32, 16), 'stage2_out': (2, 16, 16, 32),
      'stage3_in': (2, 16, 16, 32), 'stage3_out': (2, 8, 8, 64)}
  assert [g.shape for g in fsp.fsp_matrices(features)] == [(2, 16, 16), (2, 16, 32), (2, 32, 64)]


def test_imagenet_feature_shapes():
  model = models.get('resnet18', num_classes=5)
  shapes = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))[0][1]
  assert {k: v.shape for k, v in shapes.items()} == {
      'stage1_in': (1, 16, 16, 64), 'stage1_out': (1, 16, 16, 64),
      'stage2_in': (1, 16, 16, 64), 'stage2_out': (1, 8, 8, 128),
      'stage3_in': (1, 8, 8, 128), 'stage3_out': (1, 4, 4, 256),
      'stage4_in': (1, 4, 4, 256), 'stage4_out': (1, 2, 2, 512)}


def _features(name, width, seed, x):
  model = models.get(name, num_classes=10, width=width)
  variables = model.init(jax.random.key(seed), x, train=False)
  return model.apply(variables, x, train=False)[1]


def test_teacher26_student8_pair():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  teacher, student = _features('resnet26', 1, 0, x), _features('resnet8', 1, 1, x)
  g_t, g_s = fsp.fsp_matrices(teacher), fsp.fsp_matrices(student)
  assert [g.shape for g in g_t] == [g.shape for g in g_s]
  assert float(losses.fsp_l2(g_s, g_t)) > 0.0


def test_width_mismatch_fails_then_adapter_pairs():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  teacher, student = _features('resnet8', 2, 0, x), _features('resnet8', 1, 1, x)
  with pytest.raises(ValueError, match=r'FSP matrix 0.*\(2, 16, 16\).*\(2, 32, 32\).*adapter'):
    losses.fsp_l2(fsp.fsp_matrices(student), fsp.fsp_matrices(teacher))
  widths = adapters.mismatched_widths(student, teacher)
  assert widths == {'stage1_in': 32, 'stage1_out': 32, 'stage2_in': 32, 'stage2_out': 64,
                    'stage3_in': 64, 'stage3_out': 128}
  adapter = adapters.ChannelAdapter(widths)
  adapter_vars = adapter.init(jax.random.key(2), student, train=False)
  adapted = adapter.apply(adapter_vars, student, train=True, mutable=['batch_stats'])[0]
  loss, grads = jax.value_and_grad(lambda p: losses.fsp_l2(
      fsp.fsp_matrices(adapter.apply({**adapter_vars, 'params': p}, student, train=True,
                                     mutable=['batch_stats'])[0]),
      fsp.fsp_matrices(teacher)))(adapter_vars['params'])
  assert [g.shape for g in fsp.fsp_matrices(adapted)] == [
      g.shape for g in fsp.fsp_matrices(teacher)]
  assert float(loss) > 0.0
  assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match="Unknown model 'resnet27'.*resnet26.*resnet34"):
    models.get('resnet27', num_classes=10)
  with pytest.raises(ValueError, match='width must be a positive integer'):
    models.get('resnet8', num_classes=10, width=0)


def test_adapter_rejects_unknown_feature():
  with pytest.raises(ValueError, match=r"\['stage9_in'\].*stage1_in"):
    adapters.ChannelAdapter({'stage9_in': 4}).init(
        jax.random.key(0), {'stage1_in': jnp.zeros((1, 2, 2, 3))})
