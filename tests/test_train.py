"""Training steps, multi-device equivalence, resume and config validation."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from fsp_jax import config as config_lib
from fsp_jax import data, models, train

IMAGE_SIZE = 16


@pytest.fixture(scope='module')
def batch():
  source = data.digits_source('train', IMAGE_SIZE)
  preprocess = data.Preprocess(IMAGE_SIZE, 'none')
  return next(data.train_batches(source, preprocess, 16, seed=0, process_index=0,
                                 process_count=1))


def _student(name):
  return train.Student(models.get(name, 10, axis_name='batch'))


def _on_devices(tree, devices):
  """[devices, ...] copies of a host pytree, without the replication helper's device choice."""
  return jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * devices), tree)


def _settled_teacher(batch):
  """A random ResNet-14 whose BatchNorm statistics were gathered on the batch."""
  teacher = _student('resnet14')
  state = train.create_train_state(teacher, jax.random.key(0), IMAGE_SIZE,
                                   train.optimizer(config_lib.default()))
  plain = train.Student(models.get('resnet14', 10))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  for _ in range(30):
    _, updates = plain.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    variables = {'params': state.params, 'batch_stats': updates['batch_stats']}
  return teacher, variables


def test_stage1_halves_the_fsp_loss(batch):
  teacher, teacher_variables = _settled_teacher(batch)
  student = _student('resnet8')
  tx = train.optimizer(config_lib.default())
  state = _on_devices(train.create_train_state(student, jax.random.key(1), IMAGE_SIZE, tx), 1)
  step = train.make_train_step(student, teacher, train.Terms(('fsp',)), tx)
  shards, teacher_variables = data.shard(batch, 1), _on_devices(teacher_variables, 1)
  history = []
  for _ in range(20):
    state, metrics = step(state, shards, teacher_variables, np.float32(1e-3),
                          {'fsp': np.float32(1.0)})
    history.append(float(metrics['fsp'][0]))
  assert np.all(np.isfinite(history))
  assert history[-1] < 0.5 * history[0], history


def test_cached_teacher_matrices_give_the_same_step(batch):
  """config.fsp.cache: matrices computed once per example replace the teacher pass."""
  teacher, teacher_variables = _settled_teacher(batch)
  source = data.digits_source('train', IMAGE_SIZE)
  cache = train.teacher_fsp_cache(teacher, _on_devices(teacher_variables, jax.local_device_count()),
                                  source, data.Preprocess(IMAGE_SIZE, 'none'), 120)
  teacher_variables = _on_devices(teacher_variables, 1)
  assert [g.shape for g in cache] == [(len(source), 16, 16), (len(source), 16, 32),
                                      (len(source), 32, 64)]
  student, tx = _student('resnet8'), train.optimizer(config_lib.default())
  new_states = []
  for terms, with_cache in ((train.Terms(('fsp',)), None),
                            (train.Terms(('fsp',), cached_fsp=True), cache)):
    state = _on_devices(train.create_train_state(student, jax.random.key(1), IMAGE_SIZE, tx), 1)
    step = train.make_train_step(student, teacher, terms, tx)
    shards = data.shard(train._with_teacher_fsp(dict(batch), with_cache), 1)
    state, _ = step(state, shards, teacher_variables, np.float32(1e-3), {'fsp': np.float32(1.0)})
    new_states.append(state.params)
  chex.assert_trees_all_close(*new_states, rtol=1e-5, atol=1e-6)


def test_cached_run_trains(tmp_path):
  config = config_lib.tiny(config_lib.default())
  config.methods, config.num_nets, config.fsp.cache = 'fsp', 1, True
  config.teacher.model = config.student.model = 'resnet8'
  rows = train.train_and_evaluate(config, str(tmp_path))
  assert [row['method'] for row in rows] == ['teacher', 'fsp']
  with open(tmp_path / 'fsp' / 'net1' / 'history.json') as f:
    stage1 = [loss for _, phase, loss in json.load(f)['train'] if phase == 'stage1']
  assert len(stage1) == config.fsp.stage1.until[-1] and np.all(np.isfinite(stage1))


def test_task_step_lowers_the_loss(batch):
  student = _student('resnet8')
  tx = train.optimizer(config_lib.default())
  state = _on_devices(train.create_train_state(student, jax.random.key(1), IMAGE_SIZE, tx), 1)
  step = train.make_train_step(student, None, train.Terms(('ce',)), tx)
  shards = data.shard(batch, 1)
  losses = []
  for _ in range(2):  # The loss reported by step k is measured before its update.
    state, metrics = step(state, shards, None, np.float32(0.1), {'ce': np.float32(1.0)})
    losses.append(float(metrics['ce'][0]))
  assert losses[1] < losses[0]


@pytest.mark.parametrize('terms,lr', [(('ce',), 0.1), (('fsp',), 1e-3)])  # The paper's rates.
def test_eight_devices_equal_one(batch, terms, lr):
  assert jax.local_device_count() >= 8, 'tests/conftest.py asks for 8 fake CPU devices'
  teacher, teacher_variables = _settled_teacher(batch)
  student = _student('resnet8')
  tx = train.optimizer(config_lib.default())
  state = train.create_train_state(student, jax.random.key(1), IMAGE_SIZE, tx)
  step = train.make_train_step(student, teacher, train.Terms(terms), tx)
  results = []
  for devices in (1, 8):
    new_state, _ = step(_on_devices(state, devices), data.shard(batch, devices),
                        _on_devices(teacher_variables, devices), np.float32(lr),
                        {terms[0]: np.float32(1.0)})
    results.append(jax.device_get(jax.tree_util.tree_map(lambda x: x[0], new_state)))
  for kind in ('params', 'batch_stats'):
    for one, eight in zip(jax.tree_util.tree_leaves(getattr(results[0], kind)),
                          jax.tree_util.tree_leaves(getattr(results[1], kind))):
      np.testing.assert_allclose(one, eight, atol=1e-5, rtol=1e-5)  # float32 sum orders
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(results[0].params),
                                               jax.tree_util.tree_leaves(state.params))]
  assert max(moved) > 1e-4  # The step did something.


def _tiny_config(methods):
  config = config_lib.tiny(config_lib.default())
  config.methods = methods
  config.num_nets = 1
  config.teacher.model, config.student.model = 'resnet14', 'resnet8'
  config.teacher.schedule = config_lib.schedule((0.1,), (3,))
  config.fsp.stage1 = config_lib.schedule((1e-3,), (3,))
  config.fsp.stage2 = config_lib.schedule((0.1, 0.01), (3, 5))
  config.checkpoint_every = 2
  config.keep_checkpoints = 5
  return config


def _final_params(workdir, method):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(workdir, method, 'net1', 'model')))


def test_resumed_run_equals_uninterrupted(tmp_path, capsys):
  config = _tiny_config('fsp')
  uninterrupted = str(tmp_path / 'a')
  rows = train.train_and_evaluate(config, uninterrupted)
  assert [r['method'] for r in rows] == ['teacher', 'fsp']
  assert os.path.exists(os.path.join(uninterrupted, 'results.md'))
  interrupted = str(tmp_path / 'b')
  shutil.copytree(uninterrupted, interrupted)
  # A copy stopped after the stage-2 checkpoint at step 4, whose files then got corrupted: the
  # run must fall back to step 2 and still end exactly as the uninterrupted one.
  run_dir = os.path.join(interrupted, 'fsp', 'net1')
  os.remove(os.path.join(run_dir, 'result.json'))
  for path in ('model', os.path.join('stage2', '5')):
    shutil.rmtree(os.path.join(run_dir, path))
  corrupted = 0
  for folder, _, files in os.walk(os.path.join(run_dir, 'stage2', '4')):
    for name in files:
      if os.sep + 'd' in folder:  # The array data files.
        with open(os.path.join(folder, name), 'wb') as f:
          f.write(b'garbage')
        corrupted += 1
  assert corrupted and sorted(os.listdir(os.path.join(run_dir, 'stage2'))) == ['2', '4']
  rows = train.train_and_evaluate(config, interrupted)
  expected, resumed = _final_params(uninterrupted, 'fsp'), _final_params(interrupted, 'fsp')
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert rows[-1]['iterations'] == 3 + 5
  output = capsys.readouterr().out
  assert 'checkpoint 4 is unreadable' in output and 'resumed from step 2' in output
  histories = [json.load(open(os.path.join(d, 'fsp', 'net1', 'result.json')))['history']
               for d in (uninterrupted, interrupted)]
  assert histories[0] == histories[1] and len(histories[0]['train']) == 3 + 5


def _error(config, tmp_path):
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'teacher'), 'failed after training began'
  return str(error.value)


@pytest.mark.parametrize('key,value,message', [
    ('student.model', 'resnet9', r"config.student.model: Unknown model 'resnet9'.*resnet26"),
    ('data.name', 'imagenet', r"config.data.name: unknown data set 'imagenet'.*digits"),
    ('methods', 'fsp,hint', r"config.methods: unknown \['hint'\].*fsp_shuffled, fitnet, kd"),
    ('teacher.checkpoint', '/no/such/teacher', r"config.teacher.checkpoint: '/no/such/teacher' "
     'does not exist'),
    ('fsp.stage2.until', (5, 3), r'config.fsp.stage2.until: .*increasing order, got \(5, 3\)'),
    ('batch_size', 12, r'config.batch_size: 12 is not divisible by the 8 devices'),
    ('teacher.width', 2, r"config.student.model='resnet8' \(width 1\) cannot be paired with "
     r"config.teacher.model='resnet14' \(width 2\).*adapter"),
    ('student.model', 'resnet18', r"cannot be paired.*student has 4 FSP matrices and the "
     'teacher 3'),
])
def test_bad_config_fails_before_training(tmp_path, key, value, message):
  config = _tiny_config('scratch,fsp')
  section, _, name = key.rpartition('.')
  (config if not section else config_lib._get(config, section))[name] = value  # pylint: disable=protected-access
  assert __import__('re').search(message, _error(config, tmp_path))


def test_adapter_pairs_different_widths(tmp_path):
  config = _tiny_config('fsp')
  config.teacher.width = 2
  config.student.adapter = True
  rows = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert rows[-1]['method'] == 'fsp' and 0.0 <= rows[-1]['avg'] <= 1.0
