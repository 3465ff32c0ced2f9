"""Features at named layers of any Flax Linen model: FSP without rewriting the network.

`capture(model, variables, x, {'stage1_in': 'conv1', 'stage1_out': 'block2', ...})` runs the
model once and returns its output and the outputs of the named submodules (through Flax's
`capture_intermediates`), so any model's FSP matrices are `fsp.fsp_matrices` of them:

    out, features = features.capture(model, variables, x, points)
    loss = losses.fsp_l2(fsp.fsp_matrices(features), teacher_matrices)

A path names a submodule by its scope, 'block2' or 'encoder/layers_1' (see `module_paths`).
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{'a/b': first output of module a/b's __call__} from an 'intermediates' collection."""
  found = {}
  for key, value in tree.items():
    if key == '__call__':
      found['/'.join(prefix)] = value[0]
    elif isinstance(value, Mapping):
      found.update(_flatten(value, prefix + (key,)))
  return found


def module_paths(model: nn.Module, variables, x, **kwargs) -> list[str]:
  """Every submodule path of model on input x (traced, never compiled), sorted."""
  def run(variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'],
                           **kwargs)
    return state['intermediates']
  return [path for path in _flatten(jax.eval_shape(run, variables, x)) if path]


def capture(model: nn.Module, variables, x, points: Mapping[str, str] | Sequence[str], *,
            mutable: Sequence[str] = (), **kwargs):
  """Runs model.apply(variables, x, **kwargs) and captures named NHWC activations.

  Args:
    model, variables, x: as for `model.apply`.
    points: {feature name: module path}, or module paths (then also the names).
    mutable: collections to update (['batch_stats'] in training), as for `model.apply`.
    **kwargs: further arguments of the model's __call__ (train=True, ...).

  Returns:
    (output, {name: [B, H, W, C] activation}); output is what model.apply returns, with the
    updated collections when `mutable` is given: (model output, updates).

  Raises:
    ValueError: a path that is not a submodule (the model's paths are listed), or an
      activation that is not a rank-4 NHWC array.
  """
  if not isinstance(points, Mapping):
    points = {path: path for path in points}
  wanted = set(points.values())

  def keep(module: nn.Module, method_name: str) -> bool:
    return method_name == '__call__' and '/'.join(module.path) in wanted

  out, state = model.apply(variables, x, capture_intermediates=keep,
                           mutable=['intermediates', *mutable], **kwargs)
  captured = _flatten(state.pop('intermediates', {}))
  missing = sorted(wanted - set(captured))
  if missing:
    known = module_paths(model, variables, x, **kwargs)
    raise ValueError(f'Module paths {missing} are not in {type(model).__name__}; its paths '
                     f'are: {", ".join(known)}.')
  features = {}
  for name, path in points.items():
    value = captured[path]
    if not hasattr(value, 'ndim') or value.ndim != 4:
      raise ValueError(f'The output of {path!r} ({name}) is not an NHWC batch [B, H, W, C]: '
                       f'got {getattr(value, "shape", type(value).__name__)}. Name a layer '
                       'whose output is a feature map.')
    features[name] = value
  return ((out, dict(state)) if mutable else out), features
