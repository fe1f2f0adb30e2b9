"""Per-example preprocessing: decode, crop, resize, augment, normalise.

Follows google/automl `efficientnetv2/preprocessing.py` (S/M/L/XL and
fine-tuning) and `preprocess_legacy.py` (B0-B3).

Train, by `normalization` family and `augment`:
  * 'inception' / 'ft' families: Inception crop (`sample_distorted_bounding_box`
    area 0.05-1, aspect 3/4-4/3, 100 attempts, whole image as the box) on
    the decoded image, bilinear resize without antialiasing, random flip.
  * 'imagenet' family (B0-B3): crop with min_object_covered 0.1, area
    0.08-1, 10 attempts, a centre crop when sampling fails, bicubic resize
    (TF1 `resize_bicubic`: no half-pixel centres), random flip.
  * augment 'ft' replaces the crop: whole image resized (aspect ignored),
    flip, then a noise cutout of half side size // 4.
  * augment 'randaugment' / 'autoaugment' then run on the uint8 image.
  * digits (8x8 pixel records): bilinear upscale, then for augment 'digits'
    a random translation (see `translate_digit`); never flipped.

Eval:
  * 'inception': centre crop of side int(s / (s + 32) * min(h, w)) at
    offsets ((h - c) // 2, (w - c) // 2), bilinear resize; for s >= 320 the
    whole image is resized instead.
  * 'ft': whole image resized, at every size (the official fine-tuning eval;
    identical to the rule above at the official fine-tuning sizes >= 320).
  * 'imagenet': centre crop with ratio s / (s + 32), offsets
    ((h - c) + 1) // 2, bicubic resize.

Normalisation: 'inception' (x - 128) / 128; 'ft' (x / 255 - 0.5) / 0.5;
'imagenet' (x - 255 mean) / (255 std) with ImageNet's mean and std.
"""

from __future__ import annotations

import tensorflow as tf

from effnetv2_jax.data import augment_ops
from effnetv2_jax.data import autoaugment as autoaugment_lib
from effnetv2_jax.data import randaugment as randaugment_lib
from effnetv2_jax.data import sources

NORMALIZATIONS = ('inception', 'imagenet', 'ft')
AUGMENTS = ('randaugment', 'autoaugment', 'ft', 'none', 'digits')

CROP_PADDING = 32
WHOLE_IMAGE_EVAL_SIZE = 320
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(image, normalization: str):
  """Float pixels in [0, 255] -> network input."""
  image = tf.cast(image, tf.float32)
  if normalization == 'inception':
    return (image - 128.0) / 128.0
  if normalization == 'ft':
    return (image / 255.0 - 0.5) / 0.5
  if normalization == 'imagenet':
    return (image - IMAGENET_MEAN) / IMAGENET_STD
  raise ValueError(f'normalization must be one of {NORMALIZATIONS}, '
                   f'got {normalization!r}')


def _is_jpeg(data):
  return tf.strings.substr(data, 0, 3) == b'\xff\xd8\xff'


def decode(data):
  """Encoded bytes -> uint8 [h, w, 3]; truncated JPEGs decode what is there."""
  def jpeg():
    return tf.io.decode_jpeg(data, channels=3, try_recover_truncated=True,
                             acceptable_fraction=0.0)

  def other():
    return tf.io.decode_image(data, channels=3, expand_animations=False)

  image = tf.cond(_is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def record_to_encoded(record, record_kind: str):
  if record_kind == sources.PATH:
    return tf.io.read_file(record)
  if record_kind == sources.ENCODED:
    return record
  raise ValueError(f'record kind {record_kind!r} holds no encoded image')


def _resize_bilinear(image, size: int):
  return tf.image.resize(image, [size, size], method='bilinear',
                         antialias=False)


def _resize_bicubic_legacy(image, size: int):
  # The B0-B3 code called TF1 resize_bicubic, which has no half-pixel centres.
  return tf.raw_ops.ResizeBicubic(images=image[None], size=[size, size],
                                  align_corners=False,
                                  half_pixel_centers=False)[0]


def inception_crop(image, size: int, seed):
  """The S/M/L/XL train crop on a decoded image, resized to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(0.75, 1.33),
      area_range=(0.05, 1.0), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  return _resize_bilinear(image, size)


def _legacy_center_crop_window(shape, size: int):
  height, width = shape[0], shape[1]
  crop = tf.cast(size / (size + CROP_PADDING)
                 * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  return tf.stack([((height - crop) + 1) // 2, ((width - crop) + 1) // 2,
                   crop, crop])


def _legacy_random_window(shape, size: int, seed):
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  # Sampling gave up (returned the whole image): centre crop instead.
  failed = tf.reduce_all(tf.equal(crop_size[:2], shape[:2]))
  return tf.where(failed, _legacy_center_crop_window(shape, size),
                  tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]))


def _legacy_decode_window(data, window_fn):
  """Decodes the window `window_fn(shape)` of an image, as the B0-B3 code:
  JPEGs through decode_and_crop_jpeg (only the window is decoded, which
  differs from decode-then-crop by a level or so near the window edge),
  other formats decoded whole and sliced."""
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(data))
    return tf.image.decode_and_crop_jpeg(data, window, channels=3,
                                         try_recover_truncated=True,
                                         acceptable_fraction=0.0)

  def other():
    image = decode(data)
    window = window_fn(tf.shape(image))
    return tf.slice(image, [window[0], window[1], 0],
                    [window[2], window[3], 3])

  image = tf.cond(_is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def legacy_crop(data, size: int, seed):
  """The B0-B3 train crop on encoded bytes, resized (bicubic) to size."""
  crop = _legacy_decode_window(
      data, lambda shape: _legacy_random_window(shape, size, seed))
  return _resize_bicubic_legacy(crop, size)


def legacy_center_crop(data, size: int):
  """The B0-B3 eval crop on encoded bytes, resized (bicubic) to size."""
  crop = _legacy_decode_window(
      data, lambda shape: _legacy_center_crop_window(shape, size))
  return _resize_bicubic_legacy(crop, size)


def translate_digit(image, max_shift: int, seed):
  """Shifts the content by up to max_shift px per axis, filling with 0."""
  if max_shift <= 0:
    return image
  size = image.shape[0]
  shift = tf.random.stateless_uniform([2], seed, minval=0,
                                      maxval=2 * max_shift + 1, dtype=tf.int32)
  padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift],
                          [0, 0]])
  return tf.slice(padded, [shift[0], shift[1], 0], [size, size, 3])


def digits_max_shift(image_size: int, magnitude: float) -> int:
  """Translation range of augment='digits': magnitude / 10 source pixels.

  One 8x8 source pixel spans image_size / 8 output pixels, so magnitude 10 at
  32 px shifts by up to 4 px, magnitude 5 at 16 px by 1 px.
  """
  return int(round(magnitude / 10.0 * image_size / 8.0))


def ft_noise_cutout(image, size: int, seed):
  """Fine-tuning cutout: a square of half side size // 4 of uniform noise.

  The official code fills with U[0, 1) in its normalised space
  (x / 127.5 - 1), i.e. pixel values 127.5 (1 + U[0, 1)).
  """
  noise_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(
      seed, 2))
  noise = 127.5 * (1.0 + tf.random.stateless_uniform(tf.shape(image),
                                                      noise_seed))
  return augment_ops.cutout(image, size // 4, box_seed, replace=noise)


def train_image(record, *, record_kind: str, image_size: int, augment: str,
                normalization: str, randaug_layers: int,
                randaug_magnitude: float, seed,
                augment_semantics: str = augment_ops.OFFICIAL):
  """One training example's image, [size, size, 3] float32 normalised.

  `augment_semantics` ('official' / 'intended') is passed to RandAugment and
  AutoAugment (see `augment_ops`).
  """
  crop_seed, flip_seed, policy_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if record_kind == sources.PIXELS:
    image = _resize_bilinear(record, image_size)
    if augment == 'digits':
      shift = digits_max_shift(image_size, randaug_magnitude)
      image = translate_digit(image, shift, policy_seed)
    elif augment != 'none':
      raise ValueError(f"augment {augment!r} does not suit 8x8 digits; use "
                       "'digits' or 'none'")
    return normalize(image, normalization)
  if augment == 'digits':
    raise ValueError("augment 'digits' is only for the digits dataset")

  data = record_to_encoded(record, record_kind)
  if augment == 'ft':
    image = _resize_bilinear(decode(data), image_size)
  elif normalization == 'imagenet':
    image = legacy_crop(data, image_size, crop_seed)
  else:
    image = inception_crop(decode(data), image_size, crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)

  if augment in ('randaugment', 'autoaugment'):
    # The policies work on uint8; the cast truncates, as the official code.
    pixels = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    if augment == 'randaugment':
      pixels = randaugment_lib.randaugment(pixels, policy_seed, randaug_layers,
                                           randaug_magnitude,
                                           augment_semantics)
    else:
      pixels = autoaugment_lib.autoaugment_v0(pixels, policy_seed,
                                              augment_semantics)
    image = tf.cast(pixels, tf.float32)
  elif augment == 'ft':
    image = ft_noise_cutout(image, image_size, policy_seed)
  elif augment != 'none':
    raise ValueError(f'augment must be one of {AUGMENTS}, got {augment!r}')
  image.set_shape([image_size, image_size, 3])
  return normalize(image, normalization)


def eval_image(record, *, record_kind: str, image_size: int,
               normalization: str):
  """One evaluation example's image, [size, size, 3] float32 normalised."""
  if record_kind == sources.PIXELS:
    return normalize(_resize_bilinear(record, image_size), normalization)
  data = record_to_encoded(record, record_kind)
  if normalization == 'imagenet':
    image = legacy_center_crop(data, image_size)
  else:
    image = decode(data)
    if normalization == 'inception' and image_size < WHOLE_IMAGE_EVAL_SIZE:
      shape = tf.shape(image)
      crop = tf.cast(image_size / (image_size + CROP_PADDING)
                     * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                     tf.int32)
      crop = tf.maximum(crop, 1)
      image = tf.image.crop_to_bounding_box(
          image, (shape[0] - crop) // 2, (shape[1] - crop) // 2, crop, crop)
    image = _resize_bilinear(image, image_size)
  image.set_shape([image_size, image_size, 3])
  return normalize(image, normalization)


def label_vector(label, num_classes: int, multi_label: bool):
  """Class index -> one-hot; padded index list -> multi-hot summing to 1."""
  if not multi_label:
    return tf.one_hot(label, num_classes, dtype=tf.float32)
  valid = label >= 0
  hot = tf.reduce_sum(
      tf.one_hot(tf.where(valid, label, 0), num_classes, dtype=tf.float32)
      * tf.cast(valid, tf.float32)[:, None], axis=0)
  hot = tf.minimum(hot, 1.0)
  return hot / tf.maximum(tf.reduce_sum(hot), 1.0)
