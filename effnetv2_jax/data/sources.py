"""Datasets by name: TFDS, ImageFolder directories and scikit-learn digits.

Every dataset is resolved into one `Source` per logical split. A source knows
its size and label space and serves its examples in a fixed storage order, by
index range, so the pipeline can give each process its own contiguous slice
and shuffle deterministically on top (see `pipeline.py`).

Logical splits per name (the default train / eval split first):

  * imagenet2012: train = tfds `train` minus its last 2% (1,255,544);
    validation (50,000); minival = that last 2% (25,623, the paper's ~25k).
  * imagenet2012_trainval: train = all of tfds `train` (1,281,167);
    validation; minival.
  * imagenet21k (prepared by the user, see `_imagenet21k_source`): train;
    validation = a prepared split of that name, else the first
    min(100,000, 1%) of train (the paper holds out 100k). Multi-hot labels
    are normalised to sum to 1. As an ImageFolder: train; val.
  * cifar10, cifar100, cars196: train; test.
  * oxford_flowers102: train = tfds `train+validation` (2,040, as the
    paper); test; validation.
  * imagenette: train; validation.
  * digits: train (1,437); test (360). scikit-learn's 1,797 8x8 digits
    taken in the order of `numpy.random.RandomState(0).permutation(1797)`;
    ink 0..16 scaled to 0..255, grey repeated over 3 channels.
  * imagefolder:/root: train; val (see `ImageFolderSource`).
  * any of them, given a holdout: holdout (carved from train, see below).

The official TFRecord pipeline held out its first 20 train shards (25,021
images); on TFDS the official code trained on `train[:98%]`, which is what
we do, with the complementary 2% as minival. The official code counts an
epoch of that split as 1,256,144 images (its declared size), which the
ImageNet-1k configs set as config.train.epoch_examples.

A holdout (`holdout=` here and in the pipeline, `config.data.holdout`) is a
validation set carved from the train split of a dataset that has none, so
that model selection never looks at the test set: `get_source(name,
'holdout', holdout=h)` is the carved part and the train split, asked for
with the same `h`, is the rest; the two are disjoint and together are the
train split. `h` is 0 (none), a fraction in (0, 1) of the train split
(rounded like tfds' percent slices, at least one example) or a whole number
of examples. Which examples depends only on the dataset and `h`, never on
the batch size, seed or process count:
  * tfds sources: the last examples in storage order (tfds shuffles a
    dataset when it prepares it, so its tail is a uniform sample, and it is
    read as one range). ImageNet's minival is this rule at 2%.
  * in-memory sources (digits, ImageFolder): the examples with the smallest
    crc32 of a stable id (an image's path inside the folder, the index for
    digits), as in the single-folder split rule: a file mostly stays on its
    side when others are added.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import logging
import os
import warnings
import numbers
import zlib
from typing import Mapping, Sequence

import numpy as np

# Record kinds: what `Source.read` returns under 'record'.
ENCODED = 'encoded'  # an encoded image file (JPEG, PNG, ...), tf.string
PATH = 'path'        # a path to an encoded image file, tf.string
PIXELS = 'pixels'    # decoded uint8 pixels [h, w, 3] of a fixed shape

HOLDOUT_SPLIT = 'holdout'  # the logical split carved by `holdout`
# As many training examples as the holdout has (fewer if train is smaller),
# spread over the train split that remains: evaluated without augmentation,
# the clean-train accuracy beside the holdout's (the feedback controller's
# generalisation gap).
TRAIN_PROBE_SPLIT = 'train_probe'
IMAGENET_MINIVAL_FRACTION = 0.02
IMAGENET21K_HOLDOUT = 100_000
DIGITS_NUM_TRAIN = 1437
DIGITS_PERMUTATION_SEED = 0

_TFDS_NAMES = ('imagenet2012', 'imagenet2012_trainval', 'cifar10', 'cifar100',
               'oxford_flowers102', 'cars196', 'imagenette')
DATASET_NAMES = _TFDS_NAMES + ('imagenet21k', 'digits', 'imagefolder:<root>')

log = logging.getLogger(__name__)


class DatasetNotPreparedError(RuntimeError):
  """A named dataset is known but its files are not where we looked."""


class SkippedFilesWarning(UserWarning):
  """Some files of an ImageFolder were not usable images and were skipped."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a dataset before reading it.

  Attributes:
    name: the name it was requested under.
    num_classes: size of the label vector.
    num_train_examples: examples in `train_split` (all processes together),
      less the holdout when there is one.
    num_eval_examples: examples in `eval_split`.
    train_split: logical split used for training.
    eval_split: logical split used for evaluation by default.
    multi_label: labels are multi-hot, normalised to sum to 1 (ImageNet-21k).
    num_holdout_examples: examples carved from the train split as the
      HOLDOUT_SPLIT (0: no holdout).
  """

  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str
  multi_label: bool = False
  num_holdout_examples: int = 0


class Source:
  """The examples of one logical split, in a fixed storage order.

  Attributes:
    name: dataset name.
    split: logical split name.
    num_examples: number of examples.
    num_classes: size of the label space.
    multi_label: labels are lists of class indices (padded with -1).
    record_kind: ENCODED, PATH or PIXELS.
    random_access: `read` of any range is cheap (in-memory index), so the
      pipeline can shuffle the whole split instead of windows of it.
  """

  name: str
  split: str
  num_examples: int
  num_classes: int
  multi_label: bool = False
  record_kind: str = ENCODED
  random_access: bool = False

  def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """Examples [start, stop) as {'record': [n, ...], 'label': [n] or [n, k]}."""
    raise NotImplementedError

  def dataset(self, start: int, stop: int):
    """Examples [start, stop) as an ordered tf.data.Dataset of the same dict."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.data.Dataset.from_tensor_slices(self.read(start, stop))

  def prepare(self, start: int, stop: int) -> None:
    """Makes a later `read(start, stop)` cheap to start (optional)."""
    del start, stop

  def split_off(self, count: int, rest_split: str,
                held_split: str) -> tuple[Source, Source]:
    """(the other examples, `count` held-out examples) as two sources.

    Which examples are held out is a fixed property of the source (see the
    module docstring); both keep storage order.
    """
    raise NotImplementedError

  def probe(self, count: int, split: str) -> Source:
    """`count` of the examples, spread over the split (a fixed choice)."""
    raise NotImplementedError


class ArraySource(Source):
  """A split held in memory: record and label arrays.

  `example_ids` are stable names of the examples (default: their indices),
  whose hashes choose a holdout.
  """

  random_access = True

  def __init__(self, name, split, records, labels, num_classes, record_kind,
               example_ids=None):
    self.name, self.split = name, split
    self.records, self.labels = records, labels
    self.num_examples = len(labels)
    self.num_classes = num_classes
    self.record_kind = record_kind
    self.example_ids = (np.arange(self.num_examples).astype(str)
                        if example_ids is None else np.asarray(example_ids))

  def read(self, start, stop):
    return {'record': self.records[start:stop],
            'label': self.labels[start:stop]}

  @functools.cached_property
  def _holdout_order(self) -> np.ndarray:
    """Indices by crc32 of their id, ties by index: a holdout is a head."""
    hashes = np.fromiter((zlib.crc32(str(i).encode('utf-8'))
                          for i in self.example_ids), np.uint32,
                         count=self.num_examples)
    return np.argsort(hashes, kind='stable')

  def split_off(self, count, rest_split, held_split):
    held = np.zeros(self.num_examples, bool)
    held[self._holdout_order[:count]] = True
    return (self._subset(np.flatnonzero(~held), rest_split),
            self._subset(np.flatnonzero(held), held_split))

  def probe(self, count, split):
    # Evenly spaced, so a folder stored class by class gives every class.
    indices = np.unique(np.linspace(0, self.num_examples - 1, count
                                    ).round().astype(int))
    return self._subset(indices, split)

  def _subset(self, indices: np.ndarray, split: str) -> ArraySource:
    subset = copy.copy(self)
    subset.__dict__.pop('_holdout_order', None)
    subset.split = split
    subset.records, subset.labels = self.records[indices], self.labels[indices]
    subset.example_ids = self.example_ids[indices]
    subset.num_examples = len(indices)
    return subset


# ----------------------------------------------------------------- digits --


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as uint8 RGB [n, 8, 8, 3] and int64 labels, permuted."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  order = np.random.RandomState(DIGITS_PERMUTATION_SEED).permutation(
      len(digits.target))
  # Ink levels are 0..16; 16 maps to 255 so the image looks like a photo's
  # value range to the normalisation that follows.
  gray = np.round(digits.images[order] * (255.0 / 16.0)).astype(np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  return rgb, digits.target[order].astype(np.int64)


def _digits_source(split: str) -> ArraySource:
  images, labels = _digits_arrays()
  cut = {'train': slice(0, DIGITS_NUM_TRAIN),
         'test': slice(DIGITS_NUM_TRAIN, None)}
  if split not in cut:
    raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
  return ArraySource('digits', split, images[cut[split]], labels[cut[split]],
                     num_classes=10, record_kind=PIXELS)


# ------------------------------------------------------------ ImageFolder --


def _file_problem(path: str) -> str | None:
  """Why `path` is not a usable image file, or None if it decodes.

  The whole bitstream is decoded, so truncated or scrambled files are caught
  here rather than in the middle of training; JPEGs are decoded at 1/8 scale
  (DCT scaling skips most of the work, about 1 ms for a 500 x 375 photo).
  """
  try:
    with open(path, 'rb') as f:
      head = f.read(16)
  except OSError as e:
    return f'unreadable ({e.strerror})'
  if not head:
    return 'empty file'
  is_jpeg = head.startswith(b'\xff\xd8\xff')
  known = (is_jpeg or head.startswith(b'\x89PNG')
           or head[:6] in (b'GIF87a', b'GIF89a') or head.startswith(b'BM')
           or (head[:4] == b'RIFF' and head[8:12] == b'WEBP'))
  if not known:
    return 'not a JPEG, PNG, GIF, BMP or WebP file'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      width, height = im.size
      if is_jpeg:
        im.draft('RGB', (max(1, width // 8), max(1, height // 8)))
      im.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'corrupt ({type(e).__name__}: {e})'
  if width < 1 or height < 1:
    return 'zero-sized image'
  return None


def _list_class_dir(root: str) -> list[str]:
  return sorted(e.name for e in os.scandir(root)
                if e.is_dir() and not e.name.startswith('.'))


def _list_files(class_root: str) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(class_root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                 if not f.startswith('.'))
  return files


def _holdout_by_hash(relative_path: str) -> bool:
  """The single-directory split rule: ~10% of files, stable as files change."""
  return zlib.crc32(relative_path.encode('utf-8')) % 10 == 0


class ImageFolderSource(ArraySource):
  """Images in one subfolder per class.

  Layouts:
    * `root/train/<class>/...` plus `root/val/` (or `validation/`, `test/`):
      the subfolders are the splits; classes are the sorted subfolder names of
      `train/`, and an eval split may only use those classes.
    * `root/<class>/...`: one pool, split by file: a file belongs to 'val'
      when crc32 of its path relative to root is 0 mod 10 (about 10% per
      class, and a file keeps its split when others are added), else 'train'.

  Files that are not readable JPEG/PNG/GIF/BMP/WebP images are skipped,
  counted and named in a `SkippedFilesWarning`.
  """

  def __init__(self, root: str, split: str, name: str):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise DatasetNotPreparedError(
          f'ImageFolder root {root} does not exist; point imagefolder:<root> '
          'at a directory of one subfolder per class (or with train/ and val/).')
    split_dirs = _image_folder_split_dirs(root)
    if split_dirs:
      if 'train' not in split_dirs:
        raise DatasetNotPreparedError(f'ImageFolder {root} has {sorted(split_dirs)} '
                                      'but no train/ folder.')
      class_names = _list_class_dir(split_dirs['train'])
      if split not in split_dirs:
        raise ValueError(f'ImageFolder {root} has splits {sorted(split_dirs)}, '
                         f'not {split!r}')
      split_root = split_dirs[split]
      unknown = sorted(set(_list_class_dir(split_root)) - set(class_names))
      if unknown:
        raise ValueError(f'ImageFolder {split_root} has classes not in train/: '
                         f'{unknown[:5]}')
      candidates = [(c, f) for c in class_names
                    for f in (_list_files(os.path.join(split_root, c))
                              if os.path.isdir(os.path.join(split_root, c))
                              else [])]
    else:
      if split not in ('train', 'val'):
        raise ValueError(f"ImageFolder {root} (one pool, no train/) has splits "
                         f"'train' and 'val', not {split!r}")
      split_root = root
      class_names = _list_class_dir(root)
      want_val = split == 'val'
      candidates = [(c, f) for c in class_names
                    for f in _list_files(os.path.join(root, c))
                    if _holdout_by_hash(os.path.relpath(f, root)) == want_val]
    if not class_names:
      raise DatasetNotPreparedError(
          f'ImageFolder {split_root} has no class subfolders; expected '
          f'{split_root}/<class_name>/<image files>.')
    paths, labels = _drop_bad_files(candidates, class_names, split_root)
    super().__init__(name, split, np.array(paths, dtype=object),
                     np.array(labels, dtype=np.int64),
                     num_classes=len(class_names), record_kind=PATH,
                     example_ids=np.array([os.path.relpath(p, split_root)
                                           for p in paths], dtype=object))
    self.class_names = tuple(class_names)


def _image_folder_split_dirs(root: str) -> dict[str, str]:
  aliases = {'train': 'train', 'val': 'val', 'validation': 'val',
             'test': 'test'}
  found = {}
  for entry in _list_class_dir(root):
    if entry in aliases and aliases[entry] not in found:
      found[aliases[entry]] = os.path.join(root, entry)
  return found if 'train' in found else {}


def _drop_bad_files(candidates, class_names, split_root):
  index = {c: i for i, c in enumerate(class_names)}
  # PIL decodes without the GIL, so threads scale with cores.
  with concurrent.futures.ThreadPoolExecutor(
      min(32, 2 * (os.cpu_count() or 1))) as pool:
    problems = list(pool.map(_file_problem, [f for _, f in candidates]))
  paths, labels, skipped = [], [], []
  for (cls, path), problem in zip(candidates, problems):
    if problem is None:
      paths.append(path)
      labels.append(index[cls])
    else:
      skipped.append(f'{os.path.relpath(path, split_root)} ({problem})')
  if skipped:
    shown = '; '.join(skipped[:20])
    more = f'; and {len(skipped) - 20} more' if len(skipped) > 20 else ''
    message = (f'ImageFolder {split_root}: skipped {len(skipped)} of '
               f'{len(candidates)} files that are not usable images: '
               f'{shown}{more}')
    log.warning(message)
    warnings.warn(message, SkippedFilesWarning, stacklevel=4)
  if not paths:
    raise DatasetNotPreparedError(f'ImageFolder {split_root} has no usable images.')
  return paths, labels


# ------------------------------------------------------------------- TFDS --


def _prepare_hint(tfds_name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets'
  if tfds_name == 'imagenet2012':
    return (f'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
            f'{where}/downloads/manual/ and run `tfds build imagenet2012 '
            f'--data_dir={where}`, or pass data_dir= pointing at a prepared copy')
  return (f'run `tfds build {tfds_name} --data_dir={where}` (it downloads the '
          'data), or pass data_dir= pointing at a prepared copy')


class TfdsSource(Source):
  """A logical split made of ranges of TFDS splits.

  `segments` are (tfds_split, start, stop) in example indices; a range of the
  logical split becomes a tfds split expression such as
  'train[10:20]+validation[0:5]', which tfds reads without touching other
  files. Images stay encoded (decoded later, inside the pipeline).
  """

  def __init__(self, name, split, builder, segments, label_key, num_classes,
               multi_label):
    self.name, self.split = name, split
    self.builder = builder
    self.segments = tuple(segments)
    self.label_key = label_key
    self.num_examples = sum(stop - start for _, start, stop in self.segments)
    self.num_classes = num_classes
    self.multi_label = multi_label
    self.record_kind = ENCODED
    self._batched = {}  # (start, stop) -> the range as one batch

  def split_parts(self, start: int, stop: int) -> list[tuple[str, int]]:
    """tfds split expressions (with their sizes) for examples [start, stop)."""
    return [(f'{tfds_split}[{lo}:{hi}]', hi - lo)
            for tfds_split, lo, hi in _cut_segments(self.segments, start, stop)]

  def split_off(self, count, rest_split, held_split):
    keep = self.num_examples - count
    return (self._with_segments(rest_split,
                                _cut_segments(self.segments, 0, keep)),
            self._with_segments(held_split, _cut_segments(
                self.segments, keep, self.num_examples)))

  def probe(self, count, split):
    # tfds shuffles a dataset when preparing it: its head is a uniform
    # sample, read as one range.
    return self._with_segments(split, _cut_segments(self.segments, 0, count))

  def _with_segments(self, split: str, segments) -> TfdsSource:
    return TfdsSource(self.name, split, self.builder, segments,
                      self.label_key, self.num_classes, self.multi_label)

  def dataset(self, start, stop):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if stop <= start:
      raise ValueError(f'{self.name}/{self.split}: empty range [{start}, {stop})')
    decoders = tfds.decode.PartialDecoding(
        {'image': True, self.label_key: True},
        decoders={'image': tfds.decode.SkipDecoding()})
    label_key = self.label_key
    combined = None
    for expression, size in self.split_parts(start, stop):
      ds = self.builder.as_dataset(
          split=expression, decoders=decoders, shuffle_files=False,
          read_config=tfds.ReadConfig(try_autocache=False))
      # take(): tfds.testing.mock_data ignores slicing and serves a fixed
      # number of examples for any split expression.
      ds = ds.take(size).map(
          lambda ex: {'record': ex['image'],
                      'label': tf.cast(ex[label_key], tf.int64)})
      combined = ds if combined is None else combined.concatenate(ds)
    return combined

  def prepare(self, start, stop):
    # tfds builds a dataset in Python (and tfds.testing.mock_data patches
    # the file system while it does); building each range once, on the
    # calling thread, keeps that off the pipeline's reader thread.
    if (start, stop) not in self._batched:
      self._batched[start, stop] = self._batch(start, stop)

  def read(self, start, stop):
    self.prepare(start, stop)
    batch = {k: v.numpy()
             for k, v in next(iter(self._batched[start, stop])).items()}
    if len(batch['label']) != stop - start:
      raise RuntimeError(
          f'{self.name}/{self.split}: tfds returned {len(batch["label"])} '
          f'examples for [{start}, {stop}); has the prepared data changed?')
    return batch

  def _batch(self, start, stop):
    ds = self.dataset(start, stop)
    if self.multi_label:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      ds = ds.padded_batch(
          stop - start, padding_values={'record': tf.constant(''),
                                        'label': tf.constant(-1, tf.int64)})
    else:
      ds = ds.batch(stop - start)
    return ds


def _cut_segments(segments, start: int, stop: int):
  """The (tfds_split, start, stop) segments of examples [start, stop) of the
  logical split made of `segments`."""
  cut, offset = [], 0
  for tfds_split, seg_start, seg_stop in segments:
    size = seg_stop - seg_start
    lo, hi = max(start - offset, 0), min(stop - offset, size)
    if lo < hi:
      cut.append((tfds_split, seg_start + lo, seg_start + hi))
    offset += size
  return cut


def _tfds_builder(tfds_name: str, data_dir: str | None, name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(
        f'{name}: tfds cannot open {tfds_name!r} ({type(e).__name__}: '
        f'{str(e).splitlines()[0]}); {_prepare_hint(tfds_name, data_dir)}.'
    ) from None


def _tfds_split_size(builder, tfds_split: str, name: str, data_dir) -> int:
  """Examples in one tfds split; raises DatasetNotPreparedError if absent."""
  splits = builder.info.splits
  if splits:
    if tfds_split not in splits:
      raise ValueError(f'{name}: tfds {builder.name} has no split '
                       f'{tfds_split!r} (it has {sorted(splits)})')
    return splits[tfds_split].num_examples
  # No split metadata: either not prepared, or tfds.testing.mock_data (which
  # serves data without metadata); as_dataset tells them apart.
  try:
    ds = builder.as_dataset(split=tfds_split)
  except AssertionError:
    raise DatasetNotPreparedError(
        f'{name}: tfds dataset {builder.name!r} is not prepared in '
        f'{data_dir or "the default data_dir (~/tensorflow_datasets)"}; '
        f'{_prepare_hint(builder.name, data_dir)}.') from None
  size = int(ds.cardinality())
  if size < 0:
    size = sum(1 for _ in ds)
  return size


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  tfds_name: str
  train: str
  eval: str
  base_splits: Sequence[str]


_TFDS_SPECS = {
    'imagenet2012': _TfdsSpec('imagenet2012', 'train', 'validation',
                              ('train', 'validation')),
    'imagenet2012_trainval': _TfdsSpec('imagenet2012', 'train', 'validation',
                                       ('train', 'validation')),
    'cifar10': _TfdsSpec('cifar10', 'train', 'test', ('train', 'test')),
    'cifar100': _TfdsSpec('cifar100', 'train', 'test', ('train', 'test')),
    'oxford_flowers102': _TfdsSpec('oxford_flowers102', 'train', 'test',
                                   ('train', 'validation', 'test')),
    'cars196': _TfdsSpec('cars196', 'train', 'test', ('train', 'test')),
    'imagenette': _TfdsSpec('imagenette', 'train', 'validation',
                            ('train', 'validation')),
}


def _fraction_size(num_examples: int, fraction: float) -> int:
  # Same boundary as tfds' 'train[:98%]' for fraction 0.02 (rounded to the
  # closest example).
  return num_examples - int(round(num_examples * (1 - fraction)))


def _imagenet_minival_size(num_train: int) -> int:
  # At least one example so tiny stand-ins (mock data) keep a minival.
  return max(_fraction_size(num_train, IMAGENET_MINIVAL_FRACTION),
             1 if num_train > 1 else 0)


def _logical_segments(name: str, sizes: Mapping[str, int]):
  """Logical split name -> tfds (split, start, stop) segments."""
  whole = {s: [(s, 0, n)] for s, n in sizes.items()}
  if name.startswith('imagenet2012'):
    # minival is the holdout rule of tfds sources (the tail) at 2%.
    n = sizes['train']
    keep = n - _imagenet_minival_size(n)
    minival = _cut_segments(whole['train'], keep, n)
    train = whole['train'] if name.endswith('trainval') else _cut_segments(
        whole['train'], 0, keep)
    return {'train': train, 'minival': minival,
            'validation': whole['validation']}
  if name == 'oxford_flowers102':
    return {**whole, 'train': whole['train'] + whole['validation']}
  return whole


def _tfds_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
  spec = _TFDS_SPECS[name]
  builder = _tfds_builder(spec.tfds_name, data_dir, name)
  sizes = {s: _tfds_split_size(builder, s, name, data_dir)
           for s in spec.base_splits}
  segments = _logical_segments(name, sizes)
  if split not in segments:
    raise ValueError(f'{name} has splits {sorted(segments)}, not {split!r}')
  num_classes = builder.info.features['label'].num_classes
  return TfdsSource(name, split, builder, segments[split], 'label',
                    num_classes, multi_label=False)


# ----------------------------------------------------------- ImageNet-21k --


def _find_tfds_dir(data_dir: str) -> str | None:
  """A directory holding a prepared tfds dataset (dataset_info.json)."""
  if os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  base = os.path.join(data_dir, 'imagenet21k')
  if not os.path.isdir(base):
    return None
  for dirpath, _, filenames in sorted(os.walk(base)):
    if 'dataset_info.json' in filenames:
      return dirpath
  return None


def _imagenet21k_source(split: str, data_dir: str | None) -> Source:
  hint = ('imagenet21k is not in the tfds catalog: prepare it yourself as a '
          'tfds dataset (features image + label (ClassLabel) or labels '
          '(Sequence(ClassLabel)); `tfds build` of your builder, or '
          'tfds.dataset_builders.store_as_tfds_dataset) under '
          '<data_dir>/imagenet21k/, or as an ImageFolder <data_dir>/train/'
          '<class>/..., and pass data_dir=')
  if not data_dir or not os.path.isdir(data_dir):
    raise DatasetNotPreparedError(f'imagenet21k: data_dir={data_dir!r} is not a '
                                  f'directory; {hint}.')
  tfds_dir = _find_tfds_dir(data_dir)
  if tfds_dir is None:
    if os.path.isdir(os.path.join(data_dir, 'train')):
      return ImageFolderSource(data_dir, split, 'imagenet21k')
    raise DatasetNotPreparedError(f'imagenet21k: nothing prepared in {data_dir}; '
                                  f'{hint}.')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(tfds_dir)
  features = builder.info.features
  if 'labels' in features:
    label_key, multi = 'labels', True
    num_classes = features['labels'].feature.num_classes
  elif 'label' in features:
    label_key, multi = 'label', False
    num_classes = features['label'].num_classes
  else:
    raise ValueError(f'imagenet21k at {tfds_dir}: needs a label or labels '
                     f'feature, has {sorted(features)}')
  sizes = {s: info.num_examples for s, info in builder.info.splits.items()}
  if 'train' not in sizes:
    raise DatasetNotPreparedError(f'imagenet21k at {tfds_dir} has no train '
                                  f'split ({sorted(sizes)}); {hint}.')
  n = sizes['train']
  if 'validation' in sizes:
    segments = {'train': [('train', 0, n)],
                'validation': [('validation', 0, sizes['validation'])]}
  else:
    held = min(IMAGENET21K_HOLDOUT, max(n // 100, 1))
    segments = {'train': [('train', held, n)],
                'validation': [('train', 0, held)]}
  if split not in segments:
    raise ValueError(f'imagenet21k has splits {sorted(segments)}, not {split!r}')
  return TfdsSource('imagenet21k', split, builder, segments[split], label_key,
                    num_classes, multi_label=multi)


# ------------------------------------------------------------------ names --


def _check_name(name: str) -> None:
  if not isinstance(name, str) or not (
      name in _TFDS_NAMES or name in ('imagenet21k', 'digits')
      or name.startswith('imagefolder:')):
    raise ValueError(f'unknown dataset {name!r}; choose one of '
                     f'{", ".join(DATASET_NAMES)}')


def default_splits(name: str, data_dir: str | None = None) -> tuple[str, str]:
  """(train split, eval split) of a dataset name."""
  _check_name(name)
  if name in _TFDS_SPECS:
    return _TFDS_SPECS[name].train, _TFDS_SPECS[name].eval
  if name == 'digits':
    return 'train', 'test'
  if name == 'imagenet21k':
    return 'train', ('val' if data_dir and _find_tfds_dir(data_dir) is None
                     else 'validation')
  root = os.path.abspath(os.path.expanduser(name[len('imagefolder:'):]))
  dirs = _image_folder_split_dirs(root) if os.path.isdir(root) else {}
  if dirs:
    for candidate in ('val', 'test'):
      if candidate in dirs:
        return 'train', candidate
    raise DatasetNotPreparedError(f'ImageFolder {root} has train/ but no val/, '
                                  'validation/ or test/ folder.')
  return 'train', 'val'


# ---------------------------------------------------------------- holdout --


def holdout_problem(holdout) -> str | None:
  """Why `holdout` is not a valid holdout value, or None if it is."""
  valid = ('must be 0 (none), a fraction in (0, 1) of the train split or a '
           'whole number >= 1 of its examples')
  if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real):
    return valid
  holdout = float(holdout)
  if holdout == 0 or 0 < holdout < 1 or (holdout >= 1 and holdout.is_integer()):
    return None
  return valid


def _check_holdout(holdout) -> None:
  problem = holdout_problem(holdout)
  if problem:
    raise ValueError(f'holdout={holdout!r} (config.data.holdout) {problem}')


def holdout_size(num_train: int, holdout) -> int:
  """Examples that `holdout` carves from a train split of `num_train`.

  Args:
    num_train: examples in the train split.
    holdout: 0, a fraction in (0, 1) (rounded like tfds' percent slices, at
      least one example) or a count (an int, or a float with no fraction:
      command-line values arrive as floats).

  Returns:
    The number of held-out examples, 0 <= n < num_train.

  Raises:
    ValueError: an invalid value, or one that leaves no train example; the
      message names config.data.holdout.
  """
  _check_holdout(holdout)
  if holdout == 0:
    return 0
  if holdout < 1:
    count = max(_fraction_size(num_train, holdout), 1)
  else:
    count = int(holdout)
  if count >= num_train:
    raise ValueError(f'holdout={holdout!r} (config.data.holdout) is {count} '
                     f'examples, which leaves none of the {num_train} of the '
                     'train split to train on')
  return count


_image_folder_cache: dict[tuple, Source] = {}


def get_source(name: str, split: str, data_dir: str | None = None,
               holdout=0) -> Source:
  """The `Source` of one logical split of a named dataset.

  With a holdout (see the module docstring), split HOLDOUT_SPLIT is the part
  carved from the train split, and the train split is what remains; other
  splits are unchanged.

  ImageFolder scans are cached per (root, split) for the life of the process
  (each progressive stage rebuilds its pipeline; the folder is scanned once);
  `clear_cache()` forgets them.

  Raises:
    ValueError: an unknown name or split, an invalid holdout, or split
      HOLDOUT_SPLIT without a holdout.
  """
  _check_name(name)
  _check_holdout(holdout)
  if split in (HOLDOUT_SPLIT, TRAIN_PROBE_SPLIT) and not holdout:
    raise ValueError(f'split {split!r} needs a holdout > 0 '
                     f'(config.data.holdout), got {holdout!r}')
  if split == TRAIN_PROBE_SPLIT:
    rest, held = _carve(name, default_splits(name, data_dir)[0], data_dir,
                        holdout)
    return rest.probe(min(held.num_examples, rest.num_examples),
                      TRAIN_PROBE_SPLIT)
  if holdout:
    train_split = default_splits(name, data_dir)[0]
    if split in (train_split, HOLDOUT_SPLIT):
      return _carve(name, train_split, data_dir, holdout)[
          split == HOLDOUT_SPLIT]
  return _split_source(name, split, data_dir)


def _carve(name, train_split, data_dir, holdout) -> tuple[Source, Source]:
  """(train minus holdout, holdout); cached like the folder scans."""
  key = None
  if name.startswith('imagefolder:'):
    key = (os.path.abspath(os.path.expanduser(name[len('imagefolder:'):])),
           train_split, HOLDOUT_SPLIT, float(holdout))
    if key in _image_folder_cache:
      return _image_folder_cache[key]
  train = _split_source(name, train_split, data_dir)
  carved = train.split_off(holdout_size(train.num_examples, holdout),
                           train_split, HOLDOUT_SPLIT)
  if key is not None:
    _image_folder_cache[key] = carved
  return carved


def _split_source(name: str, split: str, data_dir: str | None) -> Source:
  if name == 'digits':
    return _digits_source(split)
  if name.startswith('imagefolder:'):
    root = name[len('imagefolder:'):]
    if not root:
      raise ValueError("imagefolder needs a root: 'imagefolder:/path/to/root'")
    key = (os.path.abspath(os.path.expanduser(root)), split)
    if key not in _image_folder_cache:
      _image_folder_cache[key] = ImageFolderSource(root, split, name)
    return _image_folder_cache[key]
  if name == 'imagenet21k':
    return _imagenet21k_source(split, data_dir)
  return _tfds_source(name, split, data_dir)


def clear_cache() -> None:
  """Forgets cached ImageFolder scans (after files were added or removed)."""
  _image_folder_cache.clear()


def dataset_info(name: str, data_dir: str | None = None,
                 holdout=0) -> DatasetInfo:
  """Sizes, classes and default splits of a named dataset.

  Args:
    name: one of DATASET_NAMES ('imagefolder:/path/to/root' for a folder).
    data_dir: tfds data_dir (or the ImageNet-21k directory); None for the
      tfds default.
    holdout: 0, or the holdout carved from the train split (a fraction or a
      count, see `holdout_size`); num_train_examples is then what remains.

  Returns:
    DatasetInfo.

  Raises:
    ValueError: unknown name, or an invalid holdout.
    DatasetNotPreparedError: the files are not there; the message says how to
      prepare them.
  """
  _check_holdout(holdout)
  train_split, eval_split = default_splits(name, data_dir)
  if holdout:
    train, held = _carve(name, train_split, data_dir, holdout)
  else:
    train, held = _split_source(name, train_split, data_dir), None
  evaluation = _split_source(name, eval_split, data_dir)
  return DatasetInfo(name=name, num_classes=train.num_classes,
                     num_train_examples=train.num_examples,
                     num_eval_examples=evaluation.num_examples,
                     train_split=train_split, eval_split=eval_split,
                     multi_label=train.multi_label,
                     num_holdout_examples=held.num_examples if held else 0)
