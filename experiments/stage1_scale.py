r"""Why stage 1 overflows: feature and FSP-matrix magnitudes, and the first gradients, per pair.

For each of the paper's teacher -> student pairs, on batches of real CIFAR-10 test images
(resized for the ImageNet networks): the RMS of the teacher's (inference mode) and the
student's (training mode) features at every FSP point, the RMS entry of their FSP matrices,
the FSP loss and the global gradient norm of the student's first step under each
normalisation of `losses.fsp_l2`, and then `--steps` stage-1 steps at the paper's first rate
(SGD, momentum 0.9, weight decay 1e-4) under each normalisation: the relative error of the
student's matrices (sum over stages of ||G_S - G_T||^2 / ||G_T||^2, the same yardstick for
every normalisation) before and after, and the fraction of the student's last-stage units
still alive (positive on some image of the batch).

  python experiments/stage1_scale.py --out=results/stage1_scale.json
  python experiments/stage1_scale.py --teacher26=results/teacher_cifar10/model --pairs=26-26,26-8

A teacher without a checkpoint has random weights, run on this batch's BatchNorm statistics
(what a trained network's normalisation gives, roughly); `--raw_teacher` runs it instead on its
initial statistics (mean 0, variance 1: an unsettled teacher, as after a few steps).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax import checkpoints, data, fsp, losses, models, schedules, sources, steps
from fsp_jax.terms import Phase, Term

PAIRS = {  # name: (teacher, student, width, image size, teacher classes)
    '26-26': ('resnet26', 'resnet26', 1, 32, 10),
    '26-8': ('resnet26', 'resnet8', 1, 32, 10),
    '32x4-32x4': ('resnet32', 'resnet32', 4, 32, 100),
    '32x4-14x4': ('resnet32', 'resnet14', 4, 32, 100),
    '34-20@64': ('resnet34', 'resnet20_imagenet', 1, 64, 1000),
    '34-20@224': ('resnet34', 'resnet20_imagenet', 1, 224, 1000),
}


def alive(features) -> jnp.ndarray:
  """Fraction of the last stage's output units positive on some image of the batch."""
  last = max(k for k in features if k.endswith('_out'))
  return jnp.mean(jnp.any(features[last] > 0, axis=(0, 1, 2)))


def rms(x) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def relative_error(g_student, g_teacher) -> float:
  return float(sum(jnp.mean(jnp.sum(jnp.square(s - t), (1, 2)) / jnp.sum(jnp.square(t), (1, 2)))
                   for s, t in zip(g_student, g_teacher)))


def teacher_fn(pair, args):
  """(description, images -> (features, FSP matrices)) of the pair's teacher."""
  teacher_name, _, width, size, classes = PAIRS[pair]
  model = models.get(teacher_name, classes, width)
  checkpoint = args.teacher26 if teacher_name == 'resnet26' else None
  if checkpoint:
    variables = checkpoints.load_variables(checkpoint, model, size)
    return 'trained', jax.jit(lambda x: _with_fsp(model.apply(variables, x, train=False)[1]))
  variables = model.init(jax.random.key(100), jnp.zeros((1, size, size, 3)), train=False)
  if args.raw_teacher:
    return 'random, initial BN statistics', jax.jit(
        lambda x: _with_fsp(model.apply(variables, x, train=False)[1]))
  return 'random, BN statistics of the batch', jax.jit(lambda x: _with_fsp(model.apply(
      variables, x, train=True, mutable=['batch_stats'])[0][1]))


def _with_fsp(features):
  return features, fsp.fsp_matrices(features)


def student_step_fn(model, normalize, lr, scale, clip, num_steps):
  """The library's stage-1 step (`steps.train_step`, one device) at a constant lr on the
  teacher's matrices given with each batch; jitted, it also returns the student's matrices
  and its alive units."""
  phase = Phase('stage1', schedules.Schedule((lr,), (num_steps,)), (Term(
      'fsp', (scale, scale), (('normalize', normalize), ('cached', True))),), clip)
  tx = steps.optimizer(phase.schedule, 1e-4, 0.9, clip)

  @jax.jit
  def step(state, images, g_teacher):
    batch = {'image': images, 'label': jnp.zeros(len(images), jnp.int32),
             'teacher_fsp': g_teacher}
    state, metrics, out = steps.train_step(state, batch, None, student=model, teacher=None,
                                           phase=phase, tx=tx, axis_name=None)
    return (state, metrics['loss'], metrics['grad_norm'], fsp.fsp_matrices(out.features),
            alive(out.features))

  return tx, step


def run_pair(pair, args, source):
  teacher_name, student_name, width, size, _ = PAIRS[pair]
  batch_size = args.batch_size if size <= 64 else args.batch_size_224
  preprocess = data.Preprocess(size, 'none')
  batches = data.train_batches(source, preprocess, batch_size, seed=0, process_index=0,
                               process_count=1)
  images = [jnp.asarray(next(batches)['image']) for _ in range(args.batches)]
  kind, teacher = teacher_fn(pair, args)
  t_features, _ = teacher(images[0])
  targets = [teacher(x)[1] for x in images]
  g_teacher = targets[0]
  student = models.get(student_name, 10, width)
  init = student.init(jax.random.key(0), images[0][:1], train=False)
  (_, s_features), _ = student.apply(init, images[0], train=True, mutable=['batch_stats'])
  g_student = fsp.fsp_matrices(s_features)
  result = {
      'pair': pair, 'teacher': teacher_name, 'student': student_name, 'width': width,
      'image_size': size, 'batch_size': batch_size, 'teacher_kind': kind,
      'teacher_feature_rms': {k: rms(v) for k, v in t_features.items()},
      'student_feature_rms': {k: rms(v) for k, v in s_features.items()},
      'matrix_shapes': [list(g.shape[1:]) for g in g_teacher],
      'teacher_matrix_rms': [rms(g) for g in g_teacher],
      'teacher_alive': float(alive(t_features)),
      'student_matrix_rms': [rms(g) for g in g_student],
      'runs': {}}
  for normalize in args.normalize.split(','):
    tx, step = student_step_fn(student, normalize, args.lr, args.scale, args.clip,
                               args.steps)
    state = steps.fresh_state(init, tx)
    start = time.time()
    trace = []
    for k in range(args.steps):
      x, target = images[k % len(images)], targets[k % len(images)]
      state, loss, grad_norm, g_s, alive_units = step(state, x, target)
      trace.append({'loss': float(loss), 'grad_norm': float(grad_norm),
                    'relative_error': relative_error(g_s, target), 'alive': float(alive_units)})
      if not np.isfinite(trace[-1]['loss']) or not np.isfinite(trace[-1]['grad_norm']):
        break
    result['runs'][normalize] = {
        'first_loss': trace[0]['loss'], 'first_grad_norm': trace[0]['grad_norm'],
        'relative_error_first': trace[0]['relative_error'],
        'relative_error_last': trace[-1]['relative_error'],
        'alive_last': trace[-1]['alive'], 'steps_done': len(trace),
        'diverged': len(trace) < args.steps or not np.isfinite(trace[-1]['relative_error']),
        'seconds': time.time() - start, 'trace': trace}
  return result


def markdown(results, args) -> str:
  num_steps, lr, scale = args.steps, args.lr, args.scale
  clip = f', clip {args.clip:g}' if args.clip else ''
  lines = ['| pair | teacher | matrices | teacher G rms | student G rms | normalize | loss@1 | '
           f'grad norm@1 | rel. error 1 -> {num_steps} (lr {lr:g}, weight {scale:g}{clip}) | '
           f'alive@{num_steps} (teacher) |',
           '|' + '---|' * 10]
  for r in results:
    shapes = ' '.join('x'.join(map(str, s)) for s in r['matrix_shapes'])
    for normalize, run in r['runs'].items():
      end = 'diverged at step %d' % run['steps_done'] if run['diverged'] else \
          f"{run['relative_error_first']:.3g} -> {run['relative_error_last']:.3g}"
      lines.append(
          f"| {r['pair']} | {r['teacher_kind']} | {shapes} | "
          f"{' '.join(f'{v:.3g}' for v in r['teacher_matrix_rms'])} | "
          f"{' '.join(f'{v:.3g}' for v in r['student_matrix_rms'])} | {normalize} | "
          f"{run['first_loss']:.3g} | {run['first_grad_norm']:.3g} | {end} | "
          f"{run['alive_last']:.2f} ({r['teacher_alive']:.2f}) |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', default=','.join(PAIRS))
  parser.add_argument('--normalize', default=','.join(losses.FSP_NORMALIZATIONS))
  parser.add_argument('--teacher26', default='', help='checkpoint of a trained ResNet-26')
  parser.add_argument('--raw_teacher', action='store_true')
  parser.add_argument('--data', default='../shared/data/cifar10')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batch_size_224', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batches', type=int, default=10, help='distinct batches, cycled')
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--scale', type=float, default=1.0, help='the loss weight (lambda)')
  parser.add_argument('--clip', type=float, default=0.0,
                      help="the loss gradient's global norm is clipped to this (0: no clipping)")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  source = sources.folder_source(args.data, 'test', max_per_class=100)
  results = []
  for pair in args.pairs.split(','):
    results.append(run_pair(pair, args, source))
    print(markdown(results[-1:], args), flush=True)
  print(markdown(results, args))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'args': vars(args), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
