"""Training data on the devices, and several steps per call: the host pipeline's batches, exact
resume, and runs equal whatever steps_per_call."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import data, device_data, experiment, sources


def _host_and_device_batches(source, preprocess, steps: int, batch: int, process_index: int,
                             process_count: int, monkeypatch):
  """Each step's images of this host from the host pipeline, and from the device path (its 4
  devices' parts, gathered with the `Epochs` placed for calls of 3 steps)."""
  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  monkeypatch.setattr(jax, 'process_count', lambda: process_count)
  host = [b['image'] for b in data.train_batches(
      source, preprocess, batch, seed=3, num_steps=steps, process_index=process_index,
      process_count=process_count)]
  images, labels = device_data.stored_images(source, preprocess)
  placed = device_data.Placed(jnp.asarray(images), jnp.asarray(labels))
  gather = jax.jit(lambda epochs, step: device_data.gather(
      placed, preprocess, device_data.step_indices(epochs, step),
      device_data.step_choices(epochs, step))['image'])
  device = []
  windows = device_data.epochs(preprocess, images.shape[1:3], len(source), batch, 3, 0, steps, 3)
  for first, window in zip(range(0, steps, 3), windows):
    for step in range(first, min(first + 3, steps)):
      device.append(np.concatenate([gather(jax.tree_util.tree_map(lambda x, d=d: x[d], window),
                                           step) for d in range(4)]))
  return host, device


@pytest.mark.parametrize('augment,size', [('cifar', 16), ('crop_flip', 14), ('none', 16)])
@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_the_device_path_gives_the_host_pipelines_batches(augment, size, process_index,
                                                          process_count, monkeypatch):
  """Every step's augmented images, over three epochs of 1,437 digits at batch 480, are the
  host pipeline's to the float rounding of the normalisation (measured: equal), on one host
  and on the second of two. Mutations: the device drawing its own crops, or its choices read
  at another step, differ in most images."""
  source = sources.digits_source('train', 16)
  preprocess = data.Preprocess(size, augment)
  host, device = _host_and_device_batches(source, preprocess, 7, 480, process_index,
                                          process_count, monkeypatch)
  assert len(host) == len(device) == 7
  for step, (a, b) in enumerate(zip(host, device)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f'step {step}')


def test_the_choices_cover_every_crop_and_flip():
  """The host pipeline's draws give every offset of the padded crop and both flips."""
  preprocess = data.Preprocess(32, 'cifar')
  choices = preprocess.choices(data.augmentation_draws(0, 0, 4096), [(32, 32, 3)])
  for column, values in ((0, range(9)), (1, range(9)), (2, range(2))):
    assert sorted(set(choices[:, column])) == list(values)
  centre = preprocess.choices(None, [(32, 32, 3), (32, 32, 3)])
  np.testing.assert_array_equal(centre, [[4, 4, 0], [4, 4, 0]])


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_device_step_indices_are_the_host_pipelines_order(process_index, process_count,
                                                          monkeypatch):
  """Every step's indices found on each of the 4 devices in the epochs placed for its call
  are its part of `data.train_indices`: 2 steps an epoch, calls of 3 steps spanning epochs,
  one host of two. Mutation: positions of the first host on the second."""
  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  monkeypatch.setattr(jax, 'process_count', lambda: process_count)
  windows = list(device_data.epochs(data.Preprocess(8, 'cifar'), (8, 8), 40, 16, 5, 3, 15, 3))
  assert len(windows) == 4 and len({id(w) for w in windows}) < 4  # Placed less than per call.
  find = jax.jit(device_data.step_indices)
  per_device = 16 // process_count // 4
  for call, window in enumerate(windows):
    for step in range(3 + 3 * call, 6 + 3 * call):
      expected = data.train_indices(40, 16, 5, step).reshape(process_count, 4, per_device)
      for device in range(4):
        one = jax.tree_util.tree_map(lambda x, d=device: x[d], window)
        np.testing.assert_array_equal(find(one, step), expected[process_index, device])


def _tiny(**changes):
  config = common.tiny(config_lib.default())
  config.methods, config.num_nets = 'scratch', 1
  config.student.model = 'resnet8'
  config.data.augment = 'cifar'  # Random crops and flips, on whichever pipeline.
  config.scratch = config_lib.schedule((0.05, 0.005), (8, 16))
  config.log_every, config.checkpoint_every = 4, 4
  for key, value in changes.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def _model(workdir):
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree_util.tree_leaves(checkpointer.restore(
        os.path.abspath(os.path.join(workdir, 'scratch', 'net1', 'model'))))


@pytest.mark.parametrize('on_device', [False, True])
def test_eight_steps_per_call_equal_two_exactly_and_one_to_float_tolerance(on_device, tmp_path):
  """Calls of 2 and 8 steps run the same compiled loop body: bit-identical parameters after 16
  steps. One step a call runs no loop (XLA:CPU is slow in loops) and so sums in another float32
  order: measured 2e-6 (data on the device) and 3.5e-3 (host pipeline) of a parameter's
  largest entry, at lr 0.05 with batch norm over 4 examples per device."""
  results = {}
  for k in (1, 2, 8):
    workdir = str(tmp_path / f'k{k}')
    config = _tiny(**{'steps_per_call': k, 'data.on_device': on_device, 'log_every': 8,
                      'checkpoint_every': 8})
    experiment.train_and_evaluate(config, workdir)
    results[k] = _model(workdir)
  for a, b, c in zip(results[1], results[2], results[8]):
    np.testing.assert_array_equal(b, c)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-2 * np.abs(c).max())


def _stopped_at_step_8(whole: str, copy: str) -> None:
  """A copy of a finished 16-step run as a kill after its checkpoint at step 8 leaves it."""
  shutil.copytree(whole, copy)
  net = os.path.join(copy, 'scratch', 'net1')
  for name in ('result.json', 'model', os.path.join('train', '12'), os.path.join('train', '16')):
    path = os.path.join(net, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  assert sorted(os.listdir(os.path.join(net, 'train'))) == ['8']


def test_resumed_run_with_data_on_device_and_calls_of_four_equals_uninterrupted(tmp_path):
  """Stopped after its checkpoint at step 8 (of 16), as a kill would leave it."""
  config = _tiny(**{'steps_per_call': 4, 'data.on_device': True})
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  experiment.train_and_evaluate(config, whole)
  _stopped_at_step_8(whole, resumed)
  experiment.train_and_evaluate(config, resumed)
  for a, b in zip(_model(whole), _model(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_net_resumes_across_performance_settings(tmp_path):
  """Started on the host pipeline at one step a call, stopped after its checkpoint at step 8
  (of 16), resumed with the data on the device and two steps a call (as on a GPU machine): the
  same net as the uninterrupted run to float32 rounding (measured: 1.3e-7 of a parameter's
  largest entry; allowed 1e-4), where the net of another seed differs by 0.5-2x."""
  host = _tiny(**{'steps_per_call': 1, 'data.on_device': False})
  whole, moved, other = (str(tmp_path / name) for name in ('whole', 'moved', 'other'))
  experiment.train_and_evaluate(host, whole)
  _stopped_at_step_8(whole, moved)
  experiment.train_and_evaluate(_tiny(**{'steps_per_call': 2, 'data.on_device': True}), moved)
  experiment.train_and_evaluate(_tiny(**{'steps_per_call': 1, 'seed': 1}), other)
  gaps = [(np.abs(a - b).max(), np.abs(a - c).max(), np.abs(a).max())
          for a, b, c in zip(_model(whole), _model(moved), _model(other))]
  assert all(moved_gap <= 1e-4 * scale < other_gap for moved_gap, other_gap, scale in gaps), gaps


def test_a_split_too_large_for_the_device_is_refused_before_it_is_resized(monkeypatch):
  """1,437 digits at 64 px are 17.7 MB (x 4 CPU copies); against 100 MB of device memory they
  exceed a quarter: one line naming the key, and no image past the first resized."""
  source = sources.digits_source('train', 16)
  preprocess = data.get_preprocess(ml_collections.ConfigDict(
      dict(image_size=64, augment='cifar', normalize='cifar')))
  monkeypatch.setattr(device_data, 'device_memory', lambda: 100 * 2**20)
  resized = []
  original = preprocess.resized
  monkeypatch.setattr(data.Preprocess, 'resized', lambda self, image: resized.append(1) or
                      original(image))
  with pytest.raises(ValueError, match=r'config.data.on_device: the training split is 0.02 GiB '
                                       r'.*1,437 images of 64x64, 4 copies.*more than 25% of a '
                                       r"device's 0.1 GiB"):
    device_data.check_fits(source, preprocess)
  assert len(resized) == 1
  monkeypatch.setattr(device_data, 'device_memory', lambda: 2**30)
  device_data.check_fits(source, preprocess)
