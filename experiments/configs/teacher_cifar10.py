r"""The CPU-scale teacher of Tables 1 and 3: ResNet-26 alone on the real CIFAR-10, in three
cosine cycles (the committed model is the third's: results/teacher_cifar10/, whose README
gives each cycle's accuracy and time).

The paper's teacher trains 64k iterations at batch 128 (164 epochs). On 2 CPU cores ResNet-26
trains fastest at batch 32, so the first cycle runs 25,000 iterations at batch 32 (16 epochs):
a linear warm-up over 500 iterations to 0.025 (the paper's 0.1 scaled linearly to batch 32),
a cosine decay to 0, weight decay 5e-4 (the usual value for short CIFAR schedules; the paper's
1e-4 is for 164 epochs) and the paper's augmentation (pad 4, random crop, flip). `restart` is a
warm restart (SGDR, Loshchilov & Hutter 2017) from the first cycle's model, head included:
12,500 iterations, a warm-up over 250 to 0.01, cosine; `cycle3` a third, longer cycle from the
second's model: 37,500 iterations (24 epochs), a warm-up over 500 to 0.025, cosine.

  python experiments/main.py --config=experiments/configs/teacher_cifar10.py \
      --workdir=runs/teacher_cifar10
  python experiments/main.py --config=experiments/configs/teacher_cifar10.py:restart \
      --workdir=runs/teacher_cifar10_restart  # From the committed first cycle; for your own,
      # add --config.teacher.checkpoint=runs/teacher_cifar10/teacher/net1/model
  python experiments/main.py --config=experiments/configs/teacher_cifar10.py:cycle3 \
      --workdir=runs/teacher_cifar10_cycle3  # From the committed restart's model.
"""

from configs import common
from fsp_jax import config as config_lib

CYCLE1 = 'results/teacher_cifar10/cycle1/model'
CYCLE2 = 'results/teacher_cifar10/cycle2/model'


def get_config(arg=None):
  config = config_lib.default()
  config.methods = ''  # The teacher only.
  config.data.name = 'folder'
  config.data.root = common.CIFAR10
  config.batch_size = common.BATCH
  config.eval_batch_size = 1000
  config.weight_decay = common.WEIGHT_DECAY
  config.log_every = 200
  config.eval_every = 5000
  config.checkpoint_every = 1000
  config.teacher.num_nets = 1
  config.teacher.schedule = config_lib.schedule((common.PEAK_LR,), (common.TEACHER_STEPS,),
                                                warmup=common.WARMUP, decay='cosine')
  return common.variant(config, arg, VARIANTS)


def _restart(config):
  """A second cosine cycle from the committed first cycle's model (another one: give
  --config.teacher.checkpoint)."""
  config.methods = 'finetune'
  config.num_nets = 1
  config.teacher.checkpoint = CYCLE1
  config.finetune = config_lib.schedule((0.01,), (12_500,), warmup=250, decay='cosine')
  config.eval_every = 2500


def _cycle3(config):
  """A third, longer cosine cycle (24 epochs at the first cycle's peak) from the restart's
  model (another one: give --config.teacher.checkpoint)."""
  config.methods = 'finetune'
  config.num_nets = 1
  config.teacher.checkpoint = CYCLE2
  config.finetune = config_lib.schedule((common.PEAK_LR,), (37_500,), warmup=common.WARMUP,
                                        decay='cosine')


VARIANTS = {'restart': _restart, 'cycle3': _cycle3, 'tiny': common.tiny}
