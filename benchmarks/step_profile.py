r"""Where a train step's time goes: XLA's own per-op timings, grouped by what each op does.

Traces `--steps` stage-2 steps (cross-entropy, SGD update) of each network at batch 128 with
jax.profiler, reads the trace back (jax.profiler.ProfileData) and sums the time of every op
XLA ran. Each op is classified from the compiled HLO of the step (the ops inside a fusion):
convolutions (forward and both gradients), reductions (BatchNorm's batch statistics and their
gradients, the loss, the gradient norm), layout changes (transposes and copies, with what is
fused into them), and elementwise work (BatchNorm's normalisation, ReLU, residual adds, the update). Prints
milliseconds per step and shares; writes JSON.

  python benchmarks/step_profile.py --models=resnet20,resnet26 --out=results/profile_cpu.json
"""

import argparse
import collections
import glob
import json
import re
import tempfile

import jax
import numpy as np

from fsp_jax import data, models, steps
from fsp_jax.adapters import Student
from fsp_jax.schedules import Schedule
from fsp_jax.terms import Phase, Term

KINDS = ('convolution', 'reduction', 'layout', 'elementwise', 'other')


def op_kinds(hlo: str) -> dict[str, str]:
  """{instruction name: kind} for the instructions of an HLO module's entry computation."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif current is not None and '=' in line:
      current.append(line)

  def ops(name, seen=()):
    found = set()
    for line in computations.get(name, []):
      op = re.search(r'= [^ ]+ ([\w\-]+)\(', line)
      if op:
        found.add(op.group(1))
      for called in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
        if called not in seen:
          found |= ops(called, seen + (name,))
    return found

  kinds = {}
  for lines in computations.values():
    for line in lines:
      name = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) =', line)
      if not name:
        continue
      inside = ops(name.group(1)) | {m.group(1) for m in [re.search(r'= [^ ]+ ([\w\-]+)\(',
                                                                    line)] if m}
      called = re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line)
      for c in called:
        inside |= ops(c)
      if inside & {'convolution', 'dot'} or 'conv' in name.group(1):
        kind = 'convolution'
      elif inside & {'reduce', 'reduce-window', 'select-and-scatter'}:
        kind = 'reduction'
      elif inside & {'transpose', 'copy'}:  # A layout change, maybe with elementwise work.
        kind = 'layout'
      elif inside:
        kind = 'elementwise'
      else:
        kind = 'other'
      kinds[name.group(1)] = kind
  return kinds


def profile(name: str, batch_size: int, steps_count: int) -> dict:
  """Milliseconds of XLA's threads per step, by kind of op (threads run ops in parallel, so
  the sum can exceed the step's wall time)."""
  student = Student(models.get(name, 10, axis_name='batch'))
  phase = Phase('train', Schedule((0.1,), (1_000_000,)), (Term('ce'),))
  tx = steps.optimizer(phase.schedule, 1e-4, 0.9)
  state = steps.replicate(steps.create_train_state(student, jax.random.key(0), 32, tx))
  rng = np.random.default_rng(0)
  batch = data.shard({'image': rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
                      'label': rng.integers(0, 10, batch_size).astype(np.int32)},
                     jax.local_device_count())
  step = steps.make_train_step(student, None, phase, tx)
  kinds = op_kinds(step.lower(state, batch, None).compile().as_text())
  for _ in range(2):
    state, metrics = step(state, batch, None)
  jax.block_until_ready(metrics)
  directory = tempfile.mkdtemp()
  with jax.profiler.trace(directory):
    for _ in range(steps_count):
      state, metrics = step(state, batch, None)
    jax.block_until_ready(metrics)
  trace = jax.profiler.ProfileData.from_file(
      glob.glob(f'{directory}/**/*.xplane.pb', recursive=True)[0])
  totals, by_op = collections.Counter(), collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:  # The threads that run XLA's ops.
        continue
      for event in line.events:
        op = event.name.split(':')[0]
        if op not in kinds:  # The runtime's own spans, which contain the ops.
          continue
        totals[kinds[op]] += event.duration_ns / 1e6 / steps_count
        by_op[op] += event.duration_ns / 1e6 / steps_count
  busy = sum(totals.values())
  return {'model': name, 'batch_size': batch_size,
          'ms_per_step': {k: round(totals[k], 1) for k in KINDS},
          'share': {k: round(totals[k] / busy, 3) for k in KINDS},
          'top_ops': [(op, kinds[op], round(ms, 1)) for op, ms in by_op.most_common(8)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='resnet20,resnet26')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  results = [profile(name, args.batch_size, args.steps) for name in args.models.split(',')]
  for r in results:
    print(r['model'], ' | '.join(f'{k} {r["ms_per_step"][k]:.0f} ms ({100 * r["share"][k]:.0f}%)'
                                 for k in KINDS))
    print('  slowest ops:', r['top_ops'])
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'jax': jax.__version__, 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
