"""Batch-level mixup and CutMix, as in google/automl `efficientnetv2/datasets.py`.

Each example is mixed with its partner in the *reversed* batch (x[::-1]).
When both are on, the first half of the batch gets mixup and the second half
CutMix, each half mixed with its own reverse.

  * Mixup: lambda ~ Beta(alpha, alpha) per example, lambda <- max(lambda,
    1 - lambda); image and label both lambda x + (1 - lambda) x[::-1].
  * CutMix: per example a box centred uniformly at random with side
    int(sqrt(1 - Beta(alpha, alpha)) * side), clipped at the border, is
    pasted from the partner. The label weight of the partner depends on
    the semantics (config.data.augment_semantics): 'official' gives every
    example the fraction of pixels pasted over the whole batch (the batch
    mean, as the released code computes), 'intended' each example its own
    pasted fraction (what its pixels show).

Randomness is stateless: a batch's mixing follows from its seed alone.
"""

from __future__ import annotations

import tensorflow as tf

from effnetv2_jax.data import semantics as semantics_lib
from effnetv2_jax.data.semantics import OFFICIAL


def sample_beta(shape, seed, alpha: float):
  """Beta(alpha, alpha) samples via two gammas, in float64 so that small
  alphas (the first progressive stages) do not underflow to 0 / 0."""
  seed_a, seed_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  a = tf.random.stateless_gamma(shape, seed_a, alpha=alpha, dtype=tf.float64)
  b = tf.random.stateless_gamma(shape, seed_b, alpha=alpha, dtype=tf.float64)
  total = a + b
  return tf.cast(tf.where(total > 0, a / tf.where(total > 0, total, 1.0), 0.5),
                 tf.float32)


def mixup(images, labels, seed, alpha: float):
  """Mixup of a batch with its reverse; returns (images, labels)."""
  batch = tf.shape(images)[0]
  weight = sample_beta([batch], seed, alpha)
  weight = tf.maximum(weight, 1.0 - weight)
  image_weight = weight[:, None, None, None]
  images = images * image_weight + images[::-1] * (1.0 - image_weight)
  labels = labels * weight[:, None] + labels[::-1] * (1.0 - weight[:, None])
  return images, labels


def cutmix_boxes(shape, seed, alpha: float):
  """Per-example paste masks [b, h, w, 1] (1 = take the partner's pixel)."""
  batch, height, width = shape[0], shape[1], shape[2]
  area_seed, center_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  area = sample_beta([batch], area_seed, alpha)
  ratio = tf.sqrt(1.0 - area)
  box_w = tf.cast(ratio * tf.cast(width, tf.float32), tf.int32)
  box_h = tf.cast(ratio * tf.cast(height, tf.float32), tf.int32)
  center = tf.random.stateless_uniform(
      [batch, 2], center_seed, minval=0, maxval=tf.int32.max,
      dtype=tf.int32) % tf.stack([height, width])
  y1 = tf.clip_by_value(center[:, 0] - box_h // 2, 0, height)
  y2 = tf.clip_by_value(center[:, 0] + box_h // 2, 0, height)
  x1 = tf.clip_by_value(center[:, 1] - box_w // 2, 0, width)
  x2 = tf.clip_by_value(center[:, 1] + box_w // 2, 0, width)
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  inside = ((rows >= y1[:, None, None]) & (rows < y2[:, None, None])
            & (cols >= x1[:, None, None]) & (cols < x2[:, None, None]))
  return tf.cast(inside, tf.float32)[..., None]


def paste(images, labels, masks, semantics: str = OFFICIAL):
  """Pastes each example's partner (the reversed batch) where its mask
  [b, h, w, 1] is 1; labels weighted by the pasted fraction (batch mean
  under 'official', per example under 'intended')."""
  semantics_lib.check(semantics)
  images = (1.0 - masks) * images + masks * images[::-1]
  if semantics == OFFICIAL:
    pasted = tf.reduce_mean(masks)
  else:
    pasted = tf.reduce_mean(masks, axis=[1, 2, 3])[:, None]
  labels = (1.0 - pasted) * labels + pasted * labels[::-1]
  return images, labels


def cutmix(images, labels, seed, alpha: float, semantics: str = OFFICIAL):
  """CutMix of a batch with its reverse; returns (images, labels)."""
  masks = cutmix_boxes(tf.shape(images), seed, alpha)
  return paste(images, labels, masks, semantics)


def mix_batch(images, labels, seed, *, mixup_alpha: float,
              cutmix_alpha: float, semantics: str = OFFICIAL):
  """Applies mixup and/or CutMix (alpha 0 = off) to a batch; `semantics`
  sets CutMix's label weights (`paste`)."""
  if not mixup_alpha and not cutmix_alpha:
    return images, labels
  mixup_seed, cutmix_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  if mixup_alpha and cutmix_alpha:
    half = images.shape[0] // 2
    first = mixup(images[:half], labels[:half], mixup_seed, mixup_alpha)
    second = cutmix(images[half:], labels[half:], cutmix_seed, cutmix_alpha,
                    semantics)
    return (tf.concat([first[0], second[0]], 0),
            tf.concat([first[1], second[1]], 0))
  if mixup_alpha:
    return mixup(images, labels, mixup_seed, mixup_alpha)
  return cutmix(images, labels, cutmix_seed, cutmix_alpha, semantics)
