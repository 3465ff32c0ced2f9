r"""Results tables in the form of the paper's (Net 1..k, Avg, Ensemble, #Iter), and a report
with the paper's numbers beside ours and plots, from finished experiments' workdirs:

  python -m fsp_jax.report --out=results --notes=results/notes.md \
      table1=runs/fast_opt_cifar10_cpu table3=runs/minimize_cifar10_cpu table5=runs/transfer
"""

import argparse
import os

from matplotlib.figure import Figure  # Not pyplot: a notebook's backend stays the user's.
import numpy as np

from fsp_jax import methods
from fsp_jax.results import iterations, load_run, percent


def _label(method: str) -> str:
  return methods.get(method).label


def _color(method: str) -> str:
  return methods.get(method).color


# The paper's numbers by table and method: (Net 1, Net 2, Net 3, Avg, Ens, #Iter); None where
# the paper gives none. Methods are ours: 'scratch' is Teacher* / Student alone.
PAPER = {
    'table1': ('Table 1: fast optimisation, CIFAR-10, ResNet-26 -> ResNet-26', {
        'teacher': (91.61, 91.56, 92.09, 91.75, 93.48, '192k'),
        'scratch': (90.47, 90.83, 90.62, 90.64, 92.60, '63k'),
        'fitnet': (91.69, 91.85, 91.64, 91.72, 92.98, '98k'),
        'fsp': (92.28, 92.08, 92.07, 92.14, 93.26, '84k'),
        'fsp_shuffled': (92.28, 91.89, 92.08, 92.08, 93.67, '126k')}),
    'table3': ('Table 3: network minimisation, CIFAR-10, ResNet-26 -> ResNet-8', {
        'teacher': (None, None, None, 91.91, None, None),
        'scratch': (None, None, None, 87.91, None, None),
        'fitnet': (None, None, None, 88.57, None, None),
        'fsp': (None, None, None, 88.70, None, None)}),
    'table5': ('Table 5: transfer, ImageNet ResNet-34 -> ResNet-20 on CUB-200-2011', {
        'finetune': (None, None, None, 77.72, None, None),
        'teacher_scratch': (None, None, None, 47.53, None, None),
        'scratch': (None, None, None, 47.73, None, None),
        'fitnet': (None, None, None, 70.19, None, None),
        'fsp': (None, None, None, 74.26, None, None)}),
}
def _task_offset(history: dict) -> int:
  """Iterations before the task stage (stage 1's length; 0 for one-stage methods)."""
  return max([step for step, phase, _ in history['train'] if phase == 'stage1'], default=0)


def plot_accuracy(run: dict, title: str, path: str) -> None:
  """Test accuracy vs task-stage iteration: each net thin, the mean of the nets bold."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for method, results in run['results'].items():
    if method == 'teacher':
      continue
    curves = []
    for result in results:
      offset = _task_offset(result['history'])
      steps, accuracy = zip(*[(s - offset, 100 * a) for s, a in result['history']['eval']])
      ax.plot(steps, accuracy, color=_color(method), alpha=0.3, lw=1)
      curves.append(accuracy)
    if len({len(c) for c in curves}) == 1:
      ax.plot(steps, np.mean(curves, axis=0), color=_color(method), lw=2, marker='o',
              ms=3, label=f'{_label(method)} (mean of {len(curves)})')
  ax.set_xlabel('iteration of the task stage (after any stage 1)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_fsp_loss(run: dict, title: str, path: str) -> None:
  """Stage 1's FSP loss vs iteration (log scale), one line per net of fsp / fsp_shuffled."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for method in ('fsp', 'fsp_shuffled'):
    for k, result in enumerate(run['results'].get(method, [])):
      points = [(s, loss) for s, phase, loss in result['history']['train'] if phase == 'stage1']
      ax.plot(*zip(*points), color=_color(method), alpha=0.8, lw=1,
              label=_label(method) if k == 0 else None)
  ax.set_yscale('log')
  ax.set_xlabel('stage-1 iteration')
  ax.set_ylabel('FSP loss (sum over stages of squared L2)')
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


def gains(rows: list[dict], paper: dict, baseline: str = 'scratch') -> list[str]:
  """One line per method: its average minus the baseline's, here and in the paper, and the
  seed-paired differences (net k of each row shares seed k) with their mean, sample standard
  deviation and sign count; then each row's gap to the teacher."""
  by_method = {row['method']: row for row in rows}
  lines = []
  for method, row in by_method.items():
    if baseline not in by_method or method in (baseline, 'teacher'):
      continue
    ours = 100 * (row['avg'] - by_method[baseline]['avg'])
    line = f'- {_label(method)} - {_label(baseline)}: {ours:+.2f} points'
    if method in paper and baseline in paper:
      line += f' (paper: {paper[method][3] - paper[baseline][3]:+.2f})'
    paired = [100 * (a - b) for a, b in zip(row['nets'], by_method[baseline]['nets'])]
    if len(paired) > 1:
      line += (f'; per seed {", ".join(f"{d:+.2f}" for d in paired)} (mean '
               f'{np.mean(paired):+.2f}, sd {np.std(paired, ddof=1):.2f}; higher in '
               f'{sum(d > 0 for d in paired)} of {len(paired)})')
    lines.append(line)
  if 'teacher' in by_method:
    teacher = by_method['teacher']['avg']
    lines += [f'- Teacher - {_label(m)}: {100 * (teacher - row["avg"]):+.2f} points'
              for m, row in by_method.items() if m != 'teacher']
  return lines


def write_report(runs: dict[str, str], out_dir: str, notes: str = '') -> str:
  """Writes out_dir/REPORT.md and its plots for {table name: workdir}; returns its path.

  notes (Markdown: findings, commands, versions) goes at the top of the report.
  """
  os.makedirs(out_dir, exist_ok=True)
  parts = ['# Reproducing "A Gift from Knowledge Distillation" with fsp_jax\n', notes]
  for name, workdir in runs.items():
    title, paper = PAPER[name]
    run = load_run(workdir)
    config = run['config']
    parts.append(f'\n## {title}\n')
    data = config['data']
    subset = ''
    if data.get('classes'):
      subset = f' classes {", ".join(data["classes"])}'
    if data.get('max_per_class'):
      subset += f' ({data["max_per_class"]} training images per class)'
    parts.append(f'Ours: {config["teacher"]["model"]} -> {config["student"]["model"]} on '
                 f'{data["root"] or data["name"]}{subset}, image size {data["image_size"]},'
                 f' batch {config["batch_size"]}; seeds {config["seed"]}..'
                 f'{config["seed"] + config["num_nets"] - 1} (net k uses seed + k - 1). '
                 'Accuracy in %; #Iter is one net\'s iterations, stage 1 included, as in '
                 'the paper; Wall the time of all the nets of a row.\n')
    parts.append(comparison_table(run['rows'], paper) + '\n')
    lines = gains(run['rows'], paper)
    if lines:
      parts.append('Average accuracy over the student trained alone, here and in the paper, '
                   'and the gap to the teacher:\n')
      parts.append('\n'.join(lines) + '\n')
    plot_accuracy(run, f'{name}: test accuracy during the task stage',
                  os.path.join(out_dir, f'{name}_accuracy.png'))
    parts.append(f'![test accuracy]({name}_accuracy.png)\n')
    if 'fsp' in run['results']:
      plot_fsp_loss(run, f'{name}: FSP loss during stage 1',
                    os.path.join(out_dir, f'{name}_fsp_loss.png'))
      parts.append(f'![FSP loss]({name}_fsp_loss.png)\n')
      npz = os.path.join(workdir, 'fsp', 'net1', 'fsp_matrices.npz')
      if os.path.exists(npz):
        plot_fsp_matrices(npz, f'{name}: mean FSP matrices on the first test images '
                          '(net 1)', os.path.join(out_dir, f'{name}_fsp_matrices.png'))
        parts.append(f'![FSP matrices]({name}_fsp_matrices.png)\n')
  path = os.path.join(out_dir, 'REPORT.md')
  with open(path, 'w') as f:
    f.write('\n'.join(parts))
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description='Writes REPORT.md and plots from workdirs.')
  parser.add_argument('runs', nargs='+', help=f'table=workdir, table one of {sorted(PAPER)}')
  parser.add_argument('--out', required=True, help='folder for REPORT.md and the PNGs')
  parser.add_argument('--notes', default='', help='Markdown file put at the top')
  args = parser.parse_args(argv)
  runs = {}
  for item in args.runs:
    name, _, workdir = item.partition('=')
    if name not in PAPER or not os.path.exists(os.path.join(workdir, 'results.json')):
      parser.error(f'{item!r}: expected table=workdir with table one of {sorted(PAPER)} and '
                   'a finished experiment (its results.json) in workdir.')
    runs[name] = workdir
  notes = open(args.notes).read() if args.notes else ''
  print(write_report(runs, args.out, notes))


if __name__ == '__main__':
  main()
