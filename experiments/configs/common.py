"""Helpers shared by the experiment configs: variants, CPU-scale and tiny settings."""

from typing import Callable

import ml_collections

from fsp_jax import schedules

CIFAR10 = '../shared/data/cifar10'  # The real CIFAR-10 JPEGs, relative to the checkout.
CUB_SUBSET = '../shared/data/cub200_subset'  # 100 CUB-200-2011 species, the archive's layout.

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


# The CPU-scale teacher (teacher_cifar10.py, committed in results/teacher_cifar10): ResNet-26
# at batch 32, a warm-up then a cosine decay from 0.025 (the paper's 0.1 at batch 128, scaled
# linearly), weight decay 5e-4; TEACHER_STEPS are its first cycle's.
TEACHER = 'results/teacher_cifar10/model'
BATCH, PEAK_LR, WEIGHT_DECAY, TEACHER_STEPS, WARMUP = 32, 0.025, 5e-4, 25_000, 500


def task_schedules(config: ml_collections.ConfigDict, task: int, warmup: int) -> None:
  """Every method's task stage: `task` iterations, a warm-up over `warmup` to PEAK_LR, then a
  cosine decay to 0. FSP's stage 1 runs a third of it at the paper's rates (1e-3 / 1e-4 /
  1e-5, dropping at 11/21 and 16/21 of it), FitNet's hint stage 35/21 of that (the paper's
  ratio) at its 1e-4 / 1e-5 (dropping at 25/35)."""
  for key in ('scratch', 'fsp.stage2', 'fitnet.stage2', 'kd.schedule', 'at.schedule'):
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = schedules.schedule(
        (PEAK_LR,), (task,), warmup=warmup, decay='cosine')
  stage1 = task // 3
  config.fsp.stage1 = schedules.schedule((1e-3, 1e-4, 1e-5), (
      stage1 * 11 // 21, stage1 * 16 // 21, stage1))
  hint = stage1 * 35 // 21
  config.fitnet.stage1 = schedules.schedule((1e-4, 1e-5), (hint * 25 // 35, hint))


def cifar10_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CIFAR-10 on 2 CPU cores, against the committed teacher: the JPEG folder in ../shared/data,
  the teacher's batch and recipe, and a third of its first cycle's iterations for every
  student's task stage (the paper's students get a third of its teachers' 64k), with the
  stages before it of `task_schedules`."""
  config.data.name = 'folder'
  config.data.root = CIFAR10
  config.batch_size = BATCH
  config.eval_batch_size = 1000
  config.weight_decay = WEIGHT_DECAY
  config.teacher.checkpoint = TEACHER
  config.teacher.num_nets = 1
  task = TEACHER_STEPS // 3
  task_schedules(config, task, WARMUP // 3)
  config.eval_every = task // 4
  config.log_every = 100
  config.checkpoint_every = 1000
  return config


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of every phase on 16x16 embedded digits, networks of width 1: an experiment's
  whole pipeline, fast."""
  config.data.name = 'digits'
  config.data.root = ''
  config.data.classes = config.data.max_per_class = None
  config.data.image_size = 16
  config.data.augment = 'none'
  config.batch_size = 16
  config.eval_batch_size = 120
  config.num_nets = min(config.num_nets, 2)
  config.teacher.num_nets = 1
  config.teacher.width = config.student.width = 1
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 10
  for sched in schedules.find(config).values():
    sched.until = tuple(range(1, len(sched.lrs) + 1))
    sched.warmup = 0
  # A teacher of 20 steps, so that its BatchNorm statistics are not the initial ones.
  config.teacher.schedule.until = tuple(20 * (k + 1) // len(config.teacher.schedule.lrs)
                                        for k in range(len(config.teacher.schedule.lrs)))
  return config
