r"""Quickstart: fast optimisation (the paper's Table 1) on the real handwritten digits that ship
with scikit-learn: no download, 2 min 40 s on 2 CPU cores with nothing else running.

A ResNet-20 teacher (600 iterations), then three ResNet-8 students per row with the same short
task schedule (40 iterations): trained alone (scratch), and after a stage 1 that learns the
teacher's FSP matrices (fsp). Every net is evaluated each 10 iterations, so that the table
compares the rows after the same number of task iterations early on ('Avg @10': the paper's
first claim, that FSP students learn their task faster) as well as at the end, each net, their
average and their ensemble; #Iter counts stage 1 too.

  python experiments/main.py --config=experiments/configs/quickstart.py --workdir=/tmp/quickstart
"""

from configs import common
from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'scratch,fsp'
  config.num_nets = 3
  config.batch_size = 64
  config.eval_batch_size = 120
  config.log_every = 100
  config.eval_every = 10
  config.checkpoint_every = 500
  config.data.name = 'digits'
  config.data.image_size = 16
  config.data.augment = 'none'
  config.teacher.model = 'resnet20'
  config.teacher.num_nets = 1
  config.teacher.schedule = config_lib.schedule((0.1, 0.01), (450, 600))
  config.student.model = 'resnet8'
  config.scratch = config_lib.schedule((0.1, 0.01), (30, 40))
  config.fsp.stage1 = config_lib.schedule((1e-3, 1e-4), (150, 200))
  config.fsp.stage2 = config_lib.schedule((0.1, 0.01), (30, 40))
  return common.variant(config, arg, VARIANTS)


VARIANTS = {'tiny': common.tiny}
