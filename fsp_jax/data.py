"""Input pipelines: data sources, the paper's augmentation, host sharding and prefetching.

A *source* is random access: `len(source)`, `source[i] -> (image uint8 [H, W, 3], label)`,
`source.num_classes`. Batches are a pure function of (seed, step), so a run that resumes at
step s sees exactly the batches an uninterrupted run sees, and the pipeline's whole state is
the step stored in the checkpoint. Each host reads only its own part of every global batch.
"""

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
TFDS_CLASSES = {'cifar10': 10, 'cifar100': 100, 'caltech_birds2011': 200}
SOURCES = tuple(TFDS_CLASSES) + ('folder', 'cub', 'digits')
AUGMENTATIONS = ('cifar', 'crop_flip', 'none')
# Per-channel mean and standard deviation of the pixels, in [0, 255].
CIFAR_STATS = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
IMAGENET_STATS = ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))


def _decode(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot decode image file {path}: {e}') from e


# How a complete file of each format ends: a file cut short (an interrupted copy) has a good
# header but not this ending.
_ENDINGS = {'JPEG': (b'\xff\xd9',), 'PNG': (b'IEND\xaeB`\x82',)}


def _check_file(path: str) -> None:
  """Checks an image file's header and that it is complete, without decoding its pixels."""
  try:
    with Image.open(path) as image:
      image_format = image.format
    with open(path, 'rb') as f:
      f.seek(max(0, os.path.getsize(path) - 64))
      tail = f.read().rstrip(b'\x00\r\n ')
  except (OSError, ValueError) as e:
    raise ValueError(f'Not a readable image file: {path} ({e}).') from e
  endings = _ENDINGS.get(image_format)
  if endings and not tail.endswith(endings):
    raise ValueError(f'Image file {path} is truncated: a {image_format} file must end with '
                     f'{endings[0]!r} (an interrupted copy or download?).')


class FileSource:
  """Images on disk, decoded when read: paths [N] and integer labels [N]."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], num_classes: int):
    self.paths, self.labels, self.num_classes = list(paths), np.asarray(labels), num_classes
    for path in self.paths:  # Headers and endings: a bad file fails now, not mid-training.
      _check_file(path)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return _decode(self.paths[i]), int(self.labels[i])


class ArraySource:
  """Images held in memory: images [N, H, W, 3] uint8, labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    self.images, self.labels, self.num_classes = images, np.asarray(labels), num_classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return self.images[i], int(self.labels[i])


class TfdsSource:
  """A TFDS data set through `tfds.data_source` (random access, no TensorFlow at run time)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self.records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several kinds for a missing or unprepared data set.
      raise ValueError(
          f'TFDS data set {name!r} (split {split!r}) is not prepared in data_dir={data_dir!r}. '
          f'Prepare it with `tfds build {name} --file_format=array_record` or point '
          f'config.data.data_dir at it. TFDS said: {e}') from e
    self.num_classes = TFDS_CLASSES[name]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    record = self.records[int(i)]
    image = np.asarray(record['image'])
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return image, int(record['label'])


def folder_source(root: str, split: str, classes: Sequence[str] | None = None,
                  max_per_class: int | None = None) -> FileSource:
  """The ImageFolder layout root/<split>/<class>/*.jpg|png; classes sorted by name.

  Args:
    classes: keep only these class folders (in this order); all of them by default.
    max_per_class: keep the first images of each class (sorted by file name).
  """
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise ValueError(f'Data folder {split_dir} does not exist; expected root/<split>/<class>/*.jpg '
                     f'with root={root!r}, split={split!r}.')
  found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  if classes is None:
    classes = found
  unknown = sorted(set(classes) - set(found))
  if not classes or unknown:
    raise ValueError(f'Class folders {unknown or "(none)"} not found in {split_dir}; '
                     f'it has {found}.')
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise ValueError(f'Class folder {class_dir} holds no images ({", ".join(IMAGE_SUFFIXES)}).')
    files = files[:max_per_class]
    paths += [os.path.join(class_dir, f) for f in files]
    labels += [label] * len(files)
  return FileSource(paths, labels, len(classes))


def _read_table(path: str) -> dict[int, str]:
  if not os.path.isfile(path):
    raise ValueError(f'CUB file {path} does not exist; expected the CUB_200_2011 archive layout.')
  table = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        key, _, value = line.strip().partition(' ')
        if not key.isdigit() or not value:
          raise ValueError(f'{path}, line {number}: expected "<id> <value>", got {line.strip()!r}.')
        table[int(key)] = value
  return table


def cub_source(root: str, split: str) -> FileSource:
  """The original CUB_200_2011 layout: images/, images.txt, image_class_labels.txt,
  train_test_split.txt (1 = train), classes.txt. Labels are 0-based."""
  if split not in ('train', 'test'):
    raise ValueError(f'CUB split must be "train" or "test", got {split!r}.')
  images = _read_table(os.path.join(root, 'images.txt'))
  labels = _read_table(os.path.join(root, 'image_class_labels.txt'))
  is_train = _read_table(os.path.join(root, 'train_test_split.txt'))
  classes = _read_table(os.path.join(root, 'classes.txt'))
  for name, table in (('image_class_labels.txt', labels), ('train_test_split.txt', is_train)):
    if set(table) != set(images):
      diff = sorted(set(table) ^ set(images))[:5]
      raise ValueError(f'{os.path.join(root, name)} and images.txt list different image ids '
                       f'(for example {diff}).')
  bad = sorted(i for i, c in labels.items() if not c.isdigit() or int(c) not in classes)[:5]
  if bad:
    raise ValueError(f'image_class_labels.txt gives image ids {bad} a class not in classes.txt.')
  keep = sorted(i for i in images if (is_train[i].strip() == '1') == (split == 'train'))
  class_ids = sorted(classes)
  index = {c: k for k, c in enumerate(class_ids)}
  return FileSource([os.path.join(root, 'images', images[i]) for i in keep],
                    [index[int(labels[i])] for i in keep], len(class_ids))


def digits_source(split: str, size: int = 32) -> ArraySource:
  """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to size x size RGB.

  A fixed 80/20 split (seed 0): 1,437 train and 360 test images, 10 classes.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  if split not in ('train', 'test'):
    raise ValueError(f'digits split must be "train" or "test", got {split!r}.')
  if size % 8:
    raise ValueError(f'digits image_size must be a multiple of 8, got {size}.')
  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  cut = int(0.8 * len(order))
  order = order[:cut] if split == 'train' else order[cut:]
  images = (digits.images[order] * (255.0 / 16.0)).round().astype(np.uint8)
  images = images.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
  return ArraySource(np.repeat(images[..., None], 3, axis=-1), digits.target[order], 10)


def get_source(config: ml_collections.ConfigDict, split: str):
  """The source named by config.name: a TFDS name, 'folder', 'cub' or 'digits'."""
  if config.name in TFDS_CLASSES:
    return TfdsSource(config.name, split, config.get('data_dir'))
  if config.name == 'folder':
    few_shot = config.get('max_per_class') if split == config.get('train_split', 'train') else None
    return folder_source(config.root, split, config.get('classes'), few_shot)
  if config.name == 'cub':
    return cub_source(config.root, split)
  if config.name == 'digits':
    return digits_source(split, config.image_size)
  raise ValueError(f'Unknown data set {config.name!r}; expected one of {", ".join(SOURCES)}.')


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Per-example preprocessing: image uint8 [H, W, 3] -> float32 [size, size, 3].

  augment='cifar': pad 4 and random size x size crop, random horizontal flip (the paper);
  'crop_flip': resize the shorter side to size * 8/7, random crop, flip (CUB; eval: centre
  crop); 'none': no augmentation. Always normalised per channel with mean and std.
  """
  image_size: int
  augment: str = 'cifar'
  mean: tuple[float, float, float] = CIFAR_STATS[0]
  std: tuple[float, float, float] = CIFAR_STATS[1]

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    size = self.image_size
    if self.augment == 'crop_flip':
      image = _resize_shorter(image, round(size * 8 / 7))
      if rng is None:
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
      else:
        top = rng.integers(image.shape[0] - size + 1)
        left = rng.integers(image.shape[1] - size + 1)
      image = image[top:top + size, left:left + size]
    else:
      if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
      if self.augment == 'cifar' and rng is not None:
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        top, left = rng.integers(9, size=2)
        image = padded[top:top + size, left:left + size]
    if rng is not None and self.augment != 'none' and rng.random() < 0.5:
      image = image[:, ::-1]
    return (image.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)


def _resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
  height, width = image.shape[:2]
  scale = shorter / min(height, width)
  new = (max(shorter, round(width * scale)), max(shorter, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


def get_preprocess(config: ml_collections.ConfigDict) -> Preprocess:
  if config.augment not in AUGMENTATIONS:
    raise ValueError(f'Unknown config.data.augment {config.augment!r}; '
                     f'expected one of {", ".join(AUGMENTATIONS)}.')
  stats = IMAGENET_STATS if config.get('normalize') == 'imagenet' else CIFAR_STATS
  return Preprocess(config.image_size, config.augment, *stats)


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  """The part of every global batch that host process_index reads."""
  if global_batch % process_count:
    raise ValueError(f'The global batch size {global_batch} must be divisible by the number of '
                     f'hosts {process_count}.')
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Example indices [global_batch] of a training step: epochs of fresh permutations."""
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'The batch size {global_batch} exceeds the {num_examples} training examples.')
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * global_batch:(position + 1) * global_batch]


# Decoding (PIL) and NumPy release the GIL: threads read and preprocess examples in parallel.
_POOL = concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1))


def _load(source, indices, preprocess, rngs):
  """Reads and preprocesses examples in parallel threads: {'image': [n, S, S, 3], 'label': [n]}."""
  def one(i, rng):
    image, label = source[i]
    return preprocess(image, rng), label
  examples = list(_POOL.map(one, indices, rngs))
  return {'image': np.stack([e[0] for e in examples]),
          'label': np.asarray([e[1] for e in examples], np.int32)}


def train_batches(source, preprocess: Preprocess, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """Endless host-local training batches from start_step on.

  Yields {'image': [global_batch / hosts, S, S, 3] float32, 'label': [...] int32, 'index':
  [...] the examples' positions in source}. Batch s is the same whatever start_step was;
  augmentation is seeded per (seed, step, position).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  part = host_slice(global_batch, process_index, process_count)
  step = start_step
  while True:
    indices = train_indices(len(source), global_batch, seed, step)[part]
    rngs = [np.random.default_rng([seed, step, p]) for p in range(part.start, part.stop)]
    yield {**_load(source, indices, preprocess, rngs), 'index': indices}
    step += 1


def eval_batches(source, preprocess: Preprocess, global_batch: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """One pass over the split in order, padded to whole batches.

  Yields {'image', 'label', 'mask' [n] bool}: padding examples have mask False.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  part = host_slice(global_batch, process_index, process_count)
  for start in range(0, len(source), global_batch):
    positions = np.arange(start, start + global_batch)[part]
    mask = positions < len(source)
    batch = _load(source, np.where(mask, positions, 0), preprocess, [None] * len(positions))
    batch['mask'] = mask
    yield batch


def shard(batch: dict, num_devices: int) -> dict:
  """Reshapes every array [n, ...] to [num_devices, n / num_devices, ...] for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'A host batch of {x.shape[0]} examples cannot be split evenly over '
                       f'{num_devices} local devices; make the batch size a multiple of it.')
    return x.reshape((num_devices, -1) + x.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs iterator in a background thread, keeping up to size items ready."""
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except Exception as e:  # pylint: disable=broad-except
      items.put(e)
    items.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while (item := items.get()) is not done:
    if isinstance(item, Exception):
      raise item
    yield item
