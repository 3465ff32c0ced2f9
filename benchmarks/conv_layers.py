r"""Where the train step's time goes: one 3x3 convolution of each CIFAR ResNet stage at batch
128, forward, gradient to the input and gradient to the kernel, XLA (jitted) next to PyTorch
(channels_last) in one process. Prints milliseconds and the ratio PyTorch / ours.

  python benchmarks/conv_layers.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from steps import median_seconds

SHAPES = ((32, 16), (16, 32), (8, 64))  # (spatial size, channels) of the three stages.


def ours(batch: int, size: int, channels: int, repeats: int) -> dict[str, float]:
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, channels)),
                  jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, channels, channels)), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = conv(x, w)
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  kernel_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  return {'forward': median_seconds(lambda: forward(x, w).block_until_ready(), repeats),
          'input grad': median_seconds(lambda: input_grad(x, w, y).block_until_ready(), repeats),
          'kernel grad': median_seconds(lambda: kernel_grad(x, w, y).block_until_ready(),
                                        repeats)}


def theirs(batch: int, size: int, channels: int, repeats: int) -> dict[str, float]:
  x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
  w = torch.randn(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)
  g = F.conv2d(x, w, padding=1)
  with torch.no_grad():
    return {
        'forward': median_seconds(lambda: F.conv2d(x, w, padding=1), repeats),
        'input grad': median_seconds(
            lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1), repeats),
        'kernel grad': median_seconds(
            lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1), repeats)}


def main(batch: int = 128, repeats: int = 20):
  torch.set_num_threads(os.cpu_count())
  print(f'batch {batch}, 3x3 convolution, stride 1; ms (PyTorch / ours: > 1 means we are faster)')
  print('| input | op | ours ms | PyTorch ms | PyTorch / ours |\n|---|---|---|---|---|')
  for size, channels in SHAPES:
    a, b = ours(batch, size, channels, repeats), theirs(batch, size, channels, repeats)
    for op in a:
      print(f'| {size}x{size}x{channels} | {op} | {1000 * a[op]:.1f} | {1000 * b[op]:.1f} | '
            f'{b[op] / a[op]:.2f} |')


if __name__ == '__main__':
  main()
