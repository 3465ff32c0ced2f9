r"""Table 4, network minimisation on CIFAR-100: ResNet-32 -> ResNet-14, 4x channels, no
augmentation (as the paper's other CIFAR-100 networks).

  python experiments/main.py --config=experiments/configs/minimize_cifar100.py \
      --workdir=runs/minimize_cifar100
"""

from configs import common
from fsp_jax import config as config_lib

FULL = ((0.1, 0.01, 0.001), (32_000, 48_000, 64_000))


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'scratch,fitnet,fsp'
  config.num_nets = config.teacher.num_nets = 1
  config.data.name = 'cifar100'
  config.data.augment = 'none'
  config.teacher.model, config.student.model = 'resnet32', 'resnet14'
  config.teacher.width = config.student.width = 4
  config.fsp.stage1 = config_lib.schedule((1e-3, 1e-4, 1e-5), (16_000, 24_000, 32_000))
  config.scratch = config_lib.schedule(*FULL)
  config.fsp.stage2 = config_lib.schedule(*FULL)
  config.fitnet.stage2 = config_lib.schedule(*FULL)
  return common.variant(config, arg, VARIANTS)


def _cpu(config):
  """Width 1 and 1/100 of the iterations."""
  config.teacher.width = config.student.width = 1
  common.scale_steps(config, 0.01)


VARIANTS = {'cpu': _cpu, 'tiny': common.tiny}
