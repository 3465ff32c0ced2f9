"""Every experiment config loads and validates; its tiny variant runs end to end via main.py."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fsp_jax import config as config_lib
from fsp_jax import data, device_data, experiment, methods, sources, validation
from fsp_jax import plan as plan_lib
import helpers  # tests/ is on sys.path (pytest rootdir-relative imports).
import test_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py'))
                 if not p.endswith('common.py'))
NAMES = [os.path.basename(path)[:-3] for path in CONFIGS]


def _module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(
      ROOT, 'experiments', 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert f'experiments/configs/{name}.py' in module.__doc__, 'the docstring gives the command'
  return module


def _load(name, arg=None):
  return _module(name).get_config(arg)


VARIANTS = [(name, arg) for name in NAMES for arg in (None, *_module(name).VARIANTS)]


def test_all_experiments_present():
  assert set(NAMES) >= {'fast_opt_cifar10', 'fast_opt_cifar100', 'minimize_cifar10',
                        'minimize_cifar100', 'transfer_cub', 'quickstart'}


@pytest.mark.parametrize('name,arg', VARIANTS)
def test_config_validates_and_pairs(name, arg, monkeypatch, tmp_path):
  """Every variant validates and pairs its students with its teacher; a teacher checkpoint
  under results/ must be committed (mutation: renaming results/teacher_cifar10/model fails
  the cpu variants), others may come from the command line or another run."""
  monkeypatch.chdir(ROOT)  # cpu variants name ../shared/data relative to the checkout.
  config = _load(name, arg)
  if config.data.root and not os.path.isdir(config.data.root):
    pytest.skip(f'{config.data.root} is absent here')
  needs_checkpoint = config.teacher.num_classes and not config.teacher.checkpoint
  committed = config.teacher.checkpoint.startswith('results/')  # Must be in the checkout.
  if needs_checkpoint or (config.teacher.checkpoint and not committed
                          and not os.path.isdir(config.teacher.checkpoint)):
    # Given on the command line or made by another experiment (a source task): validation
    # checks that the folder exists; pairing needs only the teacher's shapes.
    config.teacher.checkpoint = str(tmp_path)
  validation.validate(config)
  num_classes = {'cifar100': 100, 'caltech_birds2011': 200}.get(config.data.name, 10)
  teacher = methods.Student(plan_lib.build_model(config.teacher,
                                                   config.teacher.num_classes or num_classes,
                                                   config.dtype))
  for method in validation.method_list(config):
    plan_lib.build_student(methods.get(method), config, num_classes, teacher)  # Or raises.


def test_quickstart_tiny_runs_through_main(tmp_path):
  """The README's quickstart command, at its tiny size: a table on stdout and in the workdir."""
  workdir = tmp_path / 'run'
  command = [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
             f'--config={os.path.join(ROOT, "experiments", "configs", "quickstart")}.py:tiny',
             f'--workdir={workdir}', '--config.num_nets=1']
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                           check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  with open(workdir / 'results.json') as f:
    rows = json.load(f)
  assert [row['method'] for row in rows] == ['teacher'] + validation.method_list(
      _load('quickstart', 'tiny'))
  assert f"| {rows[-1]['method']} |" in process.stdout and (workdir / 'results.md').exists()


def _distilling(config):
  """The methods of a config that learn from the teacher's outputs."""
  return [name for name in validation.method_list(config)
          if methods.get(name).uses_teacher(config) and not methods.get(name).starts_from_teacher]


def _finite_losses(workdir, method, nets):
  """Every logged training loss of the method's nets 1..nets (every phase's) is finite."""
  for net in range(1, nets + 1):
    with open(workdir / method / f'net{net}' / 'result.json') as f:
      losses = [loss for _, _, loss in json.load(f)['history']['train']]
    assert losses and all(np.isfinite(losses)), (method, net, losses)


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_tiny_variant_trains_with_finite_losses_for_seeds_0_to_4(name, tmp_path):
  """Seed 0: every method of the config's tiny variant, one net. Then the methods that learn
  from the teacher's outputs, as seeds 1..4 (net k of a run at seed 1 is initialised and fed as
  net 1 of a run at seed k), taught by the seed-0 teacher: one run, so each step is traced
  once. At the paper's stage-1 rates against a 20-step teacher every logged loss is finite (a
  NaN or Inf would also stop the run)."""
  config = _load(name, 'tiny')
  config.seed, config.num_nets = 0, 1
  rows = experiment.train_and_evaluate(config, str(tmp_path / 'seed0'))
  trained = validation.method_list(config)
  assert [row['method'] for row in rows] == ['teacher'] + trained
  assert all(len(row['nets']) == 1 for row in rows)
  helpers.assert_rows_are_their_nets_predictions(str(tmp_path / 'seed0'), rows)
  assert (tmp_path / 'seed0' / 'results.md').exists()
  for method in trained:
    _finite_losses(tmp_path / 'seed0', method, 1)
  distilling = _distilling(config)
  if not distilling:
    return
  config.seed, config.num_nets, config.methods = 1, 4, ','.join(distilling)
  config.teacher.checkpoint = str(tmp_path / 'seed0' / 'teacher' / 'net1' / 'model')
  config.checkpoint_every = 1000  # At the ends of phases only: saving is tested elsewhere.
  rows = experiment.train_and_evaluate(config, str(tmp_path / 'seeds1to4'))
  assert [row['method'] for row in rows] == ['teacher'] + distilling
  assert all(len(row['nets']) == 4 for row in rows[1:])
  helpers.assert_rows_are_their_nets_predictions(str(tmp_path / 'seeds1to4'), rows)
  for method in distilling:
    _finite_losses(tmp_path / 'seeds1to4', method, 4)


def test_transfer_source_trains_the_targets_teacher():
  source = _load('transfer_cifar10', 'source')
  assert validation.method_list(source) == ['teacher_scratch']
  assert source.teacher.model == _load('transfer_cifar10').teacher.model


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown config variant 'gpu'; this config has 'cpu', "
                                       r"'tiny'"):
    _load('transfer_cub', 'gpu')


def _cub_config(**data):
  """transfer_cub's tiny variant at 32x32 with CUB-style input, on ResNet-8s (what these
  tests check is the input; transfer_cub's own networks run in the seeds test above)."""
  config = _load('transfer_cub', 'tiny')
  config.data.update(augment='crop_flip', normalize='imagenet', **data)
  config.teacher.model = config.student.model = 'resnet8'
  config.batch_size = config.eval_batch_size = 8
  config.num_nets = 1
  return config


@pytest.mark.slow
def test_transfer_cub_runs_on_tfds_mock_data(tmp_path):
  config = _cub_config(name='caltech_birds2011')
  config.methods = 'finetune,fsp'  # All five rows run on digits in the test above.
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path / 'tfds')):
    rows = experiment.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [row['method'] for row in rows] == ['teacher', 'finetune', 'fsp']
  helpers.assert_rows_are_their_nets_predictions(str(tmp_path / 'run'), rows)


@pytest.mark.slow
def test_transfer_cub_runs_on_a_cub_folder(tmp_path):
  root = test_data.make_cub(str(tmp_path / 'CUB_200_2011'), num_images=32, num_classes=4)
  config = _cub_config(name='cub', root=root)
  config.methods = 'fsp'
  rows = experiment.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [row['method'] for row in rows] == ['teacher', 'fsp']


def _platform(monkeypatch, backend: str, memory: int, **changes):
  """platform_defaults of the quickstart's config (with changes) on a faked backend."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(device_data, 'device_memory', lambda: memory)
  config = config_lib.load_file('experiments/configs/quickstart.py')
  for key, value in changes.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  source = sources.digits_source('train', config.data.image_size)
  return plan_lib.platform_defaults(config, source, data.get_preprocess(config.data))


def test_the_platform_chooses_the_host_and_one_step_a_call_on_a_cpu(monkeypatch):
  config, said = _platform(monkeypatch, 'cpu', 2**40)
  assert (config.data.on_device, config.steps_per_call) == (False, 1)
  assert said == ('Chosen for this platform (cpu): data.on_device=False (a CPU); steps_per_call=1 '
                  '(a CPU, where XLA runs convolution gradients in a loop about 20x slower).')


def test_the_platform_chooses_the_device_and_eight_steps_a_call_on_a_gpu(monkeypatch):
  config, said = _platform(monkeypatch, 'gpu', 80 * 2**30, log_every=40, eval_every=80,
                           checkpoint_every=400)
  assert (config.data.on_device, config.steps_per_call) == (True, 8), said
  assert 'data.on_device=True (the training split at its working size is 0.00 GiB, within 25%' \
      in said
  # Periods that 8 does not divide: the largest of 4, 2 that divides them all.
  config, _ = _platform(monkeypatch, 'gpu', 80 * 2**30, log_every=20, eval_every=80,
                        checkpoint_every=400)
  assert config.steps_per_call == 4
  # A split over a quarter of the device's memory stays on the host.
  config, said = _platform(monkeypatch, 'gpu', 2**20)
  assert config.data.on_device is False and 'more than 25% of a device' in said, said


def test_explicit_settings_win_over_the_platform(monkeypatch):
  config, said = _platform(monkeypatch, 'gpu', 80 * 2**30, **{'data.on_device': False,
                                                             'steps_per_call': 2})
  assert (config.data.on_device, config.steps_per_call, said) == (False, 2, '')
