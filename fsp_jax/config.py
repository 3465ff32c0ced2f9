"""Experiment configuration: defaults, learning-rate schedules and validation.

Experiment files in experiments/configs start from `default()` and override what differs.
`validate` checks a config before anything is compiled, naming the key and what it accepts.
"""

import os
from typing import Sequence

import jax
import ml_collections

from fsp_jax import data, models

METHODS = ('scratch', 'fsp', 'fsp_shuffled', 'fitnet', 'kd', 'finetune', 'teacher_scratch')
FSP_METHODS = ('fsp', 'fsp_shuffled')  # Stage 1 on the teacher's FSP matrices.
DISTILL_METHODS = FSP_METHODS + ('fitnet', 'kd')  # Run the teacher in training.
TEACHER_METHODS = DISTILL_METHODS + ('finetune',)  # Need the teacher's weights.
TEACHER_MODEL_METHODS = ('finetune', 'teacher_scratch')  # Train the teacher's network.
DTYPES = ('float32', 'bfloat16')


DECAYS = ('step', 'cosine')


def schedule(lrs: Sequence[float], until: Sequence[int], warmup: int = 0,
             decay: str = 'step') -> ml_collections.ConfigDict:
  """A learning-rate schedule of until[-1] iterations.

  decay='step' (the paper's): lrs[k] until iteration until[k]. decay='cosine': one peak rate
  lrs[0], cosine-decayed to 0 at until[0]. Either starts with `warmup` iterations rising
  linearly from 0 (as optax.warmup_cosine_decay_schedule).
  """
  return ml_collections.ConfigDict({'lrs': tuple(lrs), 'until': tuple(until),
                                    'warmup': warmup, 'decay': decay})


def default() -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe with ResNet-26 teacher and student (Table 1)."""
  c = ml_collections.ConfigDict()
  c.methods = 'scratch,fsp'     # Comma-separated rows after the teacher's; '': teacher only.
  c.num_nets = 3                # Students per method (Net 1..3 and their ensemble).
  c.seed = 0
  c.batch_size = 128            # Global: over all devices and hosts.
  c.eval_batch_size = 512
  c.weight_decay = 1e-4
  c.momentum = 0.9
  c.dtype = 'float32'           # Computation dtype; parameters stay float32.
  c.log_every = 100
  c.eval_every = 2000           # Test accuracy during training (0: only at the end).
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'       # cifar10, cifar100, caltech_birds2011, folder, cub, digits.
  c.data.root = ''              # For folder and cub.
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # For TFDS.
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.augment = 'cifar'      # cifar, crop_flip or none.
  c.data.normalize = 'cifar'    # cifar or imagenet statistics.
  c.data.classes = ml_collections.FieldReference(None, field_type=tuple)  # Folder subset.
  c.data.max_per_class = ml_collections.FieldReference(None, field_type=int)  # Of train_split.

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = 'resnet26'
  c.teacher.width = 1
  c.teacher.checkpoint = ''     # Orbax {'params', 'batch_stats'}; empty: train it first.
  c.teacher.num_classes = 0     # Outputs of a checkpointed teacher; 0: the data set's.
  c.teacher.num_nets = 3        # Teachers trained when there is no checkpoint.
  c.teacher.schedule = schedule((0.1, 0.01, 0.001), (32_000, 48_000, 64_000))

  c.student = ml_collections.ConfigDict()
  c.student.model = 'resnet26'
  c.student.width = 1
  c.student.adapter = False     # Learned 1x1 conv + BN where stage widths differ.

  # 'scratch': the student trained alone, the paper's Teacher* / Student rows; also the
  # schedule of 'teacher_scratch', the teacher's network trained alone on this task (Table 5).
  c.scratch = schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000))
  # 'finetune': the teacher's network started from its checkpoint (all but the classifier,
  # which is new) and trained on this task: Table 5's fine-tuned teacher.
  c.finetune = schedule((0.01, 0.001, 0.0001), (11_000, 16_000, 21_000))

  c.fsp = ml_collections.ConfigDict()
  c.fsp.stage1 = schedule((1e-3, 1e-4, 1e-5), (11_000, 16_000, 21_000))
  c.fsp.stage2 = schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000))
  c.fsp.weights = ml_collections.FieldReference(None, field_type=tuple)  # lambda_i; equal.
  c.fsp.shuffle_seed = 0        # Permutation of the teacher's rows and columns (fsp_shuffled).
  c.fsp.task_weight = 0.0       # Optional FSP term added to the stage-2 loss.
  # Stage 1 reads the teacher's FSP matrices, computed once per training image as the paper
  # stored them, instead of running the teacher each step; its images are then not augmented.
  c.fsp.cache = False

  c.fitnet = ml_collections.ConfigDict()
  c.fitnet.hint = 'stage2_out'  # Teacher hint and student guided layer (the middle).
  c.fitnet.stage1 = schedule((1e-4, 1e-5), (25_000, 35_000))
  c.fitnet.stage2 = schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000))
  c.fitnet.temperature = 3.0
  c.fitnet.kd_weight = (4.0, 1.0)  # FitNet's lambda, decreased linearly over stage 2;
                                   # (0, 0) for cross-entropy alone (a teacher of other classes).

  c.kd = ml_collections.ConfigDict()
  c.kd.schedule = schedule((0.1, 0.01, 0.001), (11_000, 16_000, 21_000))
  c.kd.temperature = 4.0
  c.kd.weight = 1.0             # Cross-entropy + weight * Hinton's tau^2-scaled KL.
  return c


def schedules(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Every learning-rate schedule of a config, by key."""
  return {'teacher.schedule': config.teacher.schedule, 'scratch': config.scratch,
          'fsp.stage1': config.fsp.stage1, 'fsp.stage2': config.fsp.stage2,
          'fitnet.stage1': config.fitnet.stage1, 'fitnet.stage2': config.fitnet.stage2,
          'kd.schedule': config.kd.schedule, 'finetune': config.finetune}


def scale_steps(config: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
  """Shortens (or lengthens) every schedule by factor, keeping the paper's ratios."""
  for sched in schedules(config).values():
    until = []
    for u in sched.until:  # At least one step per learning rate.
      until.append(max(round(u * factor), until[-1] + 1 if until else 1))
    sched.until = tuple(until)
    sched.warmup = min(round(sched.warmup * factor), until[-1] - 1)
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    if config[key]:
      config[key] = max(1, round(config[key] * factor))
  return config


# Stage-1 rates for the CPU-scale experiments (ResNet-26 teacher after 640 iterations, batch 64,
# real CIFAR-10). At the paper's rates stage 1 diverges: FSP 26->26 at 1e-3 went 5.4e4 -> inf
# within 8 steps, FitNet's summed hint loss at 1e-4 within 4. FSP at 1e-4 does not diverge but
# kills the student: within 30 steps 99.9% of its stage-3 ReLUs are dead (the matrices collapse
# to 0, the loss sits at the teacher's ||G||^2) and stage 2 stays at chance (10%). At 1e-6 the
# loss falls as fast (5.4e4 -> ~5e3 in 30 steps) with 65-78% of the units alive.
# FitNet at 1e-5 lowers its hint loss 12x in 40 steps.
STABLE_STAGE1 = {'fsp': (1e-6, 1e-7, 1e-8), 'fitnet': (1e-5, 1e-6)}


def cifar10_cpu(config: ml_collections.ConfigDict, factor: float = 0.01,
                evals: int = 3) -> ml_collections.ConfigDict:
  """A CPU-scale CIFAR-10 experiment on the JPEG folder in ../shared/data: the schedules
  shortened by factor (the paper's ratios kept), batch 64, one teacher, stable stage-1 rates,
  and `evals` test evaluations during each task stage."""
  config.data.name = 'folder'
  config.data.root = '../shared/data/cifar10'
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
  config.data.image_size = image_size
  config.data.augment = 'none'
  config.batch_size = 16
  config.eval_batch_size = 120
  config.num_nets = min(config.num_nets, 2)
  config.teacher.num_nets = 1
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 2
  for sched in schedules(config).values():
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


def method_list(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in config.methods.split(',') if m.strip()]


def _fail(key: str, message: str):
  raise ValueError(f'config.{key}: {message}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks types, ranges, names, paths and divisibility; raises ValueError naming the key."""
  methods = method_list(config)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    _fail('methods', f'unknown {unknown}; expected a comma-separated list of '
          f'{", ".join(METHODS)}, or nothing to train the teacher only.')
  for key in ('num_nets', 'teacher.num_nets', 'batch_size', 'eval_batch_size',
              'log_every', 'checkpoint_every', 'keep_checkpoints', 'teacher.width',
              'student.width', 'data.image_size'):
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(key, f'expected a positive integer, got {value!r}.')
  if not isinstance(config.eval_every, int) or config.eval_every < 0:
    _fail('eval_every', f'expected an integer >= 0, got {config.eval_every!r}.')
  if config.dtype not in DTYPES:
    _fail('dtype', f'unknown {config.dtype!r}; expected one of {", ".join(DTYPES)}.')
  for key in ('weight_decay', 'momentum'):
    if not 0 <= _get(config, key) < 1:
      _fail(key, f'expected a number in [0, 1), got {_get(config, key)!r}.')
  for key, sched in schedules(config).items():
    _validate_schedule(key, sched)
  for key in ('teacher.model', 'student.model'):
    try:
      models.get(_get(config, key), num_classes=1)
    except ValueError as e:
      _fail(key, str(e))
  if config.data.name not in data.SOURCES:
    _fail('data.name', f'unknown data set {config.data.name!r}; expected one of '
          f'{", ".join(data.SOURCES)}.')
  data.get_preprocess(config.data)  # Raises for an unknown config.data.augment.
  if config.data.name in ('folder', 'cub') and not os.path.isdir(config.data.root):
    _fail('data.root', f'folder {config.data.root!r} does not exist (needed by data.name='
          f'{config.data.name!r}).')
  if config.teacher.checkpoint and not os.path.isdir(config.teacher.checkpoint):
    _fail('teacher.checkpoint', f'{config.teacher.checkpoint!r} does not exist; give an Orbax '
          'checkpoint of {params, batch_stats}, or leave it empty to train the teacher first.')
  for key in ('batch_size', 'eval_batch_size'):
    devices = jax.device_count()
    if _get(config, key) % devices:
      _fail(key, f'{_get(config, key)} is not divisible by the {devices} devices '
            f'({jax.process_count()} hosts x {jax.local_device_count()} local devices).')
  if not isinstance(config.fsp.cache, bool):
    _fail('fsp.cache', f'expected True or False, got {config.fsp.cache!r}.')
  if not 0 <= config.fsp.task_weight:
    _fail('fsp.task_weight', f'expected a weight >= 0, got {config.fsp.task_weight!r}.')
  if len(config.fitnet.kd_weight) != 2:
    _fail('fitnet.kd_weight', f'expected (start, end), got {config.fitnet.kd_weight!r}.')
  if config.teacher.num_classes:
    if not config.teacher.checkpoint:
      _fail('teacher.num_classes', 'only a teacher loaded from config.teacher.checkpoint may '
            'have its own classes: give the checkpoint (python -m fsp_jax.convert makes one from '
            'torchvision weights), or use 0 to train the teacher here on the data set.')
    uses_logits = [m for m in methods
                   if m == 'kd' or (m == 'fitnet' and any(config.fitnet.kd_weight))]
    if uses_logits:
      _fail('teacher.num_classes', f'methods {uses_logits} distill the teacher\'s logits, which '
            'need the data set\'s classes; set teacher.num_classes=0 or '
            'fitnet.kd_weight=(0.0, 0.0).')


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def _validate_schedule(key: str, sched: ml_collections.ConfigDict) -> None:
  lrs, until = tuple(sched.lrs), tuple(sched.until)
  if not lrs or len(lrs) != len(until):
    _fail(key, f'lrs {lrs} and until {until} must be non-empty and of equal length.')
  if any(not isinstance(u, int) or u < 1 for u in until) or list(until) != sorted(set(until)):
    _fail(f'{key}.until', f'iteration boundaries must be positive integers in increasing '
          f'order, got {until}.')
  if any(not lr > 0 for lr in lrs):
    _fail(f'{key}.lrs', f'learning rates must be positive, got {lrs}.')
  if sched.get('decay', 'step') not in DECAYS:
    _fail(f'{key}.decay', f'unknown {sched.decay!r}; expected one of {", ".join(DECAYS)}.')
  if sched.get('decay', 'step') == 'cosine' and len(lrs) != 1:
    _fail(key, f'a cosine schedule has one peak rate and one length, got lrs {lrs}.')
  warmup = sched.get('warmup', 0)
  if not isinstance(warmup, int) or not 0 <= warmup < until[-1]:
    _fail(f'{key}.warmup', f'expected an integer in [0, {until[-1]}), got {warmup!r}.')
