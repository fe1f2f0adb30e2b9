"""TF1 RMSProp (the official optimizer) and the L2 regulariser, as optax.

The official recipe trains with `tf.compat.v1.train.RMSPropOptimizer`, whose
semantics differ from optax's `rmsprop` in where the learning rate enters:

    ms  <- decay * ms + (1 - decay) * g**2          (ms starts at 1, not 0)
    mom <- momentum * mom + lr * g / sqrt(ms + eps)   (eps inside the sqrt)
    w   <- w - mom

Because the learning rate is multiplied in *before* the momentum
accumulation, a decaying schedule leaves the momentum buffer holding updates
scaled by older (larger) rates; an optax `rmsprop -> trace -> scale(lr)` chain
rescales the whole buffer by the current rate instead. The two agree only for
a constant rate, which the official schedule never is.

This module is importable without tensorflow or ml_collections: NAS drivers
and benchmarks build optimizers from plain keyword arguments.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


class TF1RMSPropState(NamedTuple):
  count: jax.Array  # int32 scalar: number of updates applied so far
  ms: Any  # mean-square accumulator, starts at `initial_ms`
  mom: Any  # momentum buffer, already scaled by the learning rate


def tf1_rmsprop(learning_rate: float | Schedule, *, decay: float = 0.9,
                momentum: float = 0.9, epsilon: float = 1e-3,
                initial_ms: float = 1.0) -> optax.GradientTransformation:
  """`tf.compat.v1.train.RMSPropOptimizer` as an optax transformation.

  Args:
    learning_rate: a constant, or a schedule called with the update count
      (0 on the first update), like optax schedules.
    decay: discount of the mean-square accumulator (TF `decay`, optax `decay`).
    momentum: momentum of the learning-rate-scaled update.
    epsilon: added to the mean square *inside* the square root.
    initial_ms: initial value of the mean-square slot; TF1 uses 1.0, which
      keeps the first updates small instead of dividing by sqrt(eps).

  Returns:
    A transformation whose updates are to be *added* to the parameters
    (`optax.apply_updates`); they already carry the minus sign.
  """

  def init_fn(params):
    return TF1RMSPropState(
        count=jnp.zeros([], jnp.int32),
        ms=jax.tree.map(lambda p: jnp.full_like(p, initial_ms), params),
        mom=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    ms = jax.tree.map(lambda s, g: decay * s + (1.0 - decay) * jnp.square(g),
                      state.ms, updates)
    mom = jax.tree.map(
        lambda m, g, s: momentum * m + lr * g * jax.lax.rsqrt(s + epsilon),
        state.mom, updates, ms)
    new_updates = jax.tree.map(jnp.negative, mom)
    return new_updates, TF1RMSPropState(
        count=optax.safe_increment(state.count), ms=ms, mom=mom)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_tf1_adam(*, b1: float = 0.9, b2: float = 0.999,
                      epsilon: float = 1e-8) -> optax.GradientTransformation:
  """The direction of `tf.compat.v1.train.AdamOptimizer` (before -lr).

  TF1 adds epsilon to sqrt(v) *before* the bias correction, which it folds
  into the step size: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), update
  lr_t m / (sqrt(v) + eps). optax's adam adds eps to the corrected
  sqrt(v_hat), i.e. TF1's eps / sqrt(1 - b2^t) (31x larger at t = 1): a
  different step for gradients near 1e-6. The state is optax's
  `ScaleByAdamState`, so checkpoints of either restore into the other.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g),
                      state.nu, updates)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    direction = jax.tree.map(
        lambda m, v: correction * m / (jnp.sqrt(v) + epsilon), mu, nu)
    return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def l2_mask(params) -> Any:
  """True for convolution and dense kernels, False for BN scale/bias and biases.

  The official regex excludes `.*(bias|gamma|beta).*`; with our module names
  every remaining trainable variable is a leaf called `kernel`.
  """

  def is_kernel(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', None))
    return name == 'kernel'

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def l2_loss(params, weight_decay: float) -> jax.Array:
  """`weight_decay * sum(w**2) / 2` over the kernels (what TF adds to the loss)."""
  mask = l2_mask(params)
  leaves = [jnp.sum(jnp.square(p)) for p, m in
            zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  total = sum(leaves) if leaves else jnp.zeros([])
  return 0.5 * weight_decay * total


# Each update rule's epsilon when the config leaves it at 0: TF1's
# RMSPropOptimizer as the official recipe sets it, and TF1's AdamOptimizer
# default (the official 'adam' optimizer passes none).
DEFAULT_EPSILON = {'rmsprop_tf1': 1e-3, 'momentum': 0.0, 'adamw': 1e-8}


def build(learning_rate: float | Schedule, *, name: str = 'rmsprop_tf1',
          weight_decay: float = 1e-5, decay: float = 0.9,
          momentum: float = 0.9, epsilon: float = 0.0,
          **unused: Any) -> optax.GradientTransformation:
  """The optimizer of a config: L2 on kernels, then the named update rule.

  The L2 term enters as its gradient `weight_decay * w` added before the
  update rule, which is exactly what adding `weight_decay/2 * |w|^2` to the
  loss does (so it goes through RMSProp's normalisation, as in TF; it is not
  decoupled weight decay).

  Args:
    learning_rate: constant or schedule of the update count.
    name: 'rmsprop_tf1' (official), 'momentum' (SGD + heavy ball, TF1 style
      lr inside the buffer is not needed there) or 'adamw' (TF1's
      AdamOptimizer, the official 'adam', `scale_by_tf1_adam`; the L2 above
      still applies, no decoupled decay).
    weight_decay: L2 coefficient; 0 disables it.
    decay, momentum, epsilon: update-rule hyperparameters (RMSProp; momentum
      is also used by 'momentum', and by 'adamw' as b1). epsilon 0 takes
      the rule's own (`DEFAULT_EPSILON`: RMSProp 1e-3, Adam 1e-8).
    **unused: other config keys (ignored, so a config block can be splatted).
  """
  del unused
  if name not in DEFAULT_EPSILON:
    raise ValueError(
        f"optimizer.name must be 'rmsprop_tf1', 'momentum' or 'adamw', "
        f'got {name!r}')
  epsilon = epsilon or DEFAULT_EPSILON[name]
  if name == 'rmsprop_tf1':
    rule = tf1_rmsprop(learning_rate, decay=decay, momentum=momentum,
                       epsilon=epsilon)
  elif name == 'momentum':
    rule = optax.sgd(learning_rate, momentum=momentum)
  else:
    # optax.adamw's layout (adam, decoupled decay off, rate) with TF1's
    # epsilon placement.
    rule = optax.chain(scale_by_tf1_adam(b1=momentum, epsilon=epsilon),
                       optax.add_decayed_weights(0.0),
                       optax.scale_by_learning_rate(learning_rate))
  # With weight_decay=0 this adds nothing but keeps the state layout, so a
  # checkpoint restores whether or not L2 is on.
  return optax.chain(optax.add_decayed_weights(weight_decay, l2_mask), rule)


def build_from_config(opt_config: Mapping[str, Any],
                      learning_rate: float | Schedule
                      ) -> optax.GradientTransformation:
  """`build` with the keys of a config's `optimizer` block."""
  return build(learning_rate, **dict(opt_config))
