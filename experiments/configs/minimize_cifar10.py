r"""Table 3, network minimisation on CIFAR-10: ResNet-26 teacher -> ResNet-8 student.

Rows: teacher, student alone, FitNet and FSP. The student trains with the full ResNet recipe
(64k iterations) after FSP's 21k-iteration stage 1 (the paper does not give this schedule).

  python experiments/main.py --config=experiments/configs/minimize_cifar10.py \
      --workdir=runs/minimize_cifar10
  # On 2 CPU cores (common.cifar10_cpu): the committed teacher, three students per row with
  # a third of its first cycle's 25,000 iterations at batch 32 (about 2 hours):
  python experiments/main.py --config=experiments/configs/minimize_cifar10.py:cpu \
      --workdir=runs/minimize_cifar10_cpu
"""

from configs import common
from fsp_jax import config as config_lib

FULL = ((0.1, 0.01, 0.001), (32_000, 48_000, 64_000))


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'scratch,fitnet,fsp'
  config.num_nets = config.teacher.num_nets = 1
  config.student.model = 'resnet8'
  config.scratch = config_lib.schedule(*FULL)
  config.fsp.stage2 = config_lib.schedule(*FULL)
  config.fitnet.stage2 = config_lib.schedule(*FULL)
  return common.variant(config, arg, VARIANTS)


def _cpu(config):
  common.cifar10_cpu(config)
  config.num_nets = 3


VARIANTS = {'cpu': _cpu, 'tiny': common.tiny}
