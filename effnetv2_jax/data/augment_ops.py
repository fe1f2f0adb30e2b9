"""The 16 image operations of RandAugment / AutoAugment, in TensorFlow.

Semantics follow google/automl `efficientnetv2/autoaugment.py` (the code the
paper's numbers come from), which in turn mimics PIL: every op takes and
returns a uint8 [h, w, 3] image, runs in graph mode inside tf.data, and draws
its randomness (signs, cutout centres) from a stateless seed, so an example's
augmentation depends only on its seed.

Magnitude mapping (`apply_op`), on the official scale with
`MAX_LEVEL = 10` and levels above 10 extrapolating:

| op | argument at level m |
|---|---|
| Rotate | +-30 m/10 degrees |
| ShearX/Y | +-0.3 m/10 |
| TranslateX/Y | +-translate_const m/10 pixels (100 for RandAugment, 250 AA) |
| Cutout | half side int(cutout_const m/10) (40 RandAugment, 100 AA) |
| Posterize | int(4 m/10) bits (see the semantics below) |
| Solarize | threshold int(256 m/10) (see the semantics below) |
| SolarizeAdd | addition int(110 m/10), threshold 128 |
| Color/Contrast/Brightness/Sharpness | enhance factor 1.8 m/10 + 0.1 |

Geometric ops fill uncovered pixels with 128 and sample nearest neighbours.

Two semantics (`SEMANTICS`, config.data.augment_semantics):
  * 'official' (the default): what the released code computes, wraparounds
    included. It passes Solarize's threshold int(256 m/10) and Posterize's
    shift 8 - int(4 m/10) to TF as uint8, which wrap modulo 256, and TF
    clamps bit shifts to [0, 7]. So Solarize at m = 10, 20, 30 inverts the
    whole image (threshold 0), at m = 11.67 inverts values >= 42, at 15 and
    25 >= 128, at 18.33 >= 213; Posterize at m >= 22.5 (9+ bits, shift -1
    -> 255 -> 7) keeps one bit (x & 0x80).
  * 'intended': the plain reading of the ops: Solarize with a threshold >=
    256 changes nothing, Posterize with 8+ bits changes nothing.
Both give the same result at every other magnitude, and both keep 1 bit for
Posterize at 0 bits (m < 2.5: shift 8, clamped to 7 by TF).

Deliberate details, each matching the official code:
  * Contrast blends towards a constant grey whose value is the *pixel count*
    / 256 (clipped to 255), not the mean intensity: the official histogram
    "mean" sums the histogram. `contrast(..., official=False)` gives PIL's
    mean-intensity contrast instead.
  * Every op equals the official one at every magnitude a preset uses, on
    both signs: tests/test_official_fidelity.py against outputs recorded from
    google/automl (tests/fixtures/official).
"""

from __future__ import annotations

import math

import tensorflow as tf

from effnetv2_jax.data import semantics as semantics_lib
from effnetv2_jax.data.semantics import INTENDED, OFFICIAL, SEMANTICS  # pylint: disable=unused-import

MAX_LEVEL = 10.0
FILL_VALUE = 128

RANDAUGMENT_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
    'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')


def select(mask, on_true, on_false):
  """where(mask, on_true, on_false) for uint8 images, by modular arithmetic.

  TF's select kernel is several times slower than a multiply-add on uint8;
  on_false + mask (on_true - on_false) is exact in uint8's wrap-around
  arithmetic. `mask` broadcasts against the images.
  """
  on_true = tf.convert_to_tensor(on_true)
  on_false = tf.convert_to_tensor(on_false)
  return on_false + tf.cast(mask, tf.uint8) * (on_true - on_false)


def blend(image1, image2, factor: float):
  """PIL-style blend: image1 + factor (image2 - image1), uint8.

  factor in (0, 1) interpolates (truncated to uint8); above 1 extrapolates
  and clips to [0, 255].
  """
  if factor == 0.0:
    return tf.convert_to_tensor(image1)
  if factor == 1.0:
    return tf.convert_to_tensor(image2)
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  blended = image1 + factor * (image2 - image1)
  if 0.0 < factor < 1.0:
    return tf.cast(blended, tf.uint8)
  return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def autocontrast(image):
  """Stretches each channel so its min becomes 0 and its max 255."""
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)
  # A flat channel gets scale 1 and shift 0: unchanged, with no select.
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.where(stretch, hi - lo, 1.0), 1.0)
  shift = tf.where(stretch, lo * scale, 0.0)
  stretched = tf.cast(image, tf.float32) * scale - shift
  return tf.cast(tf.clip_by_value(stretched, 0.0, 255.0), tf.uint8)


def equalize(image):
  """Per-channel histogram equalisation, PIL's `ImageOps.equalize`."""
  height_width = tf.shape(image)[0] * tf.shape(image)[1]
  channels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, 3]))
  offsets = tf.constant([[0], [256], [512]], tf.int32)
  histo = tf.reshape(
      tf.math.bincount(tf.reshape(channels + offsets, [-1]), minlength=768,
                       maxlength=768), [3, 256])
  # The last non-zero bin is the channel maximum's; PIL leaves it out of step.
  top_count = tf.gather(histo, tf.reduce_max(channels, axis=1), batch_dims=1)
  step = (height_width - top_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(histo, axis=1) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(
      tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], axis=1), 0, 255)
  # A channel with step 0 keeps its values: give it the identity table.
  lut = tf.where((step > 0)[:, None], lut, tf.range(256)[None, :])
  equalized = tf.gather(lut, channels, batch_dims=1)
  return tf.reshape(tf.cast(tf.transpose(equalized), tf.uint8),
                    tf.shape(image))


def invert(image):
  return 255 - tf.convert_to_tensor(image)


check_semantics = semantics_lib.check


def posterize_shift(bits: int, semantics: str = OFFICIAL) -> int:
  """The right-then-left shift of Posterize at `bits` (module docstring)."""
  check_semantics(semantics)
  shift = 8 - int(bits)
  if semantics == OFFICIAL:
    # uint8 wraps a negative shift to 256 + shift; TF clamps shifts to 7.
    return min(shift % 256, 7)
  return min(max(shift, 0), 7)


def posterize(image, bits: int, semantics: str = OFFICIAL):
  """Keeps the `bits` high bits of each value."""
  shift = tf.constant(posterize_shift(bits, semantics), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize_threshold(threshold: int, semantics: str = OFFICIAL) -> int:
  """The threshold Solarize compares with: modulo 256 under 'official' (the
  released code converts it to uint8), as given under 'intended'."""
  check_semantics(semantics)
  return int(threshold) % 256 if semantics == OFFICIAL else int(threshold)


def solarize(image, threshold: int, semantics: str = OFFICIAL):
  """Inverts values >= threshold."""
  threshold = solarize_threshold(threshold, semantics)
  if threshold >= 256:
    return tf.convert_to_tensor(image)
  if threshold <= 0:
    return invert(image)
  # 255 - x is x XOR 255 in uint8.
  flip = tf.cast(image >= tf.constant(threshold, tf.uint8), tf.uint8) * 255
  return tf.bitwise.bitwise_xor(image, flip)


def solarize_add(image, addition: int, threshold: int = 128):
  """Adds `addition` (clipped to [0, 255]) to values below threshold."""
  addition, threshold = int(addition), int(threshold)
  if addition >= 0:
    # Saturating uint8 addition: min(x, 255 - a) + a never wraps around.
    room = tf.constant(max(255 - addition, 0), tf.uint8)
    added = tf.minimum(image, room) + tf.constant(min(addition, 255), tf.uint8)
  else:
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int16) + addition, 0,
                                     255), tf.uint8)
  if threshold >= 256:
    return added
  if threshold <= 0:
    return tf.convert_to_tensor(image)
  return select(image < tf.constant(threshold, tf.uint8), added, image)


def color(image, factor: float):
  """PIL `ImageEnhance.Color`: blend with the greyscale image."""
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return blend(grey, image, factor)


def contrast(image, factor: float, official: bool = True):
  """Blend with a constant grey image (see the module docstring)."""
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
  if official:
    hist = tf.histogram_fixed_width(grey, [0, 255], nbins=256)
    mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
  else:
    # PIL: int(mean + 0.5) of the 'L' image.
    mean = tf.floor(tf.reduce_mean(tf.cast(grey, tf.float32)) + 0.5)
  degenerate = tf.ones_like(grey, tf.float32) * mean
  degenerate = tf.cast(tf.clip_by_value(degenerate, 0.0, 255.0), tf.uint8)
  return blend(tf.image.grayscale_to_rgb(degenerate), image, factor)


def brightness(image, factor: float):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor: float):
  """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                  [1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  # The filter does not reach the border; PIL keeps the original there.
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = select(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def transform(image, matrix):
  """Projective transform [a0, a1, a2, b0, b1, b2, c0, c1] mapping output
  pixel (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2) / k; nearest
  sampling, fill 128."""
  matrix = tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=matrix, output_shape=tf.shape(image)[:2],
      fill_value=float(FILL_VALUE), interpolation='NEAREST',
      fill_mode='CONSTANT')
  return out[0]


def rotate(image, degrees):
  """Rotates about the image centre (counter-clockwise for degrees > 0)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  return transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def shear_x(image, level):
  return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level):
  return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, pixels):
  """Content moves left by `pixels` (right if negative)."""
  return transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, pixels):
  """Content moves up by `pixels` (down if negative)."""
  return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def random_centre(image, seed):
  """A uniformly drawn (row, column) of `image`, from a stateless seed."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  return tf.random.stateless_uniform(
      [2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32) % tf.stack(
          [height, width])


def cutout(image, pad_size: int, seed, replace=FILL_VALUE):
  """Fills a square of side up to 2 pad_size, centred uniformly at random.

  The square is clipped at the image border. `replace` is a scalar or a
  tensor broadcastable to the image (noise for the fine-tuning cutout).
  """
  return cutout_at(image, random_centre(image, seed), pad_size, replace)


def cutout_at(image, centre, pad_size: int, replace=FILL_VALUE):
  """`cutout` with its square centred at `centre` (row, column)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  centre = tf.convert_to_tensor(centre, tf.int32)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = ((rows >= centre[0] - pad_size) & (rows < centre[0] + pad_size)
            & (cols >= centre[1] - pad_size) & (cols < centre[1] + pad_size))
  if image.dtype == tf.uint8:
    fill = tf.cast(tf.ones_like(image, tf.float32)
                   * tf.cast(replace, tf.float32), tf.uint8)
    return select(inside, fill, image)
  # Float images (the fine-tuning noise cutout): m fill + (1 - m) x is exact
  # for m in {0, 1}.
  mask = tf.cast(inside, image.dtype)
  return image * (1 - mask) + tf.cast(replace, image.dtype) * mask


def random_sign(seed):
  """-1.0 or 1.0 with equal probability."""
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)


def apply_op(name: str, image, level: float, seed, *, translate_const: float,
             cutout_const: float, semantics: str = OFFICIAL, sign=None,
             centre=None):
  """Applies op `name` at `level` (official scale) with its random parts
  drawn from `seed`.

  Args:
    name: one of RANDAUGMENT_OPS.
    image: uint8 [h, w, 3].
    level: magnitude, static python float.
    seed: stateless seed, int [2]; feeds the sign and the cutout centre.
    translate_const: pixels at level 10.
    cutout_const: cutout half side at level 10.
    semantics: 'official' or 'intended' (module docstring).
    sign: +1 / -1 fixes the sign of Rotate, ShearX/Y and TranslateX/Y
      instead of drawing it from `seed`.
    centre: (row, column) fixes the Cutout centre likewise.

  Returns:
    uint8 [h, w, 3].
  """
  check_semantics(semantics)
  m = float(level) / MAX_LEVEL
  enhance = 1.8 * m + 0.1
  signed = lambda value: value * (random_sign(seed) if sign is None
                                  else float(sign))
  ops = {
      'AutoContrast': lambda: autocontrast(image),
      'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image),
      'Rotate': lambda: rotate(image, signed(30.0 * m)),
      'Posterize': lambda: posterize(image, int(4 * m), semantics),
      'Solarize': lambda: solarize(image, int(256 * m), semantics),
      'SolarizeAdd': lambda: solarize_add(image, int(110 * m)),
      'Color': lambda: color(image, enhance),
      'Contrast': lambda: contrast(image, enhance),
      'Brightness': lambda: brightness(image, enhance),
      'Sharpness': lambda: sharpness(image, enhance),
      'ShearX': lambda: shear_x(image, signed(0.3 * m)),
      'ShearY': lambda: shear_y(image, signed(0.3 * m)),
      'TranslateX': lambda: translate_x(image, signed(translate_const * m)),
      'TranslateY': lambda: translate_y(image, signed(translate_const * m)),
      'Cutout': lambda: cutout_at(
          image, random_centre(image, seed) if centre is None else centre,
          int(cutout_const * m)),
  }
  if name not in ops:
    raise ValueError(f'unknown augmentation op {name!r}; one of {sorted(ops)}')
  return ops[name]()
