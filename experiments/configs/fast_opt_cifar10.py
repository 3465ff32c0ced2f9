r"""Table 1, fast optimisation on CIFAR-10: ResNet-26 teacher -> ResNet-26 students.

Three teachers (64k iterations) and, for each method, three students of 21k iterations
(Net 1..3, their average and ensemble): trained alone (Teacher*), FitNet*, FSP* and FSP*
with shuffled teacher matrices (the dagger row).

  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py \
      --workdir=runs/fast_opt_cifar10
  # On 2 CPU cores (common.cifar10_cpu): the committed teacher, students with a third of its
  # first cycle's 25,000 iterations at batch 32, on the JPEG CIFAR-10 in ../shared/data; FSP
  # and the students alone, three nets each (about 4 hours alone on the cores):
  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py:cpu \
      --workdir=runs/fast_opt_cifar10_cpu
"""

from configs import common
from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()  # The paper's CIFAR-10 recipe and schedules.
  config.methods = 'scratch,fitnet,fsp,fsp_shuffled'
  return common.variant(config, arg, VARIANTS)


def _cpu(config):
  common.cifar10_cpu(config)
  config.methods = 'scratch,fsp'


VARIANTS = {'cpu': _cpu, 'tiny': common.tiny}
