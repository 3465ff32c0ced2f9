"""The train state and the pure steps: train, evaluate, FSP matrices.

As in flax examples/imagenet: `train_step` is a plain function of (state, batch), pmapped over
the local devices with axis_name='batch' (gradients and BatchNorm statistics averaged with
lax.pmean) by `make_train_step`, or jitted on one device by a notebook or a probe. The
learning rate comes from an optax schedule inside the optimizer state; loss-term weights are
functions of the state's step.
Teachers are never in the train state: they run in inference mode and are never
differentiated (big_vision's pattern).
"""

import functools
from typing import Any

import flax
from flax import jax_utils
import jax
from jax import lax
import jax.numpy as jnp
import optax

from fsp_jax import fsp, schedules
from fsp_jax.adapters import Student
from fsp_jax.feed import HostFeed
from fsp_jax.terms import Outputs, Phase


class TrainState(flax.struct.PyTreeNode):
  """What a checkpoint holds: the network's variables, optimizer state and step."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@functools.cache
def optimizer(sched: schedules.Schedule, weight_decay: float, momentum: float,
              max_grad_norm: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (coupled), as in the ResNet
  recipe the paper follows; the learning rate (in the state's hyperparams) follows sched. A
  max_grad_norm > 0 first scales the loss's gradient down to at most that global norm."""
  clipping = (optax.clip_by_global_norm(max_grad_norm),) if max_grad_norm else ()
  return optax.chain(
      *clipping,
      optax.add_decayed_weights(weight_decay),
      optax.inject_hyperparams(optax.sgd)(learning_rate=schedules.to_optax(sched),
                                          momentum=momentum))


def learning_rate(opt_state) -> jnp.ndarray:
  """The rate of the optimizer's latest update (of the first one, before any)."""
  return opt_state[-1].hyperparams['learning_rate']


@functools.cache
def _placed_as_outputs():
  return jax.pmap(lambda tree: tree, axis_name='batch', donate_argnums=0)


def replicate(tree):
  """tree copied to every local device, placed as the pmapped steps return their outputs: a
  step's first call then compiles what its later calls use (jax_utils.replicate alone places
  arrays on another mesh, so that the second call compiles the step again)."""
  return _placed_as_outputs()(jax_utils.replicate(tree))


def init_variables(model: Student, rng: jax.Array, image_size: int) -> dict:
  """{'params', 'batch_stats'} of model on a [1, S, S, 3] input, outside pmap (no BN axis)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_model = model.clone(backbone=model.backbone.clone(axis_name=None))
  return init_model.init(rng, x, train=False)


def fresh_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """Step 0 of a phase from a network's {'params', 'batch_stats'}: the optimizer's state new."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']))


def create_train_state(model: Student, rng: jax.Array, image_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh state: the model's initial variables, step 0 and the optimizer's state."""
  return fresh_state(jax.jit(init_variables, static_argnums=(0, 2))(model, rng, image_size), tx)


def term_weights(phase: Phase, step: jnp.ndarray) -> dict:
  """{term: weight} at a step: each weight goes linearly from its start to its end."""
  progress = step / max(1, phase.steps - 1)
  return {t.name: t.weight[0] + (t.weight[1] - t.weight[0]) * progress for t in phase.terms}


def train_step(state: TrainState, batch: dict, teacher_variables, *, student, teacher, phase: Phase,
               tx: optax.GradientTransformation, axis_name: str | None = 'batch'):
  """One step of a phase: (state, batch, teacher_variables) -> (state, metrics, outputs).

  student and teacher map images to (logits, features) (a `Student`, or any `fsp_jax.models`
  network); teacher is None where no term reads it. batch: {'image': [b, H, W, 3], 'label':
  [b]}, and for a cached FSP term 'teacher_fsp' (the teacher's [b, M, N] per stage) in place
  of a teacher pass. metrics: {'loss', each term, 'grad_norm', 'lr'}, scalars; outputs: the
  `Outputs` the terms read (the student's before this update). With axis_name, gradients,
  BatchNorm statistics and metrics are averaged over that pmap axis; None: one device.
  """
  teacher_logits = teacher_features = None
  if teacher is not None and phase.needs_teacher_pass:
    teacher_logits, teacher_features = teacher.apply(teacher_variables, batch['image'],
                                                     train=False)
  weights = term_weights(phase, state.step)

  def objective(params):
    (logits, features), updates = student.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'])
    out = Outputs(logits, features, batch['label'], teacher_logits, teacher_features,
                  batch.get('teacher_fsp'))
    values = {term.name: term(out) for term in phase.terms}
    loss = sum(weights[name] * value for name, value in values.items())
    return loss, (updates['batch_stats'], {'loss': loss, **values}, out)

  grads, (batch_stats, metrics, out) = jax.grad(objective, has_aux=True)(state.params)
  if axis_name:
    grads = lax.pmean(grads, axis_name)
    batch_stats = lax.pmean(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics['lr'] = learning_rate(opt_state)  # The rate of this update.
  metrics['grad_norm'] = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, lax.pmean(metrics, axis_name) if axis_name else metrics, out


@functools.cache
def make_train_step(student: Student, teacher: Student | None, phase: Phase,
                    tx: optax.GradientTransformation, feed=HostFeed, steps_per_call: int = 1):
  """`train_step` pmapped over the local devices, `steps_per_call` steps a call (a lax.scan):
  (state, given, teacher_variables, resident) -> (state, metrics), every array with a leading
  [devices] axis, metrics [devices, steps] averaged over the devices. The state is donated.

  given is what the feed (`feed.HostFeed`, `feed.DeviceFeed`) gives the call, resident what it
  keeps on the devices; each step finds its batch with `feed.batch`.
  """

  def one_step(state, i, given, teacher_variables, resident):
    batch = feed.batch(given, resident, i, state.step, phase.augment)
    state, metrics, _ = train_step(state, batch, teacher_variables, student=student,
                                   teacher=teacher, phase=phase, tx=tx)
    return state, metrics

  def call(state, given, teacher_variables, resident):
    body = lambda s, i: one_step(s, i, given, teacher_variables, resident)
    if steps_per_call == 1:
      # One step, no loop: XLA:CPU runs convolution gradients inside a loop body about 20x
      # slower (jax-ml/jax#12868), and a CPU run has no host time to save.
      state, metrics = body(state, 0)
      return state, jax.tree_util.tree_map(lambda m: m[None], metrics)
    return lax.scan(body, state, jnp.arange(steps_per_call))

  return jax.pmap(call, axis_name='batch', donate_argnums=(0,))


@functools.cache
def make_eval_step(model: Student):
  """A pmapped (variables, batch) -> {'probs': [devices, b, classes], 'loss': [devices, b]}:
  each example's softmax and cross-entropy, inference mode."""

  def step(variables, batch):
    logits, _ = model.apply(variables, batch['image'], train=False)
    return {'probs': jax.nn.softmax(logits),
            'loss': optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])}

  return jax.pmap(step, axis_name='batch')


def eval_bytes(model: Student, image_size: int, batch: int) -> int | None:
  """Bytes of device memory that make_eval_step's computation takes for one device's batch of
  `batch` images: XLA's figure for its buffers, arguments and outputs, compiled for the shapes
  alone (None where the backend gives none)."""
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_size))
  single = model.clone(backbone=model.backbone.clone(axis_name=None))
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  memory = jax.jit(lambda v, x: single.apply(v, x, train=False)[0]).lower(
      variables, images).compile().memory_analysis()
  if memory is None:
    return None
  return (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
          memory.output_size_in_bytes)


@functools.cache
def make_batch_stats_step(model: Student):
  """A pmapped (variables, batch) -> variables whose BatchNorm running statistics took in the
  batch's images [devices, b, S, S, 3] (training mode: batch statistics over all devices)."""

  def step(variables, batch):
    _, updated = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    return {**variables, 'batch_stats': updated['batch_stats']}

  return jax.pmap(step, axis_name='batch')


@functools.cache
def make_mean_fsp(model: Student):
  """A jitted (variables, images [B, S, S, 3]) -> [mean FSP matrix [M, N] per stage], one
  device, eval mode."""

  def mean_fsp(variables, images):
    _, features = model.apply(variables, images, train=False)
    return [g.mean(0) for g in fsp.fsp_matrices(features)]

  return jax.jit(mean_fsp)


@functools.cache
def make_fsp_step(model: Student):
  """A pmapped (variables, batch) -> FSP matrices [devices, b, M, N] per stage of the batch's
  images [devices, b, S, S, 3], inference mode."""

  def step(variables, batch):
    _, features = model.apply(variables, batch['image'], train=False)
    return fsp.fsp_matrices(features)

  return jax.pmap(step, axis_name='batch')
