r"""Runs an experiment of the paper from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/quickstart.py --workdir=/tmp/q
  python experiments/main.py --config=experiments/configs/minimize_cifar10.py:cpu \
      --workdir=/tmp/min10 --config.num_nets=1

A workdir that holds an interrupted run resumes it.
"""

import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fsp_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.DEFINE_bool('multihost', False, 'Join a multi-host run with jax.distributed settings '
                  'detected from the environment (Cloud TPU VM pod slices, SLURM, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, to join a multi-host '
                    'run without detection (several GPU machines, or CPU processes).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax and JAX are chatty at INFO.
    logging.set_verbosity(logging.WARNING)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(e, flush=True)
    sys.exit(128 + signal.SIGTERM)


if __name__ == '__main__':
  app.run(main)
