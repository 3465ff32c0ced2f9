"""The processes of a multi-host run watching each other.

Each process counts its heartbeats in JAX's coordination service (a key per process) and reads
the others' counts: a process whose count has not moved for `timeout_s` (killed, or its machine
lost) stops the others, naming it, instead of leaving them waiting in a collective until JAX's
own heartbeat timeout aborts them with a stack dump and the workdir's lock still held.
"""

import threading
import time
from typing import Callable

import jax
from jax._src import distributed  # The coordination service's client: JAX has no public one.

from fsp_jax.errors import first_line

_PREFIX = 'fsp_jax/heartbeat/'
_DONE = 'done'  # A process that ended normally is not waited for.


def _client():
  return distributed.global_state.client


def silent(counts: dict[int, str], seen: dict[int, tuple[str, float]], now: float,
           timeout_s: float) -> list[int]:
  """The processes whose count has not changed for timeout_s by `now`. counts: {process: its
  count, or 'done'}; seen: {process: (its count, when it was first seen)}, updated."""
  lost = []
  for process, value in sorted(counts.items()):
    if value == _DONE:
      continue
    if process not in seen or seen[process][0] != value:
      seen[process] = (value, now)
    elif now - seen[process][1] > timeout_s:
      lost.append(process)
  return lost


def watch(timeout_s: float, on_lost: Callable[[str], None]) -> Callable[[], None]:
  """Starts this process's heartbeat and its watch of the others (a daemon thread); on_lost
  (a message) is called once from that thread when another process falls silent or the
  coordinator cannot be reached. Returns the function that says this process ended normally."""
  me, count = jax.process_index(), jax.process_count()
  period = min(5.0, timeout_s / 4)
  ended = threading.Event()
  seen: dict[int, tuple[str, float]] = {}

  def beat():
    beats = 0
    try:
      while not ended.wait(period):
        beats += 1
        _client().key_value_set(f'{_PREFIX}{me}', str(beats), allow_overwrite=True)
        counts = {process: '0' for process in range(count)}  # Until its first beat.
        counts.update({int(key.rpartition('/')[2]): value
                       for key, value in _client().key_value_dir_get(_PREFIX)})
        del counts[me]
        lost = silent(counts, seen, time.monotonic(), timeout_s)
        if lost and not ended.is_set():
          on_lost(f'process{"es" if len(lost) > 1 else ""} {", ".join(map(str, lost))} of '
                  f'{count} sent no heartbeat for {timeout_s:g} s (killed, or its machine lost)')
          return
    except Exception as e:  # pylint: disable=broad-except  (the coordinator's RPC errors)
      if not ended.is_set():
        first = first_line(e, 200)
        on_lost(f'the coordinator (process 0) cannot be reached: {first}')

  def end():
    ended.set()
    try:
      _client().key_value_set(f'{_PREFIX}{me}', _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the coordinator may have ended first)
      pass

  threading.Thread(target=beat, daemon=True, name='fsp_jax heartbeat').start()
  return end
