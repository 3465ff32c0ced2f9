"""Flax Linen ResNets that return their logits and the features at the FSP points.

Every network here maps x [B, H, W, 3] to (logits [B, classes], features), where features
holds, for each stage K, 'stageK_in' (the stage's input: its first layer) and 'stageK_out'
(the stage's output: its last layer) -- the points between which FSP matrices are taken.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# MSRA initialisation (He et al. 2015), as in the paper.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection.

  shortcut='pad' is the CIFAR ResNets' parameter-free option A (subsample and zero-pad the
  channels); shortcut='conv' is the ImageNet ResNets' 1x1 convolution + BN projection.
  """
  features: int
  strides: int = 1
  shortcut: str = 'pad'
  norm: Any = nn.BatchNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    y = conv(self.features, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.features, (3, 3), padding=1)(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      if self.shortcut == 'pad':
        x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        x = conv(self.features, (1, 1), self.strides, name='shortcut_conv')(x)
        x = self.norm(name='shortcut_norm')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet of basic blocks, CIFAR style (3x3 stem) or ImageNet style (7x7 stem + max-pool).

  Attributes:
    stage_sizes: residual blocks per stage, e.g. (4, 4, 4) for the CIFAR ResNet-26.
    widths: channels per stage, e.g. (16, 32, 64).
    num_classes: outputs of the final dense layer.
    stem: 'cifar' (3x3 conv, option-A shortcuts) or 'imagenet' (7x7/2 conv, 3x3/2 max-pool,
      projection shortcuts).
    axis_name: if set, BatchNorm averages its batch statistics over this pmap axis.
    dtype: the computation dtype (parameters stay float32).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int
  stem: str = 'cifar'
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    """x: [B, H, W, 3] -> (logits [B, num_classes], {'stageK_in'/'stageK_out': [B, h, w, c]})."""
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'cifar':
      x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, kernel_init=conv_init,
                  dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
      shortcut = 'pad'
    else:
      x = nn.Conv(self.widths[0], (7, 7), 2, padding=3, use_bias=False, kernel_init=conv_init,
                  dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      shortcut = 'conv'
    features = {}
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      features[f'stage{stage + 1}_in'] = x
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, shortcut, norm, self.dtype,
                       name=f'stage{stage + 1}_block{block + 1}')(x)
      features[f'stage{stage + 1}_out'] = x
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(logits, jnp.float32), features
