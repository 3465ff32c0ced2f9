"""One network of a table through its phases: the training loop, evaluation and preemption.

A *run* trains net k of a method: 'train' for plain training, 'stage1' then 'stage2' for FSP
and FitNet. Every phase checkpoints into workdir/<method>/net<k>/<phase> and resumes from
there; a finished run leaves result.json, its test-set probabilities (for ensembles) and
model/ (its variables, usable as a teacher).

The loop never waits for the device between log steps: metrics stay on the device and are
fetched every config.log_every steps and before every checkpoint, where a NaN or Inf stops the
run naming the step and term, before anything non-finite is saved.
"""

import collections
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import optax

from fsp_jax import checkpoints, data, logs, methods, steps

SNAPSHOT_IMAGES = 256  # Test images whose mean FSP matrices a run saves for the report.
_PREEMPTION = threading.Event()


class Preempted(Exception):
  """Raised after a SIGTERM (a TPU VM's preemption notice) once a checkpoint is saved."""


def install_preemption_handler() -> None:
  """Makes SIGTERM stop training at the next sync point, after a checkpoint (main thread)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda signum, frame: _PREEMPTION.set())


def preemption_requested(sync_point: bool) -> bool:
  """Whether to stop now. One host checks its flag every step; several agree at sync points
  (log and checkpoint steps), so that all stop at the same step."""
  if jax.process_count() == 1:
    return _PREEMPTION.is_set()
  if not sync_point:
    return False
  flag = np.asarray(_PREEMPTION.is_set())
  return bool(np.any(multihost_utils.process_allgather(flag)))


@dataclasses.dataclass(frozen=True)
class Context:
  """What every run of an experiment shares."""
  config: Any
  workdir: str
  train_source: Any
  eval_source: Any
  preprocess: data.Preprocess  # Augments when given an RNG (training), not in evaluation.
  teacher_fsp: tuple | None = None  # The teacher's matrices by training example (fsp.cache).


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """Net `net` (0-based) of a method: its network and, if it needs one, the teacher."""
  method: methods.Method
  net: int
  model_name: str
  student: methods.Student
  teacher: methods.Student | None = None
  teacher_variables: Any = None  # Replicated over the local devices.

  @property
  def label(self) -> str:
    return f'{self.method.name} net{self.net + 1}'

  def directory(self, workdir: str) -> str:
    return os.path.join(workdir, self.method.name, f'net{self.net + 1}')


def gather_in_order(chunks: list[np.ndarray]) -> np.ndarray:
  """Per-host chunks [per-host batch, ...] -> all examples [N, ...] in global order."""
  x = np.asarray(multihost_utils.process_allgather(np.stack(chunks)))  # [hosts, batches, ...]
  return np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


def evaluate(model, variables, source, preprocess, batch_size: int):
  """Accuracy and loss over a split; its probabilities [N, classes] and labels [N], in order.

  variables are replicated over the local devices.
  """
  eval_step = steps.make_eval_step(model)
  totals, probs, labels, masks = None, [], [], []
  for batch in data.eval_batches(source, preprocess, batch_size):
    metrics, p = eval_step(variables, data.shard(batch, jax.local_device_count()))
    metrics = jax.device_get(jax_utils.unreplicate(metrics))
    totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
    probs.append(np.asarray(p).reshape(-1, p.shape[-1]))
    labels.append(batch['label'])
    masks.append(batch['mask'])
  probs, labels, masks = (gather_in_order(x) for x in (probs, labels, masks))
  count = max(1, int(totals['count']))
  metrics = {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}
  return metrics, probs[masks], labels[masks]


def _report_eval(where: str, step: int, metrics: dict, writer: logs.Writer) -> None:
  logs.say(f'[{where}] step {step}: test accuracy {100 * metrics["accuracy"]:.2f}%, '
           f'loss {metrics["loss"]:.4f}')
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})


def _check_finite(fetched: list[dict], first_step: int, where: str, last_saved: str) -> None:
  """Stops the run, naming the step and terms, at the first NaN/Inf in fetched metrics."""
  for step, metrics in enumerate(fetched, first_step):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
      raise FloatingPointError(
          f'[{where}] step {step}: non-finite ' + ', '.join(f'{k} = {v}' for k, v in bad.items())
          + f'; {last_saved}. Lower this phase\'s learning rates or check the teacher.')


def _batches(ctx: Context, run: Run, phase: methods.Phase, start: int):
  """Sharded training batches on the devices from step `start` on."""
  preprocess, cache = ctx.preprocess, None
  if phase.cached_fsp:  # The un-augmented images the teacher's matrices were computed on.
    preprocess = functools.partial(lambda p, images, draws: p(images, None), ctx.preprocess)
    cache = ctx.teacher_fsp

  def with_teacher_fsp(batch):
    index = batch.pop('index')
    if cache is not None:
      batch['teacher_fsp'] = [g[index] for g in cache]
    return data.shard(batch, jax.local_device_count())

  batches = data.train_batches(ctx.train_source, preprocess, ctx.config.batch_size,
                               ctx.config.seed + run.net, start_step=start,
                               num_steps=phase.steps, workers=ctx.config.data.workers)
  return _on_devices(map(with_teacher_fsp, batches), ahead=2)


def _on_devices(batches, ahead: int):
  """Batches [devices, ...] placed on the local devices (one device_put each, asynchronous),
  `ahead` of the step that reads them."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))
  placed = collections.deque()
  for batch in batches:
    placed.append(jax.device_put(batch, sharding))
    if len(placed) > ahead:
      yield placed.popleft()
  yield from placed


def phase_optimizer(config, phase: methods.Phase) -> optax.GradientTransformation:
  """A phase's optimizer: its schedule and clipping, the config's weight decay and momentum."""
  return steps.optimizer(phase.schedule, config.weight_decay, config.momentum,
                         phase.max_grad_norm)


def train_phase(ctx: Context, run: Run, phase: methods.Phase, state: steps.TrainState,
                history: dict, offset: int, writer: logs.Writer):
  """Trains one phase from its latest checkpoint (or from `state`) to its end.

  offset is the number of steps of earlier phases, for global step numbers in the logs.
  Returns (state, history); history['train_s'] sums the run's training seconds over every
  process that worked on it (saved with each checkpoint). Raises Preempted after SIGTERM (once
  a checkpoint is saved) and FloatingPointError on a non-finite loss or gradient (keeping the
  last good checkpoint).
  """
  config, where = ctx.config, f'{run.label} {phase.name}'
  saved = checkpoints.PhaseCheckpoints(
      os.path.join(run.directory(ctx.workdir), phase.name), config.keep_checkpoints, where)
  state, history, start = saved.restore(state, history)
  began, spent = time.time(), history.get('train_s', 0.0)  # Earlier phases' and processes'.
  if start >= phase.steps:
    saved.close()
    return state, history
  last_saved = f'the last good checkpoint is step {start} in {saved.directory}' if start else \
      'no checkpoint of this phase was saved yet'
  tx = phase_optimizer(config, phase)
  train_step = steps.make_train_step(run.student, run.teacher, phase, tx)
  evaluates = any(term.name == 'ce' for term in phase.terms) and config.eval_every
  batches = _batches(ctx, run, phase, start)
  replicated = steps.replicate(state)
  progress, pending = logs.Progress(where, start, phase.steps, config.batch_size), []
  for step in range(start, phase.steps):
    replicated, metrics = train_step(replicated, next(batches), run.teacher_variables)
    pending.append(metrics)
    done = step + 1
    log = done % config.log_every == 0 or done == phase.steps
    save = done % config.checkpoint_every == 0 or done == phase.steps
    preempted = preemption_requested(sync_point=log or save)
    if log or save or preempted:  # The only points where the host waits for the device.
      fetched = [{k: float(v[0]) for k, v in m.items()} for m in jax.device_get(pending)]
      _check_finite(fetched, done - len(pending) + 1, where, last_saved)
      pending = []
    if log:
      metrics = fetched[-1]
      rate = progress.report(done, {k: v for k, v in metrics.items() if k != 'lr'})
      writer.scalars(offset + done, {**{f'{phase.name}/{k}': v for k, v in metrics.items()},
                                     'train/images_per_s': rate})
      history['train'].append([offset + done, phase.name, metrics['loss']])
    # The end of the phase is evaluated once, by train_net.
    if evaluates and done % config.eval_every == 0 and done < phase.steps:
      result, _, _ = evaluate(run.student, replicated.variables(), ctx.eval_source,
                              ctx.preprocess, config.eval_batch_size)
      _report_eval(where, offset + done, result, writer)
      history['eval'].append([offset + done, result['accuracy']])
    if save or preempted:
      history['train_s'] = spent + time.time() - began
      saved.save(done, jax.device_get(jax_utils.unreplicate(replicated)), history)
      last_saved = f'the last good checkpoint is step {done} in {saved.directory}'
    if preempted:
      saved.close()
      raise Preempted(f'[{where}] SIGTERM: saved a checkpoint at step {done} in '
                      f'{saved.directory}; run the same command again to resume.')
  saved.close()
  return jax.device_get(jax_utils.unreplicate(replicated)), history


def start_from(state: steps.TrainState, pretrained, keep_head: bool) -> steps.TrainState:
  """state with its backbone's variables from `pretrained`; its classifier head too where
  keep_head (a network of the data set's own classes), else a new one."""
  params = dict(pretrained['params']['backbone'])
  if not keep_head:
    params['head'] = state.params['backbone']['head']
  return state.replace(params={**state.params, 'backbone': params},
                       batch_stats={**state.batch_stats,
                                    'backbone': pretrained['batch_stats']['backbone']})


def mean_fsp_matrices(model, variables, images) -> list[np.ndarray]:
  """The FSP matrices [M, N] of each stage, averaged over images [B, S, S, 3] (eval mode)."""
  return [np.asarray(g) for g in steps.make_mean_fsp(model)(variables, images)]


def save_json(path: str, value) -> None:
  """Process 0 writes value to path atomically (a kill never leaves half a file)."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(value, f)
    os.replace(path + '.tmp', path)


def train_net(ctx: Context, run: Run) -> dict:
  """Trains a run through its phases (or finds it done), evaluates it, returns its result."""
  config, run_dir = ctx.config, run.directory(ctx.workdir)
  result_path = os.path.join(run_dir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  phases = run.method.phases(config)
  state = steps.create_train_state(run.student, jax.random.key(config.seed + run.net),
                                   config.data.image_size,
                                   phase_optimizer(config, phases[0]))
  if run.method.starts_from_teacher:
    state = start_from(state, jax_utils.unreplicate(run.teacher_variables),
                       keep_head=not config.teacher.num_classes)
  writer = logs.Writer(os.path.join(ctx.workdir, 'tensorboard', run.label.replace(' ', '_')))
  snapshot = {}
  if phases[0].name == 'stage1' and phases[0].terms[0].name == 'fsp':  # For the heatmaps.
    images = next(data.eval_batches(ctx.eval_source, ctx.preprocess, SNAPSHOT_IMAGES, 0, 1))
    snapshot['teacher'] = mean_fsp_matrices(run.teacher, jax_utils.unreplicate(
        run.teacher_variables), images['image'])
    snapshot['before'] = mean_fsp_matrices(run.student, state.variables(), images['image'])
  history, offset = {'train': [], 'eval': []}, 0
  for phase in phases:
    if offset:  # A new phase keeps the weights and starts a fresh optimizer.
      tx = phase_optimizer(config, phase)
      state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=state.params,
                               batch_stats=state.batch_stats, opt_state=tx.init(state.params))
    state, history = train_phase(ctx, run, phase, state, history, offset, writer)
    offset += phase.steps
    if snapshot and phase.name == 'stage1' and jax.process_index() == 0:
      snapshot['after'] = mean_fsp_matrices(run.student, state.variables(), images['image'])
      np.savez(os.path.join(run_dir, 'fsp_matrices.npz'),
               **{f'{when}_{k}': g for when, gs in snapshot.items() for k, g in enumerate(gs)})
  evaluated = time.time()
  metrics, probs, labels = evaluate(run.student, steps.replicate(state.variables()),
                                    ctx.eval_source, ctx.preprocess, config.eval_batch_size)
  history['eval'].append([offset, metrics['accuracy']])
  _report_eval(run.label, offset, metrics, writer)
  writer.close()
  export = {'params': state.params['backbone'], 'batch_stats': state.batch_stats['backbone']}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(run_dir, 'model')), export, force=True)
    checkpointer.wait_until_finished()
  result = {'method': run.method.name, 'net': run.net + 1, 'model': run.model_name,
            **metrics, 'iterations': offset,
            'wall_s': history.get('train_s', 0.0) + time.time() - evaluated,
            'history': history}
  if jax.process_index() == 0:
    np.save(os.path.join(run_dir, 'test_probs.npy'), probs.astype(np.float32))
    np.save(os.path.join(ctx.workdir, 'test_labels.npy'), labels)
  save_json(result_path, result)
  return result
