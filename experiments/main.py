r"""Runs an experiment of the paper from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/quickstart.py --workdir=/tmp/q
  python experiments/main.py --config=experiments/configs/minimize_cifar10.py:cpu \
      --workdir=/tmp/min10 --config.num_nets=1

A workdir that holds an interrupted run of the same config resumes it.
"""

import os
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fsp_jax import config as config_lib
from fsp_jax import experiment, hosts, preemption
from fsp_jax import workdir as workdir_lib
from fsp_jax.errors import first_line

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
flags.DEFINE_bool('allow_config_change', False, 'Continue a workdir whose run had other '
                  'settings (nets already finished are kept).')
flags.DEFINE_bool('multihost', False, 'Join a multi-host run with jax.distributed settings '
                  'detected from the environment (Cloud TPU VM pod slices, SLURM, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, to join a multi-host '
                    'run without detection (several GPU machines, or CPU processes).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.DEFINE_integer('coordinator_timeout_s', 300, 'Seconds that the processes of a multi-host '
                     'run wait for each other to join before failing.')
flags.DEFINE_integer('host_timeout_s', 60, 'Seconds without a heartbeat after which the other '
                     'processes of a multi-host run take a process for lost, and stop.')
flags.mark_flags_as_required(['workdir'])


def _fail(message: str) -> None:
  print(f'Error: {message}\nPass --helpshort or --helpfull to see help on flags.',
        file=sys.stderr)
  sys.exit(2)


def _config_file(argv: list[str]) -> tuple[str | None, list[str]]:
  """The value of --config (a config file, 'path' or 'path:variant') and argv without it."""
  spec, rest, args = None, argv[:1], iter(argv[1:])
  for arg in args:
    if arg.startswith('--config='):
      spec = arg[len('--config='):]
    elif arg == '--config':
      spec = next(args, '')
    else:
      rest.append(arg)
  return spec, rest


def _overridden_keys(argv: list[str]) -> list[tuple[str, str]]:
  """(flag, dotted key) of every --config.key=value (or boolean --[no]config.key) in argv."""
  found = []
  for arg in argv:
    flag = arg.split('=', 1)[0]
    for prefix in ('--config.', '--noconfig.'):
      if flag.startswith(prefix):
        found.append((flag, flag[len(prefix):]))
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, after loading the config file and checking every --config.key
  against it ourselves: each mistake is one line naming the flag."""
  spec, rest = _config_file(argv)
  if not spec:
    _fail('flag --config is required: an experiment config file, for example '
          '--config=experiments/configs/quickstart.py (or path:variant).')
  try:
    config = config_lib.load_file(spec)
  except ValueError as e:
    _fail(f'flag --config: {e}')
  for flag, key in _overridden_keys(rest):
    try:
      config_lib.check_key(config, key)
    except ValueError as e:
      _fail(f'flag {flag}: {e}')
  config_flags.DEFINE_config_dict('config', config, f'The experiment config ({spec}).',
                                  lock_config=True, sys_argv=rest)
  try:
    return FLAGS(rest)
  except flags.Error as e:  # A value of the wrong type: absl names the flag and the value.
    _fail(str(e))


def _join_hosts():
  """Joins a multi-host run where the flags ask for one, or fails in one line: flags that
  cannot describe one, or processes that did not all join within --coordinator_timeout_s.
  Returns hosts.watch's function that ends this process's heartbeat (None on one host)."""
  address, count, index = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  if not address and not FLAGS.multihost:
    if count is not None or index is not None:
      _fail('flags --num_processes and --process_id join a multi-host run: give '
            '--coordinator_address=host:port too (or --multihost where the environment '
            'describes the run).')
    return
  for name in ('coordinator_timeout_s', 'host_timeout_s'):
    if FLAGS[name].value < 1:
      _fail(f'flag --{name}: expected seconds >= 1, got {FLAGS[name].value}.')
  if address:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      _fail(f'flag --coordinator_address: expected host:port (a port in 1..65535), got '
            f'{address!r}.')
    if count is None or index is None or count < 1 or not 0 <= index < count:
      _fail(f'flags --num_processes and --process_id: expected a count >= 1 and an id in '
            f'0 .. count - 1, got {count} and {index}.')
  where = f'{address} as process {index} of {count}' if address else 'the detected run'
  timeout = FLAGS.coordinator_timeout_s
  print(f'Joining the multi-host run at {where}: waiting up to {timeout} s for every process.',
        flush=True)
  # JAX aborts the process (no exception) when its own timeout expires: ours comes first.
  watchdog = threading.Timer(timeout, _give_up, (f'the processes of the run did not all join '
                                                 f'{where} within {timeout} s: start the others '
                                                 'with the same --coordinator_address and '
                                                 '--num_processes, each with its own '
                                                 '--process_id, or raise '
                                                 '--coordinator_timeout_s.',))
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's heartbeat timeout aborts the process, holding the lock: ours (hosts.watch) first.
    jax.distributed.initialize(address, count, index, initialization_timeout=timeout + 60,
                               heartbeat_timeout_seconds=FLAGS.host_timeout_s + 60)
  except Exception as e:  # pylint: disable=broad-except  (JAX raises several kinds here)
    first = first_line(e, 300)
    _fail(f'could not join {where}: {first}.')
  finally:
    watchdog.cancel()
  return hosts.watch(FLAGS.host_timeout_s, _lost_host)


def _lost_host(message: str) -> None:
  """Stops this process when another of the run is lost: the collectives cannot complete."""
  workdir_lib.release(FLAGS.workdir)
  _give_up(f'{message}: process {jax.process_index()} stops too. The last checkpoint is intact; '
           'start every process again with the same command to resume.')


def _give_up(message: str) -> None:
  """Ends the process at once from the watchdog's thread, saying why."""
  print(f'Error: {message}', file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax and JAX are chatty at INFO.
    logging.set_verbosity(logging.WARNING)
  end_heartbeat = _join_hosts()
  try:
    experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
  except preemption.Preempted as e:  # Every process stops at the same step.
    print(e, flush=True)
    _exit(128 + e.signum, end_heartbeat, together=True)
  except KeyboardInterrupt:  # A second Ctrl-C, or one before training began.
    print('Interrupted: nothing was saved since the last checkpoint; run the same command '
          'again to resume from it.', file=sys.stderr, flush=True)
    _exit(128 + signal.SIGINT, end_heartbeat, together=False)
  except (ValueError, RuntimeError, FloatingPointError) as e:  # The message says it all.
    if FLAGS['verbosity'].present:
      raise
    print(f'Error: {e}', file=sys.stderr, flush=True)
    if end_heartbeat is not None and isinstance(e, jax.errors.JaxRuntimeError):
      time.sleep(FLAGS.host_timeout_s + 10)  # A collective failed: the watch names whom.
    _exit(1 if isinstance(e, FloatingPointError) else 2, end_heartbeat, together=False)
  if end_heartbeat is not None:
    end_heartbeat()


def _exit(code: int, end_heartbeat, together: bool) -> None:
  """Exits with code. A process of a multi-host run that may stop alone leaves at once: JAX's
  shutdown would wait for the others, which stop when its heartbeat ends (hosts.watch)."""
  if end_heartbeat is not None:
    if not together:
      os._exit(code)  # pylint: disable=protected-access
    end_heartbeat()
  sys.exit(code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
