r"""Table 1, fast optimisation on CIFAR-10: ResNet-26 teacher -> ResNet-26 students.

Three teachers (64k iterations) and, for each method, three students of 21k iterations
(Net 1..3, their average and ensemble): trained alone (Teacher*), FitNet*, FSP* and FSP*
with shuffled teacher matrices (the dagger row).

  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py \
      --workdir=runs/fast_opt_cifar10
  # On 2 CPU cores in about an hour (common.cifar10_cpu): 1/100 of the iterations, batch 64,
  # one teacher, lower stage-1 rates, on the JPEG CIFAR-10 in ../shared/data:
  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py:cpu \
      --workdir=runs/fast_opt_cifar10_cpu
"""

from configs import common
from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()  # The paper's CIFAR-10 recipe and schedules.
  config.methods = 'scratch,fitnet,fsp,fsp_shuffled'
  return common.variant(config, arg, VARIANTS)


VARIANTS = {'cpu': common.cifar10_cpu, 'tiny': common.tiny}
