"""Exponential moving average of the weights, as `tf.train.ExponentialMovingAverage`.

The official trainer averages every trainable variable *and* the BatchNorm
moving statistics with `ExponentialMovingAverage(0.9999,
num_updates=global_step)`, so the decay actually used at update t is

    min(decay, (1 + t) / (10 + t))

which makes the average follow the weights closely early in training. The
shadow starts equal to the initial weights and is updated after each
optimizer step with the incremented step count (TF reads `global_step` after
`apply_gradients` has incremented it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(num_updates, decay: float, ramp: bool = True):
  """The decay used at `num_updates` (the step count after the update)."""
  if not ramp:
    return jnp.asarray(decay, jnp.float32)
  t = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_update(average, value, decay):
  """shadow <- shadow - (1 - decay) * (shadow - value), leaf by leaf.

  Written in TF's form (`assign_moving_average`) rather than
  `decay * shadow + (1 - decay) * value`; the two differ in the last float32
  bit, and this keeps converted EMA weights and ours on the same path.
  """
  one_minus = 1.0 - decay
  return jax.tree.map(
      lambda a, v: a - (one_minus * (a - v)).astype(a.dtype), average, value)
