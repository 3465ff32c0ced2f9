r"""Table 2, fast optimisation on CIFAR-100: ResNet-32 with 4x channels, no augmentation.

Teacher 64k iterations; students of 21k (Teacher*, FitNet*, FSP*); FSP stage 1 runs
lr 1e-3 / 1e-4 / 1e-5 until 16k / 24k / 32k.

  python experiments/main.py --config=experiments/configs/fast_opt_cifar100.py \
      --workdir=runs/fast_opt_cifar100
"""

from configs import common
from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'scratch,fitnet,fsp'
  config.data.name = 'cifar100'
  config.data.augment = 'none'
  config.teacher.model = config.student.model = 'resnet32'
  config.teacher.width = config.student.width = 4
  config.fsp.stage1 = config_lib.schedule((1e-3, 1e-4, 1e-5), (16_000, 24_000, 32_000))
  return common.variant(config, arg, VARIANTS)


def _cpu(config):
  """Width 1 and 1/100 of the iterations."""
  config.teacher.width = config.student.width = 1
  common.scale_steps(config, 0.01)


VARIANTS = {'cpu': _cpu, 'tiny': common.tiny}
