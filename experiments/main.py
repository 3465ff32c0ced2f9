r"""Runs an experiment of the paper from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/quickstart.py --workdir=/tmp/q
  python experiments/main.py --config=experiments/configs/minimize_cifar10.py:cpu \
      --workdir=/tmp/min10 --config.num_nets=1

A workdir that holds an interrupted run of the same config resumes it.
"""

import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fsp_jax import experiment, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.DEFINE_bool('allow_config_change', False, 'Continue a workdir whose run had other '
                  'settings (nets already finished are kept).')
flags.DEFINE_bool('multihost', False, 'Join a multi-host run with jax.distributed settings '
                  'detected from the environment (Cloud TPU VM pod slices, SLURM, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, to join a multi-host '
                    'run without detection (several GPU machines, or CPU processes).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str) -> None:
  print(f'Error: {message}\nPass --helpshort or --helpfull to see help on flags.',
        file=sys.stderr)
  sys.exit(2)


def _first_and_last_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = lines[0].removesuffix(' Error whilst parsing config file:')
  return first if len(lines) == 1 else f'{first} {lines[-1]}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one short line for a bad flag (config_flags puts a traceback
  into its message, and an unknown --config.key escapes as an AttributeError)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # A bad value or variant.
    _fail(_first_and_last_line(e))
  except (AttributeError, KeyError) as e:  # An unknown --config.key.
    text = str(e).replace('\\', '')
    key = re.search(r"'(\w+)'", text).group(1)
    hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
    named = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a]
    _fail(f'flag {named[0] if named else "--config"}: the config has no key {key!r}.'
          + (f' {hint.group(0)}' if hint else ''))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax and JAX are chatty at INFO.
    logging.set_verbosity(logging.WARNING)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()
  config = FLAGS.config
  try:
    config.keys()  # A config file that did not load is reported at its first use.
  except OSError as e:
    _fail(f'flag --config: {_first_and_last_line(e)}')
  try:
    experiment.train_and_evaluate(config, FLAGS.workdir, FLAGS.allow_config_change)
  except trainer.Preempted as e:
    print(e, flush=True)
    sys.exit(128 + signal.SIGTERM)
  except (ValueError, RuntimeError, FloatingPointError) as e:  # The message says it all.
    if FLAGS['verbosity'].present:
      raise
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(1 if isinstance(e, FloatingPointError) else 2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
