"""Each method's record: its phases, schedules, loss terms and weights, and its student."""

import jax
import numpy as np
import pytest

from fsp_jax import config as config_lib
from fsp_jax import methods, models, steps, terms, trainer, validation
from fsp_jax import plan as plan_lib


@pytest.fixture
def config():
  return config_lib.default()


def _summary(method, config):
  """[(phase, schedule, ((term, weights, options), ...)), ...]."""
  return [(p.name, tuple(p.schedule), tuple((t.name, t.weight, dict(t.options))
                                             for t in p.terms))
          for p in methods.get(method).phases(config)]


def test_every_method_has_a_label_colour_and_valid_phases(config):
  for method in [methods.TEACHER, *methods.METHODS.values()]:
    assert method.label and method.color
    phases = method.phases(config)
    assert [p.name for p in phases] in (['train'], ['stage1', 'stage2'])
    assert all(t.name in terms.TERMS for p in phases for t in p.terms)


def test_scratch_and_teacher_scratch_train_alone_on_the_task_schedule(config):
  task = (('ce', (1.0, 1.0), {}),)
  paper = ((0.1, 0.01, 0.001), (11_000, 16_000, 21_000), 0, 'step')
  assert _summary('scratch', config) == [('train', paper, task)]
  assert _summary('teacher_scratch', config) == [('train', paper, task)]
  assert methods.get('teacher_scratch').network == 'teacher'
  assert not methods.get('scratch').uses_teacher(config)
  assert _summary('teacher', config)[0][1] == (
      (0.1, 0.01, 0.001), (32_000, 48_000, 64_000), 0, 'step')


def test_scratch_matched_trains_alone_as_long_as_fsp_with_the_task_schedules_shape(config):
  config.scratch = config_lib.schedule((0.025,), (8_333,), warmup=166, decay='cosine')
  config.fsp.stage1 = config_lib.schedule((1e-3, 1e-4), (1_000, 2_777))
  config.fsp.stage2 = config.scratch
  assert _summary('scratch_matched', config) == [
      ('train', ((0.025,), (11_110,), 221, 'cosine'), (('ce', (1.0, 1.0), {}),))]
  assert config.scratch.until == (8_333,)  # The task schedule itself is left as it was.
  assert not methods.get('scratch_matched').uses_teacher(config)


@pytest.mark.parametrize('name,section', [('kd_matched', 'kd'), ('at_matched', 'at'),
                                          ('teacher_scratch_matched', 'scratch')])
def test_one_stage_methods_stretched_to_fsps_iterations_keep_their_terms(config, name, section):
  """The budget-matched baselines: the same loss terms, the schedule's shape kept, FSP's total
  length (one stretch for every one-stage method, not a copy per method)."""
  base = methods.get(name.removesuffix('_matched'))
  schedule = config_lib.schedule((0.025,), (8_333,), warmup=166, decay='cosine')
  config[section] = schedule if section == 'scratch' else config[section]
  if section != 'scratch':
    config[section].schedule = schedule
  config.fsp.stage1 = config_lib.schedule((1e-3, 1e-4), (1_000, 2_777))
  config.fsp.stage2 = schedule
  (phase,), (matched,) = base.phases(config), methods.get(name).phases(config)
  assert tuple(matched.schedule) == ((0.025,), (11_110,), 221, 'cosine')
  assert phase.schedule.until == (8_333,) and matched.terms == phase.terms
  assert methods.get(name).network == base.network
  assert methods.get(name).uses_teacher(config) == base.uses_teacher(config)
  with pytest.raises(ValueError):  # Two phases cannot be stretched as one.
    methods.stretched(methods.get('fsp').phases(config), 100)


def test_fsp_random_is_fsp_against_a_random_teacher_never_the_cache(config):
  config.fsp.cache = True
  random, fsp = methods.get('fsp_random'), methods.get('fsp')
  assert random.random_teacher and not fsp.random_teacher
  assert [p.schedule for p in random.phases(config)] == [p.schedule for p in fsp.phases(config)]
  assert dict(random.phases(config)[0].terms[0].options)['cached'] is False
  assert dict(fsp.phases(config)[0].terms[0].options)['cached'] is True


def test_fsp_has_the_papers_two_stages(config):
  options = {'normalize': config.fsp.normalize, 'weights': None, 'shuffle_seed': None}
  assert _summary('fsp', config) == [
      ('stage1', ((1e-3, 1e-4, 1e-5), (11_000, 16_000, 21_000), 0, 'step'),
       (('fsp', (100.0, 100.0), {**options, 'cached': False}),)),
      ('stage2', ((0.1, 0.01, 0.001), (11_000, 16_000, 21_000), 0, 'step'),
       (('ce', (1.0, 1.0), {}),))]
  config.fsp.task_weight, config.fsp.cache = 0.5, True
  stage1, stage2 = _summary('fsp', config)
  assert stage1[2][0][2]['cached'] and stage2[2][1] == ('fsp', (0.5, 0.5), options)
  stage1, stage2 = methods.get('fsp').phases(config)
  assert (stage1.max_grad_norm, stage2.max_grad_norm) == (100.0, 0.0)
  assert methods.get('fsp').uses_teacher(config)


def test_fsp_shuffled_permutes_the_teachers_rows_and_columns(config):
  (_, _, ((_, _, options),)), _ = _summary('fsp_shuffled', config)
  assert options['shuffle_seed'] == config.fsp.shuffle_seed
  g = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  shuffled = terms.shuffle_fsp([g], 0)[0]
  rows = np.random.default_rng(0).permutation(3)
  cols = np.random.default_rng(0)
  cols.permutation(3)
  np.testing.assert_array_equal(shuffled, g[:, rows][:, :, cols.permutation(4)])
  assert not np.array_equal(shuffled, g)
  np.testing.assert_array_equal(np.sort(shuffled.ravel()), np.sort(g.ravel()))


def test_fitnet_hint_stage_as_fsps_stage1_and_kd_weight_over_tau_squared(config):
  hint, task = _summary('fitnet', config)
  assert hint == ('stage1', ((1e-4, 1e-5), (25_000, 35_000), 0, 'step'),
                  (('hint', (100.0, 100.0), {'layer': 'stage2_out', 'normalize': 'teacher'}),))
  stage1, stage2 = methods.get('fitnet').phases(config)
  assert (stage1.max_grad_norm, stage2.max_grad_norm) == (100.0, 0.0)
  assert task[2] == (('ce', (1.0, 1.0), {}), ('kd', (4.0 / 9.0, 1.0 / 9.0),
                                              {'temperature': 3.0}))
  config.fitnet.kd_weight = (0.0, 0.0)  # A teacher of other classes: cross-entropy alone.
  assert _summary('fitnet', config)[1][2] == (('ce', (1.0, 1.0), {}),)


def test_kd_and_finetune(config):
  assert _summary('kd', config)[0][2] == (('ce', (0.1, 0.1), {}),
                                          ('kd', (0.9, 0.9), {'temperature': 4.0}))
  finetune = methods.get('finetune')
  assert finetune.starts_from_teacher and finetune.network == 'teacher'
  assert _summary('finetune', config)[0][1][0] == (0.01, 0.001, 0.0001)


def test_start_from_copies_the_backbone_and_the_head_of_the_same_classes():
  model = methods.Student(models.get('resnet8', 10))
  fresh = steps.init_variables(model, jax.random.key(0), 16)
  pretrained = steps.init_variables(model, jax.random.key(1), 16)
  started = trainer.start_from(fresh, pretrained, keep_head=False)
  backbone, old = started['params']['backbone'], pretrained['params']['backbone']
  for name in backbone:
    same = jax.tree_util.tree_map(np.array_equal, backbone[name], (
        fresh['params']['backbone'] if name == 'head' else old)[name])
    assert all(jax.tree_util.tree_leaves(same)), name
  assert not np.array_equal(backbone['head']['kernel'], old['head']['kernel'])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, started['batch_stats'], pretrained['batch_stats']))
  restarted = trainer.start_from(fresh, pretrained, keep_head=True)  # The same classes.
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, restarted['params'], pretrained['params']))


def test_students_get_what_their_method_adds(config):
  config.student.model = 'resnet8'
  teacher = methods.Student(plan_lib.build_model(config.teacher, 10, 'float32'))
  fitnet = plan_lib.build_student(methods.get('fitnet'), config, 10, teacher)
  assert fitnet.hint == ('stage2_out', 32) and not fitnet.adapter
  config.teacher.width = 2
  teacher = methods.Student(plan_lib.build_model(config.teacher, 10, 'float32'))
  with pytest.raises(ValueError, match='cannot be paired'):
    plan_lib.build_student(methods.get('fsp'), config, 10, teacher)
  config.student.adapter = True
  fsp_student = plan_lib.build_student(methods.get('fsp'), config, 10, teacher)
  assert dict(fsp_student.adapter) == {'stage1_in': 32, 'stage1_out': 32, 'stage2_in': 32,
                                       'stage2_out': 64, 'stage3_in': 64, 'stage3_out': 128}
  assert plan_lib.build_student(methods.get('scratch'), config, 10, teacher).adapter == ()


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match=r"Unknown method 'hint'.*fsp_shuffled"):
    methods.get('hint')


def test_attention_transfer_is_one_stage_with_the_authors_weight(config):
  assert _summary('at', config) == [
      ('train', ((0.1, 0.01, 0.001), (11_000, 16_000, 21_000), 0, 'step'),
       (('ce', (1.0, 1.0), {}), ('at', (500.0, 500.0), {})))]
  assert methods.get('at').uses_teacher(config)
  config.student.model = 'resnet8'
  teacher = methods.Student(plan_lib.build_model(config.teacher, 10, 'float32'))
  assert plan_lib.build_student(methods.get('at'), config, 10, teacher).hint is None
  config.at.weight = 0.0
  with pytest.raises(ValueError, match=r'config.at.weight: expected a finite number > 0'):
    validation.validate(config)
