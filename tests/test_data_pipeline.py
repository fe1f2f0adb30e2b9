"""Train/eval iterators: digits, exact resume, host slices, padding, sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from effnetv2_jax import data
from effnetv2_jax.data import pipeline
from effnetv2_jax.data import sources

SINGLE = dict(process_index=0, process_count=1)


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def test_digits_info_and_split():
  info = data.dataset_info('digits')
  assert (info.num_classes, info.num_train_examples,
          info.num_eval_examples) == (10, 1437, 360)
  assert (info.train_split, info.eval_split) == ('train', 'test')
  train = sources.get_source('digits', 'train')
  test = sources.get_source('digits', 'test')
  for split in (train, test):
    assert split.records.dtype == np.uint8
    assert split.records.shape[1:] == (8, 8, 3)
    assert split.labels.min() == 0 and split.labels.max() == 9
    assert split.records.max() == 255  # ink 16 maps to 255
  # Together the two splits are exactly scikit-learn's 1,797 digits.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  ours = np.concatenate([train.records[..., 0], test.records[..., 0]])
  ours_labels = np.concatenate([train.labels, test.labels])
  theirs = np.round(digits.images * 255 / 16).astype(np.uint8)
  key = lambda imgs, labels: sorted(
      im.tobytes() + bytes([l]) for im, l in zip(imgs, labels))
  assert key(ours, ours_labels) == key(theirs, digits.target)


def test_digits_train_batches():
  it = data.make_train_iterator('digits', global_batch_size=32, image_size=21,
                                seed=0, randaug_magnitude=6.67, **SINGLE)
  batch = next(it)
  it.close()
  assert batch['image'].shape == (32, 21, 21, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (32, 10) and batch['label'].dtype == np.float32
  assert -1.0 <= batch['image'].min() and batch['image'].max() < 1.0
  np.testing.assert_array_equal(batch['label'].sum(1), 1.0)
  assert set(np.unique(batch['label'])) <= {0.0, 1.0}
  assert it.info.num_classes == 10


def test_same_seed_same_batches_other_seed_differs():
  kwargs = dict(global_batch_size=16, image_size=16, **SINGLE)
  a = _take(data.make_train_iterator('digits', seed=5, **kwargs), 2)
  b = _take(data.make_train_iterator('digits', seed=5, **kwargs), 2)
  c = _take(data.make_train_iterator('digits', seed=6, **kwargs), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


@pytest.mark.parametrize('start_batch', [1, 43, 90])
def test_exact_resume_digits_across_epochs(start_batch):
  # 1,437 / 32 = 44.9 batches per epoch: batch 43-46 and 90 straddle epochs.
  kwargs = dict(global_batch_size=32, image_size=16, seed=3,
                mixup_alpha=0.2, cutmix_alpha=0.2, **SINGLE)
  reference = _take(data.make_train_iterator('digits', **kwargs),
                    start_batch + 3)
  resumed_iterator = data.make_train_iterator('digits', start_batch=start_batch,
                                              **kwargs)
  resumed = _take(resumed_iterator, 3)
  assert resumed_iterator.next_batch == start_batch + 3
  for expected, got in zip(reference[start_batch:], resumed):
    np.testing.assert_array_equal(expected['image'], got['image'])
    np.testing.assert_array_equal(expected['label'], got['label'])


class _CountingSource(sources.ArraySource):

  def __init__(self, n):
    super().__init__('fake', 'train', np.arange(n), np.arange(n) % 3,
                     num_classes=3, record_kind=sources.PIXELS)
    self.reads = []

  def read(self, start, stop):
    self.reads.append((start, stop))
    return super().read(start, stop)


def test_resume_far_ahead_reads_one_window_and_skips_before_decoding():
  source = _CountingSource(1000)
  source.random_access = False  # windowed, like tfds
  order = pipeline.ShuffledWindows(source, 0, 1000, seed=1, process_index=0,
                                   window=50)
  first = 10**9 * 32 + 17
  window = next(order(first))
  assert len(source.reads) == 1  # earlier epochs and windows are never read
  assert source.reads[0][1] - source.reads[0][0] == 50
  assert window['position'][0] == first
  # What is yielded is that window's order minus the skipped head: records
  # are dropped before any decoding happens.
  kept = len(window['index'])
  whole = next(order(first - (50 - kept)))
  assert len(whole['index']) == 50
  np.testing.assert_array_equal(whole['index'][50 - kept:], window['index'])
  np.testing.assert_array_equal(whole['record'][50 - kept:], window['record'])


def test_windowed_stream_matches_from_zero_and_covers_each_epoch():
  source = _CountingSource(50)
  source.random_access = False
  order = pipeline.ShuffledWindows(source, 0, 50, seed=2, process_index=0,
                                   window=7)
  stream = []
  for window in order(0):
    stream.append(window)
    if sum(len(w['index']) for w in stream) >= 150:
      break
  index = np.concatenate([w['index'] for w in stream])
  position = np.concatenate([w['position'] for w in stream])
  np.testing.assert_array_equal(position, np.arange(len(position)))
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(index[epoch * 50:(epoch + 1) * 50]),
                                  np.arange(50))
  assert not np.array_equal(index[:50], index[50:100])  # reshuffled per epoch
  for start in (0, 6, 7, 49, 50, 83):
    resumed = np.concatenate([w['index'] for w in _first_n(order(start), 40)])
    np.testing.assert_array_equal(resumed[:40], index[start:start + 40])


def _first_n(windows, n):
  out, count = [], 0
  for window in windows:
    out.append(window)
    count += len(window['index'])
    if count >= n:
      return out


@pytest.mark.parametrize('n,count', [(1437, 3), (360, 8), (10, 4), (7, 7)])
def test_host_slices_disjoint_and_cover(n, count):
  slices = [pipeline.host_slice(n, i, count) for i in range(count)]
  assert slices[0][0] == 0 and slices[-1][1] == n
  for (_, stop), (start, _) in zip(slices, slices[1:]):
    assert stop == start
  sizes = [b - a for a, b in slices]
  assert max(sizes) - min(sizes) <= 1


def test_host_slices_are_tfds_even_splits():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for n in (7, 10, 1437, 1_281_167):
    info = {'train': tfds.core.SplitInfo(name='train', shard_lengths=[n],
                                         num_bytes=0)}
    for count in (1, 3, 8, 32):
      for index, split in enumerate(tfds.even_splits('train', n=count)):
        absolute, = split.to_absolute(info)
        expected = (absolute.from_ or 0,
                    n if absolute.to is None else absolute.to)
        assert pipeline.host_slice(n, index, count) == expected


def test_faked_processes_read_disjoint_slices():
  source = sources.get_source('digits', 'train')
  seen = []
  for process in range(3):
    start, stop = pipeline.host_slice(source.num_examples, process, 3)
    order = pipeline.ShuffledWindows(source, start, stop, seed=0,
                                     process_index=process,
                                     window=source.num_examples)
    epoch = next(order(0))['index']
    np.testing.assert_array_equal(np.sort(epoch), np.arange(start, stop))
    seen.append(set(epoch.tolist()))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert len(seen[0] | seen[1] | seen[2]) == 1437
  # The iterators of different processes produce different batches.
  a = _take(data.make_train_iterator('digits', global_batch_size=12,
                                     image_size=8, seed=0, process_index=0,
                                     process_count=3), 1)[0]
  b = _take(data.make_train_iterator('digits', global_batch_size=12,
                                     image_size=8, seed=0, process_index=1,
                                     process_count=3), 1)[0]
  assert a['image'].shape == (4, 8, 8, 3)
  assert not np.array_equal(a['image'], b['image'])


@pytest.mark.parametrize('global_batch,count', [(64, 1), (66, 3), (7, 1)])
def test_padded_eval_counts_every_example_once(global_batch, count):
  lengths, total = set(), 0.0
  for process in range(count):
    ev = data.make_eval_iterator('digits', global_batch_size=global_batch,
                                 image_size=16, normalization='inception',
                                 process_index=process, process_count=count)
    lengths.add(len(ev))
    for _ in range(2):  # re-iterable: a fresh pass each time
      batches = list(ev)
      assert len(batches) == len(ev)
      masks = np.concatenate([b['mask'] for b in batches])
      for b in batches:
        assert b['image'].shape == (global_batch // count, 16, 16, 3)
        assert b['label'].shape == (global_batch // count, 10)
        padding = b['mask'] == 0
        assert not b['image'][padding].any() and not b['label'][padding].any()
        np.testing.assert_array_equal(b['label'][~padding].sum(1), 1.0)
    total += masks.sum()
  assert len(lengths) == 1  # identical on every process
  assert total == 360


def test_eval_images_are_deterministic():
  ev = data.make_eval_iterator('digits', global_batch_size=90, image_size=24,
                               normalization='inception', **SINGLE)
  first, second = list(ev), list(ev)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_global_arrays_on_the_data_axis():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  kwargs = dict(global_batch_size=16, image_size=12, seed=1)
  sharded = _take(data.make_train_iterator('digits', sharding=sharding,
                                           **kwargs), 1)[0]
  local = _take(data.make_train_iterator('digits', **kwargs), 1)[0]
  for key in ('image', 'label'):
    assert isinstance(sharded[key], jax.Array)
    assert sharded[key].sharding == sharding
    assert sharded[key].shape[0] == 16
    np.testing.assert_array_equal(np.asarray(sharded[key]), local[key])
  ev = data.make_eval_iterator('digits', global_batch_size=40, image_size=12,
                               normalization='inception', sharding=sharding)
  batches = list(ev)
  assert len(batches) == 9 and batches[-1]['mask'].sharding == sharding
  assert sum(float(b['mask'].sum()) for b in batches) == 360
  with pytest.raises(ValueError, match='without sharding'):
    data.make_train_iterator('digits', sharding=sharding, process_count=2,
                             process_index=0, **kwargs)


def test_randaugment_and_mixing_in_the_pipeline():
  # One photo-style pipeline end to end (its graph is the slow one to build).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=20):
    kwargs = dict(global_batch_size=8, image_size=24, seed=4,
                  randaug_magnitude=15.0, mixup_alpha=0.8, cutmix_alpha=0.8,
                  shuffle_buffer=6, **SINGLE)
    reference = _take(data.make_train_iterator('imagenette', **kwargs), 4)
    resumed = _take(data.make_train_iterator('imagenette', start_batch=3,
                                             **kwargs), 1)
  np.testing.assert_array_equal(reference[3]['image'], resumed[0]['image'])
  np.testing.assert_array_equal(reference[3]['label'], resumed[0]['label'])
  batch = reference[0]
  assert batch['image'].shape == (8, 24, 24, 3)
  assert -1.0 <= batch['image'].min() and batch['image'].max() < 1.0
  np.testing.assert_allclose(batch['label'].sum(1), 1.0, atol=1e-5)
  assert (batch['label'] > 0).sum(1).max() == 2  # mixed with a partner


def test_bad_arguments():
  with pytest.raises(ValueError, match='unknown dataset'):
    data.dataset_info('mnist')
  with pytest.raises(ValueError, match='multiple of process_count'):
    data.make_train_iterator('digits', global_batch_size=10, image_size=8,
                             seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='augment'):
    data.make_train_iterator('digits', global_batch_size=8, image_size=8,
                             seed=0, augment='randaugment', **SINGLE)
  with pytest.raises(ValueError, match='normalization'):
    data.make_eval_iterator('digits', global_batch_size=8, image_size=8,
                            normalization='bogus', **SINGLE)
