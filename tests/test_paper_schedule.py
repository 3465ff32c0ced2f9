"""experiments/paper_schedule.py rehearsed on a CPU: rounds of nets, and a run carried to a new
machine through --out."""

import json
import os
import subprocess
import sys

import pytest

import paper_schedule  # experiments/ is on sys.path (conftest).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = paper_schedule.ROWS.split(',')


def _schedule(workdir, out, *extra):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'paper_schedule.py'), '--tiny',
       f'--workdir={workdir}', f'--out={out}', *extra], capture_output=True, text=True,
      timeout=900, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_carry_out_takes_finished_nets_and_the_newest_checkpoint_and_carry_in_restores(tmp_path):
  workdir, out, moved = tmp_path / 'w', tmp_path / 'out', tmp_path / 'moved'
  done, running = workdir / 'fsp' / 'net1', workdir / 'fsp' / 'net2'
  for folder in (done / 'model', running / 'stage1' / '40', running / 'stage2' / '10',
                 running / 'stage2' / '20'):
    os.makedirs(folder)
    (folder / 'state').write_text(str(folder))
  for net in (done, running):
    (net / 'settings.json').write_text('{}')
  (done / 'result.json').write_text('{}')
  (done / 'test_probs.npy').write_bytes(b'probs')
  assert paper_schedule.carry_out(str(workdir), str(out)) == ['fsp/net1', 'fsp/net2']
  assert sorted(os.listdir(out / 'fsp' / 'net1')) == ['result.json', 'settings.json',
                                                      'test_probs.npy']
  assert sorted(os.listdir(out / 'fsp' / 'net2')) == ['settings.json', 'stage2']
  assert os.listdir(out / 'fsp' / 'net2' / 'stage2') == ['20']
  paper_schedule.carry_in(str(out), str(moved))
  assert (moved / 'fsp' / 'net2' / 'stage2' / '20' / 'state').read_text() == str(
      running / 'stage2' / '20')
  assert (moved / 'fsp' / 'net1' / 'result.json').exists()


@pytest.mark.slow
def test_rounds_train_net_1_of_every_row_first_and_a_new_machine_goes_on(tmp_path):
  out = tmp_path / 'out'
  first = _schedule(tmp_path / 'machine1', out, '--nets=1')
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(ROWS + ['config.json', 'data.json', 'results.json',
                                                   'results.md', 'test_labels.npy'])
  assert all(os.listdir(out / row) == ['net1'] for row in ROWS)
  kept = (out / 'kd' / 'net1' / 'result.json').read_text()
  # Another machine: a new workdir from --out alone, two nets a row.
  second = _schedule(tmp_path / 'machine2', out, '--nets=2')
  assert second.returncode == 0, second.stderr[-3000:]
  assert '[kd net1' not in second.stdout and '[kd net2' in second.stdout
  assert (out / 'kd' / 'net1' / 'result.json').read_text() == kept
  rows = {row['method']: row for row in json.loads((out / 'results.json').read_text())}
  assert all(len(rows[row]['nets']) == 2 for row in ROWS)
