"""Results tables in the form of the paper's: Net 1..k, Avg, Ensemble, #Iter."""

import json
import os

import numpy as np


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
  """Accuracy of the averaged softmax of several nets: probs [nets][N, C], labels [N]."""
  return float(np.mean(np.argmax(np.mean(probs, axis=0), axis=-1) == labels))


def table_row(results: list[dict], probs: list[np.ndarray], labels: np.ndarray) -> dict:
  """One row from the result.json dicts and test probabilities of a method's nets."""
  return {'method': results[0]['method'], 'model': results[0]['model'],
          'nets': [r['accuracy'] for r in results],
          'avg': float(np.mean([r['accuracy'] for r in results])),
          'ensemble': ensemble_accuracy(probs, labels) if len(probs) > 1 else None,
          'iterations': sum(r['iterations'] for r in results),
          'wall_s': sum(r.get('wall_s', 0.0) for r in results)}


def _percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def markdown_table(rows: list[dict]) -> str:
  """Accuracies in %, a column per net, like the paper's Table 1."""
  nets = max(len(row['nets']) for row in rows)
  head = (['Method', 'Model'] + [f'Net {k + 1}' for k in range(nets)] +
          ['Avg', 'Ens', '#Iter', 'Wall'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [row['method'], row['model']] + [_percent(a) for a in row['nets']]
    cells += ['-'] * (nets - len(row['nets']))
    cells += [_percent(row['avg']), _percent(row['ensemble']), _iterations(row['iterations']),
              f"{row['wall_s'] / 60:.1f} min"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _iterations(n: int) -> str:
  return f'{n / 1000:g}k' if n >= 1000 else str(n)


def write_results(workdir: str, rows: list[dict]) -> str:
  """Writes results.md and results.json into workdir; returns the Markdown table."""
  table = markdown_table(rows)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('Test accuracy (%) of each net, their average and their ensemble (averaged softmax).'
            '\n\n' + table + '\n')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  return table
