"""AutoAugment policy v0, the augmentation of the EfficientNet B0-B3 path.

One of 25 sub-policies is chosen uniformly per image; each of its two ops is
applied with its own probability at its own level (official scale, see
`augment_ops`). Fill 128, translate 250 px and cutout 100 px at level 10.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from effnetv2_jax.data import augment_ops

TRANSLATE_CONST = 250.0
CUTOUT_CONST = 100.0

# (op, probability, level) pairs, the AutoAugment paper's ImageNet policy.
POLICY_V0 = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)


def _apply_sub_policy(image, sub_policy, seed, semantics):
  seeds = tf.random.experimental.stateless_split(seed, 2 * len(sub_policy))
  for i, (name, probability, level) in enumerate(sub_policy):
    coin = tf.random.stateless_uniform([], seeds[2 * i])
    op = functools.partial(augment_ops.apply_op, name, image, level,
                           seeds[2 * i + 1], translate_const=TRANSLATE_CONST,
                           cutout_const=CUTOUT_CONST, semantics=semantics)
    # The official test is floor(u + p) == 1, i.e. u >= 1 - p.
    image = tf.cond(coin >= 1.0 - probability, op, lambda img=image: img)
    image.set_shape([None, None, 3])
  return image


def autoaugment_v0(image, seed, semantics: str = augment_ops.OFFICIAL):
  """Applies one random sub-policy of POLICY_V0 to a uint8 [h, w, 3] image.

  `semantics` ('official' or 'intended', see `augment_ops`) matters for one
  op of v0, ('Solarize', 0.6, 10): its threshold 256 wraps to 0 in the
  official code, which inverts the whole image; 'intended' leaves it as is.
  """
  augment_ops.check_semantics(semantics)
  choice_seed, policy_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  index = tf.random.stateless_uniform(
      [], choice_seed, minval=0, maxval=len(POLICY_V0), dtype=tf.int32)
  branches = [functools.partial(_apply_sub_policy, image, sub, policy_seed,
                                semantics)
              for sub in POLICY_V0]
  image = tf.switch_case(index, branches)
  image.set_shape([None, None, 3])
  return image
