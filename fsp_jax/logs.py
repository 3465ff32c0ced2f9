"""What a run tells its user: progress lines with ETA on process 0, and TensorBoard scalars.

TensorBoard files come from tensorboardX (small, no TensorFlow). clu's writers and periodic
actions would fit the loop, but clu imports TensorFlow for its summary writer.
"""

import time

import jax
import tensorboardX


def say(line: str) -> None:
  """Prints a line on process 0 only."""
  if jax.process_index() == 0:
    print(line, flush=True)


def duration(seconds: float) -> str:
  seconds = int(seconds)
  return (f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600
          else f'{seconds // 60}m{seconds % 60:02d}s')


class Progress:
  """Prints a line per report: where, step, loss terms, images/s and ETA."""

  def __init__(self, where: str, start: int, total: int, batch_size: int):
    self.where, self.total, self.batch_size = where, total, batch_size
    self.last_step, self.last_time = start, time.time()

  def report(self, step: int, metrics: dict[str, float]) -> float:
    """Prints metrics after `step` steps; returns the images/s since the last report."""
    now = time.time()
    rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
    terms = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    say(f'[{self.where}] {step}/{self.total} ({100 * step / self.total:.0f}%) {terms} | '
        f'{rate:.0f} img/s | ETA {duration(eta)}')
    self.last_step, self.last_time = step, now
    return rate


class Writer:
  """TensorBoard scalars from process 0; a no-op elsewhere."""

  def __init__(self, logdir: str):
    self.writer = tensorboardX.SummaryWriter(logdir) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer:
      for key, value in values.items():
        self.writer.add_scalar(key, value, step)
      self.writer.flush()

  def close(self) -> None:
    if self.writer:
      self.writer.close()
