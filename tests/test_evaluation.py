"""Evaluation: every example once, in order, in inference mode, whatever the batch size."""

import jax
import numpy as np
import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import data, device_data, evaluation, experiment, models, sources, steps
from fsp_jax.adapters import Student
from fsp_jax.feed import DeviceFeed


@pytest.fixture(scope='module')
def model_and_source():
  """A ResNet-8 whose BatchNorm statistics are far from any batch's (mean 3, variance 9), and
  10 images: 10 is no multiple of the 4 devices, nor of the batch sizes below."""
  model = Student(models.get('resnet8', 10, 1, axis_name='batch'))
  variables = steps.init_variables(model, jax.random.key(0), 16)
  variables['batch_stats'] = jax.tree.map(
      lambda v: np.full_like(v, 3.0), variables['batch_stats'])
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  source = sources.ArraySource(images, np.arange(10) % 10, 10)
  preprocess = data.get_preprocess(_data_config())
  return model, steps.replicate(variables), source, preprocess


def _data_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(image_size=16, augment='none', normalize='cifar'))


def test_each_example_once_in_order_whatever_the_batch_size(model_and_source):
  """Outputs of 4-, 8- and a million-example batches agree (a million is cut to the split's
  12: nothing is padded past what the devices need). Mutations: padding left unmasked gives
  more than 10 outputs; BatchNorm in training mode makes an example's output depend on its
  batch's other examples."""
  model, variables, source, preprocess = model_and_source
  runs = [evaluation.evaluate(model, variables, source, preprocess, b) for b in (4, 8, 2**20)]
  for metrics, probs, labels in runs:
    assert probs.shape == (10, 10)
    np.testing.assert_array_equal(labels, np.arange(10))
    np.testing.assert_allclose(probs, runs[0][1], rtol=1e-5, atol=1e-6)


def test_evaluation_uses_the_running_statistics(model_and_source):
  """The probabilities are those of the model in inference mode on each image alone."""
  model, variables, source, preprocess = model_and_source
  _, probs, _ = evaluation.evaluate(model, variables, source, preprocess, 8)
  single = jax.tree.map(lambda v: v[0], variables)
  batch = next(data.eval_batches(source, preprocess, 12))
  logits, _ = model.apply(single, batch['image'][:10], train=False)
  np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)


def test_a_batch_larger_than_the_split_reads_it_in_one_batch(model_and_source, monkeypatch):
  model, variables, source, preprocess = model_and_source
  sizes = []
  original = data.eval_batches
  monkeypatch.setattr(data, 'eval_batches', lambda s, p, b, *a: sizes.append(b) or original(
      s, p, b, *a))
  evaluation.evaluate(model, variables, source, preprocess, 2**20)
  assert sizes == [12]


@pytest.mark.parametrize('augment', ['cifar', 'crop_flip'])
def test_evaluation_on_the_device_equals_the_host_pipelines(augment, model_and_source):
  """The split's centre crops placed on the devices and gathered there: the same accuracy and
  labels, probabilities within 1e-6, for batches that pad (4 of 10) and one that does not.
  Fresh statistics: the fixture's give every image the same outputs. Mutation: the crop of
  `device_data.centre_crops` moved off the centre."""
  model, _, source, _ = model_and_source
  variables = steps.replicate(steps.init_variables(model, jax.random.key(1), 16))
  preprocess = data.Preprocess(12 if augment == 'crop_flip' else 16, augment)
  placed = device_data.place(*device_data.centre_crops(source, preprocess))
  for batch_size in (4, 2**20):
    host = evaluation.evaluate(model, variables, source, preprocess, batch_size)
    device = evaluation.evaluate(model, variables, source, preprocess, batch_size,
                                 placed=placed)
    assert host[0]['accuracy'] == device[0]['accuracy']
    np.testing.assert_array_equal(host[2], device[2])
    assert host[1].std(axis=0).max() > 1e-3  # The examples' outputs differ.
    np.testing.assert_allclose(host[1], device[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize('augment', ['cifar', 'crop_flip'])
def test_the_teachers_fsp_cache_from_the_split_on_the_device_equals_the_host_pipelines(
    augment, model_and_source):
  """The training split as the device feed holds it (at its working size; crop_flip's larger
  than the crop) gives the teacher's matrices of the centre crops that the host computes.
  Mutation: the device's crop moved off the centre."""
  model, _, source, _ = model_and_source
  variables = steps.replicate(steps.init_variables(model, jax.random.key(1), 16))
  preprocess = data.Preprocess(12 if augment == 'crop_flip' else 16, augment)
  resident = DeviceFeed.place(device_data.stored_images(source, preprocess), preprocess).resident
  host = experiment.teacher_fsp_cache(model, variables, source, preprocess, 4)
  device = experiment.teacher_fsp_cache(model, variables, source, preprocess, 4, resident)
  for a, b in zip(host, device):
    assert a.shape == b.shape and a.std() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def test_an_evaluation_batch_too_large_for_the_device_is_refused_with_what_fits(monkeypatch):
  """XLA's figure for ResNet-8 at 16 px grows with the batch; a device of 64 MiB takes 90
  images per device (360 test images over 4 devices) but not 90 times as many."""
  model = Student(models.get('resnet8', 10, 1, axis_name='batch'))
  small, large = (steps.eval_bytes(model, 16, b) for b in (90, 8100))
  assert 0 < small < large
  monkeypatch.setattr(device_data, 'device_memory', lambda: int(small * 4 / 0.5 * 1.5))
  config = common.tiny(config_lib.default())
  config.eval_batch_size = 360
  experiment.check_eval_batch(config.eval_batch_size, config.data.image_size,
                              {'student (resnet8)': model}, 360)
  with pytest.raises(ValueError, match=r'config.eval_batch_size=32400: evaluating the student '
                     r'\(resnet8\) on 8,100 images per device takes .* GiB \(XLA\'s figure\) on '
                     r'each of 4 devices, more than 50% of a device\'s .* lower it to [\d,]+ or '
                     r'less\.'):
    config.eval_batch_size = 32400
    experiment.check_eval_batch(config.eval_batch_size, config.data.image_size,
                                {'student (resnet8)': model}, 32400)
