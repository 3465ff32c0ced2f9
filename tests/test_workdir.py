"""A workdir belongs to one config and one writer; it must be a writable folder."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import experiment, workdir
from fsp_jax.layout import Layout
import helpers


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
    with open(Layout(str(tmp_path)).lock, 'w') as f:
      json.dump({'pid': holder.pid, 'host': os.uname().nodename, 'since': 'now'}, f)
    with pytest.raises(RuntimeError, match=f'in use by process {holder.pid} on '):
      experiment.train_and_evaluate(_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / 'scratch')
  finally:
    holder.kill()
    holder.wait()
  # Its process is gone: the lock is stale and taken over.
  rows = experiment.train_and_evaluate(_config(), str(tmp_path))
  assert rows[0]['method'] == 'scratch' and not os.path.exists(Layout(str(tmp_path)).lock)


def test_lock_is_held_while_running_and_released(tmp_path):
  with workdir.lock(str(tmp_path)):
    with open(Layout(str(tmp_path)).lock) as f:
      assert json.load(f)['pid'] == os.getpid()
    with pytest.raises(RuntimeError, match='in use by process'):
      with workdir.lock(str(tmp_path)):
        pass
  assert not os.path.exists(Layout(str(tmp_path)).lock)


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


def test_a_run_that_failed_on_its_inputs_leaves_a_workdir_the_corrected_command_can_use(tmp_path):
  """A teacher checkpoint of other classes fails before config.json is written; the same
  command with the right checkpoint then runs in that workdir."""
  config = _config(methods='fsp')
  config.teacher.checkpoint = helpers.save_model(str(tmp_path / 'teacher5'), classes=5)
  run = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r'config.teacher.checkpoint: .* its classifier has 5 '
                     r'classes where the model has 10'):
    experiment.train_and_evaluate(config, run)
  assert not os.path.exists(Layout(run).config)
  config.teacher.checkpoint = helpers.save_model(str(tmp_path / 'teacher10'), classes=10)
  rows = experiment.train_and_evaluate(config, run)
  assert [row['method'] for row in rows] == ['teacher', 'fsp']


def test_allow_config_change_keeps_finished_nets_and_restarts_the_others(tmp_path, capsys):
  """Net 1 finished with ResNet-8s is kept, and its row marked, under another student model;
  net 2, stopped with ResNet-8 checkpoints, is moved aside and trained anew as a ResNet-14,
  never called corrupt. Mutation: resuming net 2 from its old checkpoints (no settings check)
  reports them unreadable."""
  layout = Layout(str(tmp_path))
  experiment.train_and_evaluate(_config(num_nets=2), str(tmp_path))
  net2 = layout.net('scratch', 2)
  os.remove(net2.result)  # As if stopped after its last checkpoint.
  finished = json.load(open(layout.net('scratch', 1).result))
  changed = _config(num_nets=2)
  changed.student.model = 'resnet14'
  capsys.readouterr()
  rows = experiment.train_and_evaluate(changed, str(tmp_path), allow_config_change=True)
  output = capsys.readouterr().out
  assert json.load(open(layout.net('scratch', 1).result)) == finished
  assert re.search(r'\[scratch net2\] its checkpoints were made with other settings '
                   r'\(network.model\): moved to .*net2.replaced-\d+-\d+; this net starts anew',
                   output), output
  assert 'unreadable' not in output and 'corrupt' not in output
  assert json.load(open(net2.result))['model'] == 'resnet14'
  assert [name for name in os.listdir(tmp_path / 'scratch') if '.replaced-' in name]
  assert rows[0]['other_settings']
  with open(layout.results_md) as f:
    assert '| scratch * |' in f.read()


def test_a_shorter_schedule_under_allow_config_change_restarts_the_unfinished_net(tmp_path,
                                                                                   capsys):
  """A net stopped at step 4 of 6 whose schedule becomes 3 steps trains its 3 anew (it
  reported 'resumed from step 4' and 4 iterations before). Mutation: no settings check."""
  layout = Layout(str(tmp_path))
  experiment.train_and_evaluate(_config(scratch=config_lib.schedule((0.1,), (6,)),
                                        checkpoint_every=2), str(tmp_path))
  net = layout.net('scratch', 1)
  os.remove(net.result)
  shutil.rmtree(net.phase('train') + '/6')
  capsys.readouterr()
  rows = experiment.train_and_evaluate(_config(scratch=config_lib.schedule((0.1,), (3,))),
                                       str(tmp_path), allow_config_change=True)
  output = capsys.readouterr().out
  assert 'this net starts anew' in output and 'resumed from step' not in output, output
  assert rows[0]['iterations'] == 3 and not rows[0]['other_settings']


def test_unreadable_lock_is_taken_over_saying_so(tmp_path, capsys):
  for content in ('', '{"pid": ', 'garbage'):
    with open(Layout(str(tmp_path)).lock, 'w') as f:
      f.write(content)
    with workdir.lock(str(tmp_path)):
      pass
    assert 'it cannot be read, so no run holds it' in capsys.readouterr().out
  assert not os.path.exists(Layout(str(tmp_path)).lock)


@pytest.mark.parametrize('name,what', [
    ('config.json', 'the settings this workdir was run with'),
    ('scratch/net1/result.json', "a finished net's result"),
    ('scratch/net1/test_probs.npy', "scratch net1's test probabilities"),
])
def test_a_broken_file_read_back_names_itself(name, what, tmp_path):
  experiment.train_and_evaluate(_config(), str(tmp_path))
  path = tmp_path / name
  path.write_bytes(path.read_bytes()[:10])  # Cut short.
  with pytest.raises(ValueError) as error:
    experiment.train_and_evaluate(_config(), str(tmp_path))
  assert str(error.value).startswith(f'{path} ({what}) cannot be read: ')
  assert 'Delete it and run the same command again' in str(error.value)


@pytest.mark.parametrize('held,pattern', [
    ({'results.md': '# mine', 'results.json': '[]'},
     r'holds 2 entries but no run of fsp_jax \(no config.json\): results.json, results.md'),
    ({'config.json': '{"learning_rate": 0.1}'}, r'holds a config.json that fsp_jax did not write'),
])
def test_a_folder_of_something_else_is_refused_and_left_as_it_was(tmp_path, held, pattern):
  for name, text in held.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(ValueError, match=pattern):
    experiment.train_and_evaluate(_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(held)
  assert all((tmp_path / name).read_text() == text for name, text in held.items())


def test_workdir_names_with_whitespace_or_dangling_links_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"begins or ends with whitespace"):
    workdir.create(str(tmp_path / 'run\n'))
  os.symlink(tmp_path / 'gone', tmp_path / 'link')
  with pytest.raises(ValueError, match=r'link is a symbolic link to .*gone, which does not exist'):
    workdir.create(str(tmp_path / 'link'))
  assert not os.path.exists(tmp_path / 'run\n')


def _folder_config(root):
  config = _config(batch_size=4, eval_batch_size=4)
  config.data.name, config.data.root = 'folder', root
  return config


def test_a_workdir_is_bound_to_its_data(tmp_path):
  """Another test split (an image added; the same count with files swapped) is refused naming
  the split, before anything trains; --allow_config_change continues, and the finished net
  tested on the old split is then refused by name before any table is formed."""
  import test_data  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'data')
  for split in ('train', 'test'):
    for c, name in enumerate(('cat', 'dog')):
      for i in range(3):
        test_data.write_image(os.path.join(root, split, name, f'{i}.png'), 10 * c + i, (16, 16))
  run = str(tmp_path / 'run')
  experiment.train_and_evaluate(_folder_config(root), run)
  extra = os.path.join(root, 'test', 'cat', 'extra.png')
  test_data.write_image(extra, 99, (16, 16))
  with pytest.raises(ValueError, match=r'run on other data \(test: \d examples of 2 classes -> '
                                       r'\d of 2\)'):
    experiment.train_and_evaluate(_folder_config(root), run)
  os.remove(extra)
  first = sorted(os.listdir(os.path.join(root, 'test', 'cat')))[0]
  os.rename(os.path.join(root, 'test', 'cat', first), os.path.join(root, 'test', 'cat', 'z.png'))
  with pytest.raises(ValueError, match=r'test: the same \d examples in number, other files'):
    experiment.train_and_evaluate(_folder_config(root), run)
  os.rename(os.path.join(root, 'test', 'cat', 'z.png'), os.path.join(root, 'test', 'cat', first))
  experiment.train_and_evaluate(_folder_config(root), run)  # The data restored: it resumes.
  test_data.write_image(extra, 99, (16, 16))
  with pytest.raises(ValueError, match=r'net1/test_probs.npy holds \d test examples, the test '
                                       r'split \d'):
    experiment.train_and_evaluate(_folder_config(root), run, allow_config_change=True)


def test_a_setting_of_how_fast_a_run_goes_does_not_bind_the_workdir(tmp_path):
  """data.workers changes how a run reads, not what it computes: a finished workdir reruns
  with another value, and the nets' settings leave it out (one list, workdir.NEUTRAL_KEYS)."""
  experiment.train_and_evaluate(_config(), str(tmp_path))
  changed = _config()
  changed.data.workers = 1
  experiment.train_and_evaluate(changed, str(tmp_path))
  settings = Layout(str(tmp_path)).net('scratch', 1).settings
  with open(settings) as f:
    assert 'workers' not in json.load(f)['data']
