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
import optax

from fsp_jax import adapters, checkpoints, data, losses, models, schedules, sources, steps

HINT = 'stage2_out'


def teacher_hints(checkpoint, images):
  """The teacher's hint [B, 16, 16, 32] on each batch of images."""
  teacher = models.get('resnet26', 10)
  variables = checkpoints.load_variables(checkpoint, teacher, images[0].shape[1])
  apply = jax.jit(lambda x: teacher.apply(variables, x, train=False)[1][HINT])
  return [apply(x) for x in images]


def run(images, hints, normalize, weight, clip, lr, num_steps):
  """[{'step', 'loss', 'grad_norm', 'relative_error', 'alive': {stage: fraction}}, ...]."""
  student = adapters.Student(models.get('resnet8', 10), hint=(HINT, hints[0].shape[-1]))
  variables = student.init(jax.random.key(0), images[0][:1], train=False)
  tx = steps.optimizer(schedules.Schedule((lr,), (num_steps,)), 5e-4, 0.9, clip)

  def loss_fn(params, batch_stats, x, hint):
    (_, features), updates = student.apply({'params': params, 'batch_stats': batch_stats}, x,
                                           train=True, mutable=['batch_stats'])
    loss = weight * losses.hint_loss(features['hint'], hint, normalize)
    return loss, (updates['batch_stats'], features)

  @jax.jit
  def step(params, batch_stats, opt_state, x, hint):
    (loss, (batch_stats, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, hint)
    updates, opt_state = tx.update(grads, opt_state, params)
    alive = {k: jnp.mean(jnp.any(features[k] > 0, axis=(0, 1, 2)))
             for k in features if k.endswith('_out')}
    return (optax.apply_updates(params, updates), batch_stats, opt_state, loss,
            optax.tree.norm(grads), losses.hint_loss(features['hint'], hint, 'teacher'), alive)

  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  trace = []
  for k in range(num_steps):
    x, hint = images[k % len(images)], hints[k % len(images)]
    params, batch_stats, opt_state, loss, grad_norm, error, alive = step(
        params, batch_stats, opt_state, x, hint)
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
  hints = teacher_hints(args.teacher, images)
  runs = []
  for setting in args.settings.split(','):
    normalize, weight, clip = setting.split(':')
    runs.append({'normalize': normalize, 'weight': float(weight), 'clip': float(clip)})
    runs[-1]['trace'] = run(images, hints, normalize, float(weight), float(clip), args.lr,
                            args.steps)
    print(markdown(runs[-1:], args.steps), flush=True)
  print(markdown(runs, args.steps))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'args': vars(args), 'runs': runs}, f, indent=1)


if __name__ == '__main__':
  main()
