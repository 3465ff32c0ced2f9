r"""Loop benchmark: the whole training loop against the bare compiled call, in one process.

  python benchmarks/loop.py --out=results/benchmark_loop_gpu.json
  python benchmarks/loop.py --resnet_settings=1:0,1:1 --out=results/benchmark_loop_cpu.json

(on a CPU, ResNet-8 only at k = 1: XLA:CPU runs convolution gradients in a loop body ~23x
slower, README: speed)

For every setting (steps per call k = 1, 8, 32; the host input pipeline or the split on the
devices, config.data.on_device), bare calls and `phase_loop.train_phase` alternated --rounds
times, so that the machine's drift falls on both alike, the median round taken:
1. The loop's host time per step, with a step that does almost nothing (one Dense layer on
   the channel means of 8x8 images, batch 8), in microseconds: what a fast accelerator sees
   of the loop. Phases of N and 2N steps, logging every 96 and checkpointing every N / 2:
   `host_us_per_step` is the loop's time beyond the bare calls' per added step (from N to
   2N: the steady state, with its logs and checkpoints, without what a phase costs once:
   its setup and its last checkpoint), also between checkpoints (phases checkpointed at
   their end only), with `checkpoint_ms`, the host time of one save; `all_in_us_per_step`
   is the 2N-step phase's (loop - bare) / 2N, and `all_in_thread_us_per_step` the same in
   CPU seconds of the main thread (Python's share, not slowed by the machine's noise nor by
   the device's threads on a CPU). Goal: < 50 us with the data on the devices and k >= 8.
2. ResNet-8 at batch 128 on 32x32 images, a phase of --steps logging 8 times: the bare
   compiled call (inputs already on the devices, the host waiting for it at the same steps
   as the loop) against `phase_loop.train_phase` (the input pipeline with the paper's
   augmentation, the compiled call, metrics fetched at each log step, progress lines,
   TensorBoard), each timed from its first log step to its last (the steady state of a long
   phase), `ratio` bare / loop; `phase_ratio` over the whole phase, its setup and final
   checkpoint included. Goal: >= 0.99.

3. The evaluation's host time per example, host pipeline and split on the devices: the trivial
   step's `evaluation.evaluate` over --eval_examples images against the bare eval step called
   as often on one batch already on the devices, outputs fetched once (`host_us_per_example`).
4. What a checkpoint costs an accelerator, emulated: the trivial step's call sleeps
   --device_ms a step (the device busy, the host's CPU free), k = 8, the data on the device,
   a phase checkpointed every 128 steps and at its end only: the loop's time beyond the bare
   calls per added checkpoint (`lost_ms_per_checkpoint`), beside one save's own time, written
   and waited for alone (`save_ms`). On a CPU the device is the host, so item 1's
   `checkpoint_ms` cannot show what the device loses while the host saves.

The bare call and the loop run the same compiled program (steps.make_train_step's cache).
"""

import argparse
import json
import os
import platform
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax import checkpoints
from fsp_jax import config as config_lib
from fsp_jax import data, device_data, evaluation, logs, methods, models, phase_loop, sources
from fsp_jax import steps
from fsp_jax import plan as plan_lib
from fsp_jax.adapters import Student
from fsp_jax.feed import DeviceFeed, HostFeed
from fsp_jax.schedules import Schedule

SETTINGS = [(k, on_device) for on_device in (False, True) for k in (1, 8, 32)]


class Trivial(nn.Module):
  """A step that does almost nothing: one Dense layer and a BatchNorm on its 10 outputs (the
  train state holds batch statistics), no features."""
  num_classes: int = 10
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    logits = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
    return nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(logits), {}


class Sleeping(nn.Module):
  """The trivial step on an emulated accelerator: each step's call first waits `device_ms` in
  a host callback that sleeps (no CPU; the callback does take the GIL to start)."""
  device_ms: float
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    def wait(y):
      time.sleep(self.device_ms / 1e3)
      return y

    x = jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return Trivial(axis_name=self.axis_name)(x, train)


class _LogTimes(logs.Writer):
  """A TensorBoard writer that notes when each log step's metrics reached the host."""

  def __init__(self, logdir: str):
    super().__init__(logdir)
    self.times = []

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self.times.append(time.perf_counter())
    super().scalars(step, values)


def _setup(image_size: int, batch_size: int, steps_count: int, log_every: int,
           checkpoint_every: int, k: int, on_device: bool):
  """The loop's settings, the feed of 4,096 random images, and a plain phase of steps_count
  steps."""
  loop = plan_lib.Loop(batch_size=batch_size, eval_batch_size=512, seed=0, weight_decay=1e-4,
                       momentum=0.9, log_every=log_every, eval_every=0,
                       checkpoint_every=checkpoint_every, keep_checkpoints=2, steps_per_call=k,
                       image_size=image_size)
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.integers(0, 256, (4096, image_size, image_size, 3), np.uint8),
                               rng.integers(0, 10, 4096), 10)
  preprocess = data.Preprocess(image_size, 'cifar')
  feed = DeviceFeed.place(device_data.stored_images(source, preprocess), preprocess) if (
      on_device) else HostFeed(source, preprocess)
  config = config_lib.default()
  config.scratch = config_lib.schedule((0.1,), (steps_count,))
  return loop, feed, methods.get('scratch').phases(config)[0]


def _seconds(times: list[float]) -> float | None:
  """From the first log step to the last (None if fewer than two)."""
  return times[-1] - times[0] if len(times) > 1 else None


def measure(backbone, image_size: int, batch_size: int, steps_count: int, k: int,
            on_device: bool, log_every: int, checkpoint_every: int, rounds: int = 1) -> dict:
  """`steps_count` steps as bare compiled calls (the host waiting for the device every
  log_every steps, as the loop does) and as train_phase (a phase in a new workdir), alternated
  `rounds` times: the machine's drift falls on both alike. Per round: the wall seconds of all
  steps, the main thread's CPU seconds, and the seconds from the first log step to the last
  (the steady state: without the phase's setup and final checkpoint)."""
  with tempfile.TemporaryDirectory() as workdir:
    loop, feed, phase = _setup(image_size, batch_size, steps_count, log_every,
                               checkpoint_every, k, on_device)
    student = Student(backbone)
    tx = phase_loop.phase_optimizer(phase, loop.weight_decay, loop.momentum)
    variables = steps.init_variables(student, jax.random.key(0), image_size)
    call = steps.make_train_step(student, None, phase, tx, feed, k)
    inputs = next(feed.calls(loop.batch_size, loop.seed, 0, phase.steps, k, phase.augment))
    replicated = steps.replicate(steps.fresh_state(variables, tx))
    for _ in range(3):  # Compiles, warms up.
      replicated, metrics = call(replicated, inputs, None, feed.resident)
    jax.block_until_ready(metrics)
    found = {name: [] for name in ('bare_s', 'loop_s', 'bare_thread_s', 'loop_thread_s',
                                   'bare_steady_s', 'loop_steady_s')}
    log_due = phase_loop.Every(log_every, steps_count)  # The loop's log steps.
    for r in range(rounds):
      start, thread, times = time.perf_counter(), time.thread_time(), []
      for first in range(0, steps_count, k):
        replicated, metrics = call(replicated, inputs, None, feed.resident)
        if log_due(first + k):
          jax.block_until_ready(metrics)
          times.append(time.perf_counter())
      jax.block_until_ready(metrics)
      found['bare_s'].append(time.perf_counter() - start)
      found['bare_thread_s'].append(time.thread_time() - thread)
      found['bare_steady_s'].append(_seconds(times))
      writer = _LogTimes(os.path.join(workdir, str(r), 'tensorboard'))
      run = phase_loop.PhaseRun(loop, feed, student, None, None, None, writer, loop.seed)
      start, thread = time.perf_counter(), time.thread_time()
      phase_loop.train_phase(run, phase, phase_loop.Where('bench train', 'train', 0),
                             os.path.join(workdir, str(r), 'train'), variables,
                             phase_loop.History())
      found['loop_s'].append(time.perf_counter() - start)
      found['loop_thread_s'].append(time.thread_time() - thread)
      found['loop_steady_s'].append(_seconds(writer.times))
      writer.close()
  return {'steps': steps_count, 'steady_steps': steps_count - log_every, 'steps_per_call': k,
          'on_device': on_device, 'batch_size': batch_size, 'log_every': log_every,
          'checkpoint_every': checkpoint_every, 'rounds': found}


def _median(values) -> float:
  return float(np.median(values))


def _beyond_bare(run: dict, kind: str = '') -> float:
  """The median round's loop - bare seconds of a `measure` (kind '_thread': CPU seconds)."""
  return _median(np.subtract(run['rounds'][f'loop{kind}_s'], run['rounds'][f'bare{kind}_s']))


def host_time(trivial, steps_count: int, k: int, on_device: bool, rounds: int) -> dict:
  """The trivial step's loop over phases of N and 2N steps: host us per step (see above),
  with a checkpoint every N / 2 steps and with one at the end only, and the host ms of one
  checkpoint (the 2N-step phase's three more saves); the median round of each phase's
  loop - bare."""
  n, long, half = steps_count, 2 * steps_count, steps_count // 2
  runs = {(steps, every): measure(trivial, 8, 8, steps, k, on_device, 96, every, rounds)
          for steps in (n, long) for every in (half, steps)}

  host = lambda key, kind='': _beyond_bare(runs[key], kind)

  return {'steps_per_call': k, 'on_device': on_device, 'phases': list(runs.values()),
          'host_us_per_step': 1e6 * (host((long, half)) - host((n, half))) / n,
          'host_us_per_step_between_checkpoints':
              1e6 * (host((long, long)) - host((n, n))) / n,
          'checkpoint_ms': 1e3 * (host((long, half)) - host((long, long))) / 3,
          'all_in_us_per_step': 1e6 * host((long, half)) / long,
          'all_in_thread_us_per_step': 1e6 * host((long, half), '_thread') / long,
          'bare_us_per_step': 1e6 * _median(runs[long, half]['rounds']['bare_s']) / long}


def resnet_ratio(steps_count: int, batch_size: int, k: int, on_device: bool,
                 rounds: int) -> dict:
  """ResNet-8's loop / bare call in the steady state (see above), each round's and the
  median; the whole phase's too (its setup and final checkpoint included)."""
  log_every = max(k, steps_count // 8 // k * k)
  result = measure(models.get('resnet8', 10, axis_name='batch'), 32, batch_size, steps_count,
                   k, on_device, log_every, steps_count, rounds)
  found = result['rounds']
  steady = np.divide(found['bare_steady_s'], found['loop_steady_s'])
  phase = np.divide(found['bare_s'], found['loop_s'])
  return {**result, 'ratios': steady.tolist(), 'ratio': _median(steady),
          'phase_ratios': phase.tolist(), 'phase_ratio': _median(phase),
          'bare_images_per_s': result['steady_steps'] * batch_size / _median(
              found['bare_steady_s'])}


def eval_host_time(trivial, examples: int, batch_size: int, on_device: bool,
                   rounds: int) -> dict:
  """An evaluation's host time per example: `evaluation.evaluate` of the trivial step over a
  split of `examples` 8x8 images (the host pipeline, or the split's centre crops on the
  devices) against the bare compiled eval step called as many times on one batch already on
  the devices, its outputs fetched once; alternated `rounds` times, the median round's
  (evaluate - bare) / examples."""
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.integers(0, 256, (examples, 8, 8, 3), np.uint8),
                               rng.integers(0, 10, examples), 10)
  preprocess = data.Preprocess(8, 'cifar')
  placed = device_data.place(*device_data.centre_crops(source, preprocess)) if on_device \
      else None
  model = Student(trivial)
  variables = steps.replicate(steps.init_variables(model, jax.random.key(0), 8))
  batch_size = min(batch_size, examples)  # As evaluation.predict takes it (examples: whole).
  step, calls = steps.make_eval_step(model), -(-examples // batch_size)
  batch = jax.device_put(data.shard(next(data.eval_batches(source, preprocess, batch_size)),
                                    jax.local_device_count()))
  jax.device_get(step(variables, batch))  # Both compiled and warm before the rounds.
  evaluation.evaluate(model, variables, source, preprocess, batch_size, placed=placed)
  found = {'bare_s': [], 'eval_s': []}
  for _ in range(rounds):
    start = time.perf_counter()
    jax.device_get([step(variables, batch) for _ in range(calls)])
    found['bare_s'].append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluation.evaluate(model, variables, source, preprocess, batch_size, placed=placed)
    found['eval_s'].append(time.perf_counter() - start)
  return {'on_device': on_device, 'examples': examples, 'batch_size': batch_size,
          'rounds': found, 'host_us_per_example': 1e6 * _median(
              np.subtract(found['eval_s'], found['bare_s'])) / examples}


def emulated_checkpoints(steps_count: int, device_ms: float, rounds: int) -> dict:
  """Item 4 above: phases of steps_count steps at k = 8 checkpointed every 128 steps and at
  their end only; the median round's loop - bare of each, per added checkpoint, and the
  median of 10 saves of the same state written and waited for alone."""
  backbone, every = Sleeping(device_ms, axis_name='batch'), 128
  runs = {period: measure(backbone, 8, 8, steps_count, 8, True, every, period, rounds)
          for period in (every, steps_count)}
  lost = {period: _beyond_bare(run) for period, run in runs.items()}
  tx = steps.optimizer(Schedule((0.1,), (steps_count,)), 1e-4, 0.9)
  state = jax.device_get(steps.fresh_state(
      steps.init_variables(Student(backbone), jax.random.key(0), 8), tx))
  seconds = []
  with tempfile.TemporaryDirectory() as directory:
    saved = checkpoints.PhaseCheckpoints(directory, 2, 'bench save')
    for step in range(1, 13):
      start = time.perf_counter()
      saved.save(step, state, {'train': []})
      saved.wait()
      seconds.append(time.perf_counter() - start)
    saved.close()
  return {'device_ms': device_ms, 'steps': steps_count, 'phases': list(runs.values()),
          'lost_ms_per_checkpoint': 1e3 * (lost[every] - lost[steps_count]) / (
              steps_count // every - 1),
          'save_ms': 1e3 * _median(seconds[2:])}


def _settings(text: str) -> list[tuple[int, bool]]:
  return [(int(k), bool(int(d))) for k, d in (entry.split(':') for entry in text.split(','))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=128, help='ResNet-8 steps per setting')
  parser.add_argument('--trivial_steps', type=int, default=3072, help='N (see above)')
  parser.add_argument('--resnet_batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3, help='bare / loop alternations')
  parser.add_argument('--settings', default=','.join(f'{k}:{int(d)}' for k, d in SETTINGS),
                      help='k:on_device entries, comma-separated')
  parser.add_argument('--resnet_settings', default=None,
                      help='those of --settings that also time ResNet-8 (default: all); on a '
                      'CPU, k > 1 runs its convolution gradients ~23x slower (README: speed)')
  parser.add_argument('--eval_examples', type=int, default=8192,
                      help='images of the split evaluated (host time per example)')
  parser.add_argument('--eval_batch', type=int, default=512)
  parser.add_argument('--device_ms', type=float, default=1.0,
                      help='the emulated accelerator\'s time a step (item 4; the H200 ran a '
                      'ResNet-8 step at batch 128 in 0.93 ms)')
  parser.add_argument('--emulated_steps', type=int, default=1024,
                      help='steps of item 4\'s phases (0: not run)')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  settings = _settings(args.settings)
  resnet_settings = settings if args.resnet_settings is None else _settings(args.resnet_settings)
  result = {'machine': f'{platform.machine()}, {os.cpu_count()} cores',
            'devices': [str(d) for d in jax.local_devices()], 'jax': jax.__version__,
            'trivial_batch8': [], f'resnet8_batch{args.resnet_batch}': [],
            'eval_trivial': []}
  for k, on_device in settings:
    trivial = host_time(Trivial(axis_name='batch'), args.trivial_steps, k, on_device,
                        args.rounds)
    result['trivial_batch8'].append(trivial)
    line = (f"k={k:2d} {'on device' if on_device else 'host     '}: trivial step "
            f"{trivial['host_us_per_step']:4.0f} us of host time per step "
            f"({trivial['host_us_per_step_between_checkpoints']:.0f} between checkpoints, "
            f"{trivial['checkpoint_ms']:.0f} ms a checkpoint; all in "
            f"{trivial['all_in_us_per_step']:.0f}, main thread's CPU "
            f"{trivial['all_in_thread_us_per_step']:.0f}; bare "
            f"{trivial['bare_us_per_step']:.0f} us)")
    if (k, on_device) in resnet_settings:
      resnet = resnet_ratio(args.steps, args.resnet_batch, k, on_device, args.rounds)
      result[f'resnet8_batch{args.resnet_batch}'].append(resnet)
      line += (f"; ResNet-8 loop / bare {resnet['ratio']:.3f} (rounds "
               + ' '.join(f'{r:.3f}' for r in resnet['ratios'])
               + f"; whole phase {resnet['phase_ratio']:.3f}; bare "
               f"{resnet['bare_images_per_s']:.0f} img/s)")
    print(line, flush=True)
    _save(result, args.out)
  for on_device in sorted({on_device for _, on_device in settings}):
    evaluated = eval_host_time(Trivial(axis_name='batch'), args.eval_examples, args.eval_batch,
                               on_device, args.rounds)
    result['eval_trivial'].append(evaluated)
    print(f"evaluation {'on device' if on_device else 'host     '}: "
          f"{evaluated['host_us_per_example']:.2f} us of host time per example", flush=True)
    _save(result, args.out)
  if not args.emulated_steps:
    return
  emulated = emulated_checkpoints(args.emulated_steps, args.device_ms, args.rounds)
  result['emulated_accelerator'] = emulated
  print(f"emulated accelerator ({args.device_ms:g} ms a step): a checkpoint costs it "
        f"{emulated['lost_ms_per_checkpoint']:.1f} ms; a save alone takes "
        f"{emulated['save_ms']:.1f} ms", flush=True)
  _save(result, args.out)


def _save(result: dict, out: str) -> None:
  """After each setting: a run cut short keeps what it measured."""
  if out:
    with open(out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
