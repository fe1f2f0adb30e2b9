"""Train and eval iterators: per-process slices, deterministic order, resume.

Order and randomness (the exact-resume contract):
  * Process p of P reads only examples [start_p, stop_p) of the split: the
    contiguous, near-equal slices of `tfds.even_splits` (sizes differ by at
    most one).
  * The slice is cut into windows of `shuffle_buffer` consecutive examples
    (the whole slice for in-memory sources: digits, ImageFolder). Each epoch
    visits the windows in a random order and each window in a random order,
    both from numpy generators seeded by (seed, process, epoch, window). The
    examples form one endless stream; example number k of it has *position*
    k. Batches are consecutive positions, so batch b is positions
    [b B, (b + 1) B) with B the per-process batch.
  * Every random choice made for an example (crop, flip, RandAugment...) is a
    stateless function of (seed, process, position), and a batch's mixup /
    CutMix of (seed, process, batch index).
  So `start_batch=k` starts the stream at position k B: whole epochs and
  windows before it are never read, at most one window is read and its head
  dropped before decoding, and batches k, k+1, ... come out identical to
  those of a run from 0. Tfds data is pre-shuffled on disk when prepared, so
  windowed shuffling of it mixes well; the official pipeline used a 128k
  shuffle buffer, which cannot be resumed exactly.

Multi-host: with `sharding` (a NamedSharding over the data axis) each
process builds global_batch_size // process_count examples and the iterator
returns global jax.Arrays (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import weakref
from typing import Any, Iterator

import numpy as np

from effnetv2_jax.data import semantics
from effnetv2_jax.data import sources

DEFAULT_SHUFFLE_BUFFER = 16384
# Slices of at most this many windows are set up for reading up front.
_PREPARED_WINDOWS = 16

log = logging.getLogger(__name__)

_tensorflow_configured = False


def configure_tensorflow() -> None:
  """Keeps TensorFlow on the CPU, away from the accelerators JAX uses."""
  global _tensorflow_configured
  if _tensorflow_configured:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # runtime already initialised, or no such device type
  _tensorflow_configured = True


def host_slice(num_examples: int, process_index: int,
               process_count: int) -> tuple[int, int]:
  """[start, stop) of process `process_index`: even, contiguous slices."""
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def _seed_word(*values: int) -> int:
  """A 63-bit integer derived from `values`, for stateless TF seeds."""
  words = [int(v) % (1 << 64) for v in values]
  state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
  return int(state >> np.uint64(1))


_EXAMPLE_STREAM, _MIX_STREAM, _ORDER_STREAM = 1, 2, 3


class ShuffledWindows:
  """The endless, deterministic order in which one process visits its slice.

  Calling the object with a first position yields dicts of numpy arrays
  ('record', 'label', 'index' in the split, 'position' in the stream), one
  (partial, for the first) window at a time, starting exactly there.
  """

  def __init__(self, source: sources.Source, start: int, stop: int, seed: int,
               process_index: int, window: int):
    if stop <= start:
      raise ValueError(f'{source.name}/{source.split}: process '
                       f'{process_index} has no examples (slice [{start}, '
                       f'{stop}))')
    self.source = source
    self.start, self.stop = start, stop
    self.window = max(1, min(int(window), stop - start))
    self.num_windows = math.ceil((stop - start) / self.window)
    self._words = (seed, process_index)
    if self.num_windows <= _PREPARED_WINDOWS:
      for window in range(self.num_windows):
        source.prepare(*self._bounds(window))

  @property
  def num_examples(self) -> int:
    return self.stop - self.start

  def _rng(self, *values):
    return np.random.default_rng(
        [_seed_word(*self._words, _ORDER_STREAM), *values])

  def _bounds(self, window: int) -> tuple[int, int]:
    lo = self.start + window * self.window
    return lo, min(lo + self.window, self.stop)

  def plan(self, first_position: int) -> Iterator[tuple[int, int, int]]:
    """(epoch, window, examples to skip in it) from `first_position` on."""
    epoch, offset = divmod(first_position, self.num_examples)
    while True:
      visited = 0
      for window in self._rng(epoch).permutation(self.num_windows):
        lo, hi = self._bounds(window)
        if visited + (hi - lo) > offset:
          yield epoch, int(window), max(offset - visited, 0)
        visited += hi - lo
      epoch, offset = epoch + 1, 0

  def _read(self, epoch, window, skip):
    lo, hi = self._bounds(window)
    order = self._rng(epoch, window + 1).permutation(hi - lo)[skip:]
    data = self.source.read(lo, hi)
    data = {k: v[order] for k, v in data.items()}
    data['index'] = (lo + order).astype(np.int64)
    return data

  def __call__(self, first_position: int) -> Iterator[dict[str, np.ndarray]]:
    position = first_position
    for step in self.plan(first_position):
      data = self._read(*step)
      n = len(data['label'])
      data['position'] = np.arange(position, position + n, dtype=np.int64)
      position += n
      yield data


def _resolve_processes(sharding, process_index, process_count):
  import jax  # pylint: disable=g-import-not-at-top
  if sharding is not None and (
      (process_index is not None and process_index != jax.process_index())
      or (process_count is not None and process_count != jax.process_count())):
    raise ValueError('process_index/process_count override only without '
                     'sharding (global arrays need the real process layout)')
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, '
                     f'{process_count})')
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a '
                     f'positive multiple of process_count {process_count}')
  return global_batch_size // process_count


def _dataset_options(num_threads: int | None):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = num_threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  return options


def _record_spec(source: sources.Source, batched: bool):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lead = [None] if batched else []
  if source.record_kind == sources.PIXELS:
    shape = source.read(0, 1)['record'].shape[1:]
    record = tf.TensorSpec(lead + list(shape), tf.uint8)
  else:
    record = tf.TensorSpec(lead, tf.string)
  label = tf.TensorSpec(lead + ([None] if source.multi_label else []),
                        tf.int64)
  return record, label


def _to_output(batch: dict[str, np.ndarray], sharding, global_batch: int):
  if sharding is None:
    return batch
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (global_batch,) + v.shape[1:]) for k, v in batch.items()}


_live_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  # A tf.data iterator over a Python generator must be released while the
  # interpreter is still alive, or TF logs finalisation errors at exit.
  for iterator in list(_live_iterators):
    iterator.close()


class TrainIterator:
  """Endless training batches; `next_batch` is the index of the next one.

  Yields {'image': [B, s, s, 3] float32, 'label': [B, classes] float32}:
  numpy per-process batches without sharding, global jax.Arrays with it.
  """

  def __init__(self, dataset, *, sharding, global_batch_size: int,
               local_batch_size: int, start_batch: int,
               info: sources.DatasetInfo):
    self._dataset = dataset
    self._iterator = None
    self._sharding = sharding
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.next_batch = start_batch
    self.info = info
    _live_iterators.add(self)

  def __iter__(self):
    return self

  def close(self) -> None:
    """Releases the tf.data pipeline; the iterator is finished afterwards
    (continue with make_train_iterator(..., start_batch=next_batch))."""
    self._iterator = None
    self._dataset = None

  def __next__(self) -> dict[str, Any]:
    if self._iterator is None:
      if self._dataset is None:
        raise StopIteration
      self._iterator = self._dataset.as_numpy_iterator()
    batch = next(self._iterator)
    self.next_batch += 1
    return _to_output(batch, self._sharding, self.global_batch_size)


class _VirtualProcessesIterator(TrainIterator):
  """This process's share of an N-process input pipeline: one numpy
  pipeline per virtual process, their batches concatenated in process order
  (the row order `make_array_from_process_local_data` gives N real ones)."""

  def __init__(self, parts, *, sharding, global_batch_size: int,
               start_batch: int, info):
    super().__init__(None, sharding=sharding,
                     global_batch_size=global_batch_size,
                     local_batch_size=sum(p.local_batch_size for p in parts),
                     start_batch=start_batch, info=info)
    self._parts = parts

  def close(self) -> None:
    for part in self._parts:
      part.close()
    self._parts = []

  def __next__(self) -> dict[str, Any]:
    if not self._parts:
      raise StopIteration
    batches = [next(part) for part in self._parts]
    self.next_batch += 1
    local = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return _to_output(local, self._sharding, self.global_batch_size)


def _virtual_processes_iterator(arguments: dict, *, sharding,
                                global_batch_size: int,
                                input_processes: int) -> TrainIterator:
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  if input_processes < count or input_processes % count:
    raise ValueError(f'input_processes={input_processes} must be a multiple '
                     f'of the job\'s {count} processes')
  _local_batch_size(global_batch_size, input_processes)  # divisible?
  share = input_processes // count
  parts = [make_train_iterator(global_batch_size=global_batch_size,
                               process_index=v, process_count=input_processes,
                               **arguments)
           for v in range(index * share, (index + 1) * share)]
  return _VirtualProcessesIterator(
      parts, sharding=sharding, global_batch_size=global_batch_size,
      start_batch=arguments['start_batch'], info=parts[0].info)


class EvalIterator:
  """A re-iterable eval pass of fixed-shape, padded batches with a mask.

  `len()` batches on every process (the largest host slice decides); each
  pass yields {'image', 'label', 'mask'}: mask [B] float32 is 1 for real
  examples and 0 for padding (zero images and labels), so every example is
  counted once and every batch has the same shape.
  """

  def __init__(self, dataset, *, sharding, global_batch_size: int,
               local_batch_size: int, num_batches: int, num_examples: int,
               local_num_examples: int, image_size: int, num_classes: int):
    self._dataset = dataset
    self._sharding = sharding
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.num_batches = num_batches
    self.num_examples = num_examples
    self.local_num_examples = local_num_examples
    self._shapes = {'image': (image_size, image_size, 3),
                    'label': (num_classes,), 'mask': ()}

  def __len__(self) -> int:
    return self.num_batches

  def _pad(self, batch):
    size = len(batch['mask'])
    if size == self.local_batch_size:
      return batch
    out = {}
    for key, shape in self._shapes.items():
      full = np.zeros((self.local_batch_size,) + shape, np.float32)
      if size:
        full[:size] = batch[key]
      out[key] = full
    return out

  def __iter__(self) -> Iterator[dict[str, Any]]:
    produced = 0
    empty = {k: np.zeros((0,) + s, np.float32) for k, s in self._shapes.items()}
    if self.local_num_examples:
      for batch in self._dataset.as_numpy_iterator():
        produced += 1
        yield _to_output(self._pad(batch), self._sharding,
                         self.global_batch_size)
    while produced < self.num_batches:
      produced += 1
      yield _to_output(self._pad(empty), self._sharding,
                       self.global_batch_size)


def _check_choice(value, choices, what):
  if value not in choices:
    raise ValueError(f'{what} must be one of {choices}, got {value!r}')


def make_train_iterator(
    name: str, *, data_dir: str | None = None, global_batch_size: int,
    image_size: int, seed: int, augment: str | None = None,
    randaug_layers: int = 2, randaug_magnitude: float = 10.0,
    mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
    normalization: str = 'inception', sharding=None, start_batch: int = 0,
    process_index: int | None = None, process_count: int | None = None,
    shuffle_buffer: int | None = None, split: str | None = None,
    num_threads: int | None = None, holdout: float = 0,
    augment_semantics: str = 'official',
    input_processes: int = 0) -> TrainIterator:
  """An endless, resumable iterator of augmented training batches.

  Args:
    name: dataset name (see `sources.DATASET_NAMES`).
    data_dir: tfds data_dir (the ImageNet-21k directory for imagenet21k).
    global_batch_size: examples per step over all processes.
    image_size: side of the square output images (per progressive stage).
    seed: the whole stream (order, augmentation, mixing) follows from it.
    augment: 'randaugment', 'autoaugment' (B0-B3 AutoAugment v0), 'ft'
      (fine-tuning: whole-image resize, flip, noise cutout), 'none', or
      'digits' (digits only: upscale and a random translation of up to
      randaug_magnitude / 10 source pixels, see `preprocess.digits_max_shift`).
      None picks 'digits' for digits and 'randaugment' otherwise.
    randaug_layers: RandAugment ops per image.
    randaug_magnitude: RandAugment magnitude on the official scale (also the
      translation strength of augment='digits').
    mixup_alpha: Beta alpha of mixup; 0 = off.
    cutmix_alpha: Beta alpha of CutMix; 0 = off. Both on: half batch each.
    normalization: 'inception' (S/M/L/XL), 'imagenet' (B0-B3, also selects
      their crop) or 'ft' (fine-tuning).
    sharding: NamedSharding over the data axis for global jax.Arrays; None
      for numpy per-process batches.
    start_batch: index of the first batch to produce (exact resume).
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).
    shuffle_buffer: window size for shuffling tfds data (default 16384);
      in-memory sources always shuffle whole epochs.
    split: logical split to train on (default: the dataset's train split).
    num_threads: tf.data worker threads (default: all cores).
    holdout: examples of the train split kept out of training (a fraction
      or a count, see `sources.holdout_size`; 0: none); evaluate on them
      with make_eval_iterator(split=sources.HOLDOUT_SPLIT, holdout=...).
    augment_semantics: 'official' (what google/automl computes: Solarize and
      Posterize wrap around above magnitude 10, CutMix labels weighted by
      the batch-mean pasted fraction) or 'intended' (no wraparound, each
      example's own fraction); see `augment_ops` and `mix`.
    input_processes: with `sharding`, build the global batches an input
      pipeline split over this many processes builds (0: the job's own
      count). A multiple of the process count: each process then runs the
      pipelines of its share of them and concatenates their batches, so a
      run on one host reproduces the data order of a run on N.

  Returns:
    TrainIterator.

  Raises:
    ValueError: a bad argument, or a holdout that leaves fewer than
      global_batch_size train examples.
  """
  if sharding is not None and input_processes:
    import jax  # pylint: disable=g-import-not-at-top
    if input_processes != jax.process_count():
      return _virtual_processes_iterator(
          dict(name=name, data_dir=data_dir, image_size=image_size, seed=seed,
               augment=augment, randaug_layers=randaug_layers,
               randaug_magnitude=randaug_magnitude, mixup_alpha=mixup_alpha,
               cutmix_alpha=cutmix_alpha, normalization=normalization,
               start_batch=start_batch, shuffle_buffer=shuffle_buffer,
               split=split, num_threads=num_threads, holdout=holdout,
               augment_semantics=augment_semantics),
          sharding=sharding, global_batch_size=global_batch_size,
          input_processes=input_processes)
  configure_tensorflow()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.data import mix as mix_lib  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  _check_choice(normalization, preprocess.NORMALIZATIONS, 'normalization')
  if augment is not None:
    _check_choice(augment, preprocess.AUGMENTS, 'augment')
  semantics.check(augment_semantics)
  if image_size < 1 or start_batch < 0:
    raise ValueError(f'need image_size >= 1 and start_batch >= 0, got '
                     f'{image_size}, {start_batch}')
  if min(mixup_alpha, cutmix_alpha, randaug_magnitude) < 0:
    raise ValueError('mixup_alpha, cutmix_alpha and randaug_magnitude must be '
                     '>= 0')
  process_index, process_count = _resolve_processes(
      sharding, process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  info = sources.dataset_info(name, data_dir, holdout)
  source = sources.get_source(name, split or info.train_split, data_dir,
                              holdout)
  if holdout and source.num_examples < global_batch_size:
    raise ValueError(f'holdout={holdout!r} (config.data.holdout) leaves '
                     f'{source.num_examples} examples of {name}/'
                     f'{source.split}, fewer than one global batch of '
                     f'{global_batch_size}')
  if augment is None:
    augment = 'digits' if source.record_kind == sources.PIXELS else 'randaugment'
  if (augment == 'digits') != (source.record_kind == sources.PIXELS) and (
      augment != 'none'):
    raise ValueError(f"augment {augment!r} does not fit {name}: 'digits' "
                     "is for (and the only augmentation of) the digits dataset")

  start, stop = host_slice(source.num_examples, process_index, process_count)
  window = source.num_examples if source.random_access else (
      shuffle_buffer or DEFAULT_SHUFFLE_BUFFER)
  log.info('train input %s/%s: process %d/%d reads [%d, %d), batch %d of %d, '
           '%d px, augment %s (magnitude %g), mixup %g, cutmix %g, from '
           'batch %d', name, source.split, process_index, process_count,
           start, stop, local_batch, global_batch_size, image_size, augment,
           randaug_magnitude, mixup_alpha, cutmix_alpha, start_batch)
  order = ShuffledWindows(source, start, stop, seed, process_index, window)
  record_spec, label_spec = _record_spec(source, batched=True)
  first_position = start_batch * local_batch
  ds = tf.data.Dataset.from_generator(
      lambda: order(first_position),
      output_signature={'record': record_spec, 'label': label_spec,
                        'index': tf.TensorSpec([None], tf.int64),
                        'position': tf.TensorSpec([None], tf.int64)})
  # prefetch(1): the next window (a tfds read that takes a while) is read in
  # the background while this one is decoded.
  ds = ds.prefetch(1).unbatch()

  example_word = _seed_word(seed, process_index, _EXAMPLE_STREAM)
  mix_word = _seed_word(seed, process_index, _MIX_STREAM)
  num_classes, multi_label = source.num_classes, source.multi_label

  def preprocess_example(example):
    example_seed = tf.stack([tf.constant(example_word, tf.int64),
                             example['position']])
    image = preprocess.train_image(
        example['record'], record_kind=source.record_kind,
        image_size=image_size, augment=augment, normalization=normalization,
        randaug_layers=randaug_layers, randaug_magnitude=randaug_magnitude,
        seed=example_seed, augment_semantics=augment_semantics)
    label = preprocess.label_vector(example['label'], num_classes, multi_label)
    return {'image': image, 'label': label, 'position': example['position']}

  def mix_batch(batch):
    batch_seed = tf.stack([tf.constant(mix_word, tf.int64),
                           batch['position'][0] // local_batch])
    images, labels = mix_lib.mix_batch(
        batch['image'], batch['label'], batch_seed, mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha, semantics=augment_semantics)
    return {'image': images, 'label': labels}

  # The functions hold no Python control flow on tensors: skip autograph.
  plain = tf.autograph.experimental.do_not_convert
  ds = ds.map(plain(preprocess_example), num_parallel_calls=tf.data.AUTOTUNE)
  if source.record_kind == sources.PATH:
    # Files that passed the header check but still fail to decode are dropped
    # (logged by tf.data) rather than stopping training.
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(plain(mix_batch), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.prefetch(2).with_options(_dataset_options(num_threads))
  return TrainIterator(ds, sharding=sharding,
                       global_batch_size=global_batch_size,
                       local_batch_size=local_batch, start_batch=start_batch,
                       info=info)


def make_eval_iterator(
    name: str, *, data_dir: str | None = None, split: str | None = None,
    global_batch_size: int, image_size: int, normalization: str = 'inception',
    sharding=None, process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None, holdout: float = 0) -> EvalIterator:
  """A re-iterable, padded evaluation pass over a split.

  Args:
    name: dataset name.
    data_dir: tfds data_dir.
    split: logical split (default: the dataset's eval split; e.g. 'minival'
      for imagenet2012, or sources.HOLDOUT_SPLIT with `holdout`).
    global_batch_size: examples per batch over all processes.
    image_size: eval resolution.
    normalization: 'inception', 'imagenet' or 'ft' (see `preprocess`).
    sharding: NamedSharding over the data axis, or None for numpy batches.
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).
    num_threads: tf.data worker threads (default: all cores).
    holdout: the holdout carved from the train split (see
      make_train_iterator); it is split sources.HOLDOUT_SPLIT, and the train
      split is what remains.

  Returns:
    EvalIterator.
  """
  configure_tensorflow()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  _check_choice(normalization, preprocess.NORMALIZATIONS, 'normalization')
  process_index, process_count = _resolve_processes(
      sharding, process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  info = sources.dataset_info(name, data_dir, holdout)
  source = sources.get_source(name, split or info.eval_split, data_dir,
                              holdout)
  start, stop = host_slice(source.num_examples, process_index, process_count)
  largest_slice = math.ceil(source.num_examples / process_count)
  num_batches = math.ceil(largest_slice / local_batch)
  log.info('eval input %s/%s: process %d/%d reads [%d, %d), %d batches of '
           '%d, %d px, %s', name, source.split, process_index, process_count,
           start, stop, num_batches, local_batch, image_size, normalization)
  num_classes, multi_label = source.num_classes, source.multi_label

  def preprocess_example(example):
    image = preprocess.eval_image(example['record'],
                                  record_kind=source.record_kind,
                                  image_size=image_size,
                                  normalization=normalization)
    label = preprocess.label_vector(example['label'], num_classes, multi_label)
    return {'image': image, 'label': label, 'mask': tf.ones([], tf.float32)}

  ds = None
  if stop > start:
    ds = source.dataset(start, stop)
    ds = ds.map(tf.autograph.experimental.do_not_convert(preprocess_example),
                num_parallel_calls=tf.data.AUTOTUNE)
    if source.record_kind == sources.PATH:
      ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(local_batch).prefetch(2).with_options(
        _dataset_options(num_threads))
  return EvalIterator(ds, sharding=sharding,
                      global_batch_size=global_batch_size,
                      local_batch_size=local_batch, num_batches=num_batches,
                      num_examples=source.num_examples,
                      local_num_examples=stop - start, image_size=image_size,
                      num_classes=num_classes)
