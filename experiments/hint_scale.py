r"""FitNet's hint stage against a trained teacher: loss, gradient and the student's live units.

The committed ResNet-26 teacher's hint (its second stage's output, inference mode) and a fresh
ResNet-8 with FitNet's regressor (`adapters.Student`), on batches of real CIFAR-10 training
images, SGD with momentum 0.9 and weight decay 5e-4 at the paper's hint rate 1e-4 (the
library's optimizer), under each `--settings` entry normalize:weight:clip. Per step: the loss,
the gradient's global norm, the relative error ||u_h - r||^2 / ||u_h||^2 (the same yardstick for
every setting) and the fraction of the student's units alive (positive on some image of the
batch) at each stage's output.

  python experiments/hint_scale.py --out=results/stage1/fitnet_hint.json
"""

import argparse
import json

import jax
import jax.numpy as jnp

from fsp_jax import adapters, checkpoints, data, losses, models, schedules, sources, steps
from fsp_jax.terms import Phase, Term

HINT = 'stage2_out'


def load_teacher(checkpoint, image_size):
  """The trained ResNet-26 and its variables."""
  teacher = models.get('resnet26', 10)
  return teacher, checkpoints.load_variables(checkpoint, teacher, image_size)


def run(images, teacher, teacher_variables, normalize, weight, clip, lr, num_steps):
  """[{'step', 'loss', 'grad_norm', 'relative_error', 'alive': {stage: fraction}}, ...]."""
  width = teacher.widths[int(HINT[len('stage')]) - 1]  # The hint's channels.
  student = adapters.Student(models.get('resnet8', 10), hint=(HINT, width))
  variables = student.init(jax.random.key(0), images[0][:1], train=False)
  phase = Phase('stage1', schedules.Schedule((lr,), (num_steps,)), (Term(
      'hint', (weight, weight), (('layer', HINT), ('normalize', normalize))),), clip)
  tx = steps.optimizer(phase.schedule, 5e-4, 0.9, clip)

  @jax.jit
  def step(state, x, teacher_variables):
    batch = {'image': x, 'label': jnp.zeros(len(x), jnp.int32)}
    state, metrics, out = steps.train_step(state, batch, teacher_variables, student=student,
                                           teacher=teacher, phase=phase, tx=tx, axis_name=None)
    alive = {k: jnp.mean(jnp.any(out.features[k] > 0, axis=(0, 1, 2)))
             for k in out.features if k.endswith('_out')}
    error = losses.hint_loss(out.features['hint'], out.teacher_features[HINT], 'teacher')
    return state, metrics['loss'], metrics['grad_norm'], error, alive

  state = steps.fresh_state(variables, tx)
  trace = []
  for k in range(num_steps):
    state, loss, grad_norm, error, alive = step(state, images[k % len(images)],
                                                teacher_variables)
    trace.append({'step': k + 1, 'loss': float(loss), 'grad_norm': float(grad_norm),
                  'relative_error': float(error), 'alive': {a: float(v) for a, v in alive.items()}})
  return trace


def markdown(runs, num_steps) -> str:
  lines = ['| normalize | weight | clip | loss@1 | grad norm@1 | rel. error 1 -> 10 -> '
           f'{num_steps} | alive@{num_steps} (stage 1 / 2 / 3 outputs) |', '|---' * 7 + '|']
  for run_ in runs:
    t = run_['trace']
    alive = ' / '.join(f'{v:.2f}' for v in t[-1]['alive'].values())
    lines.append(f"| {run_['normalize']} | {run_['weight']:g} | {run_['clip']:g} | "
                 f"{t[0]['loss']:.3g} | {t[0]['grad_norm']:.3g} | {t[0]['relative_error']:.3g} -> "
                 f"{t[9]['relative_error']:.3g} -> {t[-1]['relative_error']:.3g} | {alive} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', default='results/teacher_cifar10/model')
  parser.add_argument('--data', default='../shared/data/cifar10')
  parser.add_argument('--settings', default='none:1:0,none:1:100,teacher:100:100',
                      help='normalize:weight:clip entries, comma-separated')
  parser.add_argument('--lr', type=float, default=1e-4)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batches', type=int, default=20, help='distinct batches of 32, cycled')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  source = sources.folder_source(args.data, 'train', max_per_class=200)
  batches = data.train_batches(source, data.Preprocess(32, 'cifar'), 32, seed=0,
                               process_index=0, process_count=1)
  images = [jnp.asarray(next(batches)['image']) for _ in range(args.batches)]
  teacher, teacher_variables = load_teacher(args.teacher, 32)
  runs = []
  for setting in args.settings.split(','):
    normalize, weight, clip = setting.split(':')
    runs.append({'normalize': normalize, 'weight': float(weight), 'clip': float(clip)})
    runs[-1]['trace'] = run(images, teacher, teacher_variables, normalize, float(weight),
                            float(clip), args.lr, args.steps)
    print(markdown(runs[-1:], args.steps), flush=True)
  print(markdown(runs, args.steps))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'args': vars(args), 'runs': runs}, f, indent=1)


if __name__ == '__main__':
  main()
