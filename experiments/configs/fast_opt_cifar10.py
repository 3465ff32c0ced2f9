r"""Table 1, fast optimisation on CIFAR-10: ResNet-26 teacher -> ResNet-26 students.

Three teachers (64k iterations) and, for each method, three students of 21k iterations
(Net 1..3, their average and ensemble): trained alone (Teacher*), FitNet*, FSP* and FSP*
with shuffled teacher matrices (the dagger row).

  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py \
      --workdir=runs/fast_opt_cifar10
  # 1/100 of the iterations on the ImageFolder CIFAR-10 in ../shared/data (CPU):
  python experiments/main.py --config=experiments/configs/fast_opt_cifar10.py:cpu \
      --workdir=runs/fast_opt_cifar10_cpu
"""

from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()  # The paper's CIFAR-10 recipe and schedules.
  config.methods = 'scratch,fitnet,fsp,fsp_shuffled'
  if arg == 'cpu':
    config.data.name = 'folder'
    config.data.root = '../shared/data/cifar10'
    config.batch_size = 64  # Halves the step time of the paper's 128 on 2 CPU cores.
    config.eval_batch_size = 1000
    config.teacher.num_nets = 1
    config_lib.scale_steps(config, 0.01)
    config.eval_every = 70
  elif arg == 'tiny':
    config_lib.tiny(config)
  return config
