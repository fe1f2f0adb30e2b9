"""A validation split carved from train: `holdout` (config.data.holdout)."""

import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from effnetv2_jax import data
from effnetv2_jax.data import sources
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import recipes
from config_files import load_config

SINGLE = dict(process_index=0, process_count=1)
HOLDOUT = data.HOLDOUT_SPLIT


def _pixel_ids(images):
  """The constant value each identity image was made of ('ft' inputs)."""
  centre = np.asarray(images)[:, images.shape[1] // 2, images.shape[2] // 2, 0]
  return np.round((centre * 0.5 + 0.5) * 255).astype(int)


def _eval_ids(name, split, holdout, *, global_batch_size=4, process_count=1,
              **kwargs):
  """Ids of every example an eval pass yields, over all processes."""
  ids = []
  for process in range(process_count):
    ev = data.make_eval_iterator(
        name, split=split, holdout=holdout,
        global_batch_size=global_batch_size, image_size=8, normalization='ft',
        process_index=process, process_count=process_count, **kwargs)
    ids += [_pixel_ids(b['image'])[b['mask'] == 1] for b in ev]
  return np.concatenate(ids)


def _train_epoch_ids(name, holdout, num_examples, *, seed=0,
                     global_batch_size=4, **kwargs):
  """Ids of the first epoch (stream positions [0, num_examples)) of training."""
  train = data.make_train_iterator(
      name, holdout=holdout, global_batch_size=global_batch_size,
      image_size=8, seed=seed, augment='none', normalization='ft', **SINGLE,
      **kwargs)
  batches = [_pixel_ids(next(train)['image'])
             for _ in range(math.ceil(num_examples / global_batch_size))]
  train.close()
  return np.concatenate(batches)[:num_examples]


def _png(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
  """train/ of 3 classes x 20 images (values 1..60), val/ of 6."""
  root = tmp_path / 'folder'
  for c, cls in enumerate(('ant', 'bee', 'cat')):
    for i in range(20):
      _png(str(root / 'train' / cls / f'{i:03d}.png'), 1 + 20 * c + i)
    for i in range(2):
      _png(str(root / 'val' / cls / f'{i}.png'), 100 + 2 * c + i)
  yield f'imagefolder:{root}'
  data.clear_cache()


NUM_TFDS = 40


@pytest.fixture(scope='module')
def prepared_tfds(tmp_path_factory):
  """A tfds dataset really prepared on disk (no mocking), example i a
  constant image of value i; served under the name imagenet21k, whose
  validation split is then the first train example."""
  root = str(tmp_path_factory.mktemp('prepared'))
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=4)})
  examples = [(i, {'image': np.full((6, 5, 3), i, np.uint8), 'label': i % 4})
              for i in range(NUM_TFDS)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='imagenet21k', version='1.0.0', features=features,
      split_datasets={'train': examples}, data_dir=root)
  return root


def _cases(folder, prepared_tfds):
  return {'folder': (folder, {}),
          'tfds': ('imagenet21k', {'data_dir': prepared_tfds})}


@pytest.mark.parametrize('case', ['folder', 'tfds'])
@pytest.mark.parametrize('holdout', [0.25, 7])
def test_holdout_and_train_are_disjoint_cover_train_and_match_info(
    case, holdout, folder, prepared_tfds):
  name, kwargs = _cases(folder, prepared_tfds)[case]
  info = data.dataset_info(name, holdout=holdout, **kwargs)
  whole = data.dataset_info(name, **kwargs)
  everything = _eval_ids(name, 'train', 0, **kwargs)
  held = _eval_ids(name, HOLDOUT, holdout, **kwargs)
  rest = _eval_ids(name, 'train', holdout, **kwargs)
  epoch = _train_epoch_ids(name, holdout, info.num_train_examples, **kwargs)

  assert len(set(everything)) == len(everything) == whole.num_train_examples
  assert len(set(held)) == len(held) == info.num_holdout_examples > 0
  assert len(set(rest)) == len(rest) == info.num_train_examples
  assert not set(held) & set(rest)
  assert set(held) | set(rest) == set(everything)
  assert sorted(epoch) == sorted(rest)  # training never sees the holdout
  assert info.num_eval_examples == whole.num_eval_examples
  if holdout < 1:
    assert abs(info.num_holdout_examples - holdout * len(everything)) <= 1
  else:
    assert info.num_holdout_examples == holdout


@pytest.mark.parametrize('case', ['folder', 'tfds'])
def test_holdout_does_not_depend_on_batch_seed_or_processes(
    case, folder, prepared_tfds):
  name, kwargs = _cases(folder, prepared_tfds)[case]
  holdout = 0.3
  held = set(_eval_ids(name, HOLDOUT, holdout, **kwargs))
  for batch, processes in ((1, 1), (6, 3), (8, 2)):
    ids = _eval_ids(name, HOLDOUT, holdout, global_batch_size=batch,
                    process_count=processes, **kwargs)
    assert sorted(ids) == sorted(held)
  num_train = data.dataset_info(name, holdout=holdout,
                                **kwargs).num_train_examples
  epochs = [_train_epoch_ids(name, holdout, num_train, seed=seed,
                             global_batch_size=batch, **kwargs)
            for seed, batch in ((0, 4), (1, 4), (5, 3))]
  assert not np.array_equal(epochs[0], epochs[1])  # other seeds, other order
  for epoch in epochs:
    assert len(epoch) == num_train and not set(epoch) & held


def test_folder_holdout_keeps_its_files_when_files_are_added(folder):
  root = folder[len('imagefolder:'):]
  count = 8
  before = set(sources.get_source(folder, HOLDOUT, holdout=count).records)
  for cls in ('ant', 'bee', 'cat'):
    _png(os.path.join(root, 'train', cls, 'new.png'), 90)
  data.clear_cache()
  after = set(sources.get_source(folder, HOLDOUT, holdout=count).records)
  assert len(after) == count
  assert len(before & after) >= count - 3  # each new file displaces <= 1


def test_mock_tfds_holdout_sizes_and_iterators():
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info('cifar10', holdout=3)
    assert (info.num_train_examples, info.num_holdout_examples) == (7, 3)
    assert info.num_eval_examples == 10
    train = data.make_train_iterator('cifar10', global_batch_size=4,
                                     image_size=12, seed=0, augment='none',
                                     holdout=3, **SINGLE)
    assert train.info == info
    assert next(train)['image'].shape == (4, 12, 12, 3)
    train.close()
    ev = data.make_eval_iterator('cifar10', split=HOLDOUT, holdout=3,
                                 global_batch_size=2, image_size=12, **SINGLE)
    assert sum(b['mask'].sum() for b in ev) == 3 and len(ev) == 2


def test_mock_tfds_holdout_segments_cross_splits_and_spare_minival():
  with tfds.testing.mock_data(num_examples=10):
    # flowers' train is tfds train + validation: 12 held cross into train.
    rest = sources.get_source('oxford_flowers102', 'train', holdout=12)
    held = sources.get_source('oxford_flowers102', HOLDOUT, holdout=12)
    assert rest.segments == (('train', 0, 8),)
    assert held.segments == (('train', 8, 10), ('validation', 0, 10))
    # ImageNet: the holdout is the tail of train[:98%], before minival.
    minival = sources.get_source('imagenet2012', 'minival', holdout=2)
    rest = sources.get_source('imagenet2012', 'train', holdout=2)
    held = sources.get_source('imagenet2012', HOLDOUT, holdout=2)
  assert minival.segments == (('train', 9, 10),)
  assert rest.segments == (('train', 0, 7),)
  assert held.segments == (('train', 7, 9),)


def _rows(source):
  """Each example as one row (pixels then label), sorted: a multiset."""
  rows = np.concatenate([source.records.reshape(source.num_examples, -1),
                         source.labels[:, None]], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize('holdout', [0.1, 300, 300.0])
def test_digits_holdout_covers_train(holdout):
  whole = sources.get_source('digits', 'train')
  rest = sources.get_source('digits', 'train', holdout=holdout)
  held = sources.get_source('digits', HOLDOUT, holdout=holdout)
  assert rest.num_examples + held.num_examples == whole.num_examples
  both = np.concatenate([rest.records, held.records])
  np.testing.assert_array_equal(
      _rows(whole), _rows(sources.ArraySource(
          'digits', 'both', both, np.concatenate([rest.labels, held.labels]),
          10, sources.PIXELS)))
  # Every class is in the holdout (a spread sample, not one corner).
  assert len(np.unique(held.labels)) == 10


BAD = [-1, -0.5, 1.5, 2.25, float('nan'), float('inf'), True, '0.1', None,
       1437, 1437.0, 5000]


@pytest.mark.parametrize('holdout', BAD)
def test_bad_holdout_is_a_one_line_error_naming_the_key(holdout):
  with pytest.raises(ValueError) as error:
    data.dataset_info('digits', holdout=holdout)
  assert 'config.data.holdout' in str(error.value)
  assert '\n' not in str(error.value)


def test_holdout_errors_that_need_the_batch_or_a_holdout():
  with pytest.raises(ValueError, match=r'config\.data\.holdout.*one global '
                     'batch of 64'):
    data.make_train_iterator('digits', global_batch_size=64, image_size=8,
                             seed=0, holdout=1400, **SINGLE)
  with pytest.raises(ValueError, match=r"'holdout' needs a holdout > 0 "
                     r'\(config\.data\.holdout\)'):
    data.make_eval_iterator('digits', split=HOLDOUT, global_batch_size=8,
                            image_size=8, **SINGLE)


@pytest.mark.parametrize('holdout', [-1.0, 1.5, float('nan')])
def test_validate_names_the_holdout_key(holdout):
  config = recipes.base_config()
  config.data.holdout = holdout
  with pytest.raises(config_checks.ConfigError,
                     match=r'^config\.data\.holdout='):
    config_checks.validate(config, num_devices=1)


def _digits_config():
  return load_config('digits')


def test_digits_config_trains_without_its_holdout_and_tests_on_test():
  config = _digits_config()
  config_checks.validate(config, num_devices=1,
                         reference=recipes.base_config())
  c = config.data
  assert c.holdout > 0
  info = data.dataset_info(c.dataset, holdout=c.holdout)
  assert info.num_holdout_examples > 0
  assert (info.num_train_examples + info.num_holdout_examples ==
          data.dataset_info(c.dataset).num_train_examples)
  train = data.make_train_iterator(
      c.dataset, global_batch_size=config.train.batch_size, image_size=16,
      seed=config.seed, augment=c.augment, holdout=c.holdout, **SINGLE)
  batch = next(train)
  train.close()
  assert batch['image'].shape == (config.train.batch_size, 16, 16, 3)
  # Stage-end evals: the holdout; the final eval: the test split.
  for split, size in ((HOLDOUT, info.num_holdout_examples),
                      (c.eval_split, info.num_eval_examples)):
    ev = data.make_eval_iterator(
        c.dataset, split=split, holdout=c.holdout,
        global_batch_size=config.eval.batch_size, image_size=16, **SINGLE)
    assert sum(b['mask'].sum() for b in ev) == size


def test_the_train_probe_is_held_out_size_of_train_spread_over_it(folder):
  digits_rest = sources.get_source('digits', 'train', holdout=144)
  probe = sources.get_source('digits', data.TRAIN_PROBE_SPLIT, holdout=144)
  assert probe.num_examples == 144 and probe.split == data.TRAIN_PROBE_SPLIT
  assert set(probe.example_ids) <= set(digits_rest.example_ids)
  held = sources.get_source('digits', HOLDOUT, holdout=144)
  assert not set(probe.example_ids) & set(held.example_ids)
  # Train smaller than the holdout: all of it.
  small = sources.get_source('digits', data.TRAIN_PROBE_SPLIT, holdout=1137)
  assert small.num_examples == 300
  # A folder stored class by class: the probe still has every class.
  folder_probe = sources.get_source(folder, data.TRAIN_PROBE_SPLIT, holdout=3)
  assert len(set(folder_probe.labels)) == 3
  with tfds.testing.mock_data(num_examples=10):
    tfds_probe = sources.get_source('cifar10', data.TRAIN_PROBE_SPLIT,
                                    holdout=3)
  assert tfds_probe.segments == (('train', 0, 3),)
  with pytest.raises(ValueError, match="'train_probe' needs a holdout"):
    sources.get_source('digits', data.TRAIN_PROBE_SPLIT)
