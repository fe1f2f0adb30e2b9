"""The augmentation ops against their definitions and PIL's equivalents.

Tolerances, and why:
  * equalize, invert, posterize, solarize, integer translation: exact (PIL
    uses the same integer arithmetic).
  * autocontrast: off by 1 only where the exact value is an integer (float32
    here, double in PIL, both truncating; PIL lands just below).
  * color, brightness, sharpness, contrast: at most 1 + ceil(|1 - factor|)
    levels, on average under half a level per unit of |1 - factor|. PIL
    makes its greyscale with fixed-point rounding ((19595 R + 38470 G +
    7471 B + 2^15) >> 16) and rounds its SMOOTH filter; TF uses float weights
    and truncates. The degenerate images so differ by <= 1 level, which the
    blend scales by |1 - factor|.
  * rotate: nearest-neighbour sampling picks another source pixel only where
    the source coordinate is within float rounding of a pixel boundary; at
    most 1% of pixels may differ.
  * shear: exact at levels without exact half-pixel ties (at a tie TF rounds
    half up and PIL need not).
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from effnetv2_jax.data import augment_ops
from effnetv2_jax.data import autoaugment
from effnetv2_jax.data import mix
from effnetv2_jax.data import preprocess
from effnetv2_jax.data import randaugment

OPS = augment_ops.RANDAUGMENT_OPS
SEED = tf.constant([3, 4], tf.int64)


def _photo(height=37, width=53, seed=0):
  """A smooth-ish RGB image with a full value range, odd-sized on purpose."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255.0 / width, y * 255.0 / height,
                   (x + y) * 127.0 / (height + width) + 60], -1)
  noisy = base + rng.normal(0, 25, base.shape)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _tf(op, image, *args, **kwargs):
  return op(tf.constant(image), *args, **kwargs).numpy()


def _diff(a, b):
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


@pytest.fixture(scope='module')
def photo():
  return _photo()


@pytest.mark.parametrize('name', OPS)
@pytest.mark.parametrize('magnitude', [0.0, 7.0, 15.0])
def test_every_op_keeps_shape_dtype_range(name, magnitude):
  image = _photo(11, 29, seed=1)
  out = augment_ops.apply_op(name, tf.constant(image), magnitude, SEED,
                             translate_const=100.0, cutout_const=40.0)
  assert out.dtype == tf.uint8
  assert out.shape == image.shape


IDENTITY_AT = [('Rotate', 0.0), ('ShearX', 0.0), ('ShearY', 0.0),
               ('TranslateX', 0.0), ('TranslateY', 0.0), ('Cutout', 0.0),
               ('SolarizeAdd', 0.0), ('Color', 5.0), ('Contrast', 5.0),
               ('Brightness', 5.0), ('Sharpness', 5.0), ('Solarize', 10.0),
               ('Posterize', 20.0)]


@pytest.mark.parametrize('name,magnitude', IDENTITY_AT)
def test_identity_where_the_magnitude_says_so(photo, name, magnitude):
  # Solarize at 10 (threshold 256) is the identity as intended; the official
  # code wraps the threshold to 0 and inverts (test_official_fidelity.py).
  out = augment_ops.apply_op(name, tf.constant(photo), magnitude, SEED,
                             translate_const=100.0, cutout_const=40.0,
                             semantics='intended')
  np.testing.assert_array_equal(out.numpy(), photo)


@pytest.mark.parametrize('name,magnitude',
                         [(n, m) for n, m in IDENTITY_AT if m == 0.0])
def test_not_identity_above_zero(photo, name, magnitude):
  del magnitude
  out = augment_ops.apply_op(name, tf.constant(photo), 3.0, SEED,
                             translate_const=100.0, cutout_const=40.0)
  assert np.any(out.numpy() != photo)


def test_equalize_matches_pil_exactly(photo):
  dark = (photo // 3).astype(np.uint8)  # a narrow histogram to stretch
  for image in (photo, dark, np.full((5, 6, 3), 7, np.uint8)):
    expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    np.testing.assert_array_equal(_tf(augment_ops.equalize, image), expected)


def test_autocontrast_matches_pil(photo):
  narrow = (photo // 4 + 50).astype(np.uint8)
  for image in (photo, narrow, np.full((4, 4, 3), 9, np.uint8)):
    expected = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
    out = _tf(augment_ops.autocontrast, image)
    assert _diff(out, expected).max() <= 1
    # They differ only where the exact value (v - lo) 255 / (hi - lo) is an
    # integer: PIL's double arithmetic lands just below it and truncates.
    lo = image.min(axis=(0, 1)).astype(int)
    span = np.maximum(image.max(axis=(0, 1)).astype(int) - lo, 1)
    exact_integer = ((image.astype(int) - lo) * 255) % span == 0
    assert np.all(exact_integer[out != expected])


def test_invert_posterize_solarize_match_pil_exactly(photo):
  pil = Image.fromarray(photo)
  np.testing.assert_array_equal(_tf(augment_ops.invert, photo),
                                np.asarray(ImageOps.invert(pil)))
  for bits in range(1, 9):
    np.testing.assert_array_equal(_tf(augment_ops.posterize, photo, bits),
                                  np.asarray(ImageOps.posterize(pil, bits)))
  for threshold in (0, 1, 77, 128, 200, 255, 256):
    np.testing.assert_array_equal(
        _tf(augment_ops.solarize, photo, threshold, 'intended'),
        np.asarray(ImageOps.solarize(pil, threshold)))


def test_posterize_zero_bits_keeps_one_as_tf_did(photo):
  np.testing.assert_array_equal(_tf(augment_ops.posterize, photo, 0),
                                photo & 0x80)


def test_solarize_add_definition(photo):
  for addition in (-40, 0, 30, 110, 165, 300):
    for threshold in (0, 128, 200, 256):
      added = np.clip(photo.astype(int) + addition, 0, 255)
      expected = np.where(photo < threshold, added, photo)
      np.testing.assert_array_equal(
          _tf(augment_ops.solarize_add, photo, addition, threshold), expected)


ENHANCE = [(augment_ops.color, ImageEnhance.Color),
           (augment_ops.brightness, ImageEnhance.Brightness),
           (augment_ops.sharpness, ImageEnhance.Sharpness),
           (lambda im, f: augment_ops.contrast(im, f, official=False),
            ImageEnhance.Contrast)]


@pytest.mark.parametrize('op,pil_enhancer', ENHANCE)
@pytest.mark.parametrize('factor', [0.1, 0.46, 1.0, 1.54, 1.9, 2.8])
def test_enhance_ops_match_pil(photo, op, pil_enhancer, factor):
  expected = np.asarray(pil_enhancer(Image.fromarray(photo)).enhance(factor))
  out = _tf(op, photo, factor)
  # The degenerate images differ by <= 1 level; blending scales that by
  # |1 - factor|, and each side truncates once.
  spread = max(1.0, abs(1.0 - factor))
  assert _diff(out, expected).max() <= 1 + np.ceil(spread)
  assert _diff(out, expected).mean() < 0.5 * spread


def test_official_contrast_uses_pixel_count_over_256(photo):
  factor = 0.46
  grey = photo.shape[0] * photo.shape[1] / 256.0  # what the official code does
  expected = np.floor(grey + factor * (photo - np.floor(grey))).astype(np.uint8)
  out = _tf(augment_ops.contrast, photo, factor)
  assert _diff(out, expected).max() <= 1
  big = np.zeros((40, 40, 3), np.uint8)  # 1600 / 256 = 6.25 -> grey 6
  np.testing.assert_array_equal(_tf(augment_ops.contrast, big, 0.0),
                                np.full_like(big, 6))


@pytest.mark.parametrize('degrees', [-45.0, -12.5, 30.0, 90.0])
def test_rotate_matches_pil(photo, degrees):
  expected = np.asarray(Image.fromarray(photo).rotate(
      degrees, resample=Image.NEAREST, fillcolor=(128, 128, 128)))
  out = _tf(augment_ops.rotate, photo, degrees)
  assert np.mean(np.any(out != expected, axis=-1)) < 0.01


# Levels without exact half-pixel ties on this image (level n is never
# k + 1/2 for n < 53): at a tie TF rounds half up and PIL need not, a
# convention difference, not an error (0.3 ties on every 5th row).
@pytest.mark.parametrize('level', [-0.2345, 0.1234, 0.4321])
def test_shear_matches_pil_affine(photo, level):
  height, width = photo.shape[:2]
  pil = Image.fromarray(photo)
  # PIL samples at pixel centres (x + 0.5); TF at integer indices. The
  # -level/2 offset makes PIL's affine map index x to x + level y like TF's.
  sheared_x = np.asarray(pil.transform(
      (width, height), Image.AFFINE, (1, level, -level / 2, 0, 1, 0),
      Image.NEAREST, fillcolor=(128, 128, 128)))
  sheared_y = np.asarray(pil.transform(
      (width, height), Image.AFFINE, (1, 0, 0, level, 1, -level / 2),
      Image.NEAREST, fillcolor=(128, 128, 128)))
  for op, expected in ((augment_ops.shear_x, sheared_x),
                       (augment_ops.shear_y, sheared_y)):
    np.testing.assert_array_equal(_tf(op, photo, level), expected)


@pytest.mark.parametrize('pixels', [-20, 3, 17, 60])
def test_translate_matches_pil_exactly(photo, pixels):
  height, width = photo.shape[:2]
  pil = Image.fromarray(photo)
  for op, matrix in ((augment_ops.translate_x, (1, 0, pixels, 0, 1, 0)),
                     (augment_ops.translate_y, (1, 0, 0, 0, 1, pixels))):
    expected = np.asarray(pil.transform((width, height), Image.AFFINE, matrix,
                                        Image.NEAREST,
                                        fillcolor=(128, 128, 128)))
    np.testing.assert_array_equal(_tf(op, photo, float(pixels)), expected)


@pytest.mark.parametrize('pad', [0, 1, 8, 40])
def test_cutout_definition(photo, pad):
  for i in range(5):
    seed = tf.constant([i, 9], tf.int64)
    out = augment_ops.cutout(tf.constant(photo), pad, seed).numpy()
    if pad == 0:
      np.testing.assert_array_equal(out, photo)
      continue
    filled = np.all(out == 128, axis=-1)
    rows, cols = np.nonzero(np.any(out != photo, axis=-1))
    # One axis-aligned box of side <= 2 pad, filled with 128; all else kept.
    box = np.zeros(filled.shape, bool)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert filled[box].all()
    np.testing.assert_array_equal(out[~box], photo[~box])
    assert rows.max() - rows.min() < 2 * pad
    assert cols.max() - cols.min() < 2 * pad


def test_magnitude_scale_extrapolates_above_10():
  image = _photo(200, 220, seed=2)
  # Translate at magnitude 15 moves by 150 px (100 px at 10), either way.
  out = augment_ops.apply_op('TranslateX', tf.constant(image), 15.0, SEED,
                             translate_const=100.0, cutout_const=40.0).numpy()
  candidates = [_tf(augment_ops.translate_x, image, s) for s in (150., -150.)]
  assert any(np.array_equal(out, c) for c in candidates)
  # Rotate at magnitude 15 turns by 45 degrees.
  out = augment_ops.apply_op('Rotate', tf.constant(image), 15.0, SEED,
                             translate_const=100.0, cutout_const=40.0).numpy()
  candidates = [_tf(augment_ops.rotate, image, s) for s in (45., -45.)]
  assert any(np.array_equal(out, c) for c in candidates)
  # Posterize at 7.5 keeps int(3.0) = 3 bits; Solarize at 5 thresholds at 128.
  out = augment_ops.apply_op('Posterize', tf.constant(image), 7.5, SEED,
                             translate_const=100.0, cutout_const=40.0).numpy()
  np.testing.assert_array_equal(out, image & 0xE0)
  out = augment_ops.apply_op('Solarize', tf.constant(image), 5.0, SEED,
                             translate_const=100.0, cutout_const=40.0).numpy()
  np.testing.assert_array_equal(out, np.where(image < 128, image, 255 - image))


def test_randaugment_applies_every_sampled_op():
  image = _photo(24, 24, seed=3)
  chosen = set()
  for i in range(60):
    seed = tf.constant([i, 1], tf.int64)
    (op_index, op_seed), = randaugment.layer_choices(seed, 1)
    name = OPS[int(op_index)]
    chosen.add(name)
    expected = augment_ops.apply_op(name, tf.constant(image), 9.0, op_seed,
                                    translate_const=100.0, cutout_const=40.0)
    out = randaugment.randaugment(tf.constant(image), seed, 1, 9.0)
    np.testing.assert_array_equal(out.numpy(), expected.numpy())
  assert len(chosen) >= 14  # ~16 (1 - e^(-60/16)) expected


def test_randaugment_two_layers_deterministic_per_seed():
  image = tf.constant(_photo(20, 30, seed=4))
  a = randaugment.randaugment(image, SEED, 2, 10.0).numpy()
  b = randaugment.randaugment(image, SEED, 2, 10.0).numpy()
  np.testing.assert_array_equal(a, b)
  outs = {randaugment.randaugment(image, tf.constant([k, 7], tf.int64), 2,
                                  10.0).numpy().tobytes() for k in range(6)}
  assert len(outs) > 1
  assert a.dtype == np.uint8 and a.shape == (20, 30, 3)


def test_autoaugment_policy_and_output():
  for sub_policy in autoaugment.POLICY_V0:
    assert len(sub_policy) == 2
    for name, probability, level in sub_policy:
      assert name in OPS and 0 <= probability <= 1 and 0 <= level <= 10
  image = tf.constant(_photo(20, 30, seed=5))
  outs = [autoaugment.autoaugment_v0(image, tf.constant([k, 2], tf.int64))
          for k in range(8)]
  for out in outs:
    assert out.dtype == tf.uint8 and out.shape == (20, 30, 3)
  assert len({o.numpy().tobytes() for o in outs}) > 1
  again = autoaugment.autoaugment_v0(image, tf.constant([0, 2], tf.int64))
  np.testing.assert_array_equal(outs[0].numpy(), again.numpy())


# ------------------------------------------------------------ mixup, CutMix --


def _onehot_batch(batch=8, size=12, classes=5):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
  return images, labels


def test_mixup_pairs_with_reversed_batch():
  images, labels = _onehot_batch()
  out_images, out_labels = mix.mixup(tf.constant(images), tf.constant(labels),
                                     SEED, 0.4)
  out_images, out_labels = out_images.numpy(), out_labels.numpy()
  np.testing.assert_allclose(out_labels.sum(1), 1.0, atol=1e-6)
  weight = (out_labels * labels).sum(1)  # weight of the example's own label
  same_class = np.argmax(labels, 1) == np.argmax(labels[::-1], 1)
  weight = np.where(same_class, 1.0, weight)
  assert np.all(weight >= 0.5 - 1e-6)
  for i in range(len(images)):
    if same_class[i]:
      continue
    expected = weight[i] * images[i] + (1 - weight[i]) * images[::-1][i]
    np.testing.assert_allclose(out_images[i], expected, atol=1e-5)


@pytest.mark.parametrize('semantics', ['official', 'intended'])
def test_cutmix_label_weight_is_pasted_pixel_fraction(semantics):
  """'intended': each example's own pasted fraction; 'official': the
  fraction over the whole batch, for every example."""
  images, labels = _onehot_batch(batch=6, size=16)
  out_images, out_labels = mix.cutmix(tf.constant(images),
                                      tf.constant(labels), SEED, 1.0,
                                      semantics)
  out_images, out_labels = out_images.numpy(), out_labels.numpy()
  partner = images[::-1]
  fractions = []
  for i in range(len(images)):
    pasted = np.all(np.isclose(out_images[i], partner[i]), -1) & ~np.all(
        np.isclose(images[i], partner[i]), -1)
    kept = np.all(np.isclose(out_images[i], images[i]), -1)
    assert np.all(pasted | kept)
    fractions.append(pasted.mean())
  assert len(set(fractions)) > 1  # the boxes differ, so the readings do
  for i, own in enumerate(fractions):
    fraction = own if semantics == 'intended' else np.mean(fractions)
    expected = (1 - fraction) * labels[i] + fraction * labels[::-1][i]
    np.testing.assert_allclose(out_labels[i], expected, atol=1e-6)
  assert not np.allclose(out_labels, labels)


def test_mix_batch_splits_halves():
  images, labels = _onehot_batch(batch=8)
  out_images, out_labels = mix.mix_batch(
      tf.constant(images), tf.constant(labels), SEED, mixup_alpha=0.5,
      cutmix_alpha=0.5)
  out_images = out_images.numpy()
  # Second half: CutMix with the reversed second half (pixels copied exactly).
  second, second_partner = images[4:], images[4:][::-1]
  for i in range(4):
    exact = (np.all(out_images[4 + i] == second[i], -1)
             | np.all(out_images[4 + i] == second_partner[i], -1))
    assert exact.all()
  # First half: mixup, every pixel a blend with the reversed first half.
  first, first_partner = images[:4], images[:4][::-1]
  for i in range(4):
    weight = (out_labels.numpy()[i] * labels[i]).sum()
    np.testing.assert_allclose(
        out_images[i], weight * first[i] + (1 - weight) * first_partner[i],
        atol=1e-5)
  untouched = mix.mix_batch(tf.constant(images), tf.constant(labels), SEED,
                            mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(untouched[0], images)


def test_beta_samples_small_alpha_are_finite():
  samples = mix.sample_beta([4096], SEED, 0.05).numpy()
  assert np.all(np.isfinite(samples)) and samples.min() >= 0
  assert samples.max() <= 1


# --------------------------------------------------------------- preprocess --


def _encode(image, fmt='PNG'):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, fmt)
  return buffer.getvalue()


def _coordinate_image(height, width):
  """Pixel (y, x) holds (y, x, 0): crops and offsets can be read back."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


@pytest.mark.parametrize('size', [224, 300, 319])
def test_eval_center_crop_rule_below_320(size):
  image = _coordinate_image(200, 250)
  out = preprocess.eval_image(tf.constant(_encode(image)),
                              record_kind='encoded', image_size=size,
                              normalization='inception').numpy()
  crop = int(size / (size + 32) * 200)
  y0, x0 = (200 - crop) // 2, (250 - crop) // 2
  expected = tf.image.resize(image[y0:y0 + crop, x0:x0 + crop], [size, size])
  np.testing.assert_allclose(out, (expected.numpy() - 128) / 128, atol=1e-5)


@pytest.mark.parametrize('normalization,size', [('inception', 320),
                                                ('inception', 384),
                                                ('ft', 224)])
def test_eval_whole_image_resize(normalization, size):
  image = _photo(90, 140)
  out = preprocess.eval_image(tf.constant(_encode(image)),
                              record_kind='encoded', image_size=size,
                              normalization=normalization).numpy()
  resized = tf.image.resize(image, [size, size]).numpy()
  expected = preprocess.normalize(resized, normalization).numpy()
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_eval_imagenet_family_offsets_and_normalisation():
  image = _coordinate_image(101, 150)
  size = 64
  out = preprocess.eval_image(tf.constant(_encode(image)),
                              record_kind='encoded', image_size=size,
                              normalization='imagenet').numpy()
  crop = int(size / (size + 32) * 101)
  y0, x0 = ((101 - crop) + 1) // 2, ((150 - crop) + 1) // 2
  resized = tf.raw_ops.ResizeBicubic(
      images=image[None, y0:y0 + crop, x0:x0 + crop], size=[size, size],
      align_corners=False, half_pixel_centers=False)[0].numpy()
  mean = np.array(preprocess.IMAGENET_MEAN)
  std = np.array(preprocess.IMAGENET_STD)
  np.testing.assert_allclose(out, (resized - mean) / std, atol=1e-4)


def test_unknown_normalization_names_the_choices():
  with pytest.raises(ValueError) as error:
    preprocess.normalize(tf.constant([0.0]), 'bogus')
  message = str(error.value)
  assert "'bogus'" in message and '\n' not in message
  assert all(name in message for name in preprocess.NORMALIZATIONS)


@pytest.mark.parametrize('shape', [(5, 3), (17, 41), (47, 17), (300, 200)])
@pytest.mark.parametrize('normalization', ['inception', 'imagenet'])
def test_train_crops_cope_with_any_image_size(shape, normalization):
  encoded = tf.constant(_encode(_photo(*shape), 'JPEG'))
  for k in range(3):
    out = preprocess.train_image(
        encoded, record_kind='encoded', image_size=32, augment='none',
        normalization=normalization, randaug_layers=2, randaug_magnitude=10,
        seed=tf.constant([k, 5], tf.int64))
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))


@pytest.mark.parametrize('fmt,slack', [('PNG', 0.5), ('JPEG', 4.0)])
def test_legacy_crop_falls_back_to_centre_crop(fmt, slack):
  # No 3/4..4/3 box of >= 8% area fits a 10 x 200 strip (at most 10 x 13):
  # sampling gives up and the B0-B3 path takes the centre crop, side
  # int(32 / 64 * 10) = 5 at offsets ((10 - 5) + 1) // 2 = 3 and
  # ((200 - 5) + 1) // 2 = 98. (JPEG goes through decode_and_crop_jpeg; its
  # lossy coordinates get some slack.)
  image = _coordinate_image(10, 200)
  encoded = tf.constant(_encode(image, fmt))
  for k in range(5):
    out = preprocess.legacy_crop(encoded, 32,
                                 tf.constant([k, 0], tf.int64)).numpy()
    assert out.shape == (32, 32, 3)
    assert 98 - slack <= out[..., 1].min() and out[..., 1].max() <= 102 + slack
    assert 3 - slack <= out[..., 0].min() and out[..., 0].max() <= 7 + slack


def test_inception_crop_area_within_range():
  image = _coordinate_image(200, 240)
  areas = []
  for k in range(40):
    seed = tf.constant([k, 11], tf.int64)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4]), seed=seed, min_object_covered=0.,
        aspect_ratio_range=(0.75, 1.33), area_range=(0.05, 1.0),
        max_attempts=100, use_image_if_no_bounding_boxes=True)
    out = preprocess.inception_crop(tf.constant(image), 16, seed).numpy()
    y, x = int(begin[0]), int(begin[1])
    h, w = int(size[0]), int(size[1])
    areas.append(h * w / (200 * 240))
    # The resized crop samples only inside the sampled box.
    assert out[..., 0].min() >= y - 1 and out[..., 0].max() <= y + h
    assert out[..., 1].min() >= x - 1 and out[..., 1].max() <= x + w
  assert min(areas) >= 0.05 - 1e-3 and max(areas) <= 1.0
  assert max(areas) - min(areas) > 0.3


def test_ft_augment_whole_image_flip_and_noise_cutout():
  image = _photo(40, 60)
  out = preprocess.train_image(
      tf.constant(_encode(image)), record_kind='encoded', image_size=64,
      augment='ft', normalization='ft', randaug_layers=2,
      randaug_magnitude=10, seed=SEED).numpy()
  resized = preprocess.normalize(tf.image.resize(image, [64, 64]), 'ft').numpy()
  candidates = (resized, resized[:, ::-1])
  same = [np.all(np.isclose(out, c, atol=1e-5), -1) for c in candidates]
  kept = max(same, key=np.mean)
  noise_area = ~kept
  assert 0 < noise_area.sum() <= 32 * 32  # square of half side 64 // 4
  assert np.all(out[noise_area] >= 0.0) and np.all(out[noise_area] < 1.0)


def test_digits_translation_range_and_no_flip():
  digit = np.zeros((8, 8, 3), np.uint8)
  digit[2:6, 3] = 255  # an asymmetric stroke: a flip would move it
  digit[2, 3:6] = 255
  base = preprocess.normalize(tf.image.resize(digit, [32, 32]), 'inception')
  seen = set()
  for k in range(30):
    out = preprocess.train_image(
        tf.constant(digit), record_kind='pixels', image_size=32,
        augment='digits', normalization='inception', randaug_layers=2,
        randaug_magnitude=10.0, seed=tf.constant([k, 3], tf.int64)).numpy()
    match = None
    for dy in range(-4, 5):
      for dx in range(-4, 5):
        shifted = np.full_like(base.numpy(), -1.0)
        src = base.numpy()[max(dy, 0):32 + min(dy, 0),
                           max(dx, 0):32 + min(dx, 0)]
        shifted[max(-dy, 0):32 + min(-dy, 0),
                max(-dx, 0):32 + min(-dx, 0)] = src
        if np.allclose(out, shifted, atol=1e-5):
          match = (dy, dx)
    assert match is not None  # a pure translation of <= 4 px, never flipped
    seen.add(match)
  assert len(seen) > 5
  # Magnitude 10 moves by up to one 8x8 source pixel: 4 px at 32 px.
  assert max(max(abs(dy), abs(dx)) for dy, dx in seen) == 4


def test_label_vectors():
  np.testing.assert_array_equal(
      preprocess.label_vector(tf.constant(2, tf.int64), 4, False),
      [0, 0, 1, 0])
  multi = preprocess.label_vector(tf.constant([3, 0, -1, -1], tf.int64), 5,
                                  True).numpy()
  np.testing.assert_allclose(multi, [0.5, 0, 0, 0.5, 0])
