"""The network's layers, with the official initialisation and TF-'SAME'
padding.

Parameters are float32; a layer's `dtype` is its compute dtype (bfloat16 on
TPU/GPU). BatchNorm statistics are always computed in float32. How a
convolution runs (XLA, shifted multiply-adds, oneDNN) is its implementation,
chosen once at construction from `impl` and `dtype` (`effnetv2_jax.kernels`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnetv2_jax import kernels
from effnetv2_jax.kernels import batch_norm


def fan_out_normal(kernel_h: int, kernel_w: int, out_channels: int):
  """normal(0, sqrt(2 / fan_out)), untruncated, as the official code.

  For depthwise kernels the official fan-out is kh*kw*1 (TF shape (k,k,C,1)),
  not kh*kw*C, so callers pass out_channels=1 there.
  """
  std = math.sqrt(2.0 / (kernel_h * kernel_w * out_channels))

  def init(key, shape, dtype=jnp.float32):
    if (isinstance(key, jax.core.Tracer)
        or not jax.config.jax_threefry_partitionable):
      return std * jax.random.normal(key, shape, dtype)
    return eager_scaled_normal(key, shape, dtype, std)

  return init


def eager_scaled_normal(key, shape, dtype, std: float) -> jax.Array:
  """`std * jax.random.normal(key, shape, dtype)`, the same values, drawn
  through one compiled program per power-of-two size instead of per shape.

  Eagerly, every new kernel shape compiled its own threefry + erf_inv
  program, most of the time `create_model` took on a CPU. With
  partitionable threefry (JAX's default) element i of a draw depends only on
  the key and i, so the first n values of a longer draw are the draw of n
  values; the slice is taken on the host, where it compiles nothing.
  """
  size = math.prod(shape)
  bucket = 1 << max(size - 1, 0).bit_length()
  flat = _scaled_normal_draw(key, jnp.asarray(std, dtype), bucket,
                             jnp.dtype(dtype))
  # device_put, not jnp.asarray: that stages the host array through a
  # program compiled per shape.
  return jax.device_put(np.asarray(flat)[:size].reshape(shape))


@functools.partial(jax.jit, static_argnames=('size', 'dtype'))
def _scaled_normal_draw(key, std, size: int, dtype):
  return std * jax.random.normal(key, (size,), dtype)


def filled(shape, value: float) -> jax.Array:
  """`jnp.full(shape, value)` in float32 without a program compiled per
  shape when run eagerly."""
  return jax.device_put(np.full(shape, value, np.float32))


class Conv2D(nnx.Module):
  """Dense (non-grouped) convolution, HWIO kernel, TF-'SAME' padding.

  `impl` is one of `kernels.CONV_IMPLS`; 1x1 stride-1 convolutions are
  matmuls in every implementation.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
               stride: int = 1, *, use_bias: bool = False, impl: str = 'auto',
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.dtype = dtype
    self.impl = kernels.choose_conv_impl(impl, dtype)
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, out_channels)(
        rngs.params(), (kernel_size, kernel_size, in_channels, out_channels)))
    self.bias = nnx.Param(filled((out_channels,), 0.0)) if use_bias else None

  def __call__(self, x):
    y = self.impl.dense(x.astype(self.dtype), self.kernel[...], self.stride)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def folds_batch_norm(self, x) -> bool:
    """Whether an eval-mode BatchNorm after `self(x)` runs folded in."""
    return self.impl.folds_batch_norm(
        x.shape, pointwise=kernels.is_pointwise(self.kernel.shape, self.stride))

  def scaled_and_shifted(self, x, scale, shift, *, silu: bool):
    """`self(x) * scale + shift` per output channel (then SiLU when `silu`)
    as one call: scale and shift folded into the kernel and a bias."""
    bias = shift if self.bias is None else shift + self.bias[...] * scale
    return self.impl.conv_bias(x.astype(self.dtype), self.kernel[...] * scale,
                               bias, self.stride, groups=1, silu=silu)


class DepthwiseConv2D(nnx.Module):
  """Depthwise k x k convolution; kernel stored as (k, k, 1, C)."""

  def __init__(self, channels: int, kernel_size: int, stride: int = 1, *,
               impl: str = 'auto', dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.dtype = dtype
    self.impl = kernels.choose_conv_impl(impl, dtype)
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, 1)(
        rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def __call__(self, x):
    return self.impl.depthwise(x.astype(self.dtype), self.kernel[...],
                               self.stride)

  def folds_batch_norm(self, x) -> bool:
    """Whether an eval-mode BatchNorm after `self(x)` runs folded in."""
    return self.impl.folds_batch_norm(x.shape, pointwise=False)

  def scaled_and_shifted(self, x, scale, shift, *, silu: bool):
    """`self(x) * scale + shift` per channel (then SiLU when `silu`) as one
    call: scale and shift folded into the kernel and a bias."""
    return self.impl.conv_bias(x.astype(self.dtype), self.kernel[...] * scale,
                               shift, self.stride, groups=x.shape[-1],
                               silu=silu)


class BatchNorm(nnx.Module):
  """BatchNorm with float32 statistics and optional grouped batch moments.

  `groups > 1` splits the batch into that many equal consecutive groups and
  normalises each with its own moments: with the batch sharded in order over
  the data axis, a group of N replicas' examples is one group, which is the
  official TPU BatchNorm (`num_shards_per_group`). The running statistics are
  updated with the moments averaged over groups.

  `activation='silu'` applies SiLU after the normalisation, to the output in
  the compute dtype, exactly as `jax.nn.silu(bn(x))` would; in training the
  pair then shares one backward pass and saves one tensor fewer
  (`kernels.batch_norm`).
  """

  def __init__(self, channels: int, *, momentum: float = 0.9,
               epsilon: float = 1e-3, dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(filled((channels,), 1.0))
    self.bias = nnx.Param(filled((channels,), 0.0))
    self.mean = nnx.BatchStat(filled((channels,), 0.0))
    self.var = nnx.BatchStat(filled((channels,), 1.0))

  def __call__(self, x, *, training: bool, groups: int = 1, activation=None):
    act = batch_norm.activation_fn(activation)
    if training:
      batch = x.shape[0]
      if batch % groups:
        raise ValueError(
            f'BatchNorm groups={groups} does not divide the batch {batch}')
      y, mean, var = batch_norm.train(
          x, self.scale[...], self.bias[...], groups, self.epsilon,
          activation, jnp.dtype(self.dtype))
      m = self.momentum
      # set_value rather than `self.mean[...] = `: flax's indexed assignment
      # compares the shardings of old and new value, and asking a tracer for
      # its sharding builds an error message that walks the whole jaxpr
      # traced so far, which made tracing quadratic in the model's size.
      self.mean.set_value(m * self.mean[...] + (1 - m) * mean.mean(0))
      self.var.set_value(m * self.var[...] + (1 - m) * var.mean(0))
      return y
    inv, shift = self.eval_affine()
    y = (x.astype(jnp.float32) * inv + shift).astype(self.dtype)
    return act(y) if act else y

  def eval_affine(self):
    """(scale, shift), float32: eval-mode BN is `x * scale + shift`."""
    inv = jax.lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
    return inv, self.bias[...] - self.mean[...] * inv


class ConvBN:
  """A block's convolution and the BatchNorm after it, called as one layer.

  Declared on the block's class with the names of the attributes that hold
  the two modules; they stay there, so their parameters keep the paths that
  checkpoints and the converters name:

    class Block(nnx.Module):
      project = ConvBN('project_conv', 'project_bn')
      ...
      y = self.project(x, training=training, groups=groups)

  The call computes `bn(conv(x), training=..., groups=..., activation=...)`.
  In eval mode, where the convolution's implementation folds a BatchNorm
  (`kernels.OneDnnConv`), it is one call: the BN's scale and shift folded
  into the kernel and a bias, the SiLU applied as the output is written,
  which saves passes over the activations.
  """

  def __init__(self, conv_attribute: str, bn_attribute: str):
    self.conv_attribute = conv_attribute
    self.bn_attribute = bn_attribute

  def __get__(self, block, owner=None):
    if block is None:
      return self
    return functools.partial(self.apply, getattr(block, self.conv_attribute),
                             getattr(block, self.bn_attribute))

  @staticmethod
  def apply(conv, bn: BatchNorm, x, *, training: bool, groups: int = 1,
            activation=None):
    """`bn(conv(x), ...)`, folded into one call where `conv` can."""
    batch_norm.activation_fn(activation)
    if training or not conv.folds_batch_norm(x):
      return bn(conv(x), training=training, groups=groups,
                activation=activation)
    scale, shift = bn.eval_affine()
    return conv.scaled_and_shifted(x, scale, shift,
                                   silu=activation == 'silu')


class SqueezeExcite(nnx.Module):
  """Mean-pool, 1x1 reduce (bias) + SiLU, 1x1 expand (bias) + sigmoid gate."""

  def __init__(self, channels: int, reduced: int, *, impl: str = 'auto',
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.reduce = Conv2D(channels, reduced, 1, use_bias=True, impl=impl,
                         dtype=dtype, rngs=rngs)
    self.expand = Conv2D(reduced, channels, 1, use_bias=True, impl=impl,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x):
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    s = jax.nn.silu(self.reduce(s.astype(x.dtype)))
    return x * jax.nn.sigmoid(self.expand(s))


def drop_path(x, keep, survival_prob):
  """Per-example stochastic depth: zero the examples where `keep` [B] is
  False, rescale the kept ones by 1/p (`keep` drawn with probability p)."""
  scale = keep.astype(jnp.float32) / survival_prob
  return x * scale.astype(x.dtype)[:, None, None, None]
