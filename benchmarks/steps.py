r"""Step benchmark: our jitted + pmapped steps next to a PyTorch FSP reference, in one process.

For the paper's pairs (26->26, 26->8, 32->14) at batch 128: images/s and the median step time
(after warm-up) of stage 1 (teacher pass + student FSP step), stage 1 with cached teacher
matrices (config.fsp.cache), stage 2 (cross-entropy) and evaluation; our compile time, XLA's
FLOP count and memory estimate, the achieved FLOP/s as a fraction of a measured fp32 matmul,
and the ratio ours / PyTorch (> 1: we are faster). The reference runs on the GPU where torch
sees one (its forward passes under bfloat16 autocast with --dtype=bfloat16). Prints a Markdown
table, writes JSON.

  python benchmarks/steps.py --out=/tmp/steps.json
  python benchmarks/steps.py --xla_flags=--xla_cpu_use_onednn=true --out=/tmp/onednn.json

Where torch is not installed (our Python 3.12 environment), --torch_from takes the reference's
step times from the JSON of a run just before in the same sitting:

  python benchmarks/steps.py --out=/tmp/jax010.json                            # with torch
  python3.12 benchmarks/steps.py --torch_from=/tmp/jax010.json --out=/tmp/jax012.json
"""

import argparse
import json
import os
import platform
import statistics
import time

PAIRS = (('resnet26', 'resnet26'), ('resnet26', 'resnet8'), ('resnet32', 'resnet14'))
STEPS = ('stage1', 'stage1_cached', 'stage2', 'eval')


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n fp32 matmul: the machine's practical peak for our steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  seconds = median_seconds(lambda: matmul(a).block_until_ready(), repeats)
  return 2 * n**3 / seconds


def _first(analysis):
  """cost_analysis() is a dict, or a list of one dict per computation in some versions."""
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def jax_pair(teacher_name: str, student_name: str, batch_size: int, repeats: int,
             dtype: str = 'float32') -> dict:
  """{step: {'seconds', 'compile_s', 'flops', 'memory_bytes'}} of our library's steps (one
  step per call), computing in dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fsp_jax import data, models, steps  # pylint: disable=g-import-not-at-top
  from fsp_jax.adapters import Student  # pylint: disable=g-import-not-at-top
  from fsp_jax.schedules import Schedule  # pylint: disable=g-import-not-at-top
  from fsp_jax.terms import Phase, Term  # pylint: disable=g-import-not-at-top

  devices = jax.local_device_count()
  # Every input on the devices before it is timed, as the reference's are (and as training's
  # are with data.on_device): numpy arguments would be copied to the devices at every call.
  # Replicated trees through steps.replicate; batches [devices, ...] through on_devices.
  on_devices = jax.pmap(lambda tree: tree)
  schedule = Schedule((1e-3,), (1_000_000,))
  tx = steps.optimizer(schedule, 1e-4, 0.9)
  teacher = Student(models.get(teacher_name, 10, axis_name='batch', dtype=np.dtype(dtype)))
  student = Student(models.get(student_name, 10, axis_name='batch', dtype=np.dtype(dtype)))
  teacher_variables = steps.replicate(
      steps.create_train_state(teacher, jax.random.key(1), 32, tx).variables())
  rng = np.random.default_rng(0)
  batch = on_devices(data.shard({
      'image': rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
      'label': rng.integers(0, 10, batch_size).astype(np.int32)}, devices))
  cached = steps.make_fsp_step(teacher)(teacher_variables, batch)
  phase = lambda *terms: Phase('train', schedule, terms)
  one_call = lambda inputs: on_devices(jax.tree_util.tree_map(lambda x: x[:, None], inputs))
  calls = {
      'stage1': (steps.make_train_step(student, teacher, phase(Term('fsp')), tx),
                 one_call(batch), teacher_variables),
      'stage1_cached': (steps.make_train_step(
          student, teacher, phase(Term('fsp', options=(('cached', True),))), tx),
                        one_call({**batch, 'teacher_fsp': cached}), teacher_variables),
      'stage2': (steps.make_train_step(student, None, phase(Term('ce')), tx), one_call(batch),
                 None),
  }
  results = {}
  for name, (step, inputs, variables) in calls.items():
    state = steps.replicate(steps.create_train_state(student, jax.random.key(0), 32, tx))
    start = time.perf_counter()
    compiled = step.lower(state, inputs, variables, None).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], inputs, variables, None)
      jax.block_until_ready(metrics)

    results[name] = _measure(compiled, run, compile_s, repeats)
  variables = steps.replicate(
      steps.create_train_state(student, jax.random.key(0), 32, tx).variables())
  eval_batch = batch
  start = time.perf_counter()
  compiled = steps.make_eval_step(student).lower(variables, eval_batch).compile()
  compile_s = time.perf_counter() - start
  results['eval'] = _measure(compiled, lambda: jax.block_until_ready(
      compiled(variables, eval_batch)), compile_s, repeats)
  return results


def _measure(compiled, run, compile_s: float, repeats: int) -> dict:
  memory = compiled.memory_analysis()
  memory_bytes = None
  if memory is not None:  # Arguments + outputs + temporaries, less what is aliased (donated).
    memory_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                    memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {'seconds': median_seconds(run, repeats), 'compile_s': compile_s,
          'flops': _first(compiled.cost_analysis()).get('flops'), 'memory_bytes': memory_bytes}


def torch_device() -> str:
  import torch  # pylint: disable=g-import-not-at-top
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def torch_pair(teacher_name: str, student_name: str, batch_size: int, repeats: int,
               dtype: str = 'float32') -> dict:
  """{step: {'seconds'}} of the PyTorch reference, on the GPU where torch sees one."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  device = torch_device()
  steps = torch_reference.Steps(int(teacher_name[6:]), int(student_name[6:]), batch_size,
                                device=device, dtype=dtype)

  def timed(step):
    def run():
      step()
      if device == 'cuda':  # Its kernels run asynchronously, as ours do.
        torch.cuda.synchronize()
    return run

  return {name: {'seconds': median_seconds(timed(getattr(steps, name)), repeats)}
          for name in STEPS}


def _label(teacher_name: str, student_name: str) -> str:
  """'resnet26', 'resnet8' -> '26->8'."""
  return f'{teacher_name[6:]}->{student_name[6:]}'


def _ratio(a, b):
  return None if a is None or b is None else a / b


def _cell(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def table(rows: list[dict], peak: float) -> str:
  head = ('| pair | step | ours img/s | ours ms | PyTorch img/s | ours / PyTorch | compile s '
          '| GFLOP/step | % of matmul peak | XLA memory MiB |')
  lines = [head, '|' + '---|' * 10]
  for r in rows:
    flops = r['flops'] or 0
    memory = '-' if r['memory_bytes'] is None else f"{r['memory_bytes'] / 2**20:.0f}"
    lines.append(
        f"| {r['pair']} | {r['step']} | {r['ours_images_per_s']:.0f} | "
        f"{1000 * r['ours_seconds']:.0f} | {_cell(r['torch_images_per_s'], '.0f')} | "
        f"{_cell(r['ratio'], '.2f')} | {r['compile_s']:.1f} | {flops / 1e9:.1f} | "
        f"{100 * flops / r['ours_seconds'] / peak:.0f} | {memory} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--pairs', default=','.join(f'{t}:{s}' for t, s in PAIRS))
  parser.add_argument('--xla_flags', default='', help='added to XLA_FLAGS before JAX starts')
  parser.add_argument('--out', default='', help='JSON file for the measurements')
  parser.add_argument('--torch_from', default='',
                      help="a JSON of this script's whose PyTorch times to use instead of "
                           'running the reference')
  parser.add_argument('--no_torch', action='store_true',
                      help='ours alone, without the PyTorch reference (an accelerator machine)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args()
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  import jax  # pylint: disable=g-import-not-at-top

  if args.no_torch:
    reference, torch_seconds = 'no PyTorch reference', None
  elif args.torch_from:
    with open(args.torch_from) as f:
      earlier = json.load(f)
    reference = f"torch from {args.torch_from} ({earlier['machine']})"
    torch_seconds = {(r['pair'], r['step']): r['torch_seconds'] for r in earlier['rows']}
    missing = [p for p in args.pairs.split(',') if (_label(*p.split(':')), STEPS[0])
               not in torch_seconds]
    if missing:
      raise SystemExit(f'--torch_from={args.torch_from} has no PyTorch times for the pairs '
                       f'{", ".join(missing)}; it has {sorted({p for p, _ in torch_seconds})}.')
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    reference = f'torch {torch.__version__} on {torch_device()}'
  device = jax.devices()[0]
  machine = (f'{device.device_kind} x {jax.local_device_count()} ({platform.machine()}, '
             f'{os.cpu_count()} CPUs), jax {jax.__version__}, {reference}, '
             f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  peak = matmul_peak()
  rows, speedups = [], []
  for pair in args.pairs.split(','):
    teacher_name, student_name = pair.split(':')
    ours = jax_pair(teacher_name, student_name, args.batch_size, args.repeats, args.dtype)
    label = _label(teacher_name, student_name)
    if args.no_torch:
      theirs = {step: {'seconds': None} for step in STEPS}
    elif args.torch_from:
      theirs = {step: {'seconds': torch_seconds[label, step]} for step in STEPS}
    else:
      theirs = torch_pair(teacher_name, student_name, args.batch_size, args.repeats, args.dtype)
    for step in STEPS:
      rows.append({'pair': label, 'step': step,
                   **{k: v for k, v in ours[step].items() if k != 'seconds'},
                   'ours_seconds': ours[step]['seconds'],
                   'ours_images_per_s': args.batch_size / ours[step]['seconds'],
                   'torch_seconds': theirs[step]['seconds'],
                   'torch_images_per_s': _ratio(args.batch_size, theirs[step]['seconds']),
                   'ratio': _ratio(theirs[step]['seconds'], ours[step]['seconds'])})
    by_step = {r['step']: r for r in rows[-len(STEPS):]}
    ours, theirs = (_ratio(by_step['stage1'][f'{who}_seconds'],
                           by_step['stage1_cached'][f'{who}_seconds']) for who in ('ours', 'torch'))
    speedups.append(f"{rows[-1]['pair']}: the cache makes stage 1 {ours:.2f}x faster "
                    f'(PyTorch reference: {_cell(theirs, ".2f")}x)')
  print(f'\n{machine}; batch {args.batch_size}, {args.dtype}; matmul peak {peak / 1e9:.0f} '
        'GFLOP/s\n')
  print(table(rows, peak))
  print('\n' + '\n'.join(speedups))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'machine': machine, 'batch_size': args.batch_size, 'dtype': args.dtype,
                 'matmul_flops': peak, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
