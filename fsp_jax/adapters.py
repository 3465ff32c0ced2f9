"""What distillation adds on the student's side: channel adapters and the Student wrapper.

The paper's students are their teachers with blocks removed, so stage widths agree and no
adapter is needed (the default). For pairs whose widths differ, a 1x1 convolution (+ BN) on
the student side maps each student feature to the teacher's width before the FSP matrices
are taken. The same module, without BN, is FitNet's hint regressor.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from fsp_jax.models.resnet import conv_init


class ChannelAdapter(nn.Module):
  """Maps named features to given widths with a learned convolution.

  Attributes:
    widths: {feature name: output channels}; features not named pass through unchanged.
    kernel_size: 1 for a channel adapter; FitNet regressors may use 3.
    norm: follow the convolution with BatchNorm.
    axis_name: pmap axis over which BatchNorm averages batch statistics.
  """
  widths: Mapping[str, int]
  kernel_size: int = 1
  norm: bool = True
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray], train: bool = True):
    """{name: [B, H, W, C_name]} -> {name: [B, H, W, widths[name]] (or unchanged)}."""
    unknown = sorted(set(self.widths) - set(features))
    if unknown:
      raise ValueError(f'Adapter widths name {unknown}, not among features {sorted(features)}.')
    out = dict(features)
    for name, width in self.widths.items():
      y = nn.Conv(width, (self.kernel_size,) * 2, padding='SAME', use_bias=not self.norm,
                  kernel_init=conv_init, dtype=self.dtype, name=f'{name}_conv')(features[name])
      if self.norm:
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, axis_name=self.axis_name, name=f'{name}_norm')(y)
      out[name] = y
    return out


def mismatched_widths(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, int]:
  """{name: teacher width} for every feature whose channel count differs from the teacher's.

  Args:
    student, teacher: feature dicts (arrays or shape structs), {name: [B, H, W, C]}.
  """
  return {name: teacher[name].shape[-1] for name in student
          if name in teacher and student[name].shape[-1] != teacher[name].shape[-1]}


class Student(nn.Module):
  """A network and what distillation adds on its side: x -> (logits, features).

  Attributes:
    backbone: a `fsp_jax.models` network.
    adapter: ((feature name, teacher width), ...): 1x1 conv + BN channel adapters applied to
      the FSP features (for pairs whose widths differ).
    hint: (feature name, teacher width): FitNet's regressor, its output in features['hint'].
  """
  backbone: nn.Module
  adapter: tuple[tuple[str, int], ...] = ()
  hint: tuple[str, int] | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    logits, features = self.backbone(x, train=train)
    if self.hint:
      name, width = self.hint
      regressor = ChannelAdapter({name: width}, kernel_size=3, norm=False,
                                 name='hint_regressor')
      features = {**features, 'hint': regressor(features, train)[name]}
    if self.adapter:
      features = ChannelAdapter(dict(self.adapter), axis_name=self.backbone.axis_name,
                                name='adapter')(features, train)
    return logits, features
