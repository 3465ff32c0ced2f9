"""Results tables in the form of the paper's: a column per net, their average and ensemble."""

import glob
import json
import os

import numpy as np


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
  """Accuracy of the averaged softmax of several nets: probs [nets][N, C], labels [N]."""
  return float(np.mean(np.argmax(np.mean(probs, axis=0), axis=-1) == labels))


def table_row(finished: list[dict], probs: list[np.ndarray], labels: np.ndarray) -> dict:
  """One row from the result.json dicts and test probabilities of a method's nets: iterations
  of one net (the paper's #Iter), wall time of all of them."""
  return {'method': finished[0]['method'], 'model': finished[0]['model'],
          'nets': [r['accuracy'] for r in finished],
          'avg': float(np.mean([r['accuracy'] for r in finished])),
          'ensemble': ensemble_accuracy(probs, labels) if len(probs) > 1 else None,
          'iterations': max(r['iterations'] for r in finished),
          'wall_s': sum(r.get('wall_s', 0.0) for r in finished)}


def row_of(workdir: str, finished: list[dict]) -> dict:
  """The row of a method's finished nets, from the files they left in workdir."""
  run_dirs = [os.path.join(workdir, r['method'], f'net{r["net"]}') for r in finished]
  probs = [np.load(os.path.join(d, 'test_probs.npy')) for d in run_dirs]
  return table_row(finished, probs, np.load(os.path.join(workdir, 'test_labels.npy')))


def percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def iterations(n: int) -> str:
  return f'{n / 1000:g}k' if n >= 1000 else str(n)


def markdown_table(rows: list[dict]) -> str:
  """Accuracies in %, a column per net, like the paper's Table 1."""
  nets = max(len(row['nets']) for row in rows)
  head = (['Method', 'Model'] + [f'Net {k + 1}' for k in range(nets)] +
          ['Avg', 'Ens', '#Iter', 'Wall'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [row['method'], row['model']] + [percent(a) for a in row['nets']]
    cells += ['-'] * (nets - len(row['nets']))
    cells += [percent(row['avg']), percent(row['ensemble']), iterations(row['iterations']),
              f"{row['wall_s'] / 60:.1f} min"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write(workdir: str, rows: list[dict]) -> str:
  """Writes results.md and results.json into workdir; returns the Markdown table."""
  table = markdown_table(rows)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('Test accuracy (%) of each net, their average and their ensemble (averaged softmax).'
            '\n\n' + table + '\n')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  return table


def load_run(workdir: str) -> dict:
  """A finished experiment: {'rows', 'config', 'results': {method: [result.json dicts]}}."""
  with open(os.path.join(workdir, 'results.json')) as f:
    rows = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  finished = {}
  for row in rows:
    paths = sorted(glob.glob(os.path.join(workdir, row['method'], 'net*', 'result.json')))
    finished[row['method']] = [json.load(open(p)) for p in paths]
  return {'workdir': workdir, 'rows': rows, 'config': config, 'results': finished}
