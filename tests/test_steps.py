"""The pmapped steps: stage 1 and the task step learn, cached teacher matrices, devices."""

import chex
import jax
import numpy as np
import pytest

from fsp_jax import config as config_lib
from fsp_jax import data, experiment, models, sources, steps
from fsp_jax.adapters import Student
from fsp_jax.schedules import Schedule
from fsp_jax.terms import Phase, Term

IMAGE_SIZE = 16


@pytest.fixture(scope='module')
def batch():
  source = sources.digits_source('train', IMAGE_SIZE)
  preprocess = data.Preprocess(IMAGE_SIZE, 'none')
  batch = next(data.train_batches(source, preprocess, 16, seed=0, process_index=0,
                                  process_count=1))
  batch.pop('index')
  return batch


def _student(name):
  return Student(models.get(name, 10, axis_name='batch'))


def _one_step(batch):
  """A call's inputs holding one step: [devices, 1, b, ...]."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], batch)


def _on_devices(tree, devices):
  """[devices, ...] copies of a host pytree, without the replication helper's device choice."""
  return jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * devices), tree)


FSP_WEIGHT = config_lib.default().fsp.weight  # The stage-1 term's weight in experiments.


def _phase(term, lr, steps=20, **options):
  weight = FSP_WEIGHT if term == 'fsp' else 1.0
  return Phase('stage1', Schedule((lr,), (steps,)),
               (Term(term, (weight, weight), tuple(options.items())),))


def _state(student, phase, devices=1):
  tx = steps.optimizer(phase.schedule, 1e-4, 0.9)
  return tx, _on_devices(steps.create_train_state(student, jax.random.key(1), IMAGE_SIZE, tx),
                         devices)


def _settled_teacher(batch):
  """A random ResNet-14 whose BatchNorm statistics were gathered on the batch."""
  teacher, plain = _student('resnet14'), Student(models.get('resnet14', 10))
  variables = steps.init_variables(teacher, jax.random.key(0), IMAGE_SIZE)
  for _ in range(30):
    _, updates = plain.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    variables = {'params': variables['params'], 'batch_stats': updates['batch_stats']}
  return teacher, variables


def test_stage1_halves_the_fsp_loss(batch):
  teacher, teacher_variables = _settled_teacher(batch)
  student, phase = _student('resnet8'), _phase('fsp', 1e-3)
  tx, state = _state(student, phase)
  step = steps.make_train_step(student, teacher, phase, tx)
  shards, teacher_variables = data.shard(batch, 1), _on_devices(teacher_variables, 1)
  history = []
  for _ in range(20):
    state, metrics = step(state, _one_step(shards), teacher_variables, None)
    history.append(float(metrics['fsp'][0, 0]))
  assert np.all(np.isfinite(history))
  assert history[-1] < 0.5 * history[0], history


def test_cached_teacher_matrices_give_the_same_step(batch):
  """config.fsp.cache: matrices computed once per example replace the teacher pass."""
  teacher, teacher_variables = _settled_teacher(batch)
  source = sources.digits_source('train', IMAGE_SIZE)
  cache = experiment.teacher_fsp_cache(
      teacher, _on_devices(teacher_variables, jax.local_device_count()), source,
      data.Preprocess(IMAGE_SIZE, 'none'), 120)
  assert [g.shape for g in cache] == [(len(source), 16, 16), (len(source), 16, 32),
                                      (len(source), 32, 64)]
  indices = data.train_indices(len(source), 16, 0, 0)  # The batch's examples.
  student, new_params = _student('resnet8'), []
  for phase, extra in ((_phase('fsp', 1e-3), {}),
                       (_phase('fsp', 1e-3, cached=True),
                        {'teacher_fsp': [g[indices] for g in cache]})):
    tx, state = _state(student, phase)
    step = steps.make_train_step(student, teacher, phase, tx)
    state, _ = step(state, _one_step(data.shard({**batch, **extra}, 1)),
                    _on_devices(teacher_variables, 1), None)
    new_params.append(state.params)
  chex.assert_trees_all_close(*new_params, rtol=1e-5, atol=1e-6)


def test_task_step_lowers_the_loss(batch):
  student, phase = _student('resnet8'), _phase('ce', 0.1)
  tx, state = _state(student, phase)
  step = steps.make_train_step(student, None, phase, tx)
  shards = data.shard(batch, 1)
  losses = []
  for _ in range(2):  # The loss reported by step k is measured before its update.
    state, metrics = step(state, _one_step(shards), None, None)
    losses.append(float(metrics['ce'][0, 0]))
  assert losses[1] < losses[0]
  assert float(metrics['lr'][0, 0]) == np.float32(0.1)


@pytest.mark.parametrize('term,lr', [('ce', 0.1), ('fsp', 1e-3)])  # The paper's rates.
def test_four_devices_equal_one(batch, term, lr):
  assert jax.local_device_count() >= 4, 'tests/conftest.py asks for 4 fake CPU devices'
  teacher, teacher_variables = _settled_teacher(batch)
  student, phase = _student('resnet8'), _phase(term, lr)
  tx, state = _state(student, phase)
  step = steps.make_train_step(student, teacher, phase, tx)
  host_state = jax.tree_util.tree_map(lambda x: x[0], state)
  results = []
  for devices in (1, 4):
    new_state, _ = step(_on_devices(host_state, devices), _one_step(data.shard(batch, devices)),
                        _on_devices(teacher_variables, devices), None)
    results.append(jax.device_get(jax.tree_util.tree_map(lambda x: x[0], new_state)))
  for kind in ('params', 'batch_stats'):
    for one, four in zip(jax.tree_util.tree_leaves(getattr(results[0], kind)),
                          jax.tree_util.tree_leaves(getattr(results[1], kind))):
      np.testing.assert_allclose(one, four, atol=1e-5, rtol=1e-5)  # float32 sum orders
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(results[0].params),
                                               jax.tree_util.tree_leaves(host_state.params))]
  assert max(moved) > 1e-4  # The step did something.


def test_term_weights_go_linearly_from_start_to_end():
  phase = Phase('stage2', Schedule((0.1,), (5,)), (Term('ce'), Term('kd', (4.0, 1.0))))
  weights = [steps.term_weights(phase, np.int32(s)) for s in range(5)]
  assert [float(w['ce']) for w in weights] == [1.0] * 5
  np.testing.assert_allclose([float(w['kd']) for w in weights], [4.0, 3.25, 2.5, 1.75, 1.0],
                             rtol=1e-6)


def test_optimizer_clips_the_loss_gradient_before_weight_decay():
  params = {'w': np.full(4, 2.0, np.float32)}
  grads = {'w': np.full(4, 500.0, np.float32)}  # Global norm 1000.
  tx = steps.optimizer(Schedule((0.1,), (1,)), 0.5, 0.0, max_grad_norm=10.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * (5.0 + 0.5 * 2.0), rtol=1e-6)
  unclipped = steps.optimizer(Schedule((0.1,), (1,)), 0.5, 0.0)
  updates, _ = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * (500.0 + 0.5 * 2.0), rtol=1e-6)


def test_optimizer_follows_the_schedule_inside_its_state():
  sched = Schedule((0.1, 0.01, 0.001), (3, 5, 6))
  tx = steps.optimizer(sched, 0.0, 0.9)
  params = {'w': np.zeros(2, np.float32)}
  state, rates = tx.init(params), []
  for _ in range(6):
    _, state = tx.update({'w': np.ones(2, np.float32)}, state, params)
    rates.append(float(steps.learning_rate(state)))
  np.testing.assert_allclose(rates, [0.1, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
