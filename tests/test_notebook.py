"""The tour notebook runs top to bottom without an error, as a user would run it."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'notebooks', 'fsp_tour.ipynb')


def test_tour_notebook_runs_and_draws(monkeypatch):
  """On the committed teacher and real CIFAR-10, or on the digits where those are absent."""
  monkeypatch.setenv('XLA_FLAGS', '')  # One CPU device, as on a user's machine.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 3, 'heatmaps, the stage-1 loss and the matrices before and after'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'FSP loss:' in text and 'module paths:' in text
