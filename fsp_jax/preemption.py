"""Preemption: SIGTERM (a TPU VM's notice), SIGINT and SIGHUP set a stop flag that the
training loop and interruptible passes read; several hosts agree on it so that all stop at the
same step."""

import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

_STOP = threading.Event()
_SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT (Ctrl-C)',
            signal.SIGHUP: 'SIGHUP (its terminal closed)'}
_received: list[int] = []


class Preempted(Exception):
  """Raised after SIGTERM (a TPU VM's preemption notice), SIGINT or SIGHUP, once a checkpoint
  is saved; `signum` is the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def _on_signal(signum, frame):
  del frame
  if _STOP.is_set() and signum == signal.SIGINT:
    raise KeyboardInterrupt  # A second Ctrl-C: stop at once, without saving.
  _received.append(signum)
  _STOP.set()


def install_handler() -> None:
  """Makes SIGTERM, SIGINT and SIGHUP stop training at the next step, after a checkpoint (a
  second SIGINT aborts at once). A SIGHUP already ignored stays so: `nohup` ignores it so that
  the run outlives its terminal. Main thread only."""
  if threading.current_thread() is threading.main_thread():
    for signum in _SIGNALS:
      if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
        signal.signal(signum, _on_signal)


def requested(sync_point: bool) -> bool:
  """Whether to stop now. One host checks its flag every step; several agree at sync points
  (log and checkpoint steps), so that all stop at the same step."""
  if jax.process_count() == 1:
    return _STOP.is_set()
  if not sync_point:
    return False
  flag = np.asarray(_STOP.is_set())
  return bool(np.any(multihost_utils.process_allgather(flag)))


def stopped(where: str, what: str) -> Preempted:
  """The exception that ends a run after the last signal received, saying what was done."""
  signum = _received[-1] if _received else signal.SIGTERM
  return Preempted(f'[{where}] {_SIGNALS[signum]}: {what}; run the same command again to '
                   'resume.', signum)
