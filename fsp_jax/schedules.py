"""Learning-rate schedules: config entries, their validation, and optax schedules.

A schedule is a ConfigDict {lrs, until, warmup, decay} of until[-1] iterations:
decay='step' (the paper's) uses lrs[k] until iteration until[k]; decay='cosine' decays one
peak rate lrs[0] to 0 at until[0]. Either may start with `warmup` iterations rising linearly
from 0.
"""

import math
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import ml_collections
import optax

from fsp_jax.errors import fail, is_integer, is_number

DECAYS = ('step', 'cosine')


def schedule(lrs: Sequence[float], until: Sequence[int], warmup: int = 0,
             decay: str = 'step') -> ml_collections.ConfigDict:
  """A schedule entry for a config (see the module docstring)."""
  return ml_collections.ConfigDict({'lrs': tuple(lrs), 'until': tuple(until),
                                    'warmup': warmup, 'decay': decay})


class Schedule(NamedTuple):
  """A schedule entry frozen for a phase (hashable: it keys compiled steps)."""
  lrs: tuple[float, ...]
  until: tuple[int, ...]
  warmup: int = 0
  decay: str = 'step'

  @classmethod
  def of(cls, node) -> 'Schedule':
    return cls(tuple(node.lrs), tuple(node.until), node.warmup, node.decay)

  @property
  def length(self) -> int:
    return self.until[-1]


def is_schedule(node) -> bool:
  return isinstance(node, ml_collections.ConfigDict) and set(node.keys()) == {
      'lrs', 'until', 'warmup', 'decay'}


def find(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """Every schedule of a config, by dotted key: {'teacher.schedule': ..., 'fsp.stage1': ...}."""
  found = {}
  for key, node in config.items():
    if is_schedule(node):
      found[prefix + key] = node
    elif isinstance(node, ml_collections.ConfigDict):
      found.update(find(node, f'{prefix}{key}.'))
  return found


def validate(key: str, sched) -> None:
  """Raises ConfigError naming config.<key> when the schedule is malformed."""
  lrs, until = tuple(sched.lrs), tuple(sched.until)
  if not lrs or len(lrs) != len(until):
    fail(key, f'lrs {lrs} and until {until} must be non-empty and of equal length.')
  if any(not is_integer(u) or not 1 <= u < 2**31 for u in until) or list(until) != sorted(
      set(until)):
    fail(f'{key}.until', 'iteration boundaries must be integers in [1, 2**31) in '
         f'increasing order, got {until}.')
  if any(not is_number(lr) or not 0 < lr < math.inf for lr in lrs):
    fail(f'{key}.lrs', f'learning rates must be positive and finite, got {lrs}.')
  if sched.decay not in DECAYS:
    fail(f'{key}.decay', f'unknown {sched.decay!r}; expected one of '
         f'{", ".join(DECAYS)}.')
  if sched.decay == 'cosine' and len(lrs) != 1:
    fail(key, f'a cosine schedule has one peak rate and one length, got lrs {lrs}.')
  if not is_integer(sched.warmup) or not 0 <= sched.warmup < until[-1]:
    fail(f'{key}.warmup', f'expected an integer in [0, {until[-1]}), got '
         f'{sched.warmup!r}.')


def to_optax(sched) -> optax.Schedule:
  """The schedule as a function of the optimizer's step count (0 for the first update)."""
  lrs, until, warmup = tuple(sched.lrs), tuple(sched.until), sched.warmup
  if sched.decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lrs[0], warmup, until[0])
  values, boundaries = jnp.asarray(lrs, jnp.float32), jnp.asarray(until[:-1])

  def step_decay(count):
    lr = values[jnp.searchsorted(boundaries, count, side='right')]
    return lr if not warmup else jnp.where(count < warmup, lr * count / warmup, lr)

  return step_decay


def scale(sched, factor: float) -> None:
  """Shortens (or lengthens) a schedule in place by factor, keeping its shape; every rate
  keeps at least one iteration."""
  until = []
  for u in sched.until:
    until.append(max(round(u * factor), until[-1] + 1 if until else 1))
  sched.until = tuple(until)
  sched.warmup = min(round(sched.warmup * factor), until[-1] - 1)
