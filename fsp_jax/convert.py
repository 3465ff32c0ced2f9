r"""Torchvision ResNet-18/34 weights -> our Flax ResNet's variables, saved for a teacher.

    python -m fsp_jax.convert --model=resnet34 --state_dict=resnet34-b627a593.pth \
        --output=/path/to/resnet34_imagenet

writes an Orbax checkpoint of {params, batch_stats} that a config names as
`config.teacher.checkpoint` (with `config.teacher.num_classes=1000`). Only reading the .pth
file needs torch (`pip install torch`, the CPU build is enough).

Layouts: torch convolutions are [out, in, kh, kw] on NCHW images, ours [kh, kw, in, out] on
NHWC; torch's fc.weight is [classes, features], our head's kernel [features, classes].
"""

import argparse
import os
import re
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fsp_jax import models

_BLOCK_LAYERS = {'Conv_0': 'conv1', 'BatchNorm_0': 'bn1', 'Conv_1': 'conv2',
                 'BatchNorm_1': 'bn2', 'shortcut_conv': 'downsample.0',
                 'shortcut_norm': 'downsample.1'}
_TOP_LAYERS = {'stem_conv': 'conv1', 'stem_norm': 'bn1', 'head': 'fc'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
# Bookkeeping that torchvision saves (recent versions) and evaluation never reads.
_IGNORED = re.compile(r'.*\.num_batches_tracked$')


def torch_name(path: tuple[str, ...]) -> str:
  """Our variable path, e.g. ('stage2_block1', 'Conv_0', 'kernel') -> 'layer2.0.conv1.weight'."""
  module, *inner, leaf = path
  if module in _TOP_LAYERS:
    prefix = _TOP_LAYERS[module]
  else:
    stage, block = re.fullmatch(r'stage(\d+)_block(\d+)', module).groups()
    prefix = f'layer{stage}.{int(block) - 1}.{_BLOCK_LAYERS[inner[0]]}'
  return f'{prefix}.{_LEAVES[leaf]}'


def _to_flax(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # Convolution [out, in, kh, kw] -> [kh, kw, in, out].
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # Linear [out, in] -> [in, out].
    return value.T
  return value


def from_torchvision(state_dict: Mapping[str, np.ndarray], model: models.ResNet) -> dict:
  """{'params', 'batch_stats'} of `model` (an ImageNet-stem ResNet) from a torchvision
  ResNet state_dict of NumPy arrays.

  Raises ValueError naming every missing key, unexpected key and wrong shape.
  """
  if model.stem != 'imagenet':
    raise ValueError('torchvision ResNets have the ImageNet stem; convert into resnet18, '
                     f'resnet34 or resnet20_imagenet, not a {model.stem!r}-stem ResNet.')
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  given = {k: v for k, v in state_dict.items() if not _IGNORED.match(k)}
  expected, problems = {}, []
  for kind in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(target[kind])[0]:
      names = tuple(p.key for p in path)
      expected[torch_name(names)] = (kind, names, leaf.shape)
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  if missing:
    problems.append(f'missing keys {missing}')
  if unexpected:
    problems.append(f'unexpected keys {unexpected}')
  variables = {'params': {}, 'batch_stats': {}}
  for name in sorted(set(expected) & set(given)):
    kind, names, shape = expected[name]
    value = _to_flax(np.asarray(given[name], np.float32))
    if value.shape != shape:
      problems.append(f'{name}: shape {tuple(np.shape(given[name]))} gives {value.shape} in '
                      f'our layout, expected {shape}')
      continue
    node = variables[kind]
    for key in names[:-1]:
      node = node.setdefault(key, {})
    node[names[-1]] = value
  if problems:
    raise ValueError(f'The state_dict does not fit {type(model).__name__}(stage_sizes='
                     f'{tuple(model.stage_sizes)}, num_classes={model.num_classes}): '
                     + '; '.join(problems) + '.')
  return variables


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch.save'd state_dict (or {'state_dict': ...}) as NumPy arrays; needs torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading a PyTorch checkpoint needs torch: pip install torch') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  state_dict = state_dict.get('state_dict', state_dict)
  return {k: v.detach().numpy() for k, v in state_dict.items()}


def convert(state_dict_path: str, model_name: str, output: str, num_classes: int = 1000):
  """Converts a torchvision checkpoint and saves {params, batch_stats} with Orbax."""
  if os.path.exists(output):
    raise ValueError(f'--output {output!r} exists; choose a new path (nothing was written).')
  model = models.get(model_name, num_classes)
  variables = from_torchvision(load_state_dict(state_dict_path), model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(output), variables)
    checkpointer.wait_until_finished()
  return variables


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--state_dict', required=True, help='torch.save(model.state_dict()) file')
  parser.add_argument('--model', default='resnet34', help='resnet18 or resnet34')
  parser.add_argument('--output', required=True, help='new folder for the Orbax checkpoint')
  parser.add_argument('--num_classes', type=int, default=1000)
  args = parser.parse_args(argv)
  convert(args.state_dict, args.model, args.output, args.num_classes)
  print(f'Saved {args.model} to {args.output}; use --config.teacher.checkpoint={args.output} '
        f'--config.teacher.model={args.model} --config.teacher.num_classes={args.num_classes}')


if __name__ == '__main__':
  main()
