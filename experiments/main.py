r"""Runs an experiment of the paper from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/quickstart.py --workdir=/tmp/q
  python experiments/main.py --config=experiments/configs/minimize_cifar10.py:cpu \
      --workdir=/tmp/min10 --config.num_nets=1

A workdir that holds an interrupted run resumes it.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fsp_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax and JAX are chatty at INFO.
    logging.set_verbosity(logging.WARNING)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
