"""The files of a workdir: the one place that knows their paths.

    <workdir>/config.json       the run's settings (config.json.<time>: settings replaced)
    <workdir>/data.json         its splits' fingerprints (data.json.<time>: data replaced)
    <workdir>/lock.json         the process writing the workdir
    <workdir>/results.md, results.json, test_labels.npy, teacher_test_probs.npy
    <workdir>/teacher_fsp.npz   the teacher's FSP matrices of every training image (fsp.cache)
    <workdir>/<method>/net<k>/  net k = 1, 2, ... of a method ('teacher' for a teacher
        <phase>/<step>/         trained here): its phases' checkpoints, the settings they
        settings.json           were made with,
        result.json, test_probs.npy, fsp_matrices.npz, model/
    <workdir>/<method>/net<k>.replaced-<time>/  a net's folder of other settings, kept
    <workdir>/tensorboard/<method>_net<k>/

Nets are numbered from 1 everywhere: in folders, result.json, tables and logs; net k uses
seed config.seed + k - 1.
"""

import contextlib
import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class NetFiles:
  """The files of one net of a method."""
  root: str
  tensorboard: str

  def phase(self, name: str) -> str:
    """The folder of a phase's checkpoints."""
    return os.path.join(self.root, name)

  @property
  def result(self) -> str:
    return os.path.join(self.root, 'result.json')

  @property
  def test_probs(self) -> str:
    return os.path.join(self.root, 'test_probs.npy')

  @property
  def fsp_matrices(self) -> str:
    return os.path.join(self.root, 'fsp_matrices.npz')

  @property
  def model(self) -> str:
    return os.path.join(self.root, 'model')

  @property
  def settings(self) -> str:
    """The settings its checkpoints were made with (`plan.settings`)."""
    return os.path.join(self.root, 'settings.json')

  def replaced(self, stamp: str) -> str:
    """Where the net's folder goes when a run with other settings takes its place."""
    return f'{self.root}.replaced-{stamp}'


@dataclasses.dataclass(frozen=True)
class Layout:
  """The files of a workdir."""
  root: str

  @property
  def config(self) -> str:
    return os.path.join(self.root, 'config.json')

  @property
  def data(self) -> str:
    """The fingerprints of the data the run was made with (data.json.<time>: data replaced)."""
    return os.path.join(self.root, 'data.json')

  @property
  def lock(self) -> str:
    return os.path.join(self.root, 'lock.json')

  @property
  def write_test(self) -> str:
    """A file that `workdir.create` writes and removes, to learn whether the folder is
    writable."""
    return os.path.join(self.root, f'.write_test_{os.getpid()}')

  @property
  def results_md(self) -> str:
    return os.path.join(self.root, 'results.md')

  @property
  def results_json(self) -> str:
    return os.path.join(self.root, 'results.json')

  @property
  def test_labels(self) -> str:
    return os.path.join(self.root, 'test_labels.npy')

  @property
  def teacher_test_probs(self) -> str:
    """The test probabilities [N, classes] of a teacher loaded from its checkpoint."""
    return os.path.join(self.root, 'teacher_test_probs.npy')

  @property
  def teacher_fsp(self) -> str:
    """The teacher's FSP matrices of every training image ('stage0', ...) and 'key', what
    they were computed from (config.fsp.cache)."""
    return os.path.join(self.root, 'teacher_fsp.npz')

  def net(self, method: str, net: int) -> NetFiles:
    """Net `net` (1, 2, ...) of a method."""
    return NetFiles(os.path.join(self.root, method, f'net{net}'),
                    os.path.join(self.root, 'tensorboard', f'{method}_net{net}'))

  def finished_nets(self, method: str) -> list[NetFiles]:
    """The method's nets that left a result.json, in the order of their numbers."""
    folder = os.path.join(self.root, method)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    numbers = sorted(int(n[3:]) for n in names if n.startswith('net') and n[3:].isdigit())
    return [self.net(method, k) for k in numbers if os.path.exists(self.net(method, k).result)]


def flat(tree: dict, sep: str = '.') -> dict:
  """{'a.b.c': leaf, ...} of nested dicts, their keys joined by sep."""
  found = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      found.update({f'{key}{sep}{k}': v for k, v in flat(value, sep).items()})
    else:
      found[key] = value
  return found


def read_json(path: str, what: str):
  """A JSON file the project wrote, or a ValueError naming it, what it is and what to do."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} ({what}) cannot be read: {e}. Delete it and run the same command '
                     'again to make it anew.') from None


def read_npy(path: str, what: str) -> np.ndarray:
  """An .npy file the project wrote, or a ValueError naming it, what it is and what to do."""
  try:
    return np.load(path)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f'{path} ({what}) cannot be read: {e}. Delete it and run the same command '
                     'again to make it anew.') from None


@contextlib.contextmanager
def whole(path: str, mode: str = 'w'):
  """A file to write path through: path.tmp, renamed over path once written, so that a kill
  never leaves half a file."""
  with open(path + '.tmp', mode) as f:
    yield f
  os.replace(path + '.tmp', path)


def write_json(path: str, value, indent: int | None = None) -> None:
  """Writes value to path as JSON, whole (`whole`)."""
  with whole(path) as f:
    json.dump(value, f, indent=indent)
