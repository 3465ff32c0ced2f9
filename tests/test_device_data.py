"""Training data on the devices, and several steps per call: the same batches, the same
augmentation's distribution, exact resume, and runs equal whatever steps_per_call."""

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

SIZE = 8


def _position_images(count: int, size: int) -> np.ndarray:
  """Images [count, size, size, 3] whose pixel (y, x) holds 1 + y * size + x: a crop and flip
  can be read back from any pixel."""
  grid = 1 + np.arange(size * size, dtype=np.uint8).reshape(size, size)
  return np.repeat(np.broadcast_to(grid, (count, size, size))[..., None], 3, -1).copy()


def _read_crop(crop: np.ndarray, size: int) -> tuple[int, int, bool]:
  """(top, left, flipped) of a crop [S, S] of a position image padded by `pad`: read from
  its first row holding two image pixels side by side (the offsets relative to the image)."""
  for i, row in enumerate(crop):
    inside = np.nonzero(row)[0]
    if len(inside) >= 2:
      j, value = inside[0], int(row[inside[0]]) - 1
      flipped = row[inside[1]] < row[inside[0]]
      y, x = divmod(value, size)
      column = crop.shape[1] - 1 - j if flipped else j
      return y - i, x - column, bool(flipped)
  raise AssertionError('no two image pixels in a row of the crop')


def _offsets(augment: str, pipeline: str, steps: int = 60, batch: int = 32):
  """The (top, left, flipped) of every training example of `steps` steps, by pipeline."""
  images = _position_images(64, SIZE)
  source = sources.ArraySource(images, np.zeros(64, np.int32), 2)
  size = SIZE if augment == 'cifar' else 6  # 'crop_flip' crops 6 of round(6 * 8 / 7) = 7.
  if augment == 'crop_flip':  # Its stored images are the position images, shorter side 7.
    source = sources.ArraySource(_position_images(64, 7), np.zeros(64, np.int32), 2)
  preprocess = data.Preprocess(size, augment, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  stored = 7 if augment == 'crop_flip' else SIZE
  found = []
  if pipeline == 'host':
    for step_batch in data.train_batches(source, preprocess, batch, seed=3, num_steps=steps,
                                         process_index=0, process_count=1):
      found += [_read_crop(np.rint(x[..., 0]).astype(int), stored) for x in step_batch['image']]
  else:
    placed = device_data.Placed(*map(jnp.asarray, device_data.stored_images(source, preprocess)))
    gather = jax.jit(lambda i, step: device_data.gather(placed, preprocess, 3, step, i)['image'])
    for step in range(steps):
      indices = data.train_indices(len(source), batch, 3, step)
      found += [_read_crop(np.rint(x[..., 0]).astype(int), stored)
                for x in np.asarray(gather(jnp.asarray(indices), step))]
  return np.array(found)


@pytest.mark.parametrize('augment,room', [('cifar', 8), ('crop_flip', 1)])
def test_device_augmentation_has_the_host_pipelines_distribution(augment, room):
  """Crops and flips read back from 1,920 examples of each pipeline: every offset (0..room,
  padded by 4 for 'cifar') and both flips occur, each as often in one pipeline as in the other
  within sampling error (a chi-square test of homogeneity per choice, far from its 0.1%
  critical value)."""
  host, device = _offsets(augment, 'host'), _offsets(augment, 'device')
  shift = 4 if augment == 'cifar' else 0
  for column, values in ((0, range(-shift, room - shift + 1)), (1, range(-shift, room - shift + 1)),
                         (2, (False, True))):
    counts = np.array([[np.sum(sample[:, column] == v) for v in values]
                       for sample in (host, device)])
    assert counts.min() > 0, (column, counts)  # Every choice occurs in both.
    expected = counts.sum(0) / 2
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    critical = {1: 10.8, 8: 26.1}[len(values) - 1]  # Chi-square 0.1% points.
    assert chi2 < critical, (column, counts, chi2)


def test_device_batches_are_a_pure_function_of_seed_and_step():
  """The same (seed, step, indices) give the same batch, in another jit and after other steps;
  another step gives other crops of the same examples (the host pipeline's order)."""
  source = sources.digits_source('train', 16)
  preprocess = data.Preprocess(16, 'cifar')
  placed = device_data.Placed(*map(jnp.asarray, device_data.stored_images(source, preprocess)))
  indices = data.train_indices(len(source), 16, 5, 7)
  first = jax.jit(lambda i: device_data.gather(placed, preprocess, 5, 7, i))(indices)
  jax.jit(lambda i: device_data.gather(placed, preprocess, 5, 8, i))(indices)
  again = jax.jit(lambda i, s: device_data.gather(placed, preprocess, 5, s, i))(indices, 7)
  np.testing.assert_array_equal(first['image'], again['image'])
  np.testing.assert_array_equal(first['label'], source.labels[indices])
  other = device_data.gather(placed, preprocess, 5, 9, jnp.asarray(indices))
  assert not np.array_equal(other['image'], first['image'])


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_device_step_indices_are_the_host_pipelines_order(process_index, process_count,
                                                          monkeypatch):
  """Every step's indices found on each of the 4 devices in the epochs placed for its call
  are its part of `data.train_indices`: 2 steps an epoch, calls of 3 steps spanning epochs,
  one host of two. Mutation: positions of the first host on the second."""
  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  monkeypatch.setattr(jax, 'process_count', lambda: process_count)
  windows = list(device_data.epochs(40, 16, 5, 3, 15, 3))
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


def test_resumed_run_with_data_on_device_and_calls_of_four_equals_uninterrupted(tmp_path):
  """Stopped after its checkpoint at step 8 (of 16), as a kill would leave it."""
  config = _tiny(**{'steps_per_call': 4, 'data.on_device': True})
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  experiment.train_and_evaluate(config, whole)
  shutil.copytree(whole, resumed)
  net = os.path.join(resumed, 'scratch', 'net1')
  for name in ('result.json', 'model', os.path.join('train', '12'), os.path.join('train', '16')):
    path = os.path.join(net, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  assert sorted(os.listdir(os.path.join(net, 'train'))) == ['8']
  experiment.train_and_evaluate(config, resumed)
  for a, b in zip(_model(whole), _model(resumed)):
    np.testing.assert_array_equal(a, b)


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
