"""Features at named layers of any Flax model: FSP without rewriting the network.

`capture(model, variables, x, {'stage1_in': 'conv1', 'stage1_out': 'block2', ...})` runs a
Linen model once and returns its output and the outputs of the named submodules (through
Flax's `capture_intermediates`), so any model's FSP matrices are `fsp.fsp_matrices` of them:

    out, features = features.capture(model, variables, x, points)
    loss = losses.fsp_l2(fsp.fsp_matrices(features), teacher_matrices)

An NNX model holds its own variables: `capture(model, x, points)`.

A path names a submodule by its scope, 'block2' or 'encoder/layers_1' (see `module_paths`;
for NNX, its attribute path, 'blocks/0').
"""

import types
from typing import Any, Mapping, Sequence

from flax import nnx
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


def _points(points) -> dict[str, str]:
  """{feature name: module path} from a mapping or a sequence of paths."""
  if isinstance(points, str) or not isinstance(points, (Mapping, Sequence)):
    raise ValueError(f'points must be {{feature name: module path}} or a sequence of module '
                     f'paths, got {points!r} (a single path is [{points!r}]).')
  if not isinstance(points, Mapping):
    points = {path: path for path in points}
  bad = [p for p in points.values() if not isinstance(p, str)]
  if bad:
    raise ValueError(f'points must name module paths as strings, got {bad}.')
  return dict(points)


def _nhwc(points: dict[str, str], captured: dict[str, Any]) -> dict[str, Any]:
  """{name: the activation captured at its path}, each checked to be NHWC."""
  features = {}
  for name, path in points.items():
    value = captured[path]
    if not hasattr(value, 'ndim') or value.ndim != 4:
      raise ValueError(f'The output of {path!r} ({name}) is not an NHWC batch [B, H, W, C]: '
                       f'got {getattr(value, "shape", type(value).__name__)}. Name a layer '
                       'whose output is a feature map.')
    features[name] = value
  return features


def _capture_nnx(model: nnx.Module, x, points: dict[str, str], **kwargs):
  """model(x, **kwargs) with the first output of each named submodule recorded: each one's class
  is swapped for a recording subclass during the call, then restored."""
  modules = {'/'.join(map(str, path)): m for path, m in nnx.iter_modules(model) if path}
  missing = sorted(set(points.values()) - set(modules))
  if missing:
    raise ValueError(f'Module paths {missing} are not in {type(model).__name__}; its paths '
                     f'are: {", ".join(sorted(modules))}.')
  captured, classes = {}, {}

  def recording(path: str, cls: type) -> type:
    def __call__(self, *args, **kw):  # pylint: disable=invalid-name
      out = cls.__call__(self, *args, **kw)
      captured.setdefault(path, out)
      return out
    return types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(
        __call__=__call__))

  try:
    for path in set(points.values()):
      classes[path] = type(modules[path])
      modules[path].__class__ = recording(path, classes[path])
    out = model(x, **kwargs)
  finally:
    for path, cls in classes.items():
      modules[path].__class__ = cls
  never = sorted(set(points.values()) - set(captured))
  if never:
    raise ValueError(f'Module paths {never} of {type(model).__name__} were not called on x.')
  return out, _nhwc(points, captured)


def capture(model: nn.Module | nnx.Module, *args, mutable: Sequence[str] = (), **kwargs):
  """Runs the model once and captures named NHWC activations.

  capture(linen_model, variables, x, points) runs linen_model.apply(variables, x, **kwargs);
  capture(nnx_model, x, points) runs nnx_model(x, **kwargs).

  Args:
    model, variables, x: as for `model.apply` (Linen), or the NNX module and its input.
    points: {feature name: module path}, or module paths (then also the names).
    mutable: Linen only: collections to update (['batch_stats'] in training).
    **kwargs: further arguments of the model's __call__ (train=True, ...).

  Returns:
    (output, {name: [B, H, W, C] activation}); a Linen output is what model.apply returns,
    with the updated collections when `mutable` is given: (model output, updates).

  Raises:
    ValueError: points that are not module paths, a path that is not a submodule (the model's
      paths are listed), or an activation that is not a rank-4 NHWC array.
  """
  if isinstance(model, nnx.Module):
    if len(args) != 2 or mutable:
      raise ValueError('An NNX model is captured as capture(model, x, points): its variables '
                       'are its own (and it updates them itself).')
    return _capture_nnx(model, args[0], _points(args[1]), **kwargs)
  if len(args) != 3:
    raise ValueError('A Linen model is captured as capture(model, variables, x, points).')
  variables, x, points = args
  points = _points(points)
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
  return ((out, dict(state)) if mutable else out), _nhwc(points, captured)
