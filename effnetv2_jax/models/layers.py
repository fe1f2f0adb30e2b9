"""Building blocks with the official initialisation and TF-'SAME' padding.

Parameters are float32; a block's `dtype` is its compute dtype (bfloat16 on
TPU/GPU). BatchNorm statistics are always computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def fan_out_normal(kernel_h: int, kernel_w: int, out_channels: int):
  """normal(0, sqrt(2 / fan_out)), untruncated, as the official code.

  For depthwise kernels the official fan-out is kh*kw*1 (TF shape (k,k,C,1)),
  not kh*kw*C, so callers pass out_channels=1 there.
  """
  std = math.sqrt(2.0 / (kernel_h * kernel_w * out_channels))

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding for one spatial dim: the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv2D(nnx.Module):
  """Dense (non-grouped) convolution, HWIO kernel, TF-'SAME' padding."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
               stride: int = 1, *, use_bias: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.dtype = dtype
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, out_channels)(
        rngs.params(), (kernel_size, kernel_size, in_channels, out_channels)))
    self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None

  def __call__(self, x):
    kernel = self.kernel[...]
    x = x.astype(self.dtype)
    if kernel.shape[:2] == (1, 1) and self.stride == 1:
      # A 1x1 convolution is a matmul; XLA:CPU runs dot faster than conv.
      y = jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0].astype(self.dtype))
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel.astype(self.dtype), (self.stride, self.stride), 'SAME',
          dimension_numbers=_DIMENSION_NUMBERS)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def resolve_depthwise_impl(impl: str) -> str:
  if impl == 'auto':
    # XLA:CPU's grouped convolution is 10-50x slower than nine shifted
    # multiply-adds; on TPU/GPU the convolution is the fast form.
    return 'shifted' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in ('xla', 'shifted'):
    raise ValueError(
        f"depthwise_impl must be 'auto', 'xla' or 'shifted', got {impl!r}")
  return impl


def depthwise_conv_shifted(x, kernel, stride: int):
  """Depthwise conv as k*k strided slices times per-channel weights.

  Same result as `feature_group_count=C` with TF-'SAME' padding. `kernel` has
  the Flax depthwise layout (kh, kw, 1, C).
  """
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
  x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (out_h - 1) * stride + 1,
           j + (out_w - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


class DepthwiseConv2D(nnx.Module):
  """Depthwise k x k convolution; kernel stored as (k, k, 1, C)."""

  def __init__(self, channels: int, kernel_size: int, stride: int = 1, *,
               impl: str = 'auto', dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.dtype = dtype
    self.impl = impl
    resolve_depthwise_impl(impl)  # fail at construction on a bad name
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, 1)(
        rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def __call__(self, x):
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if resolve_depthwise_impl(self.impl) == 'shifted':
      return depthwise_conv_shifted(x, kernel, self.stride)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), 'SAME',
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=x.shape[-1])


class BatchNorm(nnx.Module):
  """BatchNorm with float32 statistics and optional grouped batch moments.

  `groups > 1` splits the batch into that many equal consecutive groups and
  normalises each with its own moments: with the batch sharded in order over
  the data axis, a group of N replicas' examples is one group, which is the
  official TPU BatchNorm (`num_shards_per_group`). The running statistics are
  updated with the moments averaged over groups.
  """

  def __init__(self, channels: int, *, momentum: float = 0.9,
               epsilon: float = 1e-3, dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.mean = nnx.BatchStat(jnp.zeros((channels,)))
    self.var = nnx.BatchStat(jnp.ones((channels,)))

  def __call__(self, x, *, training: bool, groups: int = 1):
    x32 = x.astype(jnp.float32)
    if training:
      batch = x32.shape[0]
      if batch % groups:
        raise ValueError(
            f'BatchNorm groups={groups} does not divide the batch {batch}')
      grouped = x32.reshape((groups, batch // groups) + x32.shape[1:])
      axes = tuple(range(1, grouped.ndim - 1))
      mean = grouped.mean(axes, keepdims=True)
      # E[x^2] - E[x]^2 as the official TPU BN; clipped against cancellation.
      var = jnp.maximum(
          jnp.square(grouped).mean(axes, keepdims=True) - jnp.square(mean), 0.)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * mean.mean(0).reshape(-1)
      self.var[...] = m * self.var[...] + (1 - m) * var.mean(0).reshape(-1)
      inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
      y = (grouped - mean) * inv + self.bias[...]
      y = y.reshape(x32.shape)
    else:
      inv = jax.lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
      y = x32 * inv + (self.bias[...] - self.mean[...] * inv)
    return y.astype(self.dtype)


class SqueezeExcite(nnx.Module):
  """Mean-pool, 1x1 reduce (bias) + SiLU, 1x1 expand (bias) + sigmoid gate."""

  def __init__(self, channels: int, reduced: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.reduce = Conv2D(channels, reduced, 1, use_bias=True, dtype=dtype,
                         rngs=rngs)
    self.expand = Conv2D(reduced, channels, 1, use_bias=True, dtype=dtype,
                         rngs=rngs)

  def __call__(self, x):
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    s = jax.nn.silu(self.reduce(s.astype(x.dtype)))
    return x * jax.nn.sigmoid(self.expand(s))


def drop_path(x, survival_prob, rng):
  """Per-example stochastic depth: keep with prob p, rescale kept by 1/p."""
  keep = jax.random.bernoulli(rng, survival_prob, (x.shape[0], 1, 1, 1))
  scale = keep.astype(jnp.float32) / survival_prob
  return x * scale.astype(x.dtype)
