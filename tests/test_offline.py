"""benchmarks/offline.sh travel and home, in a clone of the repository: what a lent machine
needs of results/ travels, the rest stays behind, and the index comes back as HEAD has it."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEPT = 'results/teacher_cifar10/model/'


def _run(clone, *command):
  return subprocess.run(command, cwd=clone, capture_output=True, text=True)


def _tracked(clone, folder='results'):
  return _run(clone, 'git', 'ls-files', folder).stdout.split()


def _clone(tmp_path):
  """A clone of the repository with this checkout's offline.sh and an .offline/ bundle."""
  clone = tmp_path / 'clone'
  subprocess.run(['git', 'clone', '-q', ROOT, str(clone)], check=True)
  shutil.copy(os.path.join(ROOT, 'benchmarks', 'offline.sh'), clone / 'benchmarks')
  os.makedirs(clone / '.offline')
  (clone / '.offline' / 'cifar10.tgz').write_bytes(b'\0' * 1000)
  return clone


def test_travel_leaves_the_committed_results_behind_and_home_brings_them_back(tmp_path):
  clone = _clone(tmp_path)
  committed = _tracked(clone)
  assert any(not path.startswith(KEPT) for path in committed)

  travel = _run(clone, 'bash', 'benchmarks/offline.sh', 'travel')
  assert travel.returncode == 0, travel.stderr
  assert 'travels: ' in travel.stdout and ' MiB of 64' in travel.stdout
  assert _tracked(clone) == [path for path in committed if path.startswith(KEPT)]
  behind = next(path for path in committed if not path.startswith(KEPT))
  assert os.path.exists(clone / behind)  # Still on disk, ignored: it does not travel.
  assert _run(clone, 'git', 'check-ignore', '-q', '--no-index', behind).returncode == 0
  status = _run(clone, 'git', 'status', '--porcelain', '--untracked-files=all', '--',
                'results').stdout.splitlines()  # Out of the index; none untracked to travel.
  assert status and all(line.startswith('D  ') for line in status)

  home = _run(clone, 'bash', 'benchmarks/offline.sh', 'home')
  assert home.returncode == 0, home.stderr
  assert _tracked(clone) == committed
  assert _run(clone, 'git', 'diff', '--cached', '--quiet').returncode == 0
  assert _run(clone, 'git', 'check-ignore', '-q', '--no-index', behind).returncode == 1


def test_travel_refuses_while_something_is_staged(tmp_path):
  clone = _clone(tmp_path)
  (clone / 'README.md').write_text('changed')
  _run(clone, 'git', 'add', 'README.md')
  travel = _run(clone, 'bash', 'benchmarks/offline.sh', 'travel')
  assert travel.returncode == 1 and 'commit or unstage first' in travel.stderr
  assert len(_tracked(clone)) > len(_tracked(clone, KEPT))
