"""Datasets by name: tfds (mocked and really prepared), ImageFolder, errors."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from effnetv2_jax import data
from effnetv2_jax.data import preprocess
from effnetv2_jax.data import sources

SINGLE = dict(process_index=0, process_count=1)
MOCK_EXAMPLES = 10

TFDS_CASES = {  # name: (classes, train examples given MOCK_EXAMPLES per split)
    'imagenet2012': (1000, MOCK_EXAMPLES - 1),  # minus a 1-example minival
    'imagenet2012_trainval': (1000, MOCK_EXAMPLES),
    'cifar10': (10, MOCK_EXAMPLES),
    'cifar100': (100, MOCK_EXAMPLES),
    'oxford_flowers102': (102, 2 * MOCK_EXAMPLES),  # train + validation
    'cars196': (196, MOCK_EXAMPLES),
    'imagenette': (10, MOCK_EXAMPLES),
}


def _pixel_ids(images, normalization='ft'):
  """Recovers the constant value each identity image was made of."""
  assert normalization == 'ft'
  centre = images[:, images.shape[1] // 2, images.shape[2] // 2, 0]
  return np.round((np.asarray(centre) * 0.5 + 0.5) * 255).astype(int)


@pytest.mark.parametrize('name', sorted(TFDS_CASES))
def test_mock_tfds_dataset(name):
  classes, train_size = TFDS_CASES[name]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    info = data.dataset_info(name)
    assert info.num_classes == classes
    assert info.num_train_examples == train_size
    assert info.num_eval_examples == MOCK_EXAMPLES
    train = data.make_train_iterator(name, global_batch_size=4, image_size=20,
                                     seed=0, augment='none', **SINGLE)
    batch = next(train)
    train.close()
    assert batch['image'].shape == (4, 20, 20, 3)
    assert batch['label'].shape == (4, classes)
    np.testing.assert_array_equal(batch['label'].sum(1), 1.0)
    evaluation = data.make_eval_iterator(name, global_batch_size=4,
                                         image_size=20,
                                         normalization='inception', **SINGLE)
    masks = [b['mask'] for b in evaluation]
  assert len(evaluation) == 3 and len(masks) == 3
  assert sum(m.sum() for m in masks) == MOCK_EXAMPLES


def test_imagenet_minival_matches_tfds_percent_split():
  num_train = 1_281_167
  held = sources._imagenet_minival_size(num_train)  # pylint: disable=protected-access
  split_info = tfds.core.SplitInfo(name='train', shard_lengths=[num_train],
                                   num_bytes=0)
  absolute = tfds.core.ReadInstruction.from_spec('train[:98%]').to_absolute(
      {'train': split_info})
  assert num_train - held == absolute[0].to == 1_255_544
  assert held == 25_623
  segments = sources._logical_segments(  # pylint: disable=protected-access
      'imagenet2012', {'train': num_train, 'validation': 50_000})
  assert segments['train'] == [('train', 0, 1_255_544)]
  assert segments['minival'] == [('train', 1_255_544, num_train)]
  trainval = sources._logical_segments(  # pylint: disable=protected-access
      'imagenet2012_trainval', {'train': num_train, 'validation': 50_000})
  assert trainval['train'] == [('train', 0, num_train)]


def test_flowers_train_is_train_plus_validation_and_slices_cross_it():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    source = sources.get_source('oxford_flowers102', 'train')
  assert source.segments == (('train', 0, 10), ('validation', 0, 10))
  assert source.split_parts(7, 13) == [('train[7:10]', 3),
                                       ('validation[0:3]', 3)]
  assert source.split_parts(10, 20) == [('validation[0:10]', 10)]


# ------------------------------------------------- a really prepared dataset --


NUM_21K = 40


@pytest.fixture(scope='module')
def imagenet21k_dir(tmp_path_factory):
  """A tiny ImageNet-21k stand-in, prepared by tfds on disk (no mocking):
  example i is a constant image of value i with 1 or 2 labels."""
  root = str(tmp_path_factory.mktemp('i21k'))
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'labels': tfds.features.Sequence(tfds.features.ClassLabel(
          num_classes=7))})
  examples = [(i, {'image': np.full((6 + i % 3, 5, 3), i, np.uint8),
                   'labels': [i % 7] if i % 2 else [i % 7, (i + 3) % 7]})
              for i in range(NUM_21K)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='imagenet21k', version='1.0.0', features=features,
      split_datasets={'train': examples}, data_dir=root)
  return root


def test_imagenet21k_multi_hot_labels_and_holdout(imagenet21k_dir):
  info = data.dataset_info('imagenet21k', data_dir=imagenet21k_dir)
  assert info.multi_label and info.num_classes == 7
  assert (info.num_train_examples, info.num_eval_examples) == (NUM_21K - 1, 1)
  ev = data.make_eval_iterator('imagenet21k', data_dir=imagenet21k_dir,
                               global_batch_size=8, image_size=8,
                               normalization='ft', split='train', **SINGLE)
  for batch in ev:
    real = batch['mask'] == 1
    np.testing.assert_allclose(batch['label'][real].sum(1), 1.0, atol=1e-6)
    for value, label in zip(_pixel_ids(batch['image'][real]),
                            batch['label'][real]):
      expected = np.zeros(7)
      classes = [value % 7] if value % 2 else [value % 7, (value + 3) % 7]
      expected[classes] = 1.0 / len(classes)
      np.testing.assert_allclose(label, expected, atol=1e-6)


def test_real_tfds_host_slices_are_disjoint_and_each_epoch_covers_one(
    imagenet21k_dir):
  kwargs = dict(data_dir=imagenet21k_dir, image_size=8, normalization='ft')
  held_out = set(_pixel_ids(next(iter(data.make_eval_iterator(
      'imagenet21k', global_batch_size=1, **kwargs, **SINGLE)))['image']))
  slices = []
  for process in range(3):
    ev = data.make_eval_iterator('imagenet21k', split='train',
                                 global_batch_size=6, process_index=process,
                                 process_count=3, **kwargs)
    ids = np.concatenate([_pixel_ids(b['image'])[b['mask'] == 1] for b in ev])
    slices.append(set(ids.tolist()))
    assert len(ids) == len(slices[-1])
    train = data.make_train_iterator(
        'imagenet21k', global_batch_size=3, seed=0, augment='none',
        shuffle_buffer=4, process_index=process, process_count=3, **kwargs)
    stream = np.concatenate([_pixel_ids(next(train)['image'])
                             for _ in range(2 * len(ids))])
    train.close()
    assert set(stream[:len(ids)].tolist()) == slices[-1]  # one epoch
    assert set(stream[len(ids):2 * len(ids)].tolist()) == slices[-1]
  assert not (slices[0] & slices[1] or slices[0] & slices[2]
              or slices[1] & slices[2])
  assert slices[0] | slices[1] | slices[2] | held_out == set(range(NUM_21K))


def test_real_tfds_exact_resume_mid_window(imagenet21k_dir):
  kwargs = dict(data_dir=imagenet21k_dir, global_batch_size=4, image_size=10,
                seed=7, augment='none', normalization='ft', shuffle_buffer=6,
                mixup_alpha=0.3, process_index=0, process_count=1)
  reference = data.make_train_iterator('imagenet21k', **kwargs)
  expected = [next(reference) for _ in range(14)][11:]
  reference.close()
  resumed = data.make_train_iterator('imagenet21k', start_batch=11, **kwargs)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  resumed.close()


# ----------------------------------------------------------------- folders --


def _png(path, value, size=(9, 7)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / 'folder'
  value = 0
  for split, per_class in (('train', 5), ('val', 3)):
    for cls in ('zebra', 'ant', 'moth'):
      for i in range(per_class):
        value += 1
        _png(str(root / split / cls / f'{i}.png'), value)
  jpeg = io.BytesIO()
  Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(jpeg, 'JPEG')
  (root / 'train' / 'ant' / 'photo.jpg').write_bytes(jpeg.getvalue())
  # Bad inputs: random bytes with a PNG name, a PNG cut in half, a text
  # file, an empty file, random bytes behind a PNG signature, a scrambled JPEG.
  noise = lambda seed, n: np.random.RandomState(seed).bytes(n)
  (root / 'train' / 'ant' / 'broken.png').write_bytes(noise(1, 300))
  good = (root / 'train' / 'ant' / '0.png').read_bytes()
  (root / 'train' / 'zebra' / 'truncated.png').write_bytes(good[:len(good) // 2])
  (root / 'train' / 'moth' / 'notes.txt').write_text('not an image')
  (root / 'val' / 'moth' / 'empty.jpg').write_bytes(b'')
  (root / 'val' / 'zebra' / 'garbage.png').write_bytes(
      b'\x89PNG\r\n\x1a\n' + noise(2, 64))
  # A JPEG whose headers are intact but whose compressed data is noise.
  # Seeded: libjpeg only warns about some noise, and PIL then loads ~9% of
  # random scans (the pipeline drops those when TF fails to decode them).
  start_of_scan = jpeg.getvalue().index(b'\xff\xda')
  (root / 'train' / 'moth' / 'scrambled.jpg').write_bytes(
      jpeg.getvalue()[:start_of_scan + 20] + noise(0, 2000))
  return str(root)


def test_image_folder_skips_and_names_bad_files(image_folder):
  name = f'imagefolder:{image_folder}'
  with pytest.warns(data.SkippedFilesWarning) as caught:
    info = data.dataset_info(name)
  messages = ' '.join(str(w.message) for w in caught)
  for bad in ('broken.png', 'truncated.png', 'notes.txt', 'empty.jpg',
              'garbage.png', 'scrambled.jpg'):
    assert bad in messages
  assert 'skipped 4 of 20' in messages and 'skipped 2 of 11' in messages
  assert info.num_classes == 3
  assert (info.num_train_examples, info.num_eval_examples) == (16, 9)
  assert (info.train_split, info.eval_split) == ('train', 'val')
  source = sources.get_source(name, 'train')
  assert source.class_names == ('ant', 'moth', 'zebra')
  ant = [os.path.basename(p) for p, l in zip(source.records, source.labels)
         if l == 0]
  assert sorted(ant) == ['0.png', '1.png', '2.png', '3.png', '4.png',
                         'photo.jpg']

  train = data.make_train_iterator(name, global_batch_size=4, image_size=16,
                                   seed=0, augment='randaugment',
                                   randaug_magnitude=5, **SINGLE)
  for _ in range(9):  # > 2 epochs, no crash
    batch = next(train)
  train.close()
  assert batch['image'].shape == (4, 16, 16, 3)
  ev = data.make_eval_iterator(name, global_batch_size=4, image_size=16,
                               normalization='ft', **SINGLE)
  batches = list(ev)
  ids = np.concatenate([_pixel_ids(b['image'])[b['mask'] == 1]
                        for b in batches])
  assert sorted(ids.tolist()) == list(range(16, 25))  # val files 16..24


def test_single_pool_folder_split_rule(tmp_path):
  root = tmp_path / 'pool'
  for cls in ('a', 'b'):
    for i in range(30):
      _png(str(root / cls / f'{i:02d}.png'), i)
  name = f'imagefolder:{root}'
  info = data.dataset_info(name)
  train = set(sources.get_source(name, 'train').records)
  val = set(sources.get_source(name, 'val').records)
  assert not train & val and len(train | val) == 60
  import zlib  # pylint: disable=g-import-not-at-top
  for path in val:
    assert zlib.crc32(os.path.relpath(path, root).encode()) % 10 == 0
  assert info.num_eval_examples == len(val) > 0


# ------------------------------------------------------------------ errors --


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.dataset_info('cifar10', data_dir=str(tmp_path))
  message = str(error.value)
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert '\n' not in message and 'Traceback' not in message
  with pytest.raises(data.DatasetNotPreparedError, match='downloads/manual'):
    data.make_train_iterator('imagenet2012', data_dir=str(tmp_path),
                             global_batch_size=8, image_size=8, seed=0,
                             **SINGLE)


def test_other_missing_data_errors(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError, match='data_dir'):
    data.dataset_info('imagenet21k')
  with pytest.raises(data.DatasetNotPreparedError, match='imagenet21k'):
    data.dataset_info('imagenet21k', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError, match='does not exist'):
    data.dataset_info(f'imagefolder:{tmp_path}/nowhere')
  (tmp_path / 'only' / 'train' / 'x').mkdir(parents=True)
  with pytest.raises(data.DatasetNotPreparedError, match='no val'):
    data.dataset_info(f'imagefolder:{tmp_path}/only')
  with pytest.raises(ValueError, match='choose one of'):
    data.dataset_info('imagenet')
  with pytest.raises(ValueError, match="splits"):
    data.make_eval_iterator('digits', split='validation', global_batch_size=8,
                            image_size=8, **SINGLE)


def test_decoding_covers_the_formats_a_folder_may_hold():
  image = np.random.default_rng(0).integers(0, 255, (13, 11, 3), np.uint8)
  for fmt in ('PNG', 'BMP', 'GIF', 'WEBP'):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **(
        {'lossless': True} if fmt == 'WEBP' else {}))
    decoded = preprocess.decode(tf.constant(buffer.getvalue())).numpy()
    assert decoded.shape == (13, 11, 3)
    if fmt in ('PNG', 'BMP', 'WEBP'):
      np.testing.assert_array_equal(decoded, image)
