"""Data sources, augmentation, host slicing, determinism and bad input."""

import itertools
import multiprocessing
import os
import struct
import threading
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from fsp_jax import data, sources

CIFAR10 = os.environ.get(
    'FSP_CIFAR10', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10'))


def write_image(path, seed, size=(12, 10)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def make_cub(root, num_images=8, num_classes=3):
  """A tiny CUB_200_2011 tree: images/, images.txt, image_class_labels.txt, ... (1-based ids)."""
  lines = {'images.txt': [], 'image_class_labels.txt': [], 'train_test_split.txt': []}
  for i in range(1, num_images + 1):
    c = (i - 1) % num_classes + 1
    rel = f'{c:03d}.Bird_{c}/img_{i}.jpg'
    write_image(os.path.join(root, 'images', rel), i, size=(20 + i, 16))
    lines['images.txt'].append(f'{i} {rel}')
    lines['image_class_labels.txt'].append(f'{i} {c}')
    lines['train_test_split.txt'].append(f'{i} {int(i % 2 == 1)}')
  lines['classes.txt'] = [f'{c} {c:03d}.Bird_{c}' for c in range(1, num_classes + 1)]
  for name, rows in lines.items():
    with open(os.path.join(root, name), 'w') as f:
      f.write('\n'.join(rows) + '\n')
  return root


def make_folder(root, per_class=3, classes=('cat', 'dog')):
  for c, name in enumerate(classes):
    for i in range(per_class):
      write_image(os.path.join(root, 'train', name, f'{i}.png'), 10 * c + i)
  return root


def _config(**kwargs):
  return ml_collections.ConfigDict(dict(dict(image_size=32, augment='cifar'), **kwargs))


@pytest.mark.parametrize('name,num_classes', [('cifar10', 10), ('cifar100', 100),
                                              ('caltech_birds2011', 200)])
def test_tfds_sources(name, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    source = sources.get_source(_config(name=name), 'train')
    assert len(source) == 12 and source.num_classes == num_classes
    preprocess = data.Preprocess(16, 'crop_flip' if name == 'caltech_birds2011' else 'cifar')
    hosts = [next(data.train_batches(source, preprocess, 8, seed=0, process_index=i,
                                     process_count=2)) for i in range(2)]
  for batch in hosts:
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['label'].min() >= 0 and batch['label'].max() < num_classes
  global_indices = data.train_indices(12, 8, seed=0, step=0)
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in hosts]),
                                [source[i][1] for i in global_indices])


def test_unprepared_tfds_names_data_dir(tmp_path):
  with pytest.raises(ValueError, match=f"'cifar10'.*data_dir='{tmp_path}'.*tfds build"):
    sources.get_source(_config(name='cifar10', data_dir=str(tmp_path)), 'train')


@pytest.fixture(scope='module')
def cifar10_test():
  if not os.path.isdir(CIFAR10):
    pytest.skip(f'real CIFAR-10 not found at {CIFAR10} (set FSP_CIFAR10 to its folder)')
  return sources.folder_source(CIFAR10, 'test')


def test_real_cifar10_slice(cifar10_test):
  assert cifar10_test.num_classes == 10 and len(cifar10_test) == 10_000
  picks = np.random.default_rng(0).choice(len(cifar10_test), 2000, replace=False)
  images, labels = zip(*(cifar10_test[i] for i in picks))
  assert set(labels) == set(range(10))
  mean = np.stack(images).reshape(-1, 3).mean(axis=0)
  np.testing.assert_allclose(mean, (126.0, 123.7, 114.8), atol=2.0)


def test_cub_layout(tmp_path):
  root = make_cub(str(tmp_path / 'CUB_200_2011'))
  train, test = sources.cub_source(root, 'train'), sources.cub_source(root, 'test')
  assert (len(train), len(test), train.num_classes) == (4, 4, 3)
  # Odd ids are training images; class c of id i is (i - 1) % 3, 0-based.
  assert [os.path.basename(p) for p in train.paths] == ['img_1.jpg', 'img_3.jpg', 'img_5.jpg',
                                                        'img_7.jpg']
  assert list(train.labels) == [0, 2, 1, 0] and list(test.labels) == [1, 0, 2, 1]
  image, label = test[0]
  assert image.shape == (22, 16, 3) and label == 1
  batch = next(data.eval_batches(test, data.Preprocess(8, 'crop_flip'), 8, 0, 1))
  assert batch['image'].shape == (8, 8, 8, 3) and list(batch['mask']) == [True] * 4 + [False] * 4


def test_cub_labels_disagree(tmp_path):
  root = make_cub(str(tmp_path / 'cub'))
  with open(os.path.join(root, 'train_test_split.txt'), 'a') as f:
    f.write('99 1\n')
  with pytest.raises(ValueError, match=r'train_test_split.txt and images.txt.*\[99\]'):
    sources.cub_source(root, 'train')


def test_cub_missing_file(tmp_path):
  root = make_cub(str(tmp_path / 'cub'))
  os.remove(os.path.join(root, 'classes.txt'))
  with pytest.raises(ValueError, match='classes.txt does not exist'):
    sources.cub_source(root, 'train')


def test_folder_source_and_bad_input(tmp_path):
  root = make_folder(str(tmp_path / 'f'))
  source = sources.get_source(_config(name='folder', root=root), 'train')
  assert len(source) == 6 and list(source.labels) == [0, 0, 0, 1, 1, 1]
  subset = sources.folder_source(root, 'train', classes=['dog'], max_per_class=2)
  assert len(subset) == 2 and subset.num_classes == 1
  with pytest.raises(ValueError, match=r'f/test does not exist'):
    sources.folder_source(root, 'test')
  with pytest.raises(ValueError, match=r"\['bird'\] not found"):
    sources.folder_source(root, 'train', classes=['bird'])
  os.makedirs(os.path.join(root, 'train', 'empty'))
  with pytest.raises(ValueError, match=r'empty holds no images'):
    sources.folder_source(root, 'train')
  with open(os.path.join(root, 'train', 'empty', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  with pytest.raises(ValueError, match=r'broken.jpg'):
    sources.folder_source(root, 'train')


def test_unknown_names():
  with pytest.raises(ValueError, match="Unknown data set 'imagenet'.*cifar10.*digits"):
    sources.get_source(_config(name='imagenet'), 'train')
  with pytest.raises(ValueError, match="augment 'autoaugment'.*cifar, crop_flip, none"):
    data.get_preprocess(_config(augment='autoaugment'))


def test_digits():
  train, test = sources.digits_source('train'), sources.digits_source('test')
  assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
  image, label = train[0]
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label < 10
  assert set(test.labels) == set(range(10))


def test_cifar_augmentation():
  image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
  draws = data.augmentation_draws(seed=0, step=0, global_batch=40)
  plain = data.Preprocess(32, 'none', (0, 0, 0), (1, 1, 1))
  np.testing.assert_array_equal(plain([image] * 40, draws), [image] * 40)
  augment = data.Preprocess(32, 'cifar', (0, 0, 0), (1, 1, 1))
  outs = augment([image] * 40, draws)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(np.float32)
  for out, (top, left, flip) in zip(outs, draws):  # Row k's window, flipped where it says.
    window = padded[int(top * 9):int(top * 9) + 32, int(left * 9):int(left * 9) + 32]
    np.testing.assert_array_equal(out, window[:, ::-1] if flip < 0.5 else window)
  assert len({(int(t * 9), int(l * 9), f < 0.5) for t, l, f in draws}) > 20  # Varied.
  np.testing.assert_array_equal(augment([image], None), [image])  # evaluation: unchanged


def test_crop_flip_crops_each_image_inside_itself():
  images = [np.random.default_rng(k).integers(0, 256, (20 + 5 * k, 16, 3), np.uint8)
            for k in range(4)]
  crop = data.Preprocess(8, 'crop_flip', (0, 0, 0), (1, 1, 1))
  out = crop(images, np.array([[0.0, 0.0, 0.9], [0.999, 0.999, 0.9], [0.5, 0.5, 0.1]] * 2)[:4])
  assert out.shape == (4, 8, 8, 3)
  shorter = data._resize_shorter(images[1], 9)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out[1], shorter[-8:, -8:])  # The last window, not flipped.
  first = data._resize_shorter(images[0], 9)  # pylint: disable=protected-access
  top, left = (first.shape[0] - 8) // 2, (first.shape[1] - 8) // 2
  np.testing.assert_array_equal(crop(images, None)[0], first[top:top + 8, left:left + 8])


def test_hosts_read_disjoint_slices_that_cover_the_split():
  source = sources.ArraySource(np.zeros((10, 4, 4, 3), np.uint8), np.arange(10), 10)
  preprocess = data.Preprocess(4, 'none')
  seen = []
  for host in range(2):
    for batch in data.eval_batches(source, preprocess, 4, host, 2):
      seen += list(batch['label'][batch['mask']])
  assert sorted(seen) == list(range(10)) and len(seen) == 10
  train = [next(data.train_batches(source, preprocess, 4, 0, 0, host, 2))['label']
           for host in range(2)]
  assert not set(train[0]) & set(train[1])
  epoch = np.concatenate([data.train_indices(10, 4, 0, step) for step in range(2)])
  assert len(set(epoch)) == 8


@pytest.mark.parametrize('augment', ['cifar', 'crop_flip'])
def test_each_hosts_part_is_its_rows_of_the_global_batch_augmented_alike(augment):
  """Four hosts' parts of a step, images and labels, put together are the one-host batch:
  each example keeps its position's row of the step's draws. Mutation: every host taking the
  first rows of the draws (a host-local draw) gives other crops on hosts 1..3."""
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.integers(0, 256, (64, 12, 12, 3), np.uint8),
                               rng.integers(0, 10, 64), 10)
  preprocess = data.Preprocess(8, augment)
  for step in (0, 5):
    whole = next(data.train_batches(source, preprocess, 16, 7, step, 0, 1))
    parts = [next(data.train_batches(source, preprocess, 16, 7, step, host, 4))
             for host in range(4)]
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_same_seed_same_batches_and_resume():
  source = sources.digits_source('train')
  preprocess = data.Preprocess(32, 'cifar')
  first = data.train_batches(source, preprocess, 16, seed=3)
  uninterrupted = [next(first) for _ in range(5)]
  again = data.train_batches(source, preprocess, 16, seed=3)
  np.testing.assert_array_equal(next(again)['image'], uninterrupted[0]['image'])
  resumed = next(data.train_batches(source, preprocess, 16, seed=3, start_step=4))
  np.testing.assert_array_equal(resumed['image'], uninterrupted[4]['image'])
  np.testing.assert_array_equal(resumed['label'], uninterrupted[4]['label'])
  other = next(data.train_batches(source, preprocess, 16, seed=4))
  assert not np.array_equal(other['label'], uninterrupted[0]['label'])


def test_shard_and_batch_errors():
  batch = {'image': np.zeros((8, 2, 2, 3)), 'label': np.zeros(8)}
  assert data.shard(batch, 4)['image'].shape == (4, 2, 2, 2, 3)
  with pytest.raises(ValueError, match='6 examples.*4 local devices'):
    data.shard({'label': np.zeros(6)}, 4)
  with pytest.raises(ValueError, match='global batch size 6.*number of hosts 4'):
    data.host_slice(6, 0, 4)
  with pytest.raises(ValueError, match='batch size 64 exceeds the 10'):
    data.train_indices(10, 64, 0, 0)


def _grain_threads_end():
  """Every reading thread ends within seconds (a closed stream's finish their last batch)."""
  for thread in threading.enumerate():
    if thread.name.startswith('grain'):
      thread.join(timeout=5)
  assert not [t for t in threading.enumerate() if t.name.startswith('grain')]


def test_worker_processes_give_the_same_batches_and_end_with_the_stream():
  source = sources.digits_source('train')
  preprocess = data.Preprocess(16, 'cifar')
  threads = data.train_batches(source, preprocess, 8, seed=1, start_step=2, num_steps=5)
  workers = data.train_batches(source, preprocess, 8, seed=1, start_step=2, num_steps=5,
                               workers=2)
  for ours, theirs in itertools.zip_longest(threads, workers):
    np.testing.assert_array_equal(ours['image'], theirs['image'])
    np.testing.assert_array_equal(ours['index'], theirs['index'])
  assert multiprocessing.active_children() == []
  _grain_threads_end()


def test_reading_threads_end_when_the_consumer_stops():
  """A phase stops reading an endless batch stream: its threads must not stay behind."""
  _grain_threads_end()
  batches = data.train_batches(sources.digits_source('train'), data.Preprocess(16, 'none'), 8, 0)
  next(batches)
  assert any(t.name.startswith('grain') for t in threading.enumerate())
  batches.close()
  _grain_threads_end()


def test_broken_example_raises_in_the_consumer(tmp_path):
  root = make_folder(str(tmp_path / 'f'))
  source = sources.folder_source(root, 'train')
  os.remove(source.paths[0])
  with pytest.raises(Exception, match=os.path.basename(source.paths[0])):
    list(data.eval_batches(source, data.Preprocess(8, 'none'), 6, 0, 1))


def _png16(array: np.ndarray, color_type: int) -> bytes:
  """A PNG of bit depth 16, encoded by hand (Pillow writes none): array uint16 [H, W] (grey,
  color_type 0) or [H, W, C] (2: RGB, 4: grey + alpha, 6: RGBA)."""
  import struct, zlib  # pylint: disable=g-import-not-at-top,multiple-imports
  rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in array)
  chunk = lambda kind, body: (struct.pack('>I', len(body)) + kind + body +
                              struct.pack('>I', zlib.crc32(kind + body)))
  header = struct.pack('>IIBBBBB', array.shape[1], array.shape[0], 16, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) +
          chunk(b'IEND', b''))


@pytest.mark.parametrize('color_type,channels', [(0, None), (2, 3), (4, 2), (6, 4)])
def test_16_bit_pngs_are_scaled_by_value_not_clipped(tmp_path, color_type, channels):
  """A 16-bit grey PNG used to read as all 255 (Pillow's convert clips 'I;16')."""
  grey = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535.
  array = grey if channels is None else np.stack([grey] * channels, -1)
  path = tmp_path / 'sixteen.png'
  path.write_bytes(_png16(array, color_type))
  image, _ = sources.FileSource([str(path)], [0], ['a'])[0]
  assert image.dtype == np.uint8 and image.shape == (4, 4, 3)
  np.testing.assert_array_equal(image[..., 0], np.round(grey / 257).astype(np.uint8))
  assert len(np.unique(image)) == 16


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'RGB', 'RGBA', 'I;16'])
def test_every_png_mode_reads_as_its_values(tmp_path, mode):
  grey = np.linspace(0, 255, 16).round().astype(np.uint8).reshape(4, 4)
  if mode == '1':
    image, expected = Image.fromarray(grey > 127), np.where(grey > 127, 255, 0)
  elif mode == 'I;16':
    image, expected = Image.fromarray(grey.astype(np.uint16) * 257), grey
  else:
    image, expected = Image.fromarray(grey).convert(mode), grey
  image.save(tmp_path / 'x.png')
  read, _ = sources.FileSource([str(tmp_path / 'x.png')], [0], ['a'])[0]
  np.testing.assert_array_equal(read, np.repeat(expected[..., None], 3, -1))


def _png_rgb16(path, rgb: np.ndarray) -> None:
  """A 16-bit-per-channel RGB PNG of rgb [H, W, 3] uint16 (Pillow cannot write one)."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack(
        '>I', zlib.crc32(kind + body))
  height, width, _ = rgb.shape
  rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in rgb)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 2,
                                                                   0, 0, 0)) +
            chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def test_a_16_bit_colour_png_reads_as_its_values_scaled(tmp_path):
  values = np.arange(4 * 4 * 3, dtype=np.uint16).reshape(4, 4, 3) * 5
  _png_rgb16(tmp_path / 'x.png', values * 257)
  read, _ = sources.FileSource([str(tmp_path / 'x.png')], [0], ['a'])[0]
  np.testing.assert_array_equal(read, values)


@pytest.mark.parametrize('mode,white', [('L', 255), ('RGB', (255,) * 3), ('CMYK', (0,) * 4)])
def test_every_jpeg_mode_reads_as_rgb(tmp_path, mode, white):
  Image.new(mode, (8, 8), white).save(tmp_path / 'x.jpg', quality=95)
  read, _ = sources.FileSource([str(tmp_path / 'x.jpg')], [0], ['a'])[0]
  assert read.shape == (8, 8, 3) and read.min() >= 250


def test_jpeg_with_bytes_after_its_end_is_read_and_a_cut_one_refused(tmp_path):
  write_image(str(tmp_path / 'a.jpg'), 0, size=(16, 16))
  whole = (tmp_path / 'a.jpg').read_bytes()
  (tmp_path / 'tail.jpg').write_bytes(whole + b'EXTRA DATA AFTER THE END MARKER')
  (tmp_path / 'cut.jpg').write_bytes(whole[:-40])
  read, _ = sources.FileSource([str(tmp_path / 'tail.jpg')], [0], ['a'])[0]
  assert read.shape == (16, 16, 3)
  with pytest.raises(ValueError, match=r'cut.jpg is truncated'):
    sources.FileSource([str(tmp_path / 'cut.jpg')], [0], ['a'])


def test_corrupt_png_and_huge_image_are_refused_naming_the_file(tmp_path, monkeypatch):
  write_image(str(tmp_path / 'a.png'), 0, size=(16, 16))
  data_bytes = bytearray((tmp_path / 'a.png').read_bytes())
  data_bytes[60] ^= 0xFF  # Inside IDAT: its checksum no longer matches, header and end intact.
  (tmp_path / 'bad.png').write_bytes(bytes(data_bytes))
  with pytest.raises(ValueError, match=r'Not a readable image file: .*bad.png'):
    sources.FileSource([str(tmp_path / 'bad.png')], [0], ['a'])
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 16 x 16 is over twice this.
  with pytest.raises(ValueError, match=r'a.png is too large to decode'):
    sources.FileSource([str(tmp_path / 'a.png')], [0], ['a'])


def test_files_the_folder_reader_skips_are_named(tmp_path, capsys):
  root = make_folder(str(tmp_path / 'f'))
  for name in ('x.webp', 'notes.txt'):
    (tmp_path / 'f' / 'train' / 'dog' / name).write_bytes(b'?')
  assert len(sources.folder_source(root, 'train')) == 6
  out = capsys.readouterr().out
  assert 'skipped 2 files that are not .jpg/.jpeg/.png images' in out and 'x.webp' in out


@pytest.mark.parametrize('edit,pattern', [
    (('train_test_split.txt', '1 1', '1 train'), r"image ids \[1\] are marked 'train'; expected 1 "
                                                 r'\(train\) or 0 \(test\)'),
    (('images.txt', '2 ', '1 '), r'images.txt, line 2: id 1 is listed twice'),
    (('classes.txt', '3 003.Bird_3', '3 003.Bird_3\n4 004.Bird_4'),
     r'lists classes \[4\] that no image has'),
])
def test_cub_files_that_would_mislead_are_refused_naming_the_file(tmp_path, edit, pattern):
  root = make_cub(str(tmp_path / 'cub'))
  name, old, new = edit
  path = os.path.join(root, name)
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text.replace(old, new, 1))
  with pytest.raises(ValueError, match=pattern):
    sources.cub_source(root, 'train')


def test_a_split_says_what_it_holds_and_how_it_is_taken(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((28, 28), 10 * i, np.uint8)).save(tmp_path / f'{i}.png')
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / 'c.jpg')
  source = sources.FileSource([str(tmp_path / f) for f in ('0.png', '1.png', '2.png', 'c.jpg')],
                              [0, 0, 1, 1], ['a', 'b'])
  assert sources.describe(source) == ('4 images of 2 classes: 3 grey (as RGB) PNGs of 28x28, '
                                      '1 RGB JPEG of 30x20')
  preprocess = data.get_preprocess(_config(image_size=32, augment='crop_flip'))
  assert preprocess.describe().startswith('the shorter side resized to 37, cropped to 32x32')
  assert preprocess.describe().endswith("normalised with CIFAR-10's statistics")
