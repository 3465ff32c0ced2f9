r"""Table 5, transfer: an ImageNet ResNet-34 teacher -> a ResNet-20 student on CUB-200-2011.

Rows: the teacher's network fine-tuned from its ImageNet weights and trained from scratch, the
student alone, FitNet and FSP (both taught by the ImageNet teacher on CUB images). The student,
resnet20_imagenet, is ResNet-34 with blocks removed, (3, 4, 6, 3) -> (2, 2, 3, 2): its stage
widths stay 64..512, so its FSP matrices match the teacher's without adapters, as in the
paper's students. Convert torchvision's ImageNet weights once, then train:

  python -m fsp_jax.convert --model=resnet34 --state_dict=resnet34-b627a593.pth \
      --output=checkpoints/resnet34_imagenet
  python experiments/main.py --config=experiments/configs/transfer_cub.py \
      --workdir=runs/transfer_cub --config.teacher.checkpoint=checkpoints/resnet34_imagenet
  # From the extracted CUB_200_2011 archive instead of TFDS's caltech_birds2011:
  #   --config.data.name=cub --config.data.root=/path/to/CUB_200_2011

The paper gives no CUB schedule; this one reuses its CIFAR stage lengths at batch 64, and
fine-tunes at a tenth of the learning rate. The resolution is config.data.image_size.

The `cpu` variant is Table 5 on 2 CPU cores, where no ImageNet weights can be had. The source
network is the committed CIFAR-10 ResNet-26 (88.39%): trained on another task (ten classes at
32 px), as the paper's ImageNet ResNet-34 is for birds. The target is the 100-species CUB
subset in ../shared/data/cub200_subset (2,903 training and 2,999 test images), seen at 32 px
with the source's normalisation (the resolution it learned; 64 px cost 4x the time per
iteration in a probe, which 15 nets could not afford). The student is ResNet-14, the source
with blocks removed (26 -> 14 layers, near the paper's 34 -> 20; the same stage widths, so no
adapters). Every row trains its task stage for TASK_STEPS = 5,400 iterations at batch 32 (60
epochs: the student alone had not stopped improving after 40), a warm-up then a cosine decay
from 0.025 (fine-tuning too: the best of three rates); FSP's stage 1 and FitNet's hint stage
have the CIFAR tables' lengths relative to the task (1/3 and 35/63) at the paper's rates;
FitNet has no KD stage (the source's logits are CIFAR-10's classes). Three nets per row,
seed-paired:

  python experiments/main.py --config=experiments/configs/transfer_cub.py:cpu \
      --workdir=runs/transfer_cub_cpu
"""

from configs import common
from fsp_jax import config as config_lib

IMAGE_SIZE, TASK_STEPS = 32, 5_400  # The cpu variant's: see the module docstring.


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'finetune,teacher_scratch,scratch,fitnet,fsp'
  config.num_nets = config.teacher.num_nets = 1
  config.batch_size = 64
  config.eval_batch_size = 128
  config.data.name = 'caltech_birds2011'
  config.data.image_size = 224
  config.data.augment = 'crop_flip'
  config.data.normalize = 'imagenet'
  config.teacher.model = 'resnet34'
  config.teacher.num_classes = 1000  # ImageNet's; give config.teacher.checkpoint.
  config.student.model = 'resnet20_imagenet'
  config.fitnet.kd_weight = (0.0, 0.0)  # An ImageNet teacher has no CUB logits to distill.
  return common.variant(config, arg, VARIANTS)


def _cpu(config):
  """Table 5 on 2 CPU cores (see the module docstring)."""
  config.data.name = 'cub'
  config.data.root = common.CUB_SUBSET
  config.data.image_size = IMAGE_SIZE
  config.data.normalize = 'cifar'  # The source network's statistics.
  config.batch_size = common.BATCH
  config.eval_batch_size = 1000
  config.weight_decay = common.WEIGHT_DECAY
  config.num_nets = 3
  config.teacher.model = 'resnet26'
  config.teacher.checkpoint = common.TEACHER
  config.teacher.num_classes = 10  # CIFAR-10's: the target's birds have no logits there.
  config.student.model = 'resnet14'
  common.task_schedules(config, TASK_STEPS, TASK_STEPS // 50)
  # Fine-tuning at the students' peak rate: the best on net 1 of 0.0025, 0.01 and 0.025
  # (47.9, 65.1 and 69.4%; at a tenth of it the source underfit).
  config.finetune = config_lib.schedule((common.PEAK_LR,), (TASK_STEPS,),
                                        warmup=TASK_STEPS // 50, decay='cosine')
  config.eval_every = TASK_STEPS // 10
  config.log_every = 100
  config.checkpoint_every = 1000


def _tiny(config):
  """A teacher trained here in place of the ImageNet one: a ResNet-18 (the same stem and stage
  widths, half of ResNet-34's blocks to compile and run)."""
  common.tiny(config)
  config.teacher.model = 'resnet18'
  config.teacher.num_classes = 0


VARIANTS = {'cpu': _cpu, 'tiny': _tiny}
