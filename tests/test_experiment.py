"""Whole experiments: a cached stage 1, resume after a corrupt checkpoint, adapters, TensorBoard."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import data, evaluation, experiment, preemption, sources, steps, trainer
from fsp_jax.layout import Layout
import helpers


def _tiny_config(methods):
  config = common.tiny(config_lib.default())
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
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(os.path.join(workdir, method, 'net1', 'model')))


def test_cached_run_trains_and_a_resumed_run_reads_the_saved_matrices(tmp_path, capsys):
  config = common.tiny(config_lib.default())
  config.methods, config.num_nets, config.fsp.cache = 'fsp', 1, True
  config.teacher.model = config.student.model = 'resnet8'
  rows = experiment.train_and_evaluate(config, str(tmp_path))
  assert [row['method'] for row in rows] == ['teacher', 'fsp']
  with open(tmp_path / 'fsp' / 'net1' / 'result.json') as f:
    stage1 = [loss for _, phase, loss in json.load(f)['history']['train'] if phase == 'stage1']
  assert len(stage1) == config.fsp.stage1.until[-1] and np.all(np.isfinite(stage1))
  saved = Layout(str(tmp_path)).teacher_fsp
  assert "Cached the teacher's FSP matrices" in capsys.readouterr().out
  with np.load(saved) as f:
    first = {k: f[k] for k in f.files}
  config.num_nets = 2  # Net 2 needs the matrices: read, not computed.
  experiment.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  out = capsys.readouterr().out
  assert "Read the teacher's FSP matrices" in out and 'Cached' not in out
  # The saved matrices are those of another teacher: computed anew (and saved again).
  np.savez(saved, **{**first, 'key': 'another teacher'})
  config.num_nets = 3
  experiment.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  assert 'holds the matrices of another teacher' in capsys.readouterr().out
  with np.load(saved) as f:
    assert {k: f[k].tolist() for k in f.files} == {k: v.tolist() for k, v in first.items()}


def test_a_signal_stops_an_interruptible_pass_within_a_batch():
  """The teacher's FSP cache (an evaluation pass over the training split) stops at the next
  batch after a signal, instead of finishing the split first."""
  source = sources.digits_source('test', 16)
  preprocess = data.get_preprocess(_tiny_config('fsp').data)
  calls = []

  def step(variables, batch):  # Receives a signal during its first batch.
    calls.append(batch['image'].shape)
    preemption._on_signal(signal.SIGTERM, None)  # pylint: disable=protected-access
    return jax.numpy.zeros(batch['image'].shape[:2])

  try:
    with pytest.raises(preemption.Preempted, match=r"\[pass\] SIGTERM: stopped after 1 of 15 "
                       'batches'):
      evaluation.predict(step, None, source, preprocess, 24, interruptible='pass')
  finally:
    preemption._STOP.clear()  # pylint: disable=protected-access
  assert len(calls) == 1


def test_resumed_run_equals_uninterrupted(tmp_path, capsys):
  config = _tiny_config('fsp')
  uninterrupted = str(tmp_path / 'a')
  rows = experiment.train_and_evaluate(config, uninterrupted)
  assert [r['method'] for r in rows] == ['teacher', 'fsp']
  assert os.path.exists(os.path.join(uninterrupted, 'results.md'))
  interrupted = str(tmp_path / 'b')
  shutil.copytree(uninterrupted, interrupted)
  # A copy stopped after the stage-2 checkpoint at step 4, whose files then got corrupted: the
  # run must fall back to step 2, move 4 aside and still end exactly as the uninterrupted one.
  run_dir = os.path.join(interrupted, 'fsp', 'net1')
  os.remove(os.path.join(run_dir, 'result.json'))
  for path in ('model', os.path.join('stage2', '5')):
    shutil.rmtree(os.path.join(run_dir, path))
  with open(os.path.join(run_dir, 'stage2', '2', 'history', 'metadata')) as f:
    seconds_before = json.load(f)['train_s']  # Stage 1 and 2 steps of stage 2.
  corrupted = 0
  for folder, _, files in os.walk(os.path.join(run_dir, 'stage2', '4')):
    for name in files:
      if os.sep + 'd' in folder:  # The array data files.
        with open(os.path.join(folder, name), 'wb') as f:
          f.write(b'garbage')
        corrupted += 1
  assert corrupted and sorted(os.listdir(os.path.join(run_dir, 'stage2'))) == ['2', '4']
  capsys.readouterr()
  rows = experiment.train_and_evaluate(config, interrupted)
  expected, resumed = _final_params(uninterrupted, 'fsp'), _final_params(interrupted, 'fsp')
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert rows[-1]['iterations'] == 3 + 5
  output = capsys.readouterr().out
  assert 'checkpoint 4 is unreadable and was moved to 4.corrupt' in output
  assert 'resumed from step 2' in output and len(output.splitlines()) < 40, output
  assert sorted(os.listdir(os.path.join(run_dir, 'stage2'))) == ['2', '4', '4.corrupt', '5']
  results = [json.load(open(os.path.join(d, 'fsp', 'net1', 'result.json')))
             for d in (uninterrupted, interrupted)]
  curves = [{k: r['history'][k] for k in ('train', 'eval')} for r in results]
  assert curves[0] == curves[1] and len(curves[0]['train']) == 3 + 5
  # The wall time counts the first process's training up to the checkpoint resumed from.
  assert results[1]['wall_s'] > results[1]['history']['train_s'] > seconds_before > 0


def test_adapter_pairs_different_widths(tmp_path):
  config = _tiny_config('fsp')
  config.teacher.width = 2
  config.student.adapter = True
  rows = experiment.train_and_evaluate(config, str(tmp_path / 'run'))
  assert rows[-1]['method'] == 'fsp'
  helpers.assert_rows_are_their_nets_predictions(str(tmp_path / 'run'), rows)


def test_cached_stage1_batches_bring_their_own_examples_teacher_matrices():
  """Each example of a cached stage 1's batch comes with the teacher's matrices of that very
  (un-augmented) image. Mutation: an index off by one into the cache gives another example's."""
  config = _tiny_config('fsp')
  config.fsp.cache = True
  config.data.augment = 'cifar'  # The cached phase must still read un-augmented images.
  plan, ctx = helpers.planned(config)
  teacher = plan.teacher.network
  variables = steps.replicate(steps.init_variables(teacher, jax.random.key(3), 16))
  cache = experiment.teacher_fsp_cache(teacher, variables, plan.train, plan.preprocess, 120)
  feed = ctx.feed.with_teacher_fsp(cache)
  stage1 = plan.rows[0].phases[0]
  inputs = jax.device_get(next(feed.calls(ctx.loop.batch_size, ctx.loop.seed_of(1), 0,
                                          stage1.steps, ctx.loop.steps_per_call,
                                          stage1.augment)))
  images = {'image': inputs['image'][:, 0]}  # [devices, b, S, S, 3] of the call's one step.
  direct = steps.make_fsp_step(teacher)(variables, images)
  for cached, computed in zip(inputs['teacher_fsp'], direct):
    np.testing.assert_allclose(cached[:, 0], computed, rtol=1e-5, atol=1e-6)


def test_random_teacher_is_drawn_per_net_with_batchnorm_statistics_of_real_images():
  """fsp_random's teacher: the teacher's network at a draw of the net's seed other than the
  student's, its BatchNorm statistics taken in from training images (not the initial 0 / 1),
  the same for the same net and another for the next."""
  config = _tiny_config('fsp_random')
  config.teacher.model = config.student.model = 'resnet8'
  plan, ctx = helpers.planned(config)
  teacher = plan.teacher.network
  run = trainer.Run(plan.rows[0], 1, teacher, teacher)
  first, again = trainer.random_teacher(ctx, run), trainer.random_teacher(ctx, run)
  second = trainer.random_teacher(ctx, trainer.Run(run.row, 2, teacher, teacher))
  leaves = lambda v: jax.tree_util.tree_leaves(jax.device_get(v))
  for a, b in zip(leaves(first), leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(first), leaves(second)))
  student = steps.init_variables(teacher, jax.random.key(ctx.loop.seed_of(run.net)), 16)
  assert any(not np.array_equal(a, b[0]) for a, b in zip(
      jax.tree_util.tree_leaves(student['params']), leaves(first['params'])))
  stats = jax.device_get(first['batch_stats'])['backbone']
  means = [np.abs(v['mean']).max() for v in jax.tree_util.tree_leaves(
      stats, is_leaf=lambda x: isinstance(x, dict) and 'mean' in x)]
  assert min(means) > 1e-3, 'a BatchNorm layer kept its initial statistics'


def test_random_teacher_row_trains(tmp_path):
  config = _tiny_config('scratch,fsp_random')
  rows = experiment.train_and_evaluate(config, str(tmp_path))
  assert [row['method'] for row in rows] == ['teacher', 'scratch', 'fsp_random']
  assert os.path.exists(tmp_path / 'fsp_random' / 'net1' / 'fsp_matrices.npz')
  helpers.assert_rows_are_their_nets_predictions(str(tmp_path), rows)


def test_resumed_stage1_with_augmentation_equals_uninterrupted(tmp_path):
  """Stopped after stage 1's checkpoint at step 2 of 6, against a teacher, images augmented:
  the resumed net ends exactly as the uninterrupted one. Mutation: a resumed phase reading its
  batches from step 0 again (train_batches' start_step ignored)."""
  config = _tiny_config('fsp')
  config.data.augment = 'cifar'
  config.fsp.stage1 = config_lib.schedule((1e-3,), (6,))
  uninterrupted, interrupted = str(tmp_path / 'a'), str(tmp_path / 'b')
  experiment.train_and_evaluate(config, uninterrupted)
  shutil.copytree(uninterrupted, interrupted)
  run_dir = os.path.join(interrupted, 'fsp', 'net1')
  for path in ('result.json', 'model', 'stage2', 'fsp_matrices.npz', 'stage1/4', 'stage1/6'):
    target = os.path.join(run_dir, path)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  experiment.train_and_evaluate(config, interrupted)
  for a, b in zip(jax.tree_util.tree_leaves(_final_params(uninterrupted, 'fsp')),
                  jax.tree_util.tree_leaves(_final_params(interrupted, 'fsp'))):
    np.testing.assert_array_equal(a, b)


def _logged_steps(folder, tag: str) -> list[int]:
  """The steps of a scalar in the TensorBoard event files in folder, as written so far."""
  found = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      content, at = f.read(), 0
    while at + 12 <= len(content):  # TFRecords: length, its CRC, the record, its CRC.
      length = int.from_bytes(content[at:at + 8], 'little')
      event = event_pb2.Event.FromString(content[at + 12:at + 12 + length])
      found += [event.step for value in event.summary.value if value.tag == tag]
      at += 16 + length
  return found


def test_tensorboard_holds_every_step_of_each_checkpoint(tmp_path, monkeypatch):
  """When a checkpoint is saved, the event file already holds the loss of every step logged
  up to it (the writer syncs its file there, not at every log step).
  Mutation: without the flush before the save, the file holds no step at any save."""
  config = _tiny_config('scratch')
  config.scratch = config_lib.schedule((0.1,), (6,))
  config.log_every = 1
  seen = {}
  save = trainer.checkpoints.PhaseCheckpoints.save

  def save_and_look(self, step, state, history):
    seen[step] = _logged_steps(tmp_path / 'tensorboard' / 'scratch_net1', 'train/loss')
    save(self, step, state, history)

  monkeypatch.setattr(trainer.checkpoints.PhaseCheckpoints, 'save', save_and_look)
  experiment.train_and_evaluate(config, str(tmp_path))
  assert seen == {step: list(range(1, step + 1)) for step in (2, 4, 6)}, seen
