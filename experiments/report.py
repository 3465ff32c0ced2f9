r"""The reproduction's report: our tables beside the paper's, the paired differences that
decide each claim, and plots, read from finished experiments' workdirs.

  python experiments/report.py --out=results --notes=results/notes.md \
      table1=results/runs/fast_opt_cifar10_cpu table3=results/runs/minimize_cifar10_cpu \
      table5=results/runs/transfer_cub_cpu

The paper's numbers and what each table compares live here, beside the experiments, not in
the training library (whose `results` module writes every run's own table).
"""

import argparse
import os
from typing import NamedTuple

from matplotlib.figure import Figure  # Not pyplot: a notebook's backend stays the user's.
import numpy as np
from scipy import stats

from fsp_jax import methods
from fsp_jax.layout import Layout
from fsp_jax.results import iterations, load_run, percent, rebuild

TEACHER = methods.TEACHER.name
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Paths in configs start here.

# The paper's numbers by table and method: (Net 1, Net 2, Net 3, Avg, Ens, #Iter); None where
# the paper gives none. Methods are ours: 'scratch' is Teacher* / Student alone.
PAPER = {
    'table1': ('Table 1: fast optimisation, CIFAR-10, ResNet-26 -> ResNet-26', {
        TEACHER: (91.61, 91.56, 92.09, 91.75, 93.48, '192k'),
        'scratch': (90.47, 90.83, 90.62, 90.64, 92.60, '63k'),
        'fitnet': (91.69, 91.85, 91.64, 91.72, 92.98, '98k'),
        'fsp': (92.28, 92.08, 92.07, 92.14, 93.26, '84k'),
        'fsp_shuffled': (92.28, 91.89, 92.08, 92.08, 93.67, '126k')}),
    'table3': ('Table 3: network minimisation, CIFAR-10, ResNet-26 -> ResNet-8', {
        TEACHER: (None, None, None, 91.91, None, None),
        'scratch': (None, None, None, 87.91, None, None),
        'fitnet': (None, None, None, 88.57, None, None),
        'fsp': (None, None, None, 88.70, None, None)}),
    'table5': ('Table 5: transfer learning (paper: ImageNet ResNet-34 -> ResNet-20 on '
               'CUB-200-2011)', {
        'finetune': (None, None, None, 77.72, None, None),
        'teacher_scratch': (None, None, None, 47.53, None, None),
        'scratch': (None, None, None, 47.73, None, None),
        'fitnet': (None, None, None, 70.19, None, None),
        'fsp': (None, None, None, 74.26, None, None)}),
}

# The claims each table tests: (method, than): `method` is more accurate than `than`, judged
# by the seed-paired differences of the rows' nets. Pairs whose rows are absent are left out.
# The student alone for FSP's total iterations (scratch_matched) measures what the extra
# iterations give; shuffled FSP against it, what a stage 1 without the teacher's flow gives.
CONTROLS = [('fsp', 'scratch'), ('fsp', 'scratch_matched'), ('fsp', 'fsp_shuffled'),
            ('scratch_matched', 'scratch'), ('fsp_shuffled', 'scratch_matched')]
# The primary claims of every table, which decide its verdict (Holm's correction is applied
# over them): FSP against the student alone with FSP's total iterations, and against its
# shuffled control. The rest are secondary, each tested at 5% on its own.
PRIMARY = [('fsp', 'scratch_matched'), ('fsp', 'fsp_shuffled')]
CLAIMS = {
    'table1': CONTROLS + [('fitnet', 'scratch'), ('fsp', 'fitnet')],
    'table3': CONTROLS + [('fitnet', 'scratch'), ('fsp', 'fitnet'), ('fsp', 'kd'), ('fsp', 'at'),
                          ('kd', 'scratch'), ('at', 'scratch'), ('fsp', 'kd_matched'),
                          ('fsp', 'at_matched'), ('fsp', 'fsp_random'),
                          ('fsp_random', 'scratch_matched'), ('fsp_shuffled', 'fsp_random')],
    'table5': CONTROLS + [('fsp_shuffled', 'scratch'), ('fitnet', 'scratch'), ('fsp', 'fitnet'),
                          ('finetune', 'teacher_scratch'), ('fsp', 'teacher_scratch'),
                          ('finetune', 'fsp'), ('fsp', 'teacher_scratch_matched')],
}


def _label(method: str) -> str:
  return methods.get(method).label


def _color(method: str) -> str:
  return methods.get(method).color


def _task_offset(history: dict) -> int:
  """Iterations before the task stage (stage 1's length; 0 for one-stage methods)."""
  return max([step for step, phase, _ in history['train'] if phase == 'stage1'], default=0)


def _mean_curve(ax, method: str, curves: list[tuple]) -> None:
  """Each net's curve thin, their mean bold where the nets were measured at the same steps."""
  for steps, values in curves:
    ax.plot(steps, values, color=_color(method), alpha=0.3, lw=1)
  if len({tuple(steps) for steps, _ in curves}) == 1:
    ax.plot(curves[0][0], np.mean([values for _, values in curves], axis=0),
            color=_color(method), lw=2, label=f'{_label(method)} (mean of {len(curves)})')


def plot_accuracy(run: dict, title: str, path: str) -> None:
  """Test accuracy and the task stage's training loss vs iteration (stage 1 included), for
  every method's nets; a dashed line where a two-stage method's task stage begins."""
  fig = Figure(figsize=(12, 4.5))
  accuracy_ax, loss_ax = fig.subplots(1, 2)
  for method, results in run['results'].items():
    accuracy, loss = [], []
    for result in results:
      offset, history = _task_offset(result['history']), result['history']
      accuracy.append(tuple(zip(*[(s, 100 * a) for s, a in history['eval']])))
      loss.append(tuple(zip(*[(s, value) for s, phase, value in history['train']
                              if s > offset])))
    if results:
      _mean_curve(accuracy_ax, method, accuracy)
      _mean_curve(loss_ax, method, loss)
      offset = _task_offset(results[0]['history'])
      for ax in (accuracy_ax, loss_ax) if offset else ():
        ax.axvline(offset, color=_color(method), ls='--', lw=1, alpha=0.7)
  accuracy_ax.set_ylabel('test accuracy (%)')
  loss_ax.set_ylabel('training loss of the task stage (at log steps)')
  loss_ax.set_yscale('log')
  for ax in (accuracy_ax, loss_ax):
    ax.set_xlabel('iteration, stage 1 included (dashed: where the task stage begins)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_fsp_loss(run: dict, learners: list[str], title: str, path: str) -> None:
  """Stage 1's FSP loss vs iteration (log scale), one line per net of each method."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for method in learners:
    for k, result in enumerate(run['results'][method]):
      points = [(s, loss) for s, phase, loss in result['history']['train'] if phase == 'stage1']
      ax.plot(*zip(*points), color=_color(method), alpha=0.8, lw=1,
              label=_label(method) if k == 0 else None)
  ax.set_yscale('log')
  ax.set_xlabel('stage-1 iteration')
  ax.set_ylabel('stage-1 loss\n(weight x relative FSP error, summed over stages)')
  ax.set_title(title)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_fsp_matrices(npz_path: str, title: str, path: str) -> None:
  """Heatmaps of the teacher's and the student's mean FSP matrices, before and after stage 1:
  a row per stage, one colour scale per row (0 to the teacher's largest entry; features are
  ReLU outputs, so the matrices are non-negative)."""
  matrices = np.load(npz_path)
  stages = sorted({int(k.split('_')[1]) for k in matrices.files})
  columns = (('teacher', 'teacher'), ('before', 'student before stage 1'),
             ('after', 'student after stage 1'))
  fig = Figure(figsize=(11, 3.3 * len(stages)), layout='constrained')
  axes = fig.subplots(len(stages), 3, squeeze=False)
  for row, stage in enumerate(stages):
    scale = matrices[f'teacher_{stage}'].max()
    for col, (key, label) in enumerate(columns):
      ax = axes[row, col]
      image = ax.imshow(matrices[f'{key}_{stage}'], cmap='viridis', vmin=0, vmax=scale,
                        aspect='auto', interpolation='nearest')
      ax.set_title(f'stage {stage + 1}: {label}', fontsize=9)
      if row == len(stages) - 1:
        ax.set_xlabel('output-layer channel j')
      if col == 0:
        ax.set_ylabel('input-layer channel i')
    fig.colorbar(image, ax=axes[row].tolist(), shrink=0.9, label='G[i, j] (clipped at the '
                 "teacher's max)")
  fig.suptitle(title)
  fig.savefig(path, dpi=100)


def _cell(value) -> str:
  return '-' if value is None else (value if isinstance(value, str) else f'{value:.2f}')


def comparison_table(rows: list[dict], paper: dict) -> str:
  """Our rows (accuracy %) beside the paper's Avg, Ens and #Iter."""
  nets = max(len(row['nets']) for row in rows)
  head = (['Method', 'Model'] + [f'Net {k + 1}' for k in range(nets)] +
          ['Avg', 'Ens', '#Iter', 'Wall', 'Paper Avg', 'Paper Ens', 'Paper #Iter'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    theirs = paper.get(row['method'], (None,) * 6)
    cells = [_label(row['method']), row['model']]
    cells += [percent(a) for a in row['nets']] + ['-'] * (nets - len(row['nets']))
    cells += [percent(row['avg']), percent(row['ensemble']), iterations(row['iterations']),
              f"{row['wall_s'] / 60:.1f} min"]
    cells += [_cell(v) for v in theirs[3:]]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


class Paired(NamedTuple):
  """A paired t-test of seed-paired differences (points): their mean, its 95% interval
  (Student's t with n - 1 degrees of freedom), t and the two-sided p."""
  n: int
  mean: float
  low: float
  high: float
  t: float
  p: float


def paired_test(differences: list[float], confidence: float = 0.95) -> Paired:
  """The paired t-test of `differences` (one per seed, at least two)."""
  d = np.asarray(differences, dtype=np.float64)
  n, mean = len(d), float(np.mean(d))
  standard_error = float(np.std(d, ddof=1) / np.sqrt(n))
  half = stats.t.ppf((1 + confidence) / 2, n - 1) * standard_error
  if standard_error == 0:  # Every seed the same: no spread to test against.
    t = 0.0 if mean == 0 else np.copysign(np.inf, mean)
  else:
    t = mean / standard_error
  return Paired(n, mean, mean - half, mean + half, float(t), float(2 * stats.t.sf(abs(t), n - 1)))


def holm(p_values: list[float]) -> list[float]:
  """Holm's step-down adjustment of a family's p-values, in their order: the i-th smallest of m
  is multiplied by m - i + 1 (i from 1), made monotone and capped at 1."""
  order = np.argsort(p_values, kind='stable')
  adjusted, running = [0.0] * len(p_values), 0.0
  for rank, index in enumerate(order):
    running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
    adjusted[index] = running
  return adjusted


def teacher_check(rows: list[dict], checkpoint: str, labels: np.ndarray) -> str:
  """A line saying that the teacher's row was recomputed from the test probabilities committed
  beside its checkpoint (<checkpoint>/../test_probs.npy), or '' where there are none; raises
  ValueError where they give another accuracy than the row's."""
  path = os.path.join(os.path.dirname(checkpoint), 'test_probs.npy')
  teacher = [row for row in rows if row['method'] == TEACHER]
  if not checkpoint or not teacher or not os.path.isfile(os.path.join(ROOT, path)):
    return ''
  accuracy = float(np.mean(np.argmax(np.load(os.path.join(ROOT, path)), -1) == labels))
  if abs(accuracy - teacher[0]['avg']) > 1e-9:
    raise ValueError(f'{path}: the teacher\'s test probabilities give {percent(accuracy)}%, its '
                     f'row {percent(teacher[0]["avg"])}%: they belong to another teacher or split.')
  return (f'The teacher\'s {percent(accuracy)}% is recomputed from its test probabilities '
          f'(`{path}`) and the test labels.')


def tied_ensembles(rows: list[dict], examples: int) -> str:
  """A footnote naming rows whose ensembles are equally accurate (by coincidence: the same
  number of the `examples` test images right), or ''."""
  by_accuracy = {}
  for row in rows:
    if row.get('ensemble') is not None:
      by_accuracy.setdefault(round(row['ensemble'] * examples), []).append(row['method'])
  return ' '.join(
      f'Note: the ensembles of {" and ".join(_label(m) for m in tied)} are equally accurate '
      f'({percent(right / examples)}%, {right:,} of {examples:,} test images right each), by '
      'coincidence.' for right, tied in by_accuracy.items() if len(tied) > 1)


def verdict(mean: float, p: float, alpha: float = 0.05) -> str:
  """'held' where the difference is positive at level alpha (its 1 - alpha interval excludes
  zero), 'did not hold' where it is negative at that level, else 'within the spread'."""
  if p < alpha:
    return 'held' if mean > 0 else 'did not hold'
  return 'within the spread'


def _p(p: float) -> str:
  return '< .001' if p < 0.001 else f'= {p:.3f}'.replace('0.', '.', 1)


def claim_lines(rows: list[dict], paper: dict, claims: list[tuple[str, str]]) -> list[str]:
  """One line per claim (method, than) whose two rows are present, primary claims first: its
  verdict, the seed-paired differences (net k of each row shares seed k) with their mean, 95%
  interval, t and p (Holm-adjusted over the table's primary claims, which decide its
  verdicts), the difference of the averages (and the paper's) and the rows' iterations."""
  by_method = {row['method']: row for row in rows}
  present = [(m, than) for m, than in claims if m in by_method and than in by_method]
  paired = {claim: [100 * (x - y) for x, y in zip(by_method[claim[0]]['nets'],
                                                  by_method[claim[1]]['nets'])]
            for claim in present}
  tests = {claim: paired_test(d) for claim, d in paired.items() if len(d) > 1}
  primary = [claim for claim in PRIMARY if claim in tests]
  adjusted = dict(zip(primary, holm([tests[claim].p for claim in primary])))
  lines = []
  for claim in primary + [c for c in present if c not in primary]:
    (method, than), a, b = claim, by_method[claim[0]], by_method[claim[1]]
    line = f'- {_label(method)} > {_label(than)}'
    if claim in tests:
      test = tests[claim]
      p = adjusted.get(claim, test.p)
      line += f' ({"primary" if claim in adjusted else "secondary"}): **{verdict(test.mean, p)}**'
      line += (f' (Holm-adjusted p {_p(p)}); ' if claim in adjusted else '; ')
      line += (f'paired mean {test.mean:+.2f} points, 95% interval {test.low:+.2f} to '
               f'{test.high:+.2f}, t({test.n - 1}) = {test.t:.2f}, p {_p(test.p)}; per seed '
               f'{", ".join(f"{d:+.2f}" for d in paired[claim])}')
    else:
      line += f': {paired[claim][0]:+.2f} points (one net each, no test)'
    if method in paper and than in paper:
      line += f'; paper {paper[method][3] - paper[than][3]:+.2f}'
    line += f'; #Iter {iterations(a["iterations"])} against {iterations(b["iterations"])}'
    lines.append(line)
  if TEACHER in by_method:
    teacher = by_method[TEACHER]['avg']
    gaps = ', '.join(f'{_label(m)} {100 * (teacher - row["avg"]):+.2f}'
                     for m, row in by_method.items() if m != TEACHER)
    lines.append(f'- The teacher\'s lead ({percent(teacher)}%) over each row: {gaps} points')
  return lines


def table_section(name: str, workdir: str, out_dir: str) -> list[str]:
  """A table's part of the report: its setting, the table, the claims and the plots."""
  title, paper = PAPER[name]
  run = load_run(workdir)
  config, data = run['config'], run['config']['data']
  subset = f' classes {", ".join(data["classes"])}' if data.get('classes') else ''
  if data.get('max_per_class'):
    subset += f' ({data["max_per_class"]} training images per class)'
  parts = [f'\n## {title}\n',
           f'Ours: {config["teacher"]["model"]} -> {config["student"]["model"]} on '
           f'{data["root"] or data["name"]}{subset}, image size {data["image_size"]}, batch '
           f'{config["batch_size"]}; seeds {config["seed"]}..'
           f'{config["seed"] + max(len(row["nets"]) for row in run["rows"]) - 1} (net k uses '
           'seed + k - 1; a row of fewer nets has the first seeds). Accuracy in %; '
           '#Iter is one net\'s iterations, stage 1 included; the paper\'s #Iter counts the '
           'three nets of a row together (its teacher\'s 192k = 3 x 64k); Wall is the time '
           'of all the nets of a row.\n',
           comparison_table(run['rows'], paper) + '\n']
  labels = np.load(Layout(workdir).test_labels)
  notes = [teacher_check(run['rows'], config['teacher']['checkpoint'], labels),
           tied_ensembles(run['rows'], len(labels))]
  parts += [note + '\n' for note in notes if note]
  lines = claim_lines(run['rows'], paper, CLAIMS[name])
  if lines:
    parts += ['Each claim, by the seed-paired differences in points and a paired t-test '
              '(held: the 95% interval of the mean difference excludes zero, above it; did not '
              'hold: the same, below; primary claims after Holm\'s correction over the '
              'table\'s primary claims):\n', '\n'.join(lines) + '\n']
  plot_accuracy(run, f'{name}: test accuracy, and training loss during the task stage',
                os.path.join(out_dir, f'{name}_accuracy.png'))
  parts.append(f'![test accuracy]({name}_accuracy.png)\n')
  layout = Layout(workdir)
  learners = [m for m, results in run['results'].items()
              if results and os.path.exists(layout.net(m, 1).fsp_matrices)]
  if learners:
    plot_fsp_loss(run, learners, f'{name}: FSP loss during stage 1',
                  os.path.join(out_dir, f'{name}_fsp_loss.png'))
    parts.append(f'![FSP loss]({name}_fsp_loss.png)\n')
    plot_fsp_matrices(layout.net(learners[0], 1).fsp_matrices,
                      f'{name}: mean FSP matrices on the first test images ({learners[0]} net 1)',
                      os.path.join(out_dir, f'{name}_fsp_matrices.png'))
    parts.append(f'![FSP matrices]({name}_fsp_matrices.png)\n')
  return parts


def write_report(runs: dict[str, str], out_dir: str, notes: str = '') -> str:
  """Writes out_dir/REPORT.md and its plots for {table name: workdir}; returns its path.

  notes (Markdown: findings, commands, versions) goes at the top of the report.
  """
  os.makedirs(out_dir, exist_ok=True)
  parts = ['# Reproducing "A Gift from Knowledge Distillation" with fsp_jax\n', notes]
  for name, workdir in runs.items():
    parts += table_section(name, workdir, out_dir)
  path = os.path.join(out_dir, 'REPORT.md')
  with open(path, 'w') as f:
    f.write('\n'.join(parts))
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description='Writes REPORT.md and plots from workdirs.')
  parser.add_argument('runs', nargs='+', help=f'table=workdir, table one of {sorted(PAPER)}')
  parser.add_argument('--out', required=True, help='folder for REPORT.md and the PNGs')
  parser.add_argument('--notes', default='', help='Markdown file put at the top')
  parser.add_argument('--rebuild_tables', action='store_true', help='first form each '
                      'workdir\'s results table again from its finished nets (results.rebuild)')
  args = parser.parse_args(argv)
  runs = {}
  for item in args.runs:
    name, _, workdir = item.partition('=')
    if name not in PAPER or not os.path.exists(Layout(workdir).results_json):
      parser.error(f'{item!r}: expected table=workdir with table one of {sorted(PAPER)} and '
                   'a finished experiment (its results.json) in workdir.')
    runs[name] = workdir
    if args.rebuild_tables:
      rebuild(workdir)
  notes = open(args.notes).read() if args.notes else ''
  print(write_report(runs, args.out, notes))


if __name__ == '__main__':
  main()
