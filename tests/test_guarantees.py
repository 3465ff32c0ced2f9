"""Direct tests of guarantees that the rest of the suite kept only by accident: each docstring
names the mutation of the code that the test was written to fail on."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import checkpoints, data, device_data, methods, models, results, steps
from fsp_jax import layout, phase_loop, terms, trainer
from fsp_jax import workdir as workdir_lib
from fsp_jax.adapters import Student
import helpers
from fsp_jax.schedules import Schedule
from fsp_jax.terms import Phase, Term


def test_net_k_starts_from_seed_plus_k_minus_1():
  """Net 1 is drawn from config.seed, net 2 from config.seed + 1. Mutations: every net of a
  method using the same seed; net k using seed + k."""
  config = common.tiny(config_lib.default())
  config.seed = 5
  plan, ctx = helpers.planned(config)
  student = Student(models.get('resnet8', 10, 1, axis_name='batch'))
  row = dataclasses.replace(plan.rows[0], network=student)
  first, second = (trainer.initial_variables(ctx, trainer.Run(row, k)) for k in (1, 2))
  expected = steps.init_variables(student, jax.random.key(5), config.data.image_size)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Jitted there: float order.
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_the_shuffled_control_shuffles_at_its_default_seed_0():
  """fsp_shuffled's default shuffle_seed is 0, and 0 permutes: a student equal to the teacher
  has no loss against the true matrices and a large one against the shuffled. Mutation: the
  shuffle skipped when its seed is 0 (`if shuffle_seed:`)."""
  config = config_lib.default()
  options = dict(methods.get('fsp_shuffled').phases(config)[0].terms[0].options)
  assert options['shuffle_seed'] == 0
  features = {f'stage{k}_{end}': jax.random.uniform(jax.random.key(k + (end == 'out')),
                                                    (2, 4, 4, 8)) for k in (1, 2)
              for end in ('in', 'out')}
  out = terms.Outputs(logits=None, features=features, labels=None, teacher_features=features)
  assert float(terms.TERMS['fsp'].fn(out)) == 0.0
  assert float(terms.TERMS['fsp'].fn(out, shuffle_seed=0)) > 0.1


def test_a_phases_gradient_clipping_reaches_its_optimizer():
  """A gradient of norm 100 in a phase clipped to 1 moves the parameters by the rate times 1.
  Mutation: the trainer not passing the phase's max_grad_norm to its optimizer."""
  config = config_lib.default()
  config.weight_decay = 0.0
  phase = Phase('stage1', Schedule((1e-3,), (10,)), (Term('fsp', (1.0, 1.0)),),
                max_grad_norm=1.0)
  tx = phase_loop.phase_optimizer(phase, config.weight_decay, config.momentum)
  params = {'w': jnp.zeros(3)}
  updates, _ = tx.update({'w': jnp.array([100.0, 0.0, 0.0])}, tx.init(params), params)
  assert float(jnp.linalg.norm(updates['w'])) == pytest.approx(1e-3, rel=1e-4)


def test_every_setting_that_changes_results_is_a_config_change():
  """Each key of the default config but the neutral ones, changed alone, is reported.
  Mutation: the changed-config check ignoring batch_size."""
  flat = layout.flat(config_lib.default().to_dict())
  for key, value in flat.items():
    changed = dict(flat, **{key: (value, 'changed')})
    found = workdir_lib.config_changes(flat, changed)
    assert (key in found) == (key not in workdir_lib.NEUTRAL_KEYS), key
  assert 'batch_size' in workdir_lib.config_changes({'batch_size': 32}, {'batch_size': 64})


def test_the_ensemble_averages_probabilities_not_log_probabilities():
  """Two nets sure of class 0 and one sure of class 1: the mean probability picks class 0, the
  mean log-probability class 1. Mutation: averaging log-probabilities (a geometric mean)."""
  probs = [np.array([[0.9, 0.1]]), np.array([[0.9, 0.1]]), np.array([[1e-4, 1 - 1e-4]])]
  assert results.ensemble_accuracy(probs, np.array([0])) == 1.0


def test_each_epoch_visits_the_examples_in_a_new_order():
  """Epoch 0 and epoch 1 of the same seed are different permutations of every example.
  Mutation: every epoch visiting the examples in the same order."""
  n, batch = 24, 8
  epochs = [np.concatenate([data.train_indices(n, batch, 0, step)
                            for step in range(e * 3, e * 3 + 3)]) for e in (0, 1)]
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert not np.array_equal(*epochs)


def test_the_channel_adapters_batchnorm_averages_over_devices():
  """Under pmap, every device's adapter BatchNorm statistics are those of the whole batch.
  Mutation: the channel adapter's BatchNorm not averaged over devices (axis_name dropped)."""
  student = Student(models.get('resnet8', 10, 1, axis_name='batch'),
                    adapter=(('stage1_out', 32),))
  variables = steps.init_variables(student, jax.random.key(0), 16)

  def adapter_stats(v, x):
    _, updates = student.apply(v, x, train=True, mutable=['batch_stats'])
    return updates['batch_stats']['adapter']

  devices = jax.local_device_count()
  x = jax.random.normal(jax.random.key(1), (devices, 2, 16, 16, 3)) * jnp.arange(
      1, devices + 1)[:, None, None, None, None]  # Each device's images of another scale.
  stats = jax.pmap(adapter_stats, axis_name='batch')(steps.replicate(variables), x)
  for leaf in jax.tree.leaves(stats):
    for k in range(1, devices):
      np.testing.assert_allclose(leaf[k], leaf[0], rtol=1e-5, atol=1e-6)
  assert devices > 1, 'needs several devices (tests/conftest.py fakes 4)'


def test_a_failed_save_leaves_every_kept_checkpoint(tmp_path):
  """With two checkpoints kept, a third save that fails leaves both, and a third that succeeds
  drops the oldest only once it is committed. Mutation: a save deleting the oldest kept
  checkpoint before the new one is committed."""
  saved = lambda: sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit())
  phase = checkpoints.PhaseCheckpoints(str(tmp_path), keep=2, where='test')
  for step in (1, 2):
    phase.save(step, {'w': np.full(3, step, np.float32)}, {'step': step})
  phase.save(3, {'w': object()}, {'step': 3})  # Orbax cannot save an object.
  with pytest.raises(checkpoints.WriteError, match=r'checkpoint 3 could not be written.*'
                                                   r'checkpoint 2 there is intact'):
    phase.wait()
  assert saved() == [1, 2]
  phase.close()
  phase = checkpoints.PhaseCheckpoints(str(tmp_path), keep=2, where='test')
  phase.save(3, {'w': np.full(3, 3, np.float32)}, {'step': 3})
  phase.wait()
  assert saved() == [2, 3]
  phase.close()


def test_the_device_path_brings_each_examples_own_cached_teacher_matrices():
  """Example i's cached matrices are filled with i, its label is i: a gathered batch's matrices
  and labels agree. Mutation: the on-device path looking up the cached teacher matrices of the
  wrong example."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  n = 10
  placed = device_data.Placed(
      np.zeros((n, 8, 8, 3), np.uint8), np.arange(n, dtype=np.int32),
      (np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 2, 3), np.float32),))
  preprocess = data.get_preprocess(ml_collections.ConfigDict(
      dict(image_size=8, augment='none', normalize='cifar')))
  indices = jnp.array([5, 2, 7, 0])
  batch = device_data.gather(placed, preprocess, indices, None)
  np.testing.assert_array_equal(batch['label'], indices)
  np.testing.assert_array_equal(batch['teacher_fsp'][0][:, 0, 0], indices)
