r"""Table 5, transfer: an ImageNet ResNet-34 teacher -> a ResNet-20 student on CUB-200-2011.

The student, resnet20_imagenet, is ResNet-34 with blocks removed (2, 2, 3, 2), so its FSP
matrices match the teacher's. Give the teacher's ImageNet weights as an Orbax checkpoint of
{params, batch_stats}; without one, the teacher is trained from scratch on CUB (the paper's
'teacher from scratch' row). Data from TFDS (caltech_birds2011) or the extracted archive:

  python experiments/main.py --config=experiments/configs/transfer_cub.py \
      --workdir=runs/transfer_cub --config.teacher.checkpoint=/path/to/resnet34_imagenet \
      --config.teacher.num_classes=1000
  python experiments/main.py --config=experiments/configs/transfer_cub.py \
      --workdir=runs/transfer_cub --config.data.name=cub --config.data.root=/path/to/CUB_200_2011
  # Small enough for a CPU: 64x64 images, 1/100 of the iterations.
  python experiments/main.py --config=experiments/configs/transfer_cub.py:cpu \
      --workdir=runs/transfer_cub_cpu --config.data.name=cub --config.data.root=...

The paper gives no CUB schedule; this one reuses its CIFAR stage lengths at batch 64.
"""

from fsp_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default()
  config.methods = 'scratch,fitnet,fsp'
  config.num_nets = config.teacher.num_nets = 1
  config.batch_size = 64
  config.eval_batch_size = 128
  config.data.name = 'caltech_birds2011'
  config.data.image_size = 224
  config.data.augment = 'crop_flip'
  config.data.normalize = 'imagenet'
  config.teacher.model = 'resnet34'
  config.student.model = 'resnet20_imagenet'
  config.fitnet.kd_weight = (0.0, 0.0)  # An ImageNet teacher has no CUB logits to distill.
  if arg == 'cpu':
    config.data.image_size = 64
    config_lib.scale_steps(config, 0.01)
  elif arg == 'tiny':
    config_lib.tiny(config, image_size=32)
  return config
