"""Results tables and the report (tables beside the paper's, plots) from a finished workdir."""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from configs import common
from fsp_jax import config as config_lib
from fsp_jax import experiment, results
import report  # experiments/report.py (tests/conftest.py puts experiments/ on the path).


def test_ensemble_accuracy_averages_probabilities():
  labels = np.array([0, 1, 1])
  a = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])  # 2/3 right.
  b = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])  # 2/3 right.
  assert results.ensemble_accuracy([a, b], labels) == 1.0


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = common.tiny(config_lib.default())
  config.methods, config.num_nets = 'scratch,fsp', 2
  config.teacher.model = config.student.model = 'resnet8'
  workdir = str(tmp_path_factory.mktemp('run'))
  experiment.train_and_evaluate(config, workdir)
  return workdir


def test_report_has_tables_beside_the_paper_and_plots(workdir, tmp_path):
  out = str(tmp_path / 'report')
  report.main(['--out', out, f'table1={workdir}'])
  with open(os.path.join(out, 'REPORT.md')) as f:
    text = f.read()
  assert '| Method | Model | Net 1 | Net 2 | Avg | Ens | #Iter | Wall | Paper Avg |' in text
  assert '| FSP | resnet8 |' in text and '| 92.14 | 93.26 | 84k |' in text  # The paper's row.
  assert re.search(r'- FSP > Student alone \(secondary\): \*\*(held|did not hold|within the '
                   r'spread)\*\*; paired mean [+-]\d+\.\d\d points, 95% interval [+-]\d+\.\d\d to '
                   r'[+-]\d+\.\d\d, t\(1\) = -?\d+\.\d\d, p [=<] \.\d{3}; per seed [+-]\d+\.\d\d, '
                   r'[+-]\d+\.\d\d; paper \+1\.50; #Iter 6 against 3', text), text
  assert "- The teacher's lead (" in text and 'FSP ' in text
  for name in ('table1_accuracy.png', 'table1_fsp_loss.png', 'table1_fsp_matrices.png'):
    assert f'({name})' in text
    with Image.open(os.path.join(out, name)) as image:
      assert image.size[0] > 400 and image.size[1] > 300


def test_a_table_rebuilt_from_its_nets_takes_in_nets_copied_in(workdir, tmp_path):
  """results.rebuild forms the same rows from the same nets; a net trained elsewhere and copied
  in (here a copy of net 2 as net 3) joins its row."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  before = results.load_run(copy)['rows']
  results.rebuild(copy)
  assert results.load_run(copy)['rows'] == before
  shutil.copytree(os.path.join(copy, 'fsp', 'net2'), os.path.join(copy, 'fsp', 'net3'))
  results.rebuild(copy)
  fsp = {row['method']: row for row in results.load_run(copy)['rows']}['fsp']
  assert fsp['nets'] == [before[-1]['nets'][0], before[-1]['nets'][1], before[-1]['nets'][1]]
  assert not fsp['other_settings']


def test_fsp_matrices_are_saved_before_and_after_stage1(workdir):
  matrices = np.load(os.path.join(workdir, 'fsp', 'net1', 'fsp_matrices.npz'))
  assert sorted(matrices.files) == sorted(f'{when}_{k}' for when in ('teacher', 'before', 'after')
                                          for k in range(3))
  assert matrices['teacher_2'].shape == (32, 64)
  assert not np.allclose(matrices['before_2'], matrices['after_2'])  # Stage 1 moved them.


def test_report_rejects_unknown_tables_and_unfinished_workdirs(workdir, tmp_path):
  for item in (f'table9={workdir}', f'table1={tmp_path}'):
    with pytest.raises(SystemExit):
      report.main(['--out', str(tmp_path / 'r'), item])


def test_paired_test_matches_scipy_and_the_t_table():
  """Mean, 95% interval (t table: t(0.975, 2) = 4.302653) and p of a paired t-test, against
  scipy's one-sample test and the interval worked by hand."""
  differences = [1.88, 1.37, 2.23]
  test = report.paired_test(differences)
  mean, se = np.mean(differences), np.std(differences, ddof=1) / np.sqrt(3)
  assert test.n == 3 and test.mean == pytest.approx(mean)
  assert test.low == pytest.approx(mean - 4.302653 * se, abs=1e-5)
  assert test.high == pytest.approx(mean + 4.302653 * se, abs=1e-5)
  expected = stats.ttest_1samp(differences, 0.0)
  assert test.t == pytest.approx(expected.statistic) and test.p == pytest.approx(expected.pvalue)
  five = report.paired_test([0.5, -0.2, 0.4, 1.1, 0.3])  # t(0.975, 4) = 2.776445.
  half = 2.776445 * np.std([0.5, -0.2, 0.4, 1.1, 0.3], ddof=1) / np.sqrt(5)
  assert five.high - five.mean == pytest.approx(half, abs=1e-5)


def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_plus_1_and_stays_monotone():
  assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert report.holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
  assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # Capped at 1.


@pytest.mark.parametrize('differences,expected', [
    ([3.1, 3.4, 2.7], 'held'), ([-1.0, -1.2, -0.9], 'did not hold'),
    ([0.5, -0.2, 0.4], 'within the spread'),
    ([2.37, 1.61, 1.87], 'held'),   # t(2) = 8.7, p = .013.
    ([-1.32, -0.09, -0.79], 'within the spread'),  # The old rule's edge: t(2) = -2.06, p = .18.
])
def test_verdict_holds_where_the_95_interval_excludes_zero(differences, expected):
  test = report.paired_test(differences)
  assert report.verdict(test.mean, test.p) == expected
  assert (expected == 'within the spread') == (test.low <= 0 <= test.high)


def test_primary_claims_come_first_with_holms_correction():
  """Table 5 as committed at three nets: FSP - shuffled is p = .100 alone, .200 after Holm."""
  rows = [{'method': m, 'nets': nets, 'avg': float(np.mean(nets)), 'iterations': 7200}
          for m, nets in (('scratch', [0.5959, 0.6095, 0.6059]),
                          ('scratch_matched', [0.6243, 0.6271, 0.6346]),
                          ('fsp', [0.6473, 0.6188, 0.6416]),
                          ('fsp_shuffled', [0.6303, 0.5981, 0.6369]))]
  lines = report.claim_lines(rows, {}, report.CLAIMS['table5'])
  assert 'shuffled (dagger) (primary): **within the spread** (Holm-adjusted p = .200)' in lines[1]
  assert lines[0].startswith("- FSP > Student alone, FSP's #Iter (primary)")
  assert all('(secondary)' in line for line in lines[2:])


def test_table_row_gives_one_nets_iterations_and_all_nets_wall_time():
  finished = [{'method': 'fsp', 'model': 'resnet8', 'accuracy': a, 'iterations': 240,
               'wall_s': 60.0} for a in (0.5, 0.7)]
  labels = np.array([0, 1])
  probs = [np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([[0.8, 0.2], [0.1, 0.9]])]
  row = results.table_row(finished, probs, labels)
  assert row['iterations'] == 240 and row['wall_s'] == 120.0
  assert row['avg'] == pytest.approx(0.6) and row['ensemble'] == 1.0


def _finished(method, accuracies, early, iterations, task, evaluated_at=10):
  """result.json dicts of a method's nets, first evaluated `evaluated_at` task iterations in."""
  first = iterations - task + evaluated_at
  return [{'method': method, 'model': 'resnet8', 'accuracy': a, 'iterations': iterations,
           'task_iterations': task, 'wall_s': 1.0,
           'history': {'train': [], 'eval': [[first, e], [iterations, a]]}}
          for a, e in zip(accuracies, early)]


def test_table_compares_the_students_after_the_same_task_iterations():
  """The quickstart's claim: the early column holds each student row's mean accuracy at the
  same task iteration (stage 1 not counted), the teacher's cell is empty, and the line under
  the table names both. Mutation: counting stage 1 in the early iteration (first - 0) makes
  the rows' iterations differ and the column vanish."""
  labels = np.array([0, 1])
  probs = [np.array([[0.9, 0.1], [0.2, 0.8]])] * 2
  teacher = results.table_row(_finished('teacher', [1.0], [0.3], 600, 600), probs[:1], labels)
  scratch = results.table_row(_finished('scratch', [0.9, 0.8], [0.2, 0.3], 40, 40), probs,
                              labels)
  fsp = results.table_row(_finished('fsp', [0.9, 0.9], [0.7, 0.9], 240, 40), probs, labels)
  table = results.markdown_table([teacher, scratch, fsp])
  assert '| Avg @10 |' in table.splitlines()[0]
  cells = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in table.splitlines()[2:]}
  assert cells['teacher'][4] == '-'
  assert cells['scratch'][4] == '25.00' and cells['fsp'][4] == '80.00'
  line = results.summary([teacher, scratch, fsp])
  assert 'after 10 task iterations: scratch 25.00%, fsp 80.00%' in line
  assert '(40 task iterations): scratch 85.00%, fsp 90.00%' in line


def test_early_column_leaves_out_a_row_with_a_stretched_task_schedule():
  """The student alone for FSP's iterations trains its task for longer: at the other rows'
  early iteration it is at another point of its schedule, so its cell is empty, saying why."""
  labels = np.array([0, 1])
  probs = [np.array([[0.9, 0.1], [0.2, 0.8]])] * 2
  scratch = results.table_row(_finished('scratch', [0.9, 0.8], [0.2, 0.3], 40, 40), probs,
                              labels)
  fsp = results.table_row(_finished('fsp', [0.9, 0.9], [0.7, 0.9], 60, 40), probs, labels)
  matched = results.table_row(_finished('scratch_matched', [0.9, 0.9], [0.1, 0.1], 60, 60),
                              probs, labels)
  table = results.markdown_table([scratch, fsp, matched])
  cells = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in table.splitlines()[2:]}
  assert '| Avg @10 |' in table and cells['scratch_matched'][4] == '-'
  assert cells['fsp'][4] == '80.00'
  line = results.summary([scratch, fsp, matched])
  assert 'after 10 task iterations: scratch 25.00%, fsp 80.00% (not scratch_matched: ' in line


def test_teacher_row_is_checked_against_the_probabilities_beside_its_checkpoint(tmp_path,
                                                                                 monkeypatch):
  monkeypatch.setattr(report, 'ROOT', str(tmp_path))
  os.makedirs(tmp_path / 'teacher' / 'model')
  np.save(tmp_path / 'teacher' / 'test_probs.npy', np.array([[0.9, 0.1], [0.3, 0.7]]))
  labels, rows = np.array([0, 0]), [{'method': 'teacher', 'avg': 0.5}]
  assert '50.00% is recomputed' in report.teacher_check(rows, 'teacher/model', labels)
  assert report.teacher_check(rows, 'elsewhere/model', labels) == ''
  with pytest.raises(ValueError, match='give 100.00%, its row 50.00%'):
    report.teacher_check(rows, 'teacher/model', np.array([0, 1]))


def test_committed_report_is_what_the_committed_runs_and_notes_give(tmp_path):
  """results/REPORT.md is rebuilt whenever a row or the notes change: a stale report (a rebuilt
  results table or notes committed without rerunning report.py) fails here."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tables = {'table1': 'fast_opt_cifar10_cpu', 'table3': 'minimize_cifar10_cpu',
            'table5': 'transfer_cub_cpu'}
  runs = {name: os.path.join(root, 'results', 'runs', folder) for name, folder in tables.items()}
  with open(os.path.join(root, 'results', 'notes.md')) as f:
    notes = f.read()
  with open(report.write_report(runs, str(tmp_path), notes)) as f:
    rebuilt = f.read()
  with open(os.path.join(root, 'results', 'REPORT.md')) as f:
    assert f.read() == rebuilt, ('results/REPORT.md differs from what report.py writes from '
                                 'results/runs and results/notes.md: rebuild it with the '
                                 'report.py command in results/notes.md.')
