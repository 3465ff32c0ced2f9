"""The committed CPU-scale teacher (results/teacher_cifar10) classifies real CIFAR-10 images."""

import json
import os

import pytest

from fsp_jax import data, evaluation, experiment, methods, models, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, 'results', 'teacher_cifar10')
CIFAR10 = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'cifar10')


@pytest.mark.skipif(not os.path.isdir(CIFAR10), reason=f'the CIFAR-10 folder {CIFAR10} is absent')
def test_committed_teacher_matches_its_reported_accuracy():
  """On the first 100 test images of each class (1,000): within 3 points of the accuracy its
  result.json reports for the whole test set (88.39%, the third cycle)."""
  with open(os.path.join(TEACHER, 'result.json')) as f:
    reported = json.load(f)['accuracy']
  teacher = methods.Student(models.get('resnet26', 10, axis_name='batch'))
  variables = experiment.load_teacher(os.path.join(TEACHER, 'model'), teacher, 32)
  test_slice = sources.folder_source(CIFAR10, 'test', max_per_class=100)
  metrics, _, labels = evaluation.evaluate(teacher, variables, test_slice,
                                        data.Preprocess(32, 'none'), 200)
  assert len(labels) == 1000
  assert reported >= 0.88 and abs(metrics['accuracy'] - reported) <= 0.03, (metrics, reported)
