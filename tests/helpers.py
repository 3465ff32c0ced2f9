"""What several test modules share: saved models, checks of finished workdirs."""

import jax
import numpy as np
import orbax.checkpoint as ocp

from fsp_jax import models, trainer
from fsp_jax import plan as plan_lib
from fsp_jax.feed import HostFeed
from fsp_jax.layout import Layout


def save_model(path: str, name: str = 'resnet8', classes: int = 10, width: int = 1) -> str:
  """A freshly initialised network's {'params', 'batch_stats'} as this process's jax.Arrays,
  saved in the layout of a finished run's model/ (a teacher checkpoint); returns path."""
  model = models.get(name, classes, width)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, variables)
  return path


def planned(config):
  """The config's plan, and a trainer.Context of it: the host pipeline, and a workdir that
  nothing writes."""
  plan = plan_lib.resolve(config)
  return plan, trainer.Context(plan.loop, Layout('/nonexistent'), plan.train, plan.test,
                               plan.preprocess, HostFeed(plan.train, plan.preprocess))


def assert_rows_are_their_nets_predictions(workdir: str, rows: list[dict]) -> None:
  """Every row's accuracies are those of its nets' saved test probabilities against the test
  labels (a teacher loaded from a checkpoint: the probabilities saved beside the results)."""
  layout = Layout(workdir)
  labels = np.load(layout.test_labels)
  for row in rows:
    paths = [net.test_probs for net in layout.finished_nets(row['method'])]
    if not paths:  # A teacher loaded from a checkpoint.
      paths = [layout.teacher_test_probs]
    accuracies = [float(np.mean(np.argmax(np.load(path), -1) == labels)) for path in paths]
    np.testing.assert_allclose(row['nets'], accuracies, rtol=0, atol=1e-12)
    np.testing.assert_allclose(row['avg'], np.mean(accuracies), rtol=0, atol=1e-12)
