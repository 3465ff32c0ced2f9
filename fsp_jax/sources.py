"""Data sources: random access to labelled images.

A *source* has `len(source)`, `source[i] -> (image uint8 [H, W, 3], label)`,
`source.num_classes` and `source.class_names` (label k's name, or None where unknown): TFDS data sets through `tfds.data_source`, ImageFolder trees, the
CUB_200_2011 archive, and scikit-learn's digits. File sources check every file when built, so
a bad file fails before anything is compiled.
"""

import collections
import hashlib
import os
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image

from fsp_jax import logs

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
TFDS_CLASSES = {'cifar10': 10, 'cifar100': 100, 'caltech_birds2011': 200}
SOURCES = tuple(TFDS_CLASSES) + ('folder', 'cub', 'digits')


# Modes of more than 8 bits per value that Pillow's convert('RGB') clips at 255 (a 16-bit
# grey PNG opens as 'I;16', or 'I' in older Pillows): scaled to 8 bits by value instead.
_WIDE_GREY = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def to_rgb8(image: Image.Image) -> np.ndarray:
  """An image of any mode Pillow opens from a PNG or JPEG as uint8 [H, W, 3]: 16-bit grey
  scaled by value (v / 257: 65535 -> 255); palette, bilevel, grey, alpha and CMYK images
  converted by Pillow (alpha dropped; 16-bit colour PNGs open at 8 bits already)."""
  if image.mode in _WIDE_GREY:
    values = np.asarray(image).astype(np.float64)
    grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(image.convert('RGB'))


def _decode(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return to_rgb8(image)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'Cannot decode image file {path}: {e}') from e


# How a complete file of each format ends: a file cut short (an interrupted copy) has a good
# header but not this ending.
_ENDINGS = {'JPEG': (b'\xff\xd9',), 'PNG': (b'IEND\xaeB`\x82',)}


def _check_file(path: str) -> tuple[str, str, tuple[int, int]]:
  """Checks an image file's header, its size, that it is complete and (PNG) its chunks'
  checksums, without decoding its pixels; a file whose ending is not its format's is decoded
  whole (JPEGs may carry bytes after their end marker). Returns its (format, mode, (W, H))."""
  try:
    with Image.open(path) as image:
      image_format, kind = image.format, (image.format, image.mode, image.size)
      image.verify()  # PNG: every chunk's CRC; other formats: little.
    with open(path, 'rb') as f:
      f.seek(max(0, os.path.getsize(path) - 64))
      tail = f.read().rstrip(b'\x00\r\n ')
  except Image.DecompressionBombError as e:
    raise ValueError(f'Image file {path} is too large to decode: {e}') from None
  except (OSError, ValueError, SyntaxError) as e:  # verify() raises SyntaxError on bad chunks.
    raise ValueError(f'Not a readable image file: {path} ({e}).') from None
  endings = _ENDINGS.get(image_format)
  if endings and not tail.endswith(endings):
    try:
      with Image.open(path) as image:
        image.load()
    except (OSError, ValueError) as e:
      raise ValueError(f'Image file {path} is truncated: a {image_format} file must end with '
                       f'{endings[0]!r} and it does not decode ({e}; an interrupted copy or '
                       'download?).') from None
  return kind


class FileSource:
  """Images on disk, decoded when read: paths [N] and integer labels [N] of named classes."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str]):
    self.paths, self.labels = list(paths), np.asarray(labels)
    self.class_names, self.num_classes = tuple(class_names), len(class_names)
    # Headers and endings: a bad file fails now, not mid-training. {(format, mode, (W, H)): n}
    self.kinds = collections.Counter(_check_file(path) for path in self.paths)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return _decode(self.paths[i]), int(self.labels[i])


class ArraySource:
  """Images held in memory: images [N, H, W, 3] uint8, labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
               class_names: Sequence[str] | None = None):
    self.images, self.labels, self.num_classes = images, np.asarray(labels), num_classes
    self.class_names = None if class_names is None else tuple(class_names)

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
    self.num_classes, self.class_names = TFDS_CLASSES[name], None

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    record = self.records[int(i)]
    image = np.asarray(record['image'])
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return image, int(record['label'])


# How each mode of a file reaches the networks (`to_rgb8`).
_MODES = {'RGB': 'RGB', 'L': 'grey (as RGB)', '1': 'black-and-white (as RGB)',
          'P': 'palette (as RGB)', 'RGBA': 'RGBA (alpha dropped)', 'LA': 'grey + alpha (as RGB)',
          'CMYK': 'CMYK (converted to RGB)', 'I;16': '16-bit grey (scaled to 8 bits, as RGB)',
          'I': '16-bit grey (scaled to 8 bits, as RGB)'}


def describe(source) -> str:
  """What a split holds, in words: '2,903 images of 100 classes: 2,903 RGB JPEGs of 227x227'."""
  head = f'{len(source):,} images of {source.num_classes} classes'
  if isinstance(source, FileSource):
    groups = collections.Counter()
    sizes = collections.defaultdict(set)
    for (fmt, mode, size), n in source.kinds.items():
      groups[fmt, mode] += n
      sizes[fmt, mode].add(size)
    parts = []
    for (fmt, mode), n in groups.most_common():
      found = sorted(sizes[fmt, mode], key=lambda s: s[0] * s[1])
      shape = (f'{found[0][0]}x{found[0][1]}' if len(found) == 1 else
               f'{len(found)} sizes from {found[0][0]}x{found[0][1]} to '
               f'{found[-1][0]}x{found[-1][1]}')
      parts.append(f'{n:,} {_MODES.get(mode, mode)} {fmt}{"s" if n != 1 else ""} of {shape}')
    return f'{head}: {", ".join(parts)}'
  if isinstance(source, ArraySource):
    return f'{head}, in memory, {source.images.shape[2]}x{source.images.shape[1]}'
  return f'{head}, TFDS records'


def fingerprint(source) -> dict:
  """What identifies a split: {'examples', 'classes', 'digest'}, the digest a SHA-256 of every
  example's file (relative to the split's common folder) and size, or its pixels, and its label,
  in order. A TFDS split is identified by its size alone."""
  digest = hashlib.sha256()
  if isinstance(source, FileSource):
    common = os.path.commonpath(source.paths) if len(source.paths) > 1 else ''
    for path, label in zip(source.paths, source.labels):
      digest.update(f'{os.path.relpath(path, common or os.path.dirname(path))}\t'
                    f'{os.path.getsize(path)}\t{label}\n'.encode())
  elif isinstance(source, ArraySource):
    digest.update(np.ascontiguousarray(source.images).tobytes())
    digest.update(np.asarray(source.labels, np.int64).tobytes())
  return {'examples': len(source), 'classes': source.num_classes,
          'digest': digest.hexdigest() if not isinstance(source, TfdsSource) else None}


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
  paths, labels, skipped = [], [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    names = sorted(os.listdir(class_dir))
    files = [f for f in names if f.lower().endswith(IMAGE_SUFFIXES)]
    skipped += [os.path.join(class_dir, f) for f in names if f not in files]
    if not files:
      raise ValueError(f'Class folder {class_dir} holds no images ({", ".join(IMAGE_SUFFIXES)}).')
    files = files[:max_per_class]
    paths += [os.path.join(class_dir, f) for f in files]
    labels += [label] * len(files)
  if skipped:
    logs.say(f'{split_dir}: skipped {len(skipped)} files that are not '
             f'{"/".join(IMAGE_SUFFIXES)} images (for example {", ".join(skipped[:3])}).')
  return FileSource(paths, labels, classes)


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
        if int(key) in table:
          raise ValueError(f'{path}, line {number}: id {key} is listed twice; expected each id '
                           'once.')
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
  odd = sorted(i for i, v in is_train.items() if v.strip() not in ('0', '1'))[:5]
  if odd:
    raise ValueError(f'{os.path.join(root, "train_test_split.txt")}: image ids {odd} are marked '
                     f'{is_train[odd[0]].strip()!r}; expected 1 (train) or 0 (test).')
  empty = sorted(set(classes) - {int(c) for c in labels.values()})[:5]
  if empty:
    raise ValueError(f'{os.path.join(root, "classes.txt")} lists classes {empty} that no image '
                     'has (image_class_labels.txt); each would be an output class never seen.')
  keep = sorted(i for i in images if (is_train[i].strip() == '1') == (split == 'train'))
  class_ids = sorted(classes)
  index = {c: k for k, c in enumerate(class_ids)}
  return FileSource([os.path.join(root, 'images', images[i]) for i in keep],
                    [index[int(labels[i])] for i in keep], [classes[c] for c in class_ids])


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
  return ArraySource(np.repeat(images[..., None], 3, axis=-1), digits.target[order], 10,
                     [str(d) for d in range(10)])


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
