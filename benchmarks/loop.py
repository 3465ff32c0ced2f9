r"""Loop benchmark: the whole training loop against the bare step, in one process.

  python benchmarks/loop.py --out=results/benchmark_loop_cpu.json

1. ResNet-8 at batch 128 on 32x32 images held in memory: images/s of `trainer.train_phase`
   (the input pipeline with the paper's augmentation, the step, metrics fetched every
   log_every steps, progress lines, TensorBoard, checkpoints) against the bare pmapped step
   called in a loop on one batch already on the device. Goal: ratio >= 0.95.
2. The loop's overhead per step, with a step that does almost nothing (one Dense layer on the
   channel means of 8x8 images, batch 8): (loop time - bare time) / steps, in microseconds.
   That is what a fast accelerator sees of the loop. Goal: < 1 ms.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import flax.linen as nn
from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax import config as config_lib
from fsp_jax import data, logs, methods, models, sources, steps, trainer


class Trivial(nn.Module):
  """A step that does almost nothing: one Dense layer and a BatchNorm on its 10 outputs (the
  train state holds batch statistics), no features."""
  num_classes: int = 10
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    logits = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
    return nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(logits), {}


def _setup(backbone, image_size: int, batch_size: int, steps_count: int, workdir: str,
           workers: int):
  config = config_lib.default()
  config.update(batch_size=batch_size, log_every=100, checkpoint_every=steps_count // 2,
                eval_every=0, keep_checkpoints=2)
  config.data.image_size = image_size
  config.data.workers = workers
  config.scratch = config_lib.schedule((0.1,), (steps_count,))
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.integers(0, 256, (4096, image_size, image_size, 3), np.uint8),
                            rng.integers(0, 10, 4096), 10)
  ctx = trainer.Context(config, workdir, source, source, data.Preprocess(image_size, 'cifar'))
  run = trainer.Run(methods.get('scratch'), 0, 'bench', methods.Student(backbone))
  return config, ctx, run


def measure(backbone, image_size: int, batch_size: int, steps_count: int, workers: int) -> dict:
  """Seconds of `steps_count` bare steps and of train_phase over as many steps."""
  with tempfile.TemporaryDirectory() as workdir:
    config, ctx, run = _setup(backbone, image_size, batch_size, steps_count, workdir, workers)
    phase = run.method.phases(config)[0]
    tx = steps.optimizer(phase.schedule, config.weight_decay, config.momentum)
    state = steps.create_train_state(run.student, jax.random.key(0), image_size, tx)
    train_step = steps.make_train_step(run.student, None, phase, tx)
    batch = next(data.train_batches(ctx.train_source, ctx.preprocess, batch_size, 0))
    batch.pop('index')  # Sharded over the devices once, as the loop's prefetch does.
    batch = next(jax_utils.prefetch_to_device(
        iter([data.shard(batch, jax.local_device_count())]), 1))
    replicated = steps.replicate(state)
    for _ in range(3):  # Compiles, warms up.
      replicated, metrics = train_step(replicated, batch, None)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps_count):
      replicated, metrics = train_step(replicated, batch, None)
    jax.block_until_ready(metrics)
    bare = time.perf_counter() - start
    writer = logs.Writer(os.path.join(workdir, 'tensorboard'))
    start = time.perf_counter()
    trainer.train_phase(ctx, run, phase, state, {'train': [], 'eval': []}, 0, writer)
    loop = time.perf_counter() - start
    writer.close()
  return {'steps': steps_count, 'batch_size': batch_size, 'bare_s': bare, 'loop_s': loop,
          'bare_images_per_s': steps_count * batch_size / bare,
          'loop_images_per_s': steps_count * batch_size / loop, 'ratio': bare / loop,
          'overhead_us_per_step': 1e6 * (loop - bare) / steps_count}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=200, help='ResNet-8 steps')
  parser.add_argument('--trivial_steps', type=int, default=3000)
  parser.add_argument('--workers', type=int, default=0,
                      help='config.data.workers: input processes (0: threads)')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  # train_phase builds its own optimizer, so its step is a new function: with this cache it
  # loads the program the bare step compiled (a real run compiles once per phase, not per step).
  jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp())
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  resnet = measure(models.get('resnet8', 10, axis_name='batch'), 32, 128, args.steps,
                   args.workers)
  print(f'ResNet-8: {resnet}', flush=True)
  trivial = measure(Trivial(axis_name='batch'), 8, 8, args.trivial_steps, args.workers)
  result = {'machine': f'{platform.machine()}, {os.cpu_count()} cores',
            'devices': [str(d) for d in jax.local_devices()], 'jax': jax.__version__,
            'workers': args.workers, 'resnet8_batch128': resnet, 'trivial_batch8': trivial}
  print(f"ResNet-8, batch 128: loop {resnet['loop_images_per_s']:.0f} img/s, bare step "
        f"{resnet['bare_images_per_s']:.0f} img/s, loop / step {resnet['ratio']:.3f}")
  print(f"Trivial step, batch 8: {trivial['bare_s'] / args.trivial_steps * 1e6:.0f} us bare, "
        f"loop overhead {trivial['overhead_us_per_step']:.0f} us per step")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
