"""FSP points of any Flax model, captured by module path; stage 1 into a model of this test."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsp_jax import data, features, fsp, losses, models, sources


class SmallCnn(nn.Module):
  """A network fsp_jax knows nothing about: it returns only logits."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn0')(
        nn.Conv(16, (3, 3), name='conv0')(x)))
    for k, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      x = nn.Conv(width, (3, 3), stride, name=f'conv{k + 1}')(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f'bn{k + 1}')(x))
      x = nn.Sequential([nn.Conv(width, (3, 3)), nn.relu], name=f'block{k + 1}')(x)
    return nn.Dense(10, name='head')(jnp.mean(x, axis=(1, 2)))


# The paper's FSP points: each stage's input and output, by module path.
POINTS = {'stage1_in': 'bn0', 'stage1_out': 'block1', 'stage2_in': 'block1',
          'stage2_out': 'block2', 'stage3_in': 'block2', 'stage3_out': 'block3'}


@pytest.fixture(scope='module')
def images():
  source = sources.digits_source('train', 16)
  return next(data.eval_batches(source, data.Preprocess(16, 'none'), 32, 0, 1))['image']


def test_capture_returns_named_nhwc_features(images):
  model = SmallCnn()
  variables = model.init(jax.random.key(0), images[:1], train=False)
  logits, feats = features.capture(model, variables, images, POINTS, train=False)
  assert logits.shape == (32, 10)
  assert {k: v.shape for k, v in feats.items()} == {
      'stage1_in': (32, 16, 16, 16), 'stage1_out': (32, 16, 16, 16),
      'stage2_in': (32, 16, 16, 16), 'stage2_out': (32, 8, 8, 32),
      'stage3_in': (32, 8, 8, 32), 'stage3_out': (32, 4, 4, 64)}
  assert [g.shape for g in fsp.fsp_matrices(feats)] == [(32, 16, 16), (32, 16, 32),
                                                       (32, 32, 64)]


def test_capture_matches_the_features_our_resnets_return(images):
  model = models.get('resnet8', 10)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  (_, returned), captured = features.capture(
      model, variables, images, {'stage2_out': 'stage2_block1', 'stage3_out': 'stage3_block1'},
      train=False)
  for name in captured:
    np.testing.assert_array_equal(captured[name], returned[name])


def test_unknown_path_lists_the_models_paths_and_non_nhwc_is_refused(images):
  model = SmallCnn()
  variables = model.init(jax.random.key(0), images[:1], train=False)
  with pytest.raises(ValueError, match=r"\['block9'\] are not in SmallCnn; its paths are: "
                                       r'Conv_0, .*block1, .*bn0, .*conv0, .*head\.'):
    features.capture(model, variables, images, ['block9'], train=False)
  with pytest.raises(ValueError, match=r"'head' \(logits\) is not an NHWC batch.*\(32, 10\)"):
    features.capture(model, variables, images, {'logits': 'head'}, train=False)


def test_stage1_distills_into_a_model_defined_here(images):
  """A ResNet-14 teacher's FSP matrices taught to SmallCnn through captured features."""
  teacher = models.get('resnet14', 10)
  t_vars = teacher.init(jax.random.key(1), images[:1], train=False)
  (_, t_features), _ = teacher.apply(t_vars, images, train=True, mutable=['batch_stats'])
  target = fsp.fsp_matrices(t_features)
  student = SmallCnn()
  variables = student.init(jax.random.key(2), images[:1], train=False)
  tx = optax.sgd(1e-2, momentum=0.9)
  opt_state = tx.init(variables['params'])

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      (_, updates), feats = features.capture(
          student, {'params': params, 'batch_stats': batch_stats}, images, POINTS,
          mutable=['batch_stats'], train=True)
      return losses.fsp_l2(fsp.fsp_matrices(feats), target, normalize='teacher'), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, changes), updates['batch_stats'], opt_state, loss

  params, batch_stats, history = variables['params'], variables['batch_stats'], []
  for _ in range(30):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    history.append(float(loss))
  assert np.all(np.isfinite(history)) and history[-1] < 0.5 * history[0], history


class SmallNnxCnn(nnx.Module):
  """An NNX network fsp_jax knows nothing about (Flax's recommended API for new code)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv0 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(8, 8, (3, 3), rngs=rngs),
                            nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)])
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv0(x))
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(x.mean(axis=(1, 2)))


def test_capture_takes_an_nnx_module_and_leaves_it_as_it_was():
  model = SmallNnxCnn(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  points = {'stage1_in': 'conv0', 'stage1_out': 'blocks/0', 'stage2_in': 'blocks/0',
            'stage2_out': 'blocks/1'}
  logits, feats = features.capture(model, x, points)
  np.testing.assert_allclose(logits, model(x), rtol=1e-6)
  np.testing.assert_allclose(feats['stage1_in'], model.conv0(x), rtol=1e-6)
  assert feats['stage2_out'].shape == (2, 4, 4, 16)
  assert [g.shape for g in fsp.fsp_matrices(feats)] == [(2, 8, 8), (2, 8, 16)]
  assert type(model.blocks[0]) is nnx.Conv  # The recording class is gone.
  with pytest.raises(ValueError, match=r"\['blocks/7'\] are not in SmallNnxCnn; its paths are: "
                                       r'blocks, blocks/0, blocks/1, conv0, head'):
    features.capture(model, x, ['blocks/7'])
  with pytest.raises(ValueError, match=r'capture\(model, x, points\)'):
    features.capture(model, {}, x, points)


@pytest.mark.parametrize('call,pattern', [
    (lambda: fsp.fsp_matrix(jnp.ones((2, 16, 8, 8)), jnp.ones((2, 32, 4, 4))),
     r'one is larger in H, the other in W.*NCHW'),
    (lambda: fsp.fsp_matrix(jnp.ones((2, 4, 4, 3), jnp.complex64), jnp.ones((2, 4, 4, 3))),
     r'f1 must hold real floating or integer values, got dtype complex64'),
    (lambda: fsp.fsp_matrix(jnp.ones((2, 0, 0, 3)), jnp.ones((2, 0, 0, 3))),
     r'H, W, C >= 1, got shape \(2, 0, 0, 3\)'),
    (lambda: fsp.fsp_matrix(jnp.ones((4, 3)), jnp.ones((4, 3))), r'f1 must be an NHWC batch'),
    (lambda: fsp.fsp_matrix({'a': 1}, jnp.ones((4, 3))), r'f1 must be an array, got dict'),
    (lambda: fsp.fsp_matrices({'stagex_in': jnp.ones((1, 2, 2, 1))}),
     r"\['stagex_in'\] are not of the form stageK_in"),
    (lambda: fsp.fsp_matrices([jnp.ones((1, 2, 2, 1))]), r'features must be a mapping'),
    (lambda: losses.fsp_l2([jnp.ones((2, 4, 4, 3))], [jnp.ones((2, 4, 4, 3))]),
     r'student FSP matrix 0 must be of rank 3 \[B, M, N\], got shape \(2, 4, 4, 3\)'),
    (lambda: losses.fsp_l2([jnp.ones((2, 3, 3))], [jnp.ones((4, 3, 3))]),
     r"student's batch of 2 and the teacher's of 4 differ"),
    (lambda: losses.fsp_l2([jnp.ones((2, 3, 3), jnp.complex64)], [jnp.ones((2, 3, 3))]),
     r'student FSP matrix 0 must hold real'),
    (lambda: features.capture(SmallCnn(), {}, jnp.ones((1, 8, 8, 3)), 'conv0'),
     r"points must be .* got 'conv0' \(a single path is \['conv0'\]\)"),
], ids=['nchw', 'complex', 'empty maps', 'rank 2', 'dict', 'stage name', 'not a mapping',
        'features to fsp_l2', 'batch sizes', 'complex matrices', 'points a string'])
def test_the_notebook_api_refuses_what_it_cannot_mean(call, pattern):
  with pytest.raises(ValueError, match=pattern) as error:
    call()
  assert '\n' not in str(error.value)
