r"""A CPU-scale transfer study on real CIFAR-10, in the form of Table 5.

The source task is CIFAR-10's six animal classes (all 30,000 training images); the target
task its four vehicle classes with only 100 training images per class (the whole 4,000-image
test split is evaluated). A ResNet-26 teacher learns the source task; ResNet-14 students (the
teacher with blocks removed, 14/26 about the paper's 20/34) learn the target task alone, after
FitNet's hint stage, or after learning the teacher's FSP matrices on the target images. The
teacher's network is also fine-tuned on the target, and trained on it from scratch.

  # 1. The teacher on the source task (about 10 minutes on 2 CPU cores):
  python experiments/main.py --config=experiments/configs/transfer_cifar10.py:source \
      --workdir=runs/transfer_cifar10_source
  # 2. The five rows on the target task, three nets each (its teacher.checkpoint is step 1's):
  python experiments/main.py --config=experiments/configs/transfer_cifar10.py \
      --workdir=runs/transfer_cifar10
"""

from configs import common
from fsp_jax import config as config_lib

ANIMALS = ('bird', 'cat', 'deer', 'dog', 'frog', 'horse')
VEHICLES = ('airplane', 'automobile', 'ship', 'truck')
SOURCE_MODEL = 'runs/transfer_cifar10_source/teacher_scratch/net1/model'


def _steps(lrs, length):
  """The paper's schedule shape: lr drops at 11/21 and 16/21 of the length."""
  return config_lib.schedule(lrs, (round(length * 11 / 21), round(length * 16 / 21), length))


def get_config(arg=None):
  config = config_lib.default()
  config.data.name = 'folder'
  config.data.root = common.CIFAR10
  config.batch_size = 64
  config.eval_batch_size = 1000
  config.log_every = 10
  config.checkpoint_every = 100
  config.teacher.model = 'resnet26'
  config.teacher.num_nets = 1
  if arg == 'source':
    return _source(config)
  config.methods = 'finetune,teacher_scratch,scratch,fitnet,fsp'
  config.data.classes = VEHICLES
  config.data.max_per_class = 100
  config.teacher.checkpoint = SOURCE_MODEL
  config.teacher.num_classes = len(ANIMALS)
  config.student.model = 'resnet14'
  config.fitnet.kd_weight = (0.0, 0.0)  # The teacher's logits are of the animal classes.
  length = 200  # 32 epochs of the 400 target images.
  config.scratch = config.fsp.stage2 = config.fitnet.stage2 = _steps((0.1, 0.01, 0.001), length)
  config.finetune = _steps((0.01, 0.001, 0.0001), length)
  config.fsp.stage1 = _steps((1e-3, 1e-4, 1e-5), length)
  config.fitnet.stage1 = config_lib.schedule((1e-4, 1e-5), (length * 25 // 21, length * 35 // 21))
  config.eval_every = 50
  return common.variant(config, arg, VARIANTS)


def _source(config):
  """The teacher on the source task."""
  config.methods = 'teacher_scratch'
  config.num_nets = 1
  config.data.classes = ANIMALS
  config.scratch = _steps((0.1, 0.01, 0.001), 1280)  # 2.7 epochs of the 30,000 images.
  config.eval_every = 320
  return config


def _tiny(config):
  """Every row on digits, with a teacher trained here."""
  common.tiny(config)
  config.teacher.checkpoint = ''
  config.teacher.num_classes = 0


VARIANTS = {'source': _source, 'tiny': _tiny}  # 'source' returns before the target's settings.
