"""Model registry: `get('resnet26', num_classes=10)`."""

from fsp_jax.models.resnet import BasicBlock, ResNet

_CIFAR_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
# resnet20_imagenet is the paper's transfer student: ResNet-34 with residual blocks removed
# (3, 4, 6, 3) -> (2, 2, 3, 2), so that its stage widths, and FSP shapes, match the teacher's.
_IMAGENET_STAGES = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3),
                    'resnet20_imagenet': (2, 2, 3, 2)}
NAMES = tuple(f'resnet{d}' for d in _CIFAR_DEPTHS) + tuple(_IMAGENET_STAGES)


def get(name: str, num_classes: int, width: int = 1, **kwargs) -> ResNet:
  """Builds a network by name.

  Args:
    name: 'resnet8' ... 'resnet110' (any depth 6n+2) are the CIFAR ResNets: three stages
      of n blocks with 16/32/64 channels; 'resnet18', 'resnet34' and 'resnet20_imagenet' (blocks 2, 2, 3, 2)
      the ImageNet ResNets.
    num_classes: outputs of the classifier.
    width: channel multiplier (the paper's CIFAR-100 networks use 4).
    **kwargs: further `ResNet` attributes (axis_name, dtype).
  """
  if not isinstance(width, int) or width < 1:
    raise ValueError(f'width must be a positive integer, got {width!r}.')
  if name in _IMAGENET_STAGES:
    return ResNet(_IMAGENET_STAGES[name], tuple(w * width for w in (64, 128, 256, 512)),
                  num_classes, stem='imagenet', **kwargs)
  if name.startswith('resnet') and name[len('resnet'):].isdigit():
    depth = int(name[len('resnet'):])
    if depth >= 8 and (depth - 2) % 6 == 0:
      n = (depth - 2) // 6
      return ResNet((n, n, n), tuple(w * width for w in (16, 32, 64)), num_classes,
                    stem='cifar', **kwargs)
  raise ValueError(f'Unknown model {name!r}; known models: {", ".join(NAMES)} '
                   '(and any CIFAR resnet{6n+2}).')


__all__ = ['BasicBlock', 'NAMES', 'ResNet', 'get']
