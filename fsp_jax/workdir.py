"""A workdir belongs to one config, one data set, and one run at a time.

The first run writes config.json and data.json (its splits' fingerprints); a rerun with
settings that change results (anything but NEUTRAL_KEYS) or other data fails at once naming
them, unless told to continue. A folder that holds anything but a run of ours is refused. A
lock file names the process writing the workdir; a second writer fails at once, and a lock
left by a killed process is taken over.
"""

import contextlib
import datetime
import json
import os
import socket

import jax
from jax.experimental import multihost_utils
import numpy as np

from fsp_jax import layout as layout_lib
from fsp_jax.layout import Layout

# Settings that change how a run goes (how it reports, saves and reads, and how fast: the
# device path and steps_per_call compute the host pipeline's batches, to float rounding), not
# what it computes: the workdir's config check and each net's settings both leave them out, so
# that a run can resume with other values of them (on another machine, say).
NEUTRAL_KEYS = ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints',
                'eval_batch_size', 'data.workers', 'data.on_device', 'steps_per_call')


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """{dotted key: (old value, new value)} for every result-changing setting that differs."""
  old, new = layout_lib.flat(old), layout_lib.flat(new)
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if key not in NEUTRAL_KEYS and old.get(key) != new.get(key)}


def _all_agree(ok: bool) -> bool:
  """Process 0's answer, on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


# Top-level keys every config.json of ours has: one without them is another program's.
_CONFIG_KEYS = {'methods', 'data', 'teacher', 'student', 'seed'}


def _check_ours(workdir: str) -> None:
  """Refuses a folder that holds something other than a run of ours: files without our
  config.json, or a config.json another program wrote."""
  layout = Layout(workdir)
  if os.path.exists(layout.config):
    config = layout_lib.read_json(layout.config, 'the settings this workdir was run with')
    if not isinstance(config, dict) or not _CONFIG_KEYS <= set(config):
      raise ValueError(f'--workdir {workdir} holds a config.json that fsp_jax did not write (it '
                       f'lacks {sorted(_CONFIG_KEYS - set(config or ()))}); use another '
                       '--workdir.')
    return
  other = sorted(e for e in os.listdir(workdir) if not e.startswith(('lock.json', '.write_test')))
  if other:
    raise ValueError(f'--workdir {workdir} holds {len(other)} entries but no run of fsp_jax '
                     f'(no config.json): {", ".join(other[:5])}{", ..." if len(other) > 5 else ""}'
                     '. Expected a new or empty folder, or the workdir of an earlier run.')


def create(workdir: str) -> None:
  """Makes the workdir, with a clear error when it is a file, a dangling link, a folder of
  something else, cannot be written, or its name has whitespace at either end."""
  if workdir != workdir.strip():
    raise ValueError(f'--workdir {workdir!r} begins or ends with whitespace; expected a path '
                     'without it.')
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise ValueError(f'--workdir {workdir} is a symbolic link to {os.readlink(workdir)}, which '
                     'does not exist.')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file; expected a folder (new or of this run).')
  if os.path.isdir(workdir):
    _check_ours(workdir)
  probe = Layout(workdir).write_test
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'--workdir {workdir} cannot be written: {e.strerror} (a read-only file '
                     'system or missing permissions?).') from None


def bind_config(workdir: str, config_json: str, allow_change: bool = False) -> None:
  """Writes config.json (the config as JSON text), or checks it against the one already
  there."""
  path = Layout(workdir).config
  new = json.loads(config_json)
  changes = {}
  if os.path.exists(path):
    changes = config_changes(layout_lib.read_json(path, 'the settings this workdir was run with'),
                             new)
  if changes and not allow_change:
    listed = '; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in
                       ((k, *v) for k, v in changes.items()))
    raise ValueError(
        f'--workdir {workdir} holds a run with other settings ({listed}); its checkpoints and '
        'results belong to those. Use a new --workdir, or continue this one with the new '
        'settings by passing --allow_config_change (nets already finished are kept).')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('config read')
  _record(path, config_json, replaced=bool(changes))


def _record(path: str, text: str, replaced: bool) -> None:
  """Process 0 writes text to path in one step (through path.tmp); a replaced record is kept
  beside the new one as path.<time>: it describes the results made before."""
  if jax.process_index() == 0:
    if replaced:
      os.replace(path, f'{path}.{datetime.datetime.now():%Y%m%d-%H%M%S}')
    with layout_lib.whole(path) as f:
      f.write(text)


def _data_changes(old: dict, new: dict) -> list[str]:
  """How each split's fingerprint differs: ['test: 2,999 -> 3,003 examples', ...]."""
  changes = []
  for split in sorted(set(old) | set(new)):
    a, b = old.get(split), new.get(split)
    if a == b:
      continue
    if a is None or b is None:
      changes.append(f'{split}: {"none" if a is None else "recorded"} -> '
                     f'{"none" if b is None else "present"}')
    elif a['examples'] != b['examples'] or a['classes'] != b['classes']:
      changes.append(f'{split}: {a["examples"]:,} examples of {a["classes"]} classes -> '
                     f'{b["examples"]:,} of {b["classes"]}')
    else:
      changes.append(f'{split}: the same {a["examples"]:,} examples in number, other files, '
                     'sizes or labels')
  return changes


def bind_data(workdir: str, fingerprints: dict, allow_change: bool = False) -> None:
  """Writes data.json ({split: sources.fingerprint}), or checks the data against it: nets
  trained or evaluated on other data cannot be continued or put in one table."""
  path = Layout(workdir).data
  changes = []
  if os.path.exists(path):
    changes = _data_changes(layout_lib.read_json(path, 'the data this workdir was run with'),
                            fingerprints)
  if changes and not allow_change:
    raise ValueError(f'--workdir {workdir} was run on other data ({"; ".join(changes)}); its '
                     'nets trained or were tested on that. Use a new --workdir, restore the data, '
                     'or continue with --allow_config_change (nets already finished are kept).')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('data read')
  if changes or not os.path.exists(path):
    _record(path, json.dumps(fingerprints, indent=1), replaced=bool(changes))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder(path: str) -> dict | None:
  """The lock's {'pid', 'host', 'since'}, or None where it cannot be read (a lock is written
  whole, so an unreadable one was left broken, never half-written by a live run)."""
  try:
    with open(path) as f:
      holder = json.load(f)
    int(holder['pid'])
    return holder if isinstance(holder.get('host'), str) else None
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _create(whole: str, path: str) -> None:
  """Creates path with whole's content in one step, or raises FileExistsError."""
  try:
    os.link(whole, path)
  except FileExistsError:
    raise
  except OSError:  # A file system without hard links: create, then write.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with open(whole) as source, os.fdopen(fd, 'w') as f:
      f.write(source.read())


def _take(path: str) -> str | None:
  """Creates the lock, or returns why not (the holder)."""
  me = {'pid': os.getpid(), 'host': socket.gethostname(),
        'since': datetime.datetime.now().isoformat(timespec='seconds')}
  whole = f'{path}.{os.getpid()}.tmp'
  with open(whole, 'w') as f:
    json.dump(me, f)
  try:
    for _ in range(2):
      try:
        _create(whole, path)
        return None
      except FileExistsError:
        holder = _holder(path)
        if holder is None:
          print(f'Taking over {path}: it cannot be read, so no run holds it.', flush=True)
        elif holder['host'] == me['host'] and not _alive(int(holder['pid'])):
          print(f'Taking over {path}: its process {holder["pid"]} has ended.', flush=True)
        else:
          return f'process {holder["pid"]} on {holder["host"]} (since {holder.get("since", "?")})'
        os.remove(path)
    return 'another process that took the lock at the same time'
  finally:
    os.remove(whole)


@contextlib.contextmanager
def lock(workdir: str):
  """Holds workdir/lock.json while the run writes (process 0 takes it for every host)."""
  path = Layout(workdir).lock
  holder = _take(path) if jax.process_index() == 0 else None
  if not _all_agree(holder is None):
    raise RuntimeError(f'--workdir {workdir} is in use by {holder or "another run"}: wait for '
                       f'it to end or use another --workdir. (If that process is gone, delete '
                       f'{path}.)')
  try:
    yield
  finally:
    release(workdir)


def release(workdir: str) -> None:
  """Removes workdir's lock where this process holds it."""
  path = Layout(workdir).lock
  holder = _holder(path)
  if holder and int(holder['pid']) == os.getpid() and holder['host'] == socket.gethostname():
    os.remove(path)
