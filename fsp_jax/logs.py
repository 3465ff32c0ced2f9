"""What a run tells its user: progress lines with ETA on process 0, and TensorBoard scalars.

TensorBoard files come from tensorboardX (small, no TensorFlow). clu's writers and periodic
actions would fit the loop, but clu imports TensorFlow for its summary writer.
"""

import os
import time

import jax
from tensorboardX import event_file_writer, record_writer, summary
from tensorboardX.proto import event_pb2


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
  """TensorBoard scalars from process 0; a no-op elsewhere. Written in the calling thread
  through the file's buffer and synced to disk at `flush` and `close` (tensorboardX's
  SummaryWriter passes every scalar through a multiprocessing queue, and its flush leaves
  what is queued unwritten)."""

  def __init__(self, logdir: str):
    self.events = None
    if jax.process_index() == 0:
      record_writer.directory_check(logdir)
      self.events = event_file_writer.EventsWriter(os.path.join(logdir, 'events'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.events:
      for key, value in values.items():
        self.events.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary.scalar(key, value)))

  def flush(self) -> None:
    if self.events:
      self.events.flush()

  def close(self) -> None:
    if self.events:
      self.events.close()
