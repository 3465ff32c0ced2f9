"""Helpers shared by the experiment configs: variants, CPU-scale and tiny settings."""

from typing import Callable

import ml_collections

from fsp_jax import schedules

CIFAR10 = '../shared/data/cifar10'  # The real CIFAR-10 JPEGs, relative to the checkout.

# Stage-1 rates for the CPU-scale experiments (ResNet-26 teacher after 640 iterations, batch 64,
# real CIFAR-10). At the paper's rates stage 1 diverges: FSP 26->26 at 1e-3 went 5.4e4 -> inf
# within 8 steps, FitNet's summed hint loss at 1e-4 within 4. FSP at 1e-4 does not diverge but
# kills the student: within 30 steps 99.9% of its stage-3 ReLUs are dead (the matrices collapse
# to 0, the loss sits at the teacher's ||G||^2) and stage 2 stays at chance (10%). At 1e-6 the
# loss falls as fast (5.4e4 -> ~5e3 in 30 steps) with 65-78% of the units alive.
# FitNet at 1e-5 lowers its hint loss 12x in 40 steps.
STABLE_STAGE1 = {'fsp': (1e-6, 1e-7, 1e-8), 'fitnet': (1e-5, 1e-6)}


def variant(config: ml_collections.ConfigDict, arg: str | None,
            variants: dict[str, Callable[[ml_collections.ConfigDict], object]]):
  """config changed by variants[arg] (as it is for no arg); an unknown arg fails, listing
  the config's variants."""
  if arg is None:
    return config
  if arg not in variants:
    raise ValueError(f'Unknown config variant {arg!r}; this config has '
                     f'{", ".join(repr(v) for v in variants) or "none"} (or none, for the full '
                     'experiment).')
  variants[arg](config)
  return config


def scale_steps(config: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
  """Shortens (or lengthens) every schedule and interval by factor, keeping their shapes."""
  for sched in schedules.find(config).values():
    schedules.scale(sched, factor)
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    if config[key]:
      config[key] = max(1, round(config[key] * factor))
  return config


def cifar10_cpu(config: ml_collections.ConfigDict, factor: float = 0.01,
                evals: int = 3) -> ml_collections.ConfigDict:
  """A CPU-scale CIFAR-10 experiment on the JPEG folder in ../shared/data: the schedules
  shortened by factor (the paper's ratios kept), batch 64, one teacher, stable stage-1 rates,
  and `evals` test evaluations during each task stage."""
  config.data.name = 'folder'
  config.data.root = CIFAR10
  config.batch_size = 64  # Halves the step time of the paper's 128 on 2 CPU cores.
  config.eval_batch_size = 1000
  config.teacher.num_nets = 1
  scale_steps(config, factor)
  config.fsp.stage1.lrs = STABLE_STAGE1['fsp']
  config.fitnet.stage1.lrs = STABLE_STAGE1['fitnet']
  config.eval_every = max(1, config.fsp.stage2.until[-1] // evals)
  config.log_every = 10
  return config


def tiny(config: ml_collections.ConfigDict, image_size: int = 16) -> ml_collections.ConfigDict:
  """A few steps of every phase on the embedded digits: an experiment's whole pipeline, fast."""
  config.data.name = 'digits'
  config.data.root = ''
  config.data.classes = config.data.max_per_class = None
  config.data.image_size = image_size
  config.data.augment = 'none'
  config.batch_size = 16
  config.eval_batch_size = 120
  config.num_nets = min(config.num_nets, 2)
  config.teacher.num_nets = 1
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 2
  for sched in schedules.find(config).values():
    sched.until = tuple(range(1, len(sched.lrs) + 1))
    sched.warmup = 0
  # Enough teacher steps for its BatchNorm statistics to settle: an unsettled teacher's
  # features, and FSP matrices, are orders of magnitude too large.
  config.teacher.schedule.until = tuple(20 * (k + 1) // len(config.teacher.schedule.lrs)
                                        for k in range(len(config.teacher.schedule.lrs)))
  # Even so, a 20-step teacher's FSP matrices are far from a trained one's, and the wide
  # networks' stage-1 gradients overflow at the paper's rates: tiny runs check the plumbing.
  config.fsp.stage1.lrs = tuple(lr * 1e-3 for lr in config.fsp.stage1.lrs)
  return config
