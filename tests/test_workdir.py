"""A workdir belongs to one config and one writer; it must be a writable folder."""

import errno
import json
import os
import subprocess
import sys

import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import experiment, workdir


def _config(**changes):
  config = common.tiny(config_lib.default())
  config.update(methods='scratch', num_nets=1)
  config.teacher.model = config.student.model = 'resnet8'
  config.scratch = config_lib.schedule((0.1,), (2,))
  config.update(changes)
  return config


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path):
  experiment.train_and_evaluate(_config(), str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    before = f.read()
  changed = _config(seed=7, log_every=5)
  changed.student.model = 'resnet14'
  with pytest.raises(ValueError) as error:
    experiment.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  assert "seed: 0 -> 7" in message and "student.model: 'resnet8' -> 'resnet14'" in message
  assert 'log_every' not in message and '--allow_config_change' in message
  with open(tmp_path / 'results.json') as f:
    assert f.read() == before
  assert json.load(open(tmp_path / 'config.json'))['seed'] == 0
  # Settings that do not change results pass; an explicit flag continues with the new ones.
  experiment.train_and_evaluate(_config(log_every=5, checkpoint_every=7), str(tmp_path))
  rows = experiment.train_and_evaluate(changed, str(tmp_path), allow_config_change=True)
  assert json.load(open(tmp_path / 'config.json'))['seed'] == 7
  assert [name for name in os.listdir(tmp_path) if name.startswith('config.json.')]
  assert rows[0]['method'] == 'scratch'


def test_config_changes_ignore_reporting_keys():
  old = {'seed': 0, 'log_every': 1, 'data': {'name': 'digits'}}
  new = {'seed': 0, 'log_every': 9, 'data': {'name': 'folder'}, 'extra': 1}
  assert workdir.config_changes(old, new) == {'data.name': ('digits', 'folder'),
                                              'extra': (None, 1)}


def test_a_second_writer_fails_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(tmp_path / workdir.LOCK, 'w') as f:
      json.dump({'pid': holder.pid, 'host': os.uname().nodename, 'since': 'now'}, f)
    with pytest.raises(RuntimeError, match=f'in use by process {holder.pid} on '):
      experiment.train_and_evaluate(_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / 'scratch')
  finally:
    holder.kill()
    holder.wait()
  # Its process is gone: the lock is stale and taken over.
  rows = experiment.train_and_evaluate(_config(), str(tmp_path))
  assert rows[0]['method'] == 'scratch' and not os.path.exists(tmp_path / workdir.LOCK)


def test_lock_is_held_while_running_and_released(tmp_path):
  with workdir.lock(str(tmp_path)):
    with open(tmp_path / workdir.LOCK) as f:
      assert json.load(f)['pid'] == os.getpid()
    with pytest.raises(RuntimeError, match='in use by process'):
      with workdir.lock(str(tmp_path)):
        pass
  assert not os.path.exists(tmp_path / workdir.LOCK)


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(ValueError, match='is a file; expected a folder'):
    workdir.create(str(path))
  with pytest.raises(ValueError, match='cannot be written'):
    workdir.create('/proc/fsp_jax_workdir')

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr('builtins.open', read_only)
  with pytest.raises(ValueError, match='Read-only file system'):
    workdir.create(str(tmp_path / 'new'))
