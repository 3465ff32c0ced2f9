"""Every bad input fails at once, before anything is compiled, with a message naming it.

Each case changes the quickstart's tiny variant (or its workdir or data) and expects an error
matching its pattern; a listener on JAX's compilation events proves nothing was compiled.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import experiment, layout, validation
from fsp_jax.errors import ConfigError, PairingError
import helpers
import test_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILATIONS = []
jax.monitoring.register_event_duration_secs_listener(  # XLA compilations, or cache loads.
    lambda event, duration, **kwargs: COMPILATIONS.append(event)
    if 'backend_compile' in event or 'compilation_cache' in event else None)

FOLDER = '<folder>'  # Replaced by a generated ImageFolder tree with train and test splits.
TEACHER = '<teacher>'  # <teacher>N: replaced by a saved ResNet-8 of width 1 and N classes.
CASES = {  # name: ({key: value}, pattern of the error)
    'unknown method': ({'methods': 'fsp,hint'}, r"config.methods: unknown \['hint'\]"),
    'no nets': ({'num_nets': 0}, r'config.num_nets: expected an integer in \[1, 1000\], got 0'),
    'negative seed': ({'seed': -1}, r'config.seed: expected an integer in \[0, 2147483647\], got -1'),
    'batch not divisible': ({'batch_size': 10}, r'config.batch_size: 10 is not divisible by '
                            'the 4 devices'),
    'batch over the split': ({'batch_size': 4096}, r'config.batch_size: 4096 exceeds the 1437'),
    'eval batch 0': ({'eval_batch_size': 0}, r'config.eval_batch_size: expected an integer'),
    'log_every 0': ({'log_every': 0}, r'config.log_every: expected an integer in \[1, '),
    'eval_every negative': ({'eval_every': -1}, r'config.eval_every: expected an integer in \[0, '),
    'checkpoint_every 0': ({'checkpoint_every': 0}, r'config.checkpoint_every: expected'),
    'keep no checkpoints': ({'keep_checkpoints': 0}, r'config.keep_checkpoints: expected'),
    'unknown dtype': ({'dtype': 'float16'}, r"config.dtype: unknown 'float16'.*bfloat16"),
    'weight decay 1.5': ({'weight_decay': 1.5}, r'config.weight_decay: expected a number in'),
    'negative momentum': ({'momentum': -0.1}, r'config.momentum: expected a number in'),
    'unknown student': ({'student.model': 'resnet9'}, r"config.student.model: Unknown model "
                        r"'resnet9'.*resnet26"),
    'unknown teacher': ({'teacher.model': 'vgg16'}, r"config.teacher.model: Unknown model"),
    'width 0': ({'teacher.width': 0}, r'config.teacher.width: expected an integer in \[1, 64\]'),
    'unknown data set': ({'data.name': 'imagenet'}, r"config.data.name: unknown data set "
                         r"'imagenet'.*digits"),
    'unknown augment': ({'data.augment': 'mixup'}, r"config.data.augment: unknown 'mixup'"),
    'normalize typo': ({'data.normalize': 'cifra'}, r"config.data.normalize: unknown 'cifra'.*"
                       'imagenet'),
    'classes outside folder': ({'data.classes': ('0', '1')}, r"config.data.classes: applies to "
                               r"data.name='folder' only, not 'digits'"),
    'max_per_class outside folder': ({'data.max_per_class': 10}, r'config.data.max_per_class: '
                                     'applies to'),
    'digits size': ({'data.image_size': 12}, r'config.data.image_size: the digits are 8x8'),
    'empty split name': ({'data.train_split': ''}, r'config.data.train_split: expected a split'),
    'missing teacher': ({'teacher.checkpoint': '/no/such/teacher'}, r"config.teacher.checkpoint:"
                        r" '/no/such/teacher' does not exist"),
    'classes without checkpoint': ({'teacher.num_classes': 5}, r'config.teacher.num_classes: '
                                   'only a teacher loaded'),
    'schedule out of order': ({'scratch.until': (5, 3, 7)}, r'config.scratch.until: .*'
                              'increasing'),
    'negative rate': ({'scratch.lrs': (0.1, -0.01, 0.001)}, r'config.scratch.lrs: learning '
                      'rates must'),
    'unknown decay': ({'fsp.stage1.decay': 'linear'}, r"config.fsp.stage1.decay: unknown "
                      r"'linear'"),
    'warmup too long': ({'fsp.stage1.warmup': 100}, r'config.fsp.stage1.warmup: expected an '
                        r'integer in \[0, 3\)'),
    'unknown normalisation': ({'fsp.normalize': 'l1'}, r"config.fsp.normalize: unknown 'l1'"),
    'fsp weights count': ({'fsp.stage_weights': (1.0, 1.0)}, r'config.fsp.stage_weights: '
                          'expected 3 weights'),
    'negative stage weight': ({'fsp.stage_weights': (-1.0, 1.0, 1.0)},
                              r'config.fsp.stage_weights: expected a tuple of weights >= 0'),
    'fsp weight 0': ({'fsp.weight': 0.0}, r'config.fsp.weight: expected a finite number > 0'),
    'negative workers': ({'data.workers': -1}, r'config.data.workers: expected an integer in \[0, 1024\]'),
    'negative clip norm': ({'fsp.max_grad_norm': -1.0}, r'config.fsp.max_grad_norm: expected a '
                           'finite number >= 0'),
    'negative task weight': ({'fsp.task_weight': -1.0}, r'config.fsp.task_weight: expected a '
                             'finite number >= 0'),
    'negative shuffle seed': ({'fsp.shuffle_seed': -3}, r'config.fsp.shuffle_seed: expected'),
    'kd temperature 0': ({'kd.temperature': 0.0}, r'config.kd.temperature: expected a finite '
                         'number > 0'),
    'fitnet temperature 0': ({'fitnet.temperature': 0.0}, r'config.fitnet.temperature: '),
    'fitnet weights': ({'fitnet.kd_weight': (1.0,)}, r'config.fitnet.kd_weight: expected '
                       r'\(start, end\)'),
    'fitnet normalisation': ({'fitnet.normalize': 'entries'}, r"config.fitnet.normalize: "
                             r"unknown 'entries'"),
    'fitnet weight 0': ({'fitnet.weight': 0.0}, r'config.fitnet.weight: expected a finite number > 0'),
    'negative fitnet clip': ({'fitnet.max_grad_norm': -1.0}, r'config.fitnet.max_grad_norm: '
                             'expected a finite number >= 0'),
    'unknown hint': ({'methods': 'fitnet', 'fitnet.hint': 'stage9_out'}, r"config.fitnet.hint: "
                     r"'stage9_out' is not a feature of both networks"),
    'widths differ': ({'teacher.width': 2}, r"config.student.model='resnet8' \(width 1\) cannot "
                      r"be paired with config.teacher.model='resnet26' \(width 2\)"
                      r'.*student.adapter'),
    'stages differ': ({'student.model': 'resnet18'}, r'cannot be paired.*student has 4 FSP '
                      'matrices and the teacher 3'),
    'logits of other classes': ({'methods': 'kd', 'teacher.checkpoint': ROOT,
                                 'teacher.num_classes': 5}, r'config.teacher.num_classes: '
                                r"methods \['kd'\] distill the teacher's logits"),
    'missing folder': ({'data.name': 'folder', 'data.root': '/no/such/data'},
                       r"config.data.root: folder '/no/such/data' does not exist"),
    'max_per_class 0': ({'data.name': 'folder', 'data.root': FOLDER, 'data.max_per_class': 0},
                        r'config.data.max_per_class: expected an integer >= 1'),
    'max_per_class -1': ({'data.name': 'folder', 'data.root': FOLDER,
                          'data.max_per_class': -1}, r'config.data.max_per_class: expected'),
    'unknown class': ({'data.name': 'folder', 'data.root': FOLDER, 'data.classes': ('unicorn',)},
                      r"Class folders \['unicorn'\] not found in .*train"),
    'image size 7': ({'data.name': 'folder', 'data.root': FOLDER, 'data.image_size': 7},
                     r'config.data.image_size: 7 gives .* feature maps of \[7, 4, 2\]'),
    'truncated jpeg': ({'data.name': 'folder', 'data.root': FOLDER + 'truncated'},
                       r'Image file .*cut.jpg is truncated: a JPEG file must end with'),
    'missing split': ({'data.name': 'folder', 'data.root': FOLDER, 'data.eval_split': 'val'},
                      r'Data folder .*val does not exist'),
    'test classes by name': ({'data.name': 'folder', 'data.root': FOLDER + 'renamed'},
                             r"config.data: the 'test' split's classes are not the 'train' "
                             r"split's: only in 'train': \['b'\]; only in 'test': \['c'\]"),
    'one class': ({'data.name': 'folder', 'data.root': FOLDER, 'data.classes': ('a',)},
                  r"config.data: the 'train' split has 1 class; classifying needs at least two"),
    'class twice': ({'data.name': 'folder', 'data.root': FOLDER, 'data.classes': ('a', 'b', 'a')},
                    r"config.data.classes: names \['a'\] more than once"),
    'method twice': ({'methods': 'fsp,scratch,fsp'}, r"config.methods: names \['fsp'\] more "
                     'than once'),
    'seed past int32': ({'seed': 2**31}, r'config.seed: expected an integer in \[0, 2147483647\]'),
    'seed of the last net past int32': ({'seed': 2**31 - 1, 'num_nets': 2},
                                        r'config.seed: 2147483647 \+ 1 .*exceeds'),
    'infinite rate': ({'scratch.lrs': (1e999, 0.01, 0.001)}, r'config.scratch.lrs: learning '
                      'rates must be positive and finite'),
    'nan weight': ({'fsp.weight': float('nan')}, r'config.fsp.weight: expected a finite number'),
    'infinite clip norm': ({'fsp.max_grad_norm': float('inf')}, r'config.fsp.max_grad_norm: '
                           'expected a finite number'),
    'nan stage weight': ({'fsp.stage_weights': (1.0, float('nan'), 1.0)},
                         r'config.fsp.stage_weights: expected a tuple of weights >= 0'),
    'steps per call and logs': ({'steps_per_call': 3}, r'config.log_every: 1 is not a multiple '
                                r'of config.steps_per_call=3'),
    'steps per call and phases': ({'steps_per_call': 2, 'log_every': 2, 'checkpoint_every': 2},
                                  r'config.steps_per_call: 2 does not divide the 3 iterations'),
    'teacher checkpoint an empty folder': ({'teacher.checkpoint': 'empty'},
                                           r'teacher_empty is empty; a teacher is a finished '
                                           r"net's model folder, <workdir>/<method>/net<k>/model"),
    'teacher at a training checkpoint': ({'teacher.checkpoint': 'train/20'},
                                         r'train/20 is a training checkpoint .*net<k>/model'),
    'teacher checkpoint a file': ({'teacher.checkpoint': 'file'}, r"config.teacher.checkpoint: "
                                  r"'.*' is a file; give the folder of an Orbax checkpoint"),
    'teacher of another width': ({'teacher.checkpoint': TEACHER + '10', 'teacher.width': 2,
                                  'student.width': 2, 'teacher.model': 'resnet8'},
                                 r'config.teacher.checkpoint: .* does not hold a ResNet of '
                                 r'\(1, 1, 1\) blocks, widths \(32, 64, 128\) and 10 classes: '
                                 r'params/head/kernel is \(64, 10\) there and \(128, 10\) in '
                                 r'the model'),
    'teacher of another depth': ({'teacher.checkpoint': TEACHER + '10'}, r'config.teacher.'
                                 r'checkpoint: .* does not hold a ResNet of \(4, 4, 4\) blocks.*:'
                                 r' it has no params/stage1_block2/'),
    'teacher of other classes': ({'teacher.checkpoint': TEACHER + '5',
                                  'teacher.model': 'resnet8'}, r'config.teacher.checkpoint: .* '
                                 r'its classifier has 5 classes where the model has 10 '
                                 r'\(params/head/bias \(5,\) against \(10,\)\)'),
    'workdir is a file': ({'workdir': 'file'}, r'--workdir .* is a file; expected a folder'),
    'workdir not writable': ({'workdir': '/proc/fsp_jax'}, r'--workdir /proc/fsp_jax cannot be '
                             'written'),
}


def _folder(tmp_path, variant):
  """An ImageFolder tree root/{train,test}/{a,b}/*.png; with variant 'truncated' a cut JPEG,
  with 'renamed' the test split's class b named c."""
  root = str(tmp_path / 'folder')
  for split in ('train', 'test'):
    for label in ('a', 'b'):
      name = 'c' if (variant, split, label) == ('renamed', 'test', 'b') else label
      for i in range(8):
        test_data.write_image(os.path.join(root, split, name, f'{i}.png'), i, size=(16, 16))
  if variant == 'truncated':
    path = os.path.join(root, 'train', 'a', 'cut.jpg')
    test_data.write_image(path, 0, size=(16, 16))
    with open(path, 'rb') as f:
      whole = f.read()
    with open(path, 'wb') as f:
      f.write(whole[:-20])  # The header is intact, the end is missing.
  return root


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input_fails_at_once_naming_it(name, tmp_path):
  changes, pattern = CASES[name]
  config = common.tiny(config_lib.default())
  config.num_nets = 1
  config.student.model = 'resnet8'
  workdir = str(tmp_path / 'run')
  for key, value in changes.items():
    if key == 'workdir':
      workdir = value if value.startswith('/') else str(tmp_path / value)
      if value == 'file':
        open(workdir, 'w').close()
      continue
    if isinstance(value, str) and value.startswith(FOLDER):
      value = _folder(tmp_path, value[len(FOLDER):])
    if isinstance(value, str) and value.startswith(TEACHER):
      classes = int(value[len(TEACHER):])
      value = helpers.save_model(str(tmp_path / f'teacher{classes}'), classes=classes)
    if key == 'teacher.checkpoint' and value == 'file':
      value = str(tmp_path / 'teacher_file')
      open(value, 'w').close()
    if key == 'teacher.checkpoint' and value in ('empty', 'train/20'):
      value = str(tmp_path / ('teacher_empty' if value == 'empty' else 'net1/train/20'))
      for part in ([] if 'empty' in value else ['state', 'history']):
        os.makedirs(os.path.join(value, part))
      os.makedirs(value, exist_ok=True)
    section, _, field = key.rpartition('.')
    target = config
    for part in filter(None, section.split('.')):
      target = target[part]
    target[field] = value
  COMPILATIONS.clear()
  with pytest.raises((ValueError, RuntimeError)) as error:
    experiment.train_and_evaluate(config, workdir)
  assert re.search(pattern, str(error.value)), str(error.value)
  # Told apart by type: a message naming a key is a ConfigError carrying it.
  named = re.match(r'config\.([\w.]+)[:=]', str(error.value))
  if 'cannot be paired' in str(error.value):
    assert isinstance(error.value, PairingError), type(error.value)
  elif named:
    assert isinstance(error.value, ConfigError) and error.value.key == named[1], (
        type(error.value), getattr(error.value, 'key', None))
  assert not COMPILATIONS, f'compiled before failing: {COMPILATIONS}'
  assert not os.path.isdir(os.path.join(workdir, 'teacher'))


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'main.py'), *args],
                        capture_output=True, text=True, timeout=120, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))


@pytest.mark.parametrize('flag,pattern', [
    ('--config.fsp.wieghts=(1.0,)', r"flag --config.fsp.wieghts: the config has no key "
     r"'fsp.wieghts'; did you mean 'weight'\?"),
    ('--config.fspp.weight=1', r"flag --config.fspp.weight: the config has no key "
     r"'fspp.weight'; did you mean 'fsp'\?"),
    ('--config.seed=abc', r'config.seed'),
])
def test_bad_flag_is_one_short_message(flag, pattern, tmp_path):
  process = _main(f'--config={ROOT}/experiments/configs/quickstart.py:tiny',
                  f'--workdir={tmp_path}', flag)
  assert process.returncode != 0 and re.search(pattern, process.stderr), process.stderr
  assert 'Traceback' not in process.stderr and len(process.stderr.splitlines()) <= 6, \
      process.stderr


@pytest.mark.parametrize('flags,pattern', [
    (['--num_processes=2', '--process_id=1'], r'flags --num_processes and --process_id join a '
     r'multi-host run: give --coordinator_address'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
     r"--coordinator_address: expected host:port .* got 'localhost'"),
    (['--coordinator_address=localhost:1234', '--num_processes=2', '--process_id=5'],
     r'expected a count >= 1 and an id in 0 .. count - 1, got 2 and 5'),
])
def test_host_flags_that_describe_no_run_are_one_line(flags, pattern, tmp_path):
  process = _main(f'--config={ROOT}/experiments/configs/quickstart.py:tiny',
                  f'--workdir={tmp_path}', *flags)
  assert process.returncode == 2 and re.search(pattern, process.stderr), process.stderr
  assert 'Traceback' not in process.stderr and len(process.stderr.splitlines()) <= 2
  assert not os.listdir(tmp_path)


def test_a_host_whose_peers_never_join_stops_after_the_timeout_saying_so(tmp_path):
  """One of two processes started: it says what it waits for, and after
  --coordinator_timeout_s one line (JAX's own expiry aborts the process with a stack dump)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  process = _main(f'--config={ROOT}/experiments/configs/quickstart.py:tiny',
                  f'--workdir={tmp_path}', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', '--process_id=0', '--coordinator_timeout_s=3')
  assert process.returncode == 2, process.stderr
  assert 'waiting up to 3 s for every process' in process.stdout
  assert re.fullmatch(r'Error: the processes of the run did not all join 127.0.0.1:\d+ as '
                      r'process 0 of 2 within 3 s: .*--coordinator_timeout_s.\n',
                      process.stderr), process.stderr


def test_unknown_variant_is_named_with_the_known_ones(tmp_path):
  process = _main(f'--config={ROOT}/experiments/configs/transfer_cub.py:gpu',
                  f'--workdir={tmp_path}')
  assert process.returncode != 0, process.stderr
  assert re.search(r"Unknown config variant 'gpu'; this config has 'cpu', 'tiny'",
                   process.stderr), process.stderr
  assert 'Traceback' not in process.stderr and len(process.stderr.splitlines()) <= 6, \
      process.stderr


def test_every_float_key_refuses_a_bool_and_takes_an_int():
  """ml_collections stores True as 1.0 in a float field: each such key refuses it instead."""
  config = config_lib.default()
  floats = [key for key, value in layout.flat(config.to_dict()).items()
            if isinstance(value, float)]
  assert {'weight_decay', 'fsp.max_grad_norm', 'kd.temperature', 'at.weight'} <= set(floats)
  for key in floats:
    section, _, name = key.rpartition('.')
    node = validation.get(config, section) if section else config
    with pytest.raises(TypeError, match=f"'{name}'.*got True"):
      node[name] = True
    node[name] = 2
    assert node[name] == 2.0 and isinstance(node[name], float), key


def test_the_compilation_listener_sees_a_compilation():
  """The positive control of 'nothing compiled' above: a new jitted function is seen."""
  COMPILATIONS.clear()
  jax.jit(lambda x: x * 3.0 + 1.0)(jax.numpy.arange(7.0)).block_until_ready()
  assert COMPILATIONS


@pytest.mark.parametrize('text,pattern', [
    ('def get_config(:\n  pass\n', r'bad\.py, line 1: SyntaxError: '),
    ('import no_such_module_here\n', r'bad\.py, line 1: ModuleNotFoundError: No module named '
     "'no_such_module_here'"),
    ('def get_config():\n  return {"methods": "fsp"}\n', r'bad\.py: get_config\(\) returned a '
     'dict, expected an ml_collections.ConfigDict'),
    ('CONFIG = 1\n', r'bad\.py: defines no get_config\(\)'),
    ('def get_config():\n  return 1 / 0\n', r'bad\.py, line 2: ZeroDivisionError: '),
    ('from fsp_jax import config\ndef get_config():\n  c = config.default()\n'
     '  c.fsp.max_grad_norm = False\n  return c\n', r"bad\.py, line 4: TypeError: Could not "
     r"override field 'max_grad_norm' .*got False \(a bool, which would be read as 0\.0\)"),
])
def test_config_file_that_fails_to_load_is_one_line(text, pattern, tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text(text)
  process = _main(f'--config={path}', f'--workdir={tmp_path / "run"}')
  assert process.returncode == 2 and re.search(pattern, process.stderr), process.stderr
  assert 'Traceback' not in process.stderr and len(process.stderr.splitlines()) == 2, \
      process.stderr
  assert not os.path.exists(tmp_path / 'run')
