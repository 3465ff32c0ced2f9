"""Two-stage FSP training: train state, jitted + pmapped steps, and `train_and_evaluate`.

In the style of flax examples/imagenet: pure step functions pmapped over the local devices
with axis_name='batch' (gradients and BatchNorm statistics averaged with lax.pmean), and a
loop that feeds them. Teachers are never in the train state: they run in inference mode from
their own checkpoint, are never differentiated and never re-saved (big_vision's pattern).

A *run* trains one network (net k of a method) through its phases: 'train' for plain
training, 'stage1' then 'stage2' for FSP and FitNet. Every phase checkpoints into
workdir/<method>/net<k>/<phase> and resumes from there; a finished run leaves result.json,
its test-set probabilities (for ensembles) and model/ (its variables, usable as a teacher).
"""

import bisect
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax
from flax import jax_utils
import flax.linen as nn
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX

from fsp_jax import adapters, data, fsp, losses, models, report
from fsp_jax import config as config_lib


class TrainState(flax.struct.PyTreeNode):
  """What a checkpoint holds: the student's variables, optimizer state and step."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


class Student(nn.Module):
  """A network and what distillation adds on its side: (logits, features).

  Attributes:
    backbone: a `fsp_jax.models` network.
    adapter: ((feature name, teacher width), ...): 1x1 conv + BN channel adapters applied to
      the FSP features (only for pairs whose widths differ).
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
      regressor = adapters.ChannelAdapter({name: width}, kernel_size=3, norm=False,
                                          name='hint_regressor')
      features = {**features, 'hint': regressor(features, train)[name]}
    if self.adapter:
      features = adapters.ChannelAdapter(dict(self.adapter), axis_name=self.backbone.axis_name,
                                         name='adapter')(features, train)
    return logits, features


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of training: a learning-rate schedule and weighted loss terms.

  Attributes:
    name: 'train', 'stage1' or 'stage2'; names the checkpoint folder.
    lrs, until: lrs[k] is used until iteration until[k]; until[-1] is the length.
    warmup, decay: a linear warm-up's length, and 'step' (lrs as above) or 'cosine' (lrs[0]
      decayed to 0), as config.schedule.
    terms: ((term, weight at the first step, weight at the last step), ...) with term one
      of 'ce', 'fsp', 'kd', 'hint'; weights change linearly in between.
  """
  name: str
  lrs: tuple[float, ...]
  until: tuple[int, ...]
  terms: tuple[tuple[str, float, float], ...]
  warmup: int = 0
  decay: str = 'step'

  @property
  def steps(self) -> int:
    return self.until[-1]

  def learning_rate(self, step: int) -> float:
    if self.decay == 'cosine':
      return float(optax.warmup_cosine_decay_schedule(0.0, self.lrs[0], self.warmup,
                                                      self.steps)(step))
    lr = self.lrs[min(bisect.bisect_right(self.until, step), len(self.lrs) - 1)]
    return lr * step / self.warmup if step < self.warmup else lr

  def weights(self, step: int) -> dict[str, float]:
    progress = step / max(1, self.steps - 1)
    return {term: start + (end - start) * progress for term, start, end in self.terms}


def _phase(name, schedule, *terms) -> Phase:
  return Phase(name, tuple(schedule.lrs), tuple(schedule.until), tuple(terms),
               schedule.get('warmup', 0), schedule.get('decay', 'step'))


def method_phases(method: str, config: ml_collections.ConfigDict) -> list[Phase]:
  """The phases of a method; 'teacher' uses the teacher's recipe."""
  ce = ('ce', 1.0, 1.0)
  if method == 'teacher':
    return [_phase('train', config.teacher.schedule, ce)]
  if method in ('scratch', 'teacher_scratch'):
    return [_phase('train', config.scratch, ce)]
  if method == 'finetune':
    return [_phase('train', config.finetune, ce)]
  if method in config_lib.FSP_METHODS:
    stage2 = [ce] + ([('fsp', config.fsp.task_weight, config.fsp.task_weight)]
                     if config.fsp.task_weight else [])
    return [_phase('stage1', config.fsp.stage1, ('fsp', 1.0, 1.0)),
            _phase('stage2', config.fsp.stage2, *stage2)]
  if method == 'fitnet':
    # FitNet weighs a KL without the tau^2 of Hinton's kd_loss: divide it back out.
    start, end = (w / config.fitnet.temperature**2 for w in config.fitnet.kd_weight)
    stage2 = [ce] + ([('kd', start, end)] if start or end else [])
    return [_phase('stage1', config.fitnet.stage1, ('hint', 1.0, 1.0)),
            _phase('stage2', config.fitnet.stage2, *stage2)]
  if method == 'kd':
    return [_phase('train', config.kd.schedule, ce, ('kd', config.kd.weight, config.kd.weight))]
  raise ValueError(f'Unknown method {method!r}; expected teacher or one of '
                   f'{", ".join(config_lib.METHODS)}.')


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (coupled), as in the ResNet
  recipe the paper follows; the step scales the result by -learning_rate."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.trace(decay=config.momentum))


def shuffle_fsp(matrices: list[jnp.ndarray], seed: int) -> list[jnp.ndarray]:
  """The paper's dagger ablation: rows and columns of each [B, M, N] matrix permuted by a
  fixed random permutation."""
  rng = np.random.default_rng(seed)
  return [g[:, rng.permutation(g.shape[1])][:, :, rng.permutation(g.shape[2])]
          for g in matrices]


@dataclasses.dataclass(frozen=True)
class Terms:
  """The loss terms of a step and their settings (hashable: it keys the compiled steps)."""
  names: tuple[str, ...]
  temperature: float = 1.0
  shuffle_seed: int | None = None
  hint: str | None = None
  cached_fsp: bool = False  # The teacher's FSP matrices come with the batch: no teacher pass.

  def __call__(self, logits, features, labels, teacher_logits, teacher_features,
               teacher_fsp=None):
    """Each term's value: {'ce': scalar, 'fsp': scalar, ...}."""
    values = {}
    if 'ce' in self.names:
      values['ce'] = losses.cross_entropy(logits, labels)
    if 'fsp' in self.names:
      target = fsp.fsp_matrices(teacher_features) if teacher_fsp is None else teacher_fsp
      if self.shuffle_seed is not None:
        target = shuffle_fsp(target, self.shuffle_seed)
      values['fsp'] = losses.fsp_l2(fsp.fsp_matrices(features), target)
    if 'kd' in self.names:
      values['kd'] = losses.kd_loss(logits, teacher_logits, self.temperature)
    if 'hint' in self.names:
      values['hint'] = losses.hint_loss(features['hint'], teacher_features[self.hint])
    return values


def method_terms(method: str, config: ml_collections.ConfigDict, phase: Phase) -> Terms:
  names = tuple(term for term, _, _ in phase.terms)
  if method == 'fitnet':
    return Terms(names, config.fitnet.temperature, hint=config.fitnet.hint)
  if method == 'kd':
    return Terms(names, config.kd.temperature)
  cached = method in config_lib.FSP_METHODS and phase.name == 'stage1' and config.fsp.cache
  if method == 'fsp_shuffled':
    return Terms(names, shuffle_seed=config.fsp.shuffle_seed, cached_fsp=cached)
  return Terms(names, cached_fsp=cached)


@functools.cache
def make_train_step(student: Student, teacher: Student | None, terms: Terms,
                    tx: optax.GradientTransformation):
  """A pmapped step (state, batch, teacher_variables, lr, weights) -> (state, metrics).

  batch: {'image': [devices, b, H, W, 3], 'label': [devices, b]}, and with
  terms.cached_fsp 'teacher_fsp': the teacher's matrices ([devices, b, M, N] per stage) in
  place of a teacher pass. lr and weights ({term: weight}) are host scalars, broadcast to
  every device. The state is donated.
  """

  def step(state, batch, teacher_variables, lr, weights):
    teacher_logits = teacher_features = None
    if teacher is not None and not terms.cached_fsp:
      teacher_logits, teacher_features = teacher.apply(teacher_variables, batch['image'],
                                                       train=False)

    def objective(params):
      (logits, features), updates = student.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          mutable=['batch_stats'])
      values = terms(logits, features, batch['label'], teacher_logits, teacher_features,
                     batch.get('teacher_fsp'))
      loss = sum(weights[name] * values[name] for name in terms.names)
      return loss, (updates['batch_stats'], {'loss': loss, **values})

    grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(state.params)
    grads = lax.pmean(grads, 'batch')
    batch_stats = lax.pmean(batch_stats, 'batch')
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return new_state, lax.pmean(metrics, 'batch')

  return jax.pmap(step, axis_name='batch', in_axes=(0, 0, 0, None, None), donate_argnums=(0,))


@functools.cache
def make_eval_step(model: Student):
  """A pmapped step (variables, batch with 'mask') -> (summed metrics, probabilities)."""

  def step(variables, batch):
    logits, _ = model.apply(variables, batch['image'], train=False)
    mask = batch['mask']
    metrics = {
        'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
        'loss': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
            logits, batch['label']) * mask),
        'count': jnp.sum(mask)}
    return lax.psum(metrics, 'batch'), jax.nn.softmax(logits)

  return jax.pmap(step, axis_name='batch')


@functools.cache
def make_fsp_step(model: Student):
  """A pmapped (variables, images [devices, b, S, S, 3]) -> FSP matrices [devices, b, M, N]."""

  def step(variables, images):
    _, features = model.apply(variables, images, train=False)
    return fsp.fsp_matrices(features)

  return jax.pmap(step, axis_name='batch')


def teacher_fsp_cache(teacher: Student, variables, source, preprocess: data.Preprocess,
                      batch_size: int) -> list[np.ndarray]:
  """The teacher's FSP matrices of every example of source, seen as in evaluation (no
  augmentation): a [N, M, N'] float32 array per stage, on every host.

  variables are replicated over the local devices.
  """
  step, chunks = make_fsp_step(teacher), []
  for batch in data.eval_batches(source, preprocess, batch_size):
    matrices = step(variables, data.shard(batch['image'], jax.local_device_count()))
    chunks.append([np.asarray(g).reshape((-1,) + g.shape[2:]) for g in matrices])
  return [_gather_in_order([c[k] for c in chunks])[:len(source)]
          for k in range(len(chunks[0]))]


def _init_variables(model: Student, rng: jax.Array, image_size: int):
  """{'params', 'batch_stats'} of model on a [1, S, S, 3] input, outside pmap (no BN axis)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_model = model.clone(backbone=model.backbone.clone(axis_name=None))
  return init_model.init(rng, x, train=False)


def create_train_state(model: Student, rng: jax.Array, image_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh state: the model's initial variables, step 0 and the optimizer's state."""
  variables = jax.jit(_init_variables, static_argnums=(0, 2))(model, rng, image_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables['batch_stats'],
                    opt_state=tx.init(variables['params']))


def evaluate(model: Student, variables, source, preprocess, batch_size: int):
  """Accuracy and loss over a split; its probabilities [N, classes] and labels [N], in order."""
  eval_step = make_eval_step(model)
  local = jax.local_device_count()
  totals, probs, labels, masks = None, [], [], []
  for batch in data.prefetch(data.eval_batches(source, preprocess, batch_size)):
    metrics, p = eval_step(variables, data.shard(batch, local))
    metrics = jax.device_get(jax_utils.unreplicate(metrics))
    totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
    probs.append(np.asarray(p).reshape(-1, p.shape[-1]))
    labels.append(batch['label'])
    masks.append(batch['mask'])
  probs, labels, masks = (_gather_in_order(x) for x in (probs, labels, masks))
  count = max(1, int(totals['count']))
  metrics = {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}
  return metrics, probs[masks], labels[masks]


def _gather_in_order(chunks: list[np.ndarray]) -> np.ndarray:
  """Per-host eval chunks [per-host batch, ...] -> all examples [N, ...] in global order."""
  x = np.asarray(multihost_utils.process_allgather(np.stack(chunks)))  # [hosts, batches, ...]
  return np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


class Progress:
  """Prints a line per update: phase, step, loss terms, images/s and ETA."""

  def __init__(self, label: str, start: int, total: int, batch_size: int):
    self.label, self.total, self.batch_size = label, total, batch_size
    self.last_step, self.last_time = start, time.time()

  def update(self, step: int, metrics: dict[str, float]) -> float:
    """Reports metrics after `step` steps; returns the images/s since the last report."""
    now = time.time()
    rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
    terms = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    _print(f'[{self.label}] {step}/{self.total} ({100 * step / self.total:.0f}%) {terms} | '
           f'{rate:.0f} img/s | ETA {_duration(eta)}')
    self.last_step, self.last_time = step, now
    return rate


def _print(line: str):
  if jax.process_index() == 0:
    print(line, flush=True)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return (f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600
          else f'{seconds // 60}m{seconds % 60:02d}s')


class Writer:
  """TensorBoard scalars from process 0 (tensorboardX); a no-op elsewhere."""

  def __init__(self, logdir: str):
    self.writer = None
    if jax.process_index() == 0:
      self.writer = tensorboardX.SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]):
    if self.writer:
      for key, value in values.items():
        self.writer.add_scalar(key, value, step)
      self.writer.flush()

  def close(self):
    if self.writer:
      self.writer.close()


def _manager(directory: str, config) -> ocp.CheckpointManager:
  # Synchronous saves: a run killed at any moment loses at most checkpoint_every steps.
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False))


@dataclasses.dataclass
class Context:
  """What every run of an experiment shares."""
  config: ml_collections.ConfigDict
  workdir: str
  train_source: Any
  eval_source: Any
  preprocess: data.Preprocess  # Augments when given an RNG (training), not in evaluation.
  tx: optax.GradientTransformation
  teacher_fsp: list[np.ndarray] | None = None  # By training example, for config.fsp.cache.


class Preempted(Exception):
  """Raised after a SIGTERM (a TPU VM's preemption notice) once a checkpoint is saved."""


_PREEMPTION = threading.Event()
SNAPSHOT_IMAGES = 256  # Test images whose mean FSP matrices run_net saves for the report.


def install_preemption_handler() -> None:
  """Makes SIGTERM stop training at the next step, after a checkpoint (main thread only)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda signum, frame: _PREEMPTION.set())


def _preempted() -> bool:
  """Whether any host received SIGTERM (all hosts agree, so all stop at the same step)."""
  flag = np.asarray(_PREEMPTION.is_set())
  if jax.process_count() > 1:
    return bool(np.any(multihost_utils.process_allgather(flag)))
  return bool(flag)


def _check_finite(metrics: dict[str, float], where: str, step: int, directory: str,
                  last_saved: int | None):
  """Stops the run, naming the stage, step and terms, when a loss or gradient is NaN/Inf."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    kept = (f'the last good checkpoint is step {last_saved} in {directory}'
            if last_saved is not None else 'no checkpoint of this phase was saved yet')
    raise FloatingPointError(
        f'[{where}] step {step}: non-finite ' + ', '.join(f'{k} = {v}' for k, v in bad.items())
        + f'; {kept}. Lower this phase\'s learning rates or check the teacher.')


def _restore(manager: ocp.CheckpointManager, state: TrainState, where: str) -> TrainState:
  """The newest checkpoint that restores; a corrupt one is reported and skipped."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as e:  # pylint: disable=broad-except  (Orbax, TensorStore, OS errors)
      _print(f'[{where}] checkpoint {step} is unreadable ({type(e).__name__}: '
             f'{str(e)[:200]}); falling back to the previous one.')
      continue
    _print(f'[{where}] resumed from step {step}')
    return restored
  return state


def train_phase(ctx: Context, label: str, run_dir: str, phase: Phase, student: Student,
                teacher: Student | None, teacher_variables, terms: Terms, state: TrainState,
                seed: int, offset: int, writer: Writer, history: dict) -> TrainState:
  """Trains one phase from its latest checkpoint (or from `state`) to its end.

  offset is the number of steps of earlier phases, for global step numbers in the logs.
  Raises Preempted after SIGTERM (once a checkpoint is saved) and FloatingPointError on a
  non-finite loss or gradient (keeping the last good checkpoint).
  """
  config = ctx.config
  where = f'{label} {phase.name}'
  directory = os.path.join(run_dir, phase.name)
  manager = _manager(directory, config)
  state = _restore(manager, state, where)
  start = int(state.step)
  for key in history:  # This phase's entries after the restored step are redone below.
    history[key] = [entry for entry in history[key]
                    if not offset + start < entry[0] <= offset + phase.steps]
  if start >= phase.steps:
    manager.close()
    return state
  local = jax.local_device_count()
  preprocess = ctx.preprocess
  if terms.cached_fsp:  # The images the teacher's cached matrices were computed on.
    preprocess = functools.partial(lambda p, image, rng: p(image, None), ctx.preprocess)
  batches = data.train_batches(ctx.train_source, preprocess, config.batch_size, seed,
                               start_step=start)
  batches = jax_utils.prefetch_to_device(
      (data.shard(_with_teacher_fsp(b, ctx.teacher_fsp if terms.cached_fsp else None), local)
       for b in data.prefetch(batches)), 2)
  train_step = make_train_step(student, teacher, terms, ctx.tx)
  replicated = jax_utils.replicate(state)
  progress = Progress(where, start, phase.steps, config.batch_size)
  last_saved = start if start else None
  for step in range(start, phase.steps):
    weights = {k: np.float32(v) for k, v in phase.weights(step).items()}
    replicated, metrics = train_step(replicated, next(batches), teacher_variables,
                                     np.float32(phase.learning_rate(step)), weights)
    done = step + 1
    metrics = {k: float(v) for k, v in jax.device_get(jax_utils.unreplicate(metrics)).items()}
    _check_finite(metrics, where, done, directory, last_saved)
    if done % config.log_every == 0 or done == phase.steps:
      rate = progress.update(done, metrics)
      writer.scalars(offset + done, {**{f'{phase.name}/{k}': v for k, v in metrics.items()},
                                     f'{phase.name}/lr': phase.learning_rate(step),
                                     'train/images_per_s': rate})
      history['train'].append([offset + done, phase.name, metrics['loss']])
    # The end of the phase is evaluated once, by run_net.
    if ('ce' in terms.names and config.eval_every and done % config.eval_every == 0
        and done < phase.steps):
      result, _, _ = evaluate(student, replicated.variables(), ctx.eval_source, ctx.preprocess,
                              config.eval_batch_size)
      writer.scalars(offset + done, {f'eval/{k}': v for k, v in result.items()})
      history['eval'].append([offset + done, result['accuracy']])
    preempted = _preempted()
    if preempted or done % config.checkpoint_every == 0 or done == phase.steps:
      manager.save(done, args=ocp.args.StandardSave(jax.device_get(
          jax_utils.unreplicate(replicated))))
      _save_json(os.path.join(run_dir, 'history.json'), history)
      last_saved = done
    if preempted:
      manager.wait_until_finished()
      manager.close()
      raise Preempted(f'[{where}] SIGTERM: saved a checkpoint at step {done} in {directory}; '
                      'run the same command again to resume.')
  manager.wait_until_finished()
  manager.close()
  return jax.device_get(jax_utils.unreplicate(replicated))


def _with_teacher_fsp(batch: dict, cache: list[np.ndarray] | None) -> dict:
  """The batch for the step: its examples' cached teacher matrices added, 'index' dropped."""
  index = batch.pop('index')
  if cache is not None:
    batch['teacher_fsp'] = [g[index] for g in cache]
  return batch


def run_net(ctx: Context, method: str, net: int, model_name: str, student: Student,
            teacher: Student | None, teacher_variables, pretrained=None) -> dict:
  """Trains net `net` of `method` through its phases (or finds it done) and evaluates it.

  pretrained: replicated variables of the same network to start from (but for the head).
  """
  config = ctx.config
  run_dir = os.path.join(ctx.workdir, method, f'net{net + 1}')
  result_path = os.path.join(run_dir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  start_time = time.time()
  seed = config.seed + net
  state = create_train_state(student, jax.random.key(seed), config.data.image_size, ctx.tx)
  if pretrained is not None:
    state = start_from(state, jax_utils.unreplicate(pretrained))
  writer = Writer(os.path.join(ctx.workdir, 'tensorboard', f'{method}_net{net + 1}'))
  history_path = os.path.join(run_dir, 'history.json')
  history = {'train': [], 'eval': []}
  if os.path.exists(history_path):  # Curves of a run that is resuming.
    with open(history_path) as f:
      history = json.load(f)
  snapshot = {}
  if method in config_lib.FSP_METHODS:  # For the report's heatmaps.
    images = next(data.eval_batches(ctx.eval_source, ctx.preprocess, SNAPSHOT_IMAGES, 0, 1))
    snapshot['teacher'] = mean_fsp_matrices(teacher, jax_utils.unreplicate(teacher_variables),
                                            images['image'])
    snapshot['before'] = mean_fsp_matrices(student, state.variables(), images['image'])
  offset = 0
  for phase in method_phases(method, config):
    if offset:  # A new phase keeps the weights and starts a fresh optimizer.
      state = TrainState(step=jnp.zeros((), jnp.int32), params=state.params,
                         batch_stats=state.batch_stats, opt_state=ctx.tx.init(state.params))
    state = train_phase(ctx, f'{method} net{net + 1}', run_dir, phase, student, teacher,
                        teacher_variables, method_terms(method, config, phase), state, seed,
                        offset, writer, history)
    offset += phase.steps
    if snapshot and phase.name == 'stage1' and jax.process_index() == 0:
      snapshot['after'] = mean_fsp_matrices(student, state.variables(), images['image'])
      np.savez(os.path.join(run_dir, 'fsp_matrices.npz'),
               **{f'{when}_{k}': g for when, gs in snapshot.items() for k, g in enumerate(gs)})
  metrics, probs, labels = evaluate(student, jax_utils.replicate(state.variables()),
                                    ctx.eval_source, ctx.preprocess, config.eval_batch_size)
  history['eval'].append([offset, metrics['accuracy']])
  writer.scalars(offset, {f'eval/{k}': v for k, v in metrics.items()})
  writer.close()
  export = {'params': state.params['backbone'], 'batch_stats': state.batch_stats['backbone']}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(run_dir, 'model')), export, force=True)
  checkpointer.wait_until_finished()
  result = {'method': method, 'net': net + 1, 'model': model_name,
            **metrics, 'iterations': offset, 'wall_s': time.time() - start_time,
            'history': history}
  if jax.process_index() == 0:
    np.save(os.path.join(run_dir, 'test_probs.npy'), probs.astype(np.float32))
    np.save(os.path.join(ctx.workdir, 'test_labels.npy'), labels)
  _save_json(result_path, result)
  return result


def start_from(state: TrainState, pretrained) -> TrainState:
  """state with its backbone's variables from `pretrained`, but for a new classifier head."""
  params = dict(pretrained['params']['backbone'], head=state.params['backbone']['head'])
  return state.replace(params={**state.params, 'backbone': params},
                       batch_stats={**state.batch_stats,
                                    'backbone': pretrained['batch_stats']['backbone']})


def mean_fsp_matrices(model: Student, variables, images) -> list[np.ndarray]:
  """The FSP matrices [M, N] of each stage, averaged over images [B, S, S, 3] (eval mode)."""
  _, features = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  return [np.asarray(g.mean(0)) for g in fsp.fsp_matrices(features)]


def _save_json(path: str, value) -> None:
  """Process 0 writes value to path atomically (a kill never leaves half a file)."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(value, f)
    os.replace(path + '.tmp', path)


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                dtype: str) -> nn.Module:
  return models.get(model_config.model, num_classes, model_config.width, axis_name='batch',
                    dtype=jnp.dtype(dtype))


def _features(model: Student, image_size: int):
  """Shapes of a model's features on [2, S, S, 3]: traced, never compiled."""
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0][1], x)


def build_student(method: str, config: ml_collections.ConfigDict, num_classes: int,
                  teacher: Student) -> Student:
  """The student of a method, with FitNet's regressor or channel adapters where needed.

  Raises ValueError, before anything is compiled, when its FSP points or hint layer cannot
  be paired with the teacher's.
  """
  if method in config_lib.TEACHER_MODEL_METHODS:
    return Student(build_model(config.teacher, num_classes, config.dtype))
  backbone = build_model(config.student, num_classes, config.dtype)
  if method not in config_lib.DISTILL_METHODS:
    return Student(backbone)
  size = config.data.image_size
  mine, theirs = _features(Student(backbone), size), _features(teacher, size)
  if method == 'fitnet':
    hint = config.fitnet.hint
    if hint not in mine or hint not in theirs:
      raise ValueError(f'config.fitnet.hint: {hint!r} is not a feature of both networks; '
                       f'expected one of {sorted(set(mine) & set(theirs))}.')
    return Student(backbone, hint=(hint, theirs[hint].shape[-1]))
  if method == 'kd':
    return Student(backbone)
  adapter = ()
  if config.student.adapter:
    adapter = tuple(sorted(adapters.mismatched_widths(mine, theirs).items()))
  student = Student(backbone, adapter=adapter)
  try:
    adapted = _features(student, size) if adapter else mine
    jax.eval_shape(losses.fsp_l2, *(jax.eval_shape(fsp.fsp_matrices, features)
                                    for features in (adapted, theirs)))
  except ValueError as e:
    raise ValueError(f'config.student.model={config.student.model!r} (width '
                     f'{config.student.width}) cannot be paired with config.teacher.model='
                     f'{config.teacher.model!r} (width {config.teacher.width}): {e}') from e
  return student


def load_variables(path: str, model: Student, image_size: int):
  """A model's {'params', 'batch_stats'} from an Orbax checkpoint of its backbone."""
  target = jax.eval_shape(lambda rng: _init_variables(model, rng, image_size), jax.random.key(0))
  target = {kind: target[kind]['backbone'] for kind in ('params', 'batch_stats')}
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  except Exception as e:  # Orbax raises several kinds for missing or mismatched trees.
    raise ValueError(f'Cannot restore a {type(model.backbone).__name__} teacher from {path}: '
                     f'{e}') from e
  return {kind: {'backbone': restored[kind]} for kind in ('params', 'batch_stats')}


def _row(ctx: Context, method: str, results: list[dict]) -> dict:
  """The table row of a method, from the files that process 0 wrote."""
  run_dirs = [os.path.join(ctx.workdir, method, f'net{r["net"]}') for r in results]
  probs = [np.load(os.path.join(d, 'test_probs.npy')) for d in run_dirs]
  labels = np.load(os.path.join(ctx.workdir, 'test_labels.npy'))
  return report.table_row(results, probs, labels)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs an experiment: the teacher (trained or loaded), then every method's nets.

  Everything is checked (config, data, model pairing) before anything is compiled. Finished
  runs and phases in workdir are reused, so an interrupted experiment resumes where it
  stopped. Process 0 writes results.md and results.json into workdir and returns the table's
  rows; other processes return []. Several hosts must share the workdir's file system.
  """
  config_lib.validate(config)
  install_preemption_handler()
  methods = config_lib.method_list(config)
  train_source = data.get_source(config.data, config.data.train_split)
  eval_source = data.get_source(config.data, config.data.eval_split)
  if eval_source.num_classes != train_source.num_classes:
    raise ValueError(f'config.data: the {config.data.eval_split!r} split has '
                     f'{eval_source.num_classes} classes, {config.data.train_split!r} has '
                     f'{train_source.num_classes}.')
  if config.batch_size > len(train_source):
    raise ValueError(f'config.batch_size: {config.batch_size} exceeds the {len(train_source)} '
                     f'examples of the {config.data.train_split!r} split.')
  num_classes = train_source.num_classes
  teacher = Student(build_model(config.teacher, config.teacher.num_classes or num_classes,
                                config.dtype))
  students = {m: build_student(m, config, num_classes, teacher) for m in methods}
  ctx = Context(config, workdir, train_source, eval_source, data.get_preprocess(config.data),
                optimizer(config))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))

  rows, teacher_variables = [], None
  if not methods or any(m in config_lib.TEACHER_METHODS for m in methods):
    if config.teacher.checkpoint:
      teacher_variables = load_variables(config.teacher.checkpoint, teacher,
                                         config.data.image_size)
      if not config.teacher.num_classes:  # A teacher of other classes has no accuracy here.
        metrics, _, _ = evaluate(teacher, jax_utils.replicate(teacher_variables), eval_source,
                                 ctx.preprocess, config.eval_batch_size)
        rows.append({'method': 'teacher', 'model': config.teacher.model,
                     'nets': [metrics['accuracy']], 'avg': metrics['accuracy'],
                     'ensemble': None, 'iterations': 0, 'wall_s': 0.0})
    else:
      results = [run_net(ctx, 'teacher', k, config.teacher.model, teacher, None, None)
                 for k in range(config.teacher.num_nets)]
      if jax.process_index() == 0:
        rows.append(_row(ctx, 'teacher', results))
      teacher_variables = load_variables(os.path.join(workdir, 'teacher', 'net1', 'model'),
                                         teacher, config.data.image_size)
    teacher_variables = jax_utils.replicate(teacher_variables)
    if config.fsp.cache and set(config_lib.FSP_METHODS) & set(methods):
      start = time.time()
      ctx.teacher_fsp = teacher_fsp_cache(teacher, teacher_variables, train_source,
                                          ctx.preprocess, config.eval_batch_size)
      _print(f'Cached the teacher\'s FSP matrices of {len(train_source)} training images in '
             f'{_duration(time.time() - start)} '
             f'({sum(g.nbytes for g in ctx.teacher_fsp) / 2**20:.0f} MiB).')

  for method in methods:
    own = method in config_lib.TEACHER_MODEL_METHODS  # The teacher's network, trained here.
    distills = method in config_lib.DISTILL_METHODS
    results = [run_net(ctx, method, k, (config.teacher if own else config.student).model,
                       students[method], teacher if distills else None,
                       teacher_variables if distills else None,
                       pretrained=teacher_variables if method == 'finetune' else None)
               for k in range(config.num_nets)]
    if jax.process_index() == 0:
      rows.append(_row(ctx, method, results))
  if jax.process_index() == 0:
    table = report.write_results(workdir, rows)
    _print(f'\nResults ({workdir}/results.md):\n\n{table}\n')
  return rows
