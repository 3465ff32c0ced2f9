"""The accelerator benchmark script runs end to end (tiny sizes, on the CPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_script_writes_every_measurement(tmp_path):
  out = tmp_path / 'accelerator.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'accelerator.py'), '--tiny',
                  f'--out={out}'], check=True, timeout=900,
                 env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  result = json.loads(out.read_text())
  assert [(run['dtype'], run['batch_size']) for run in result['steps']] == [
      ('float32', 8), ('bfloat16', 8)]
  for run in result['steps']:
    assert {row['step'] for row in run['rows']} == {'stage1', 'stage1_cached', 'stage2', 'eval'}
    assert all(row['ours_images_per_s'] > 0 for row in run['rows'])
  settings = [(m['steps_per_call'], m['on_device']) for m in result['loop']['trivial_batch8']]
  assert settings == [(1, False), (8, True)]
  for m in result['loop']['resnet8_batch8']:
    assert len(m['ratios']) == 1 and m['ratio'] > 0 and m['phase_ratio'] > 0
    assert all(len(times) == 1 and times[0] > 0 for times in m['rounds'].values())
  assert [m['on_device'] for m in result['loop']['eval_trivial']] == [False, True]
  assert all(len(m['rounds']['eval_s']) == 1 for m in result['loop']['eval_trivial'])
  emulated = result['loop']['emulated_accelerator']
  assert emulated['save_ms'] > 0 and [len(m['rounds']['loop_s']) for m in emulated['phases']] == [
      1, 1]
  assert result['complete']
  assert [run['on_device'] for run in result['training']] == [True, False]
  for run in result['training']:
    assert [row['method'] for row in run['rows']] == ['teacher', 'scratch', 'fsp']
