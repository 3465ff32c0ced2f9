"""Multi-host runs, preemption, SIGKILL resume, corrupt checkpoints and NaN stops."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from configs import common
from fsp_jax import config as config_lib
from fsp_jax import experiment, hosts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'experiments', 'configs', 'quickstart.py') + ':tiny'


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _main(workdir, *overrides, extra=()):
  return [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'), f'--config={TINY}',
          f'--workdir={workdir}', '--config.num_nets=1', *overrides, *extra]


def _params(path):
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree_util.tree_leaves(checkpointer.restore(os.path.abspath(path)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_all(processes, timeout):
  """Waits for every process; kills them all if any fails or time runs out."""
  deadline = time.time() + timeout
  try:
    for p in processes:
      p.wait(timeout=max(1, deadline - time.time()))
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in processes]


@pytest.mark.slow
def test_two_hosts_equal_one_host_with_four_devices(tmp_path):
  # Two steps of every kind: the task stage alone, then FSP stage 1 and the task stage, on
  # augmented batches (each host's part of a batch must be cropped and flipped as on one host).
  # Both runs load one teacher, saved as jax.Arrays of one process (a multi-host run must read
  # it all the same), so that a net's difference is its own steps' float32 summation orders
  # (measured: 2 ulp at most); a teacher trained in each run differs by up to 3e-5, and its
  # FSP students by 1.5e-4 after four steps.
  teacher = helpers.save_model(str(tmp_path / 'teacher'))
  overrides = ['--config.methods=scratch,fsp', '--config.teacher.model=resnet8',
               f'--config.teacher.checkpoint={teacher}', '--config.data.augment=cifar']
  port = _free_port()
  logs = [open(tmp_path / f'host{i}.log', 'w') for i in range(2)]
  hosts = [subprocess.Popen(
      _main(tmp_path / 'two', *overrides, extra=[
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']),
      env=_env(2), stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  one = subprocess.Popen(_main(tmp_path / 'one', *overrides), env=_env(4),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  codes = _run_all(hosts + [one], timeout=400)
  assert codes == [0, 0, 0], (tmp_path / 'host0.log').read_text()[-3000:]
  for run in ('scratch', 'fsp'):
    path = os.path.join('{}', run, 'net1', 'model')
    for a, b in zip(_params(path.format(tmp_path / 'one')), _params(path.format(tmp_path / 'two'))):
      assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max()), run
  assert (tmp_path / 'two' / 'results.md').exists()


def test_a_silent_process_is_named_once_its_count_stops_for_the_timeout():
  seen = {}
  assert hosts.silent({1: '1', 2: '1', 3: 'done'}, seen, now=0.0, timeout_s=10) == []
  assert hosts.silent({1: '2', 2: '1', 3: 'done'}, seen, now=9.0, timeout_s=10) == []
  assert hosts.silent({1: '3', 2: '1', 3: 'done'}, seen, now=10.5, timeout_s=10) == [2]
  assert hosts.silent({1: '3', 2: '2', 3: 'done'}, seen, now=19.0, timeout_s=10) == []


@pytest.mark.slow
def test_a_killed_host_stops_the_other_naming_it_and_releasing_the_lock(tmp_path):
  """kill -9 of process 1 of 2 mid-run: process 0 stops within --host_timeout_s (plus its
  check period), saying which process was lost, and removes the workdir's lock."""
  port, workdir = _free_port(), tmp_path / 'run'
  hosts_ = [subprocess.Popen(
      _scratch_run(workdir, steps=2000, checkpoint_every=8) + [
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
          '--host_timeout_s=5'], env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    assert len(_read_steps(hosts_[0], 2)) >= 2
    hosts_[1].kill()
    hosts_[1].wait()
    start = time.time()
    out, _ = hosts_[0].communicate(timeout=60)
  finally:
    for process in hosts_:
      process.kill()
      process.wait()
  assert time.time() - start < 30 and hosts_[0].returncode == 2, out[-2000:]
  assert re.search(r'Error: process 1 of 2 sent no heartbeat for 5 s \(killed, or its machine '
                   r'lost\): process 0 stops too\. The last checkpoint is intact', out), out
  assert 'Traceback' not in out and 'Check failure' not in out, out[-3000:]
  assert not (workdir / 'lock.json').exists()


def _scratch_run(workdir, steps=24, checkpoint_every=4, keep=2):
  return _main(workdir, '--config.methods=scratch', f'--config.scratch.until=({steps - 4},{steps})',
               f'--config.checkpoint_every={checkpoint_every}', f'--config.keep_checkpoints={keep}')


def _steps_printed(text):
  return [int(m) for m in re.findall(r'\[scratch net1 train\] (\d+)/', text)]


def _read_steps(process, count, limit_s=120):
  """Reads the process's progress lines until `count` steps were printed; returns them."""
  watchdog = threading.Timer(limit_s, process.kill)
  watchdog.start()
  seen = []
  try:
    for line in process.stdout:
      seen += _steps_printed(line)
      if len(seen) >= count:
        break
  finally:
    watchdog.cancel()
  return seen


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path):
  subprocess.run(_scratch_run(tmp_path / 'whole'), env=_env(1), check=True, timeout=300,
                 capture_output=True)
  workdir, rng, kills = tmp_path / 'killed', random.Random(0), 0
  for _ in range(3):  # Bounded: at most 3 attempts.
    process = subprocess.Popen(_scratch_run(workdir), env=_env(1), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    seen = _read_steps(process, rng.randint(1, 6))
    process.kill()
    process.communicate()
    if process.returncode == 0:  # It finished before the kill.
      break
    kills += 1
    saved = [int(s) for s in os.listdir(workdir / 'scratch' / 'net1' / 'train') if s.isdigit()]
    if seen:  # At most checkpoint_every (4) steps are lost.
      assert max(seen) - max(saved, default=0) <= 4, (seen, saved)
  assert kills >= 2
  final = subprocess.run(_scratch_run(workdir), env=_env(1), timeout=300, capture_output=True,
                         text=True)
  assert final.returncode == 0, final.stderr[-2000:]
  for a, b in zip(_params(tmp_path / 'whole' / 'scratch' / 'net1' / 'model'),
                  _params(workdir / 'scratch' / 'net1' / 'model')):
    np.testing.assert_array_equal(a, b)


def _saved(directory):
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _read_until(process, pattern, limit_s=120):
  """Reads the process's output until a line matches pattern; returns the text read."""
  watchdog = threading.Timer(limit_s, process.kill)
  watchdog.start()
  text = ''
  try:
    for line in process.stdout:
      text += line
      if re.search(pattern, line):
        break
  finally:
    watchdog.cancel()
  return text


def test_saves_go_on_after_a_fall_back_and_sigterm_reports_a_real_checkpoint(tmp_path):
  """The newest of three checkpoints corrupted: a rerun falls back to the one before, moves
  the corrupt one aside and saves again at once; SIGTERM before the corrupt step saves a
  checkpoint that exists, and the next run resumes from it. (Step 18's line comes after the
  save at 16 started, which waited for 12's to be committed.)"""
  command = _scratch_run(tmp_path, steps=400, checkpoint_every=4, keep=3)
  directory = tmp_path / 'scratch' / 'net1' / 'train'
  process = subprocess.Popen(command, env=_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  _read_until(process, r'\] 18/')
  process.kill()
  process.communicate()
  saved = _saved(directory)
  assert len(saved) == 3 and saved[-1] >= 12, saved
  newest, previous = saved[-1], saved[-2]
  with open(directory / str(newest) / 'state' / '_METADATA', 'wb') as f:
    f.write(os.urandom(64))
  process = subprocess.Popen(command, env=_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output = _read_until(process, 'resumed from step')
  process.send_signal(signal.SIGTERM)  # Before the first step after the fall-back.
  output += process.communicate(timeout=120)[0]
  assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
  assert (f'checkpoint {newest} is unreadable and was moved to {newest}.corrupt' in output
          and f'resumed from step {previous}' in output), output[-2000:]
  assert len(output.splitlines()) < 30, output  # Our lines, not Orbax's tracebacks.
  step = int(re.search(r'SIGTERM: saved a checkpoint at step (\d+)', output).group(1))
  assert previous < step < newest and step in _saved(directory)
  assert os.path.isdir(directory / f'{newest}.corrupt')
  process = subprocess.Popen(command, env=_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output = _read_until(process, r'resumed from step|starting from step 0')
  process.kill()
  process.communicate()
  assert f'resumed from step {step}' in output, output


@pytest.mark.parametrize('signum,name', [(signal.SIGTERM, 'SIGTERM'),
                                         (signal.SIGINT, r'SIGINT \(Ctrl-C\)'),
                                         (signal.SIGHUP, r'SIGHUP \(its terminal closed\)')],
                         ids=['SIGTERM', 'SIGINT', 'SIGHUP'])
def test_a_signal_saves_a_checkpoint_at_the_next_step_committed_before_it_says_so(
    signum, name, tmp_path):
  """SIGTERM, SIGINT and SIGHUP stop a 2,000-step phase whose only save point is its end a few steps
  after the signal, with one line naming the checkpoint; frozen (SIGSTOP) the moment it prints
  that line, the process has that checkpoint committed. Mutations: the signal honoured only at
  save points saves step 2000; the line printed before the save finds no checkpoint there."""
  process = subprocess.Popen(_scratch_run(tmp_path, steps=2000, checkpoint_every=2000),
                             env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True,  # As from a terminal: under nohup SIGHUP is ignored.
                             preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
  seen = _read_steps(process, 3)
  process.send_signal(signum)
  output = _read_until(process, r'saved a checkpoint at step')
  os.kill(process.pid, signal.SIGSTOP)
  try:
    match = re.search(name + r': saved a checkpoint at step (\d+) in (\S+); run the same command '
                      'again to resume', output)
    assert match, output[-2000:]
    step = int(match.group(1))
    assert _saved(tmp_path / 'scratch' / 'net1' / 'train') == [step]
  finally:
    os.kill(process.pid, signal.SIGCONT)
  output += process.communicate(timeout=120)[0]
  assert process.returncode == 128 + signum, output[-2000:]
  assert max(seen) <= step < 1000, (seen, step)
  after = output[output.index('saved a checkpoint'):]
  assert 'Traceback' not in output and len(after.splitlines()) == 1, after


def test_sighup_under_nohup_stays_ignored(tmp_path):
  """A run started with SIGHUP ignored (nohup) outlives its terminal: a SIGHUP neither stops
  it nor saves early. Mutation: installing the handler over SIG_IGN stops it at the signal."""
  process = subprocess.Popen(_scratch_run(tmp_path, steps=40, checkpoint_every=40), env=_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
  _read_steps(process, 3)
  process.send_signal(signal.SIGHUP)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-2000:]
  assert 'SIGHUP' not in output and '[scratch net1 train] 40/40' in output, output[-2000:]


def _diverging_stage1(workdir, every):
  """The FloatingPointError of an FSP stage 1 at rate 1e6, its metrics fetched (and
  checkpoints saved) every `every` steps."""
  config = common.tiny(config_lib.default())
  config.methods, config.num_nets = 'fsp', 1
  config.teacher.model, config.student.model = 'resnet8', 'resnet8'
  config.teacher.schedule = config_lib.schedule((0.1,), (2,))
  config.fsp.stage1 = config_lib.schedule((1e6,), (12,))
  config.checkpoint_every = config.log_every = every
  with pytest.raises(FloatingPointError) as error:
    experiment.train_and_evaluate(config, workdir)
  return str(error.value)


def test_nan_stop_names_the_same_step_whatever_log_every(tmp_path):
  """Fetched three steps at a time, the first non-finite step is still named. Mutation: the
  step arithmetic for several fetched steps (naming the last fetched step)."""
  steps = [int(re.search(r'step (\d+): non-finite', _diverging_stage1(
      str(tmp_path / str(every)), every)).group(1)) for every in (1, 3)]
  assert steps[0] == steps[1] and steps[0] % 3, steps  # Not the last of a group of three.


def test_nan_stops_naming_stage_step_and_term(tmp_path):
  message = _diverging_stage1(str(tmp_path), 1)
  # The FSP loss or its gradient (grad_norm) overflows first.
  assert re.search(r'\[fsp net1 stage1\] step (\d+): non-finite .*(fsp|grad_norm) = (nan|inf)',
                   message), message
  step = int(re.search(r'step (\d+):', message).group(1))
  directory = tmp_path / 'fsp' / 'net1' / 'stage1'
  saved = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  assert saved and max(saved) == step - 1
  assert f'last good checkpoint is step {step - 1}' in message
  for leaf in _params_of_checkpoint(directory / str(step - 1)):
    assert np.all(np.isfinite(leaf))


def _params_of_checkpoint(path):
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree_util.tree_leaves(checkpointer.restore(os.path.abspath(path / 'state')))


def _tmpfs(path, size: str) -> bool:
  """Mounts a tmpfs of `size` at path where this process may (root); False elsewhere."""
  os.makedirs(path, exist_ok=True)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, check=False).returncode == 0


def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_intact_one(tmp_path):
  """A 1.2 MB file system fills at the second checkpoint: one line names the checkpoint, its
  folder, Orbax's cause and the intact checkpoint before, which a rerun resumes. Where no
  tmpfs can be mounted, Orbax's error for a full disk is raised in its place
  (sitecustomize below). Mutations: without the handler in PhaseCheckpoints._write the user sees
  Orbax's ValueError and the tracebacks its threads log; without its settling wait, 3 of 8
  runs printed TensorStore's tracebacks for the writes left in flight; without
  checkpoints._release, 2 of 17 printed asyncio's "Future exception was never retrieved"."""
  disk = tmp_path / 'disk'
  mounted = _tmpfs(disk, '1200k')
  extra_env = {}
  if not mounted:
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(
        'import orbax.checkpoint as ocp\n'
        'save, calls = ocp.CheckpointManager.save, []\n'
        'def full(self, step, *args, **kwargs):\n'
        '  calls.append(step)\n'
        '  if len(calls) > 1:\n'
        '    raise ValueError("RESOURCE_EXHAUSTED: Error writing: Failed to write 45865 bytes: '
        'No space left on device [os_error_code=28]")\n'
        '  return save(self, step, *args, **kwargs)\n'
        'ocp.CheckpointManager.save = full\n')
    extra_env['PYTHONPATH'] = f'{hook}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'
  try:
    workdir = disk / 'run'
    command = _scratch_run(workdir, steps=24, checkpoint_every=8)
    process = subprocess.run(command, env={**_env(1), **extra_env}, capture_output=True,
                             text=True, timeout=300, check=False)
    assert process.returncode == 2, process.stdout[-2000:] + process.stderr[-2000:]
    assert re.search(r'^Error: \[scratch net1 train\] checkpoint 16 could not be written to '
                     r'\S+/scratch/net1/train: RESOURCE_EXHAUSTED.*No space left on device.*; '
                     r'checkpoint 8 there is intact\. Free space', process.stderr), process.stderr
    assert 'Traceback' not in process.stderr + process.stdout
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert _saved(workdir / 'scratch' / 'net1' / 'train') == [8]
  finally:
    if mounted:
      subprocess.run(['umount', str(disk)], check=True)


def _children(pid: int) -> list[int]:
  """The processes whose parent is pid (from /proc)."""
  found = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        if entry.isdigit() and int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
          found.append(int(entry))
    except (OSError, ValueError, IndexError):
      continue
  return found


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads the process table from /proc')
def test_data_workers_end_with_a_killed_run_and_release_their_shared_memory(tmp_path):
  """kill -9 of a run reading with data.workers=2: its worker processes exit within seconds
  and their /dev/shm objects are released. Mutation: no worker_init_fn watching the parent
  leaves two ~400 MB workers running."""
  shm_before = set(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else set()
  process = subprocess.Popen(_scratch_run(tmp_path, steps=400, checkpoint_every=400) +
                             ['--config.data.workers=2'], env=_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  _read_steps(process, 3)
  workers = [c for c in _children(process.pid)
             if 'spawn_main' in open(f'/proc/{c}/cmdline').read()]
  assert len(workers) == 2, workers
  process.kill()
  process.wait(timeout=60)
  process.stdout.close()  # Not read to its end: live workers would hold it open.
  deadline = time.time() + 20
  while time.time() < deadline and any(os.path.exists(f'/proc/{w}') for w in workers):
    time.sleep(0.5)
  alive = [w for w in workers if os.path.exists(f'/proc/{w}') and
           open(f'/proc/{w}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z']
  for w in alive:
    os.kill(w, signal.SIGKILL)
  assert not alive, f'workers {alive} outlived the killed run'
  time.sleep(2)  # The resource tracker unlinks what they leaked once they are gone.
  if os.path.isdir('/dev/shm'):
    assert not set(os.listdir('/dev/shm')) - shm_before
