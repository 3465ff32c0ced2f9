"""Results tables in the form of the paper's: a column per net, their average and ensemble."""

import os

import numpy as np

from fsp_jax import layout as layout_lib
from fsp_jax import methods
from fsp_jax import workdir as workdir_lib
from fsp_jax.layout import Layout


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
  """Accuracy of the averaged softmax of several nets: probs [nets][N, C], labels [N]."""
  return float(np.mean(np.argmax(np.mean(probs, axis=0), axis=-1) == labels))


def first_task_evaluation(result: dict) -> tuple[int, float] | None:
  """(task iterations, test accuracy) of a net's first evaluation in its task stage (its last
  phase, of result['task_iterations']), or None where it has none before the end."""
  task = result.get('task_iterations')
  if task is None:
    return None
  start = result['iterations'] - task
  early = [(step - start, accuracy) for step, accuracy in result['history']['eval']
           if start < step < result['iterations']]
  return early[0] if early else None


def table_row(finished: list[dict], probs: list[np.ndarray], labels: np.ndarray) -> dict:
  """One row from the result.json dicts and test probabilities of a method's nets: iterations
  of one net (the paper's #Iter), wall time of all of them, and where every net was evaluated
  early in its task stage at the same iteration, their mean accuracy then ('early':
  [task iterations, accuracy])."""
  row = {'method': finished[0]['method'], 'model': finished[0]['model'],
         'nets': [r['accuracy'] for r in finished],
         'avg': float(np.mean([r['accuracy'] for r in finished])),
         'ensemble': ensemble_accuracy(probs, labels) if len(probs) > 1 else None,
         'iterations': max(r['iterations'] for r in finished),
         'task_iterations': finished[0].get('task_iterations'),
         'wall_s': sum(r.get('wall_s', 0.0) for r in finished)}
  early = [first_task_evaluation(r) for r in finished]
  if None not in early and len({step for step, _ in early}) == 1:
    row['early'] = [early[0][0], float(np.mean([accuracy for _, accuracy in early]))]
  return row


def row_of(layout: Layout, finished: list[dict], settings: dict, num_test: int) -> dict:
  """The row of a method's finished nets, from the files they left in the workdir;
  'other_settings' where a net was trained with settings other than `settings` (the current
  config's, `plan.settings`). Raises ValueError naming a net tested on a split of
  another size than the current one's `num_test` examples."""
  nets = [layout.net(r['method'], r['net']) for r in finished]
  probs = [layout_lib.read_npy(net.test_probs, f"{r['method']} net{r['net']}'s test "
                               'probabilities') for net, r in zip(nets, finished)]
  labels = layout_lib.read_npy(layout.test_labels, 'the test labels')
  for path, size in [(net.test_probs, p.shape[0]) for net, p in zip(nets, probs)] + [
      (layout.test_labels, len(labels))]:
    if size != num_test:
      raise ValueError(f'{path} holds {size:,} test examples, the test split {num_test:,}: it '
                       'was made on other data; move its net\'s folder aside (or delete the '
                       'file) to make it again on this data.')
  row = table_row(finished, probs, labels)
  recorded = [layout_lib.read_json(net.settings, 'the settings a net was trained with')
              for net in nets if os.path.exists(net.settings)]
  row['other_settings'] = settings is not None and any(
      workdir_lib.config_changes(r, settings) for r in recorded)
  return row


def percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def iterations(n: int) -> str:
  return f'{n / 1000:g}k' if n >= 1000 else str(n)


def _students(rows: list[dict]) -> list[dict]:
  """The rows of the methods (all but the teacher's)."""
  return [row for row in rows if row['method'] != methods.TEACHER.name]


def _stretched(rows: list[dict]) -> list[dict]:
  """The method rows whose task stage is longer than the shortest (a schedule stretched to
  another total, like the student alone for FSP's iterations): at the same task iteration
  they are at another point of their warm-up and decay, so the early column leaves them out."""
  trained = [row for row in _students(rows) if row.get('task_iterations') is not None]
  shortest = min((row['task_iterations'] for row in trained), default=None)
  return [row for row in trained if row['task_iterations'] != shortest]


def _early_iteration(rows: list[dict]) -> int | None:
  """The task iteration at which every method's row with the table's task schedule was first
  evaluated, if they share one."""
  stretched = _stretched(rows)
  trained = [row for row in _students(rows) if row not in stretched]
  steps = {tuple(row['early'])[0] if row.get('early') else None for row in trained}
  return steps.pop() if trained and len(steps) == 1 and None not in steps else None


def markdown_table(rows: list[dict]) -> str:
  """Accuracies in %, a column per net, like the paper's Table 1; where every row was
  evaluated early in its task stage at the same iteration N, the average then ('Avg @N')."""
  nets = max(len(row['nets']) for row in rows)
  early, stretched = _early_iteration(rows), _stretched(rows)
  head = (['Method', 'Model'] + [f'Net {k + 1}' for k in range(nets)] +
          ([f'Avg @{early}'] if early else []) + ['Avg', 'Ens', '#Iter', 'Wall'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [row['method'] + (' *' if row.get('other_settings') else ''), row['model']]
    cells += [percent(a) for a in row['nets']] + ['-'] * (nets - len(row['nets']))
    if early:
      compared = row['method'] != methods.TEACHER.name and row not in stretched
      cells.append(percent(row['early'][1]) if compared and row.get('early') else '-')
    cells += [percent(row['avg']), percent(row['ensemble']), iterations(row['iterations']),
              f"{row['wall_s'] / 60:.1f} min"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if any(row.get('other_settings') for row in rows):
    lines.append('\n\\* trained with settings other than the current config\'s (kept by '
                 '--allow_config_change; each net\'s settings.json has them).')
  return '\n'.join(lines)


def summary(rows: list[dict]) -> str:
  """A line on what the table compares: every method's average accuracy after the same number
  of task iterations (early, where evaluated, and at the end), and what #Iter counts."""
  trained = _students(rows)
  if not trained:
    return ''
  early, stretched = _early_iteration(rows), _stretched(rows)
  line = ('#Iter counts each net\'s iterations, any stage before its task included. '
          'Average test accuracy')
  if early:
    line += f' after {early} task iterations: ' + ', '.join(
        f"{row['method']} {percent(row['early'][1])}%" for row in trained
        if row not in stretched)
    if stretched:
      line += (' (not ' + ', '.join(row['method'] for row in stretched) + ': a task schedule '
               'stretched to more iterations is at another point of its warm-up and decay then)')
    line += '; at the end'
  tasks = {row.get('task_iterations') for row in trained}
  if len(tasks) == 1 and None not in tasks:
    line += f' ({tasks.pop()} task iterations)'
  return line + ': ' + ', '.join(f"{row['method']} {percent(row['avg'])}%" for row in trained) \
      + '.'



def write(layout: Layout, rows: list[dict]) -> str:
  """Writes the workdir's results.md and results.json; returns the Markdown table."""
  table = markdown_table(rows) + '\n\n' + summary(rows)
  with layout_lib.whole(layout.results_md) as f:
    f.write('Test accuracy (%) of each net, their average and their ensemble (averaged softmax).'
            '\n\n' + table + '\n')
  layout_lib.write_json(layout.results_json, rows, indent=1)
  return table


def rebuild(workdir: str) -> str:
  """Forms each row of a workdir's results.json again from every net its method has finished
  now (nets trained elsewhere and copied in join their row; a row's nets must have one
  method's settings, else it is marked); a teacher loaded from a checkpoint keeps its row.
  Writes results.md and results.json; returns the Markdown table."""
  layout = Layout(workdir)
  num_test = len(layout_lib.read_npy(layout.test_labels, 'the test labels'))
  rows = []
  for row in layout_lib.read_json(layout.results_json, 'the results table'):
    nets = layout.finished_nets(row['method'])
    if not nets:
      rows.append(row)
      continue
    finished = [layout_lib.read_json(net.result, 'a finished net\'s result') for net in nets]
    settings = (layout_lib.read_json(nets[0].settings, 'the settings a net was trained with')
                if os.path.exists(nets[0].settings) else None)
    rows.append(row_of(layout, finished, settings, num_test))
  return write(layout, rows)


def load_run(workdir: str) -> dict:
  """A finished experiment: {'workdir', 'rows', 'config', 'results': {method: [result.json
  dicts of its nets]}}."""
  layout = Layout(workdir)
  rows = layout_lib.read_json(layout.results_json, 'the results table')
  return {'workdir': workdir, 'rows': rows,
          'config': layout_lib.read_json(layout.config, 'the run\'s settings'),
          'results': {row['method']: [layout_lib.read_json(net.result, 'a finished net\'s result')
                                      for net in layout.finished_nets(row['method'])]
                      for row in rows}}
