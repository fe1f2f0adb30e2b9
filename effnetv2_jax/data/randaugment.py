"""RandAugment as in the EfficientNetV2 code: N layers over 16 ops.

Each layer picks one of the 16 ops uniformly and always applies it (the
official code samples a probability per op and never uses it) at the one
shared magnitude; see `augment_ops` for the magnitude scale. Fill 128,
translate 100 px and cutout 40 px at magnitude 10.

Written here rather than taken from a library because none available is
faithful to these semantics in graph mode: Keras' RandAugment layer has a
different op set and a [0, 1] magnitude, timm's works on PIL images with its
own magnitude rules, and tf-models-official (a port of the same code) is a
large dependency for 16 small functions. Each op is tested against PIL and
against outputs recorded from the official code.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from effnetv2_jax.data import augment_ops

TRANSLATE_CONST = 100.0
CUTOUT_CONST = 40.0


def layer_choices(seed, num_layers: int):
  """[(op index into RANDAUGMENT_OPS, op seed)] per layer, from `seed`."""
  layer_seeds = tf.random.experimental.stateless_split(seed, max(num_layers, 1))
  choices = []
  for layer in range(num_layers):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[layer], 2))
    op_index = tf.random.stateless_uniform(
        [], choice_seed, minval=0, maxval=len(augment_ops.RANDAUGMENT_OPS),
        dtype=tf.int32)
    choices.append((op_index, op_seed))
  return choices


def randaugment(image, seed, num_layers: int = 2, magnitude: float = 10.0,
                semantics: str = augment_ops.OFFICIAL):
  """Applies `num_layers` random ops at `magnitude` to a uint8 image.

  Args:
    image: uint8 [h, w, 3].
    seed: stateless seed, int [2]; the whole augmentation follows from it.
    num_layers: ops applied in sequence.
    magnitude: official-scale magnitude (static python number, >= 0).
    semantics: 'official' (the released code's Solarize / Posterize
      wraparounds above magnitude 10) or 'intended' (see `augment_ops`).

  Returns:
    uint8 [h, w, 3].
  """
  if magnitude < 0:
    raise ValueError(f'RandAugment magnitude must be >= 0, got {magnitude}')
  augment_ops.check_semantics(semantics)
  for op_index, op_seed in layer_choices(seed, num_layers):
    branches = [
        functools.partial(augment_ops.apply_op, name, image, magnitude,
                          op_seed, translate_const=TRANSLATE_CONST,
                          cutout_const=CUTOUT_CONST, semantics=semantics)
        for name in augment_ops.RANDAUGMENT_OPS]
    image = tf.switch_case(op_index, branches)
    image.set_shape([None, None, 3])
  return image
