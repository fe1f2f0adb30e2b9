"""Building blocks with the official initialisation and TF-'SAME' padding.

Parameters are float32; a block's `dtype` is its compute dtype (bfloat16 on
TPU/GPU). BatchNorm statistics are always computed in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnetv2_jax.models import onednn

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


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
  program: 101 compiles, 15.5 of the 20 s that `create_model('s')` took on a
  2-core CPU. With partitionable threefry (JAX's default) element i of a draw
  depends only on the key and i, so the first n values of a longer draw are
  the draw of n values; the slice is taken on the host, where it compiles
  nothing.
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
  shape when run eagerly (17 of them for S's BatchNorm widths)."""
  return jax.device_put(np.full(shape, value, np.float32))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding for one spatial dim: the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv2D(nnx.Module):
  """Dense (non-grouped) convolution, HWIO kernel, TF-'SAME' padding."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
               stride: int = 1, *, use_bias: bool = False, impl: str = 'auto',
               dtype=jnp.float32, rngs: nnx.Rngs):
    check_conv_impl(impl, dtype)
    self.stride = stride
    self.dtype = dtype
    self.impl = impl
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, out_channels)(
        rngs.params(), (kernel_size, kernel_size, in_channels, out_channels)))
    self.bias = nnx.Param(filled((out_channels,), 0.0)) if use_bias else None

  def _pointwise(self) -> bool:
    return self.kernel.shape[:2] == (1, 1) and self.stride == 1

  def runs_on_onednn(self) -> bool:
    return (not self._pointwise()
            and resolve_conv_impl(self.impl, self.dtype) == 'onednn')

  def __call__(self, x):
    kernel = self.kernel[...]
    x = x.astype(self.dtype)
    if self._pointwise():
      # A 1x1 convolution is a matmul; XLA:CPU runs dot faster than conv.
      y = pointwise_conv(x, kernel[0, 0].astype(self.dtype))
    elif resolve_conv_impl(self.impl, self.dtype) == 'onednn':
      y = _onednn_conv(x, kernel.astype(self.dtype), self.stride)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel.astype(self.dtype), (self.stride, self.stride), 'SAME',
          dimension_numbers=_DIMENSION_NUMBERS)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _channels_matmul(x, kernel):
  return jnp.einsum('...c,cd->...d', x, kernel)


def pointwise_conv(x, kernel):
  """x [..., C] times kernel [C, D]; on CPU with the kernel gradient below."""
  if _cpu_tuned_backward():
    return _pointwise_conv_cpu(x, kernel)
  return _channels_matmul(x, kernel)


_pointwise_conv_cpu = jax.custom_vjp(_channels_matmul)


def _pointwise_fwd(x, kernel):
  return _pointwise_conv_cpu(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum('...d,cd->...c', dy, kernel)
  rows_x = x.reshape(-1, x.shape[-1])
  rows_dy = dy.reshape(-1, dy.shape[-1])
  over_rows = (((0,), (0,)), ((), ()))
  # Both orders are the same sum over rows. XLA:CPU leaves this dot to its
  # own emitter, which runs 1.5-2.8x faster when the operand with fewer
  # channels comes first: [25088, 128] x [25088, 32] took 6.8 ms one way
  # and 2.9 ms the other (one core). The transpose after is kernel-sized;
  # the barrier keeps XLA from folding it back into the slow order.
  if rows_dy.shape[1] < rows_x.shape[1]:
    dk = jax.lax.optimization_barrier(
        jax.lax.dot_general(rows_dy, rows_x, over_rows)).T
  else:
    dk = jax.lax.dot_general(rows_x, rows_dy, over_rows)
  return dx, dk.astype(kernel.dtype)


_pointwise_conv_cpu.defvjp(_pointwise_fwd, _pointwise_bwd)


CONV_IMPLS = ('auto', 'xla', 'shifted', 'onednn')


def check_conv_impl(impl: str, dtype) -> None:
  """Fails at model construction on a bad name or an impossible pairing."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl == 'onednn' and jnp.dtype(dtype) != jnp.float32:
    raise ValueError("conv_impl='onednn' computes in float32; got dtype "
                     f"{jnp.dtype(dtype).name} (use 'auto' or 'xla')")


def resolve_conv_impl(impl: str, dtype=jnp.float32) -> str:
  """The convolution form `impl` means here, for compute `dtype`.

  'xla': XLA's convolutions. 'shifted': depthwise as k*k shifted
  multiply-adds (XLA:CPU's grouped convolution is 10-50x slower), dense ones
  by XLA. 'onednn': depthwise and dense k x k convolutions as oneDNN custom
  calls (CPU, float32; `onednn.py`). 'auto': 'xla' on GPU/TPU; on CPU
  'onednn' where it builds, else 'shifted'. 1x1 convolutions are dots in
  every form, except in `conv_bn`'s eval mode under 'onednn' on large maps.
  """
  check_conv_impl(impl, dtype)
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  # With several CPU devices (the fake test mesh) XLA's partitioner would
  # all-gather a custom call's operands and run it on every device.
  if (jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1
      and onednn.status().available):
    return 'onednn'
  return 'shifted'


def describe_conv_impl(impl: str, dtype=jnp.float32) -> str:
  """What `impl` resolves to here, and why, for logs and benchmark tables."""
  resolved = resolve_conv_impl(impl, dtype)
  if resolved == 'onednn':
    return f'onednn ({onednn.status().reason})'
  if impl != 'auto' or jax.default_backend() != 'cpu':
    return resolved
  if jnp.dtype(dtype) != jnp.float32:
    why = f'{jnp.dtype(dtype).name} compute'
  elif jax.device_count() > 1:
    why = f'{jax.device_count()} CPU devices'
  else:
    why = onednn.status().reason
  return f'{resolved} (not onednn: {why})'


def _onednn_conv(x, kernel, stride: int, groups: int = 1, bias=None,
                 silu: bool = False):
  onednn.require()
  padding = tuple(same_padding(size, k, stride)
                  for size, k in zip(x.shape[1:3], kernel.shape[:2]))
  if bias is None:
    return onednn.conv2d(x, kernel, (stride, stride), padding, groups)
  return onednn.conv2d_bias(x, kernel, bias, (stride, stride), padding,
                            groups, silu)


def _strided_taps(x, kh: int, kw: int, stride: int, out_h: int, out_w: int):
  """Yields (i, j, x[:, i::stride, j::stride, :]) cut to out_h x out_w."""
  for i in range(kh):
    for j in range(kw):
      yield i, j, jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (out_h - 1) * stride + 1,
           j + (out_w - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1))


def _shifted_forward(x, kernel, stride: int):
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
  x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  y = None
  for i, j, tap in _strided_taps(x, kh, kw, stride, out_h, out_w):
    term = tap * kernel[i, j, 0]
    y = term if y is None else y + term
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shifted(x, kernel, stride: int):
  """Depthwise conv as k*k strided slices times per-channel weights.

  Same result as `feature_group_count=C` with TF-'SAME' padding. `kernel` has
  the Flax depthwise layout (kh, kw, 1, C). The backward pass is written out:
  differentiating the slices would pad every tap's gradient back to the full
  input (k*k full-size writes, the slowest part of a CPU train step); here the
  input gradient is the same shifted sum over the stride-dilated output
  gradient with the kernel flipped, and the kernel gradient k*k reductions.
  """
  return _shifted_forward(x, kernel, stride)


def _shifted_fwd(x, kernel, stride):
  return _shifted_forward(x, kernel, stride), (x, kernel)


def _shifted_bwd(stride, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  out_h, out_w = dy.shape[1:3]
  ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
  # dx[a] = sum_i dy_dilated[a + p0 - i] * k[i]: dilate dy by the stride and
  # pad (or crop, when negative) it so that a stride-1 correlation with the
  # flipped kernel lands exactly on the unpadded input positions.
  def config(size, out, k, pad):
    low = k - 1 - pad[0]
    return (low, size + k - 1 - low - ((out - 1) * stride + 1), stride - 1)
  dy_wide = jax.lax.pad(
      dy, jnp.zeros((), dy.dtype),
      ((0, 0, 0), config(h, out_h, kh, ph), config(w, out_w, kw, pw),
       (0, 0, 0)))
  dx = None
  for i, j, tap in _strided_taps(dy_wide, kh, kw, 1, h, w):
    term = tap * kernel[kh - 1 - i, kw - 1 - j, 0]
    dx = term if dx is None else dx + term
  x_pad = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  dk = _depthwise_kernel_grad(x_pad, dy, kh, kw, stride)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


# Bytes of one operand per chunk of the kernel gradient (see below).
DEPTHWISE_GRAD_CHUNK_BYTES = 1 << 20


def _cpu_tuned_backward() -> bool:
  """Whether the backward passes take their XLA:CPU forms (decided at trace
  time; tests force either form)."""
  return jax.default_backend() == 'cpu'


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def _depthwise_kernel_grad(x_pad, dy, kh: int, kw: int, stride: int):
  """[kh*kw, C] float32: per tap, sum over batch and space of tap * dy.

  On XLA:CPU each tap's strided window is written out before its reduction
  (the reduction library reads contiguous arrays only), nine full-size
  copies; over chunks of images small enough to stay in the core's L2 cache
  the same work took a third of the time ([8, 56, 56, 128]: 52 -> 17 ms;
  whole train steps 5% faster: S 128 px 846 -> 800 ms, B0 224 px 610 -> 577).
  """
  batch, out_h, out_w = dy.shape[:3]

  def taps_dot_dy(x_pad, dy):
    return jnp.stack([
        jnp.sum(tap.astype(jnp.float32) * dy.astype(jnp.float32),
                axis=(0, 1, 2))
        for _, _, tap in _strided_taps(x_pad, kh, kw, stride, out_h, out_w)])

  if not _cpu_tuned_backward():
    # A GPU (shifted form chosen by hand) has no small cache to fit and
    # would run the chunks one after another.
    return taps_dot_dy(x_pad, dy)
  per_image = math.prod(x_pad.shape[1:]) * 4
  chunk = _largest_divisor_at_most(
      batch, DEPTHWISE_GRAD_CHUNK_BYTES // per_image)
  if chunk == batch:
    return taps_dot_dy(x_pad, dy)
  n = batch // chunk
  parts = jax.lax.map(
      lambda args: taps_dot_dy(*args),
      (x_pad.reshape((n, chunk) + x_pad.shape[1:]),
       dy.reshape((n, chunk) + dy.shape[1:])))
  return parts.sum(0)


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv_xla(x, kernel, stride: int):
  """The same depthwise convolution as one grouped XLA convolution."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME',
      dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=x.shape[-1])


class DepthwiseConv2D(nnx.Module):
  """Depthwise k x k convolution; kernel stored as (k, k, 1, C)."""

  def __init__(self, channels: int, kernel_size: int, stride: int = 1, *,
               impl: str = 'auto', dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.dtype = dtype
    self.impl = impl
    check_conv_impl(impl, dtype)
    self.kernel = nnx.Param(fan_out_normal(kernel_size, kernel_size, 1)(
        rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def runs_on_onednn(self) -> bool:
    return resolve_conv_impl(self.impl, self.dtype) == 'onednn'

  def __call__(self, x):
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    impl = resolve_conv_impl(self.impl, self.dtype)
    if impl == 'onednn':
      return _onednn_conv(x, kernel, self.stride, groups=x.shape[-1])
    if impl == 'shifted':
      return depthwise_conv_shifted(x, kernel, self.stride)
    return depthwise_conv_xla(x, kernel, self.stride)


_ACTIVATIONS = {None: None, 'silu': jax.nn.silu}


def _check_activation(activation):
  if activation not in _ACTIVATIONS:
    raise ValueError(f'activation must be one of {sorted(map(str, _ACTIVATIONS))}'
                     f', got {activation!r}')
  return _ACTIVATIONS[activation]


def _group_moments(x, groups: int):
  """x as float32 [groups, batch/groups, ..., C], its mean and variance."""
  x32 = x.astype(jnp.float32)
  grouped = x32.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  mean = grouped.mean(axes, keepdims=True)
  # E[x^2] - E[x]^2 as the official TPU BN; clipped against cancellation.
  var = jnp.maximum(
      jnp.square(grouped).mean(axes, keepdims=True) - jnp.square(mean), 0.)
  return grouped, axes, mean, var


def batch_norm_train_reference(x, scale, bias, groups: int, epsilon: float,
                               activation, out_dtype):
  """Training-mode BN (+ activation) left to autodiff: the definition.

  Returns (out, mean, var), the moments per group as [groups, C]. The output
  is cast to `out_dtype` before the activation, which runs in that dtype.
  """
  act = _check_activation(activation)
  grouped, _, mean, var = _group_moments(x, groups)
  inv = jax.lax.rsqrt(var + epsilon) * scale
  y = ((grouped - mean) * inv + bias).reshape(x.shape).astype(out_dtype)
  return (act(y) if act else y), mean.reshape(groups, -1), var.reshape(
      groups, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x, scale, bias, groups: int, epsilon: float, activation,
                     out_dtype):
  """`batch_norm_train_reference` with its backward pass written out.

  Autodiff of the moments formula leaves XLA several reductions per layer,
  and with an activation it keeps the normalised tensor alive for the
  backward pass. Here the forward saves only the input; the backward
  recomputes the normalised values and needs two reductions (sum of dy and of
  dy * x_hat, one fused pass) and one elementwise pass. Same forward values;
  the gradient is the exact gradient of the same function.
  """
  return batch_norm_train_reference(x, scale, bias, groups, epsilon,
                                    activation, out_dtype)


def _bn_fwd(x, scale, bias, groups, epsilon, activation, out_dtype):
  act = _check_activation(activation)
  grouped, _, mean, var = _group_moments(x, groups)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((grouped - mean) * (inv * scale) + bias).reshape(x.shape).astype(
      out_dtype)
  out = act(y) if act else y
  return ((out, mean.reshape(groups, -1), var.reshape(groups, -1)),
          (x, scale, bias, mean, inv))


def _bn_bwd(groups, epsilon, activation, out_dtype, residuals, cotangents):
  del epsilon
  x, scale, bias, mean, inv = residuals
  d_out, d_mean, d_var = cotangents
  # XLA:CPU hands reductions to YNNPACK, whose fusions read per-channel
  # operands as full-size tensors: the reduction of dy * x_hat took mean and
  # 1/std broadcast to the whole batch. On CPU it reads plain dy and x
  # instead, sum(dy x_hat) = inv (sum(dy x) - mean sum(dy)): B0 224 px
  # train, batch 8, 707 -> 617 ms (median of 30 steps, A/B in one process).
  # The subtraction loses about mean/std x float32 epsilon, relatively.
  on_cpu = _cpu_tuned_backward()
  grouped = x.astype(jnp.float32).reshape(
      (groups, x.shape[0] // groups) + x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  count = math.prod(grouped.shape[1:-1])
  x_hat = (grouped - mean) * inv
  dy = d_out.astype(jnp.float32).reshape(grouped.shape)
  if activation == 'silu':
    # silu'(y) = s (1 + y (1 - s)), s = sigmoid(y), at the y the forward
    # pass fed to the activation (cast to out_dtype and back).
    y = (x_hat * scale + bias).astype(out_dtype).astype(jnp.float32)
    sig = jax.nn.sigmoid(y)
    dy = dy * (sig * (1 + y * (1 - sig)))
  sum_dy = dy.sum(axes, keepdims=True)
  if on_cpu:
    sum_dy_xhat = inv * ((dy * grouped).sum(axes, keepdims=True)
                         - mean * sum_dy)
  else:
    sum_dy_xhat = (dy * x_hat).sum(axes, keepdims=True)
  dx = (scale * inv) * (dy - (sum_dy + x_hat * sum_dy_xhat) / count)
  # The returned moments feed only the running statistics; their cotangents
  # are zeros in training, but keep the derivative exact anyway.
  dx = dx + (d_mean.reshape(mean.shape)
             + 2 * d_var.reshape(mean.shape) * (grouped - mean)) / count
  d_scale = sum_dy_xhat.reshape(groups, -1).sum(0)
  d_bias = sum_dy.reshape(groups, -1).sum(0)
  return (dx.reshape(x.shape).astype(x.dtype), d_scale.astype(scale.dtype),
          d_bias.astype(bias.dtype))


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nnx.Module):
  """BatchNorm with float32 statistics and optional grouped batch moments.

  `groups > 1` splits the batch into that many equal consecutive groups and
  normalises each with its own moments: with the batch sharded in order over
  the data axis, a group of N replicas' examples is one group, which is the
  official TPU BatchNorm (`num_shards_per_group`). The running statistics are
  updated with the moments averaged over groups.

  `activation='silu'` applies SiLU after the normalisation, to the output in
  the compute dtype, exactly as `jax.nn.silu(bn(x))` would; in training the
  pair then shares one backward pass and saves one tensor fewer.
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
    act = _check_activation(activation)
    if training:
      batch = x.shape[0]
      if batch % groups:
        raise ValueError(
            f'BatchNorm groups={groups} does not divide the batch {batch}')
      y, mean, var = batch_norm_train(
          x, self.scale[...], self.bias[...], groups, self.epsilon,
          activation, jnp.dtype(self.dtype))
      m = self.momentum
      # set_value rather than `self.mean[...] = `: flax's indexed assignment
      # compares the shardings of old and new value, and asking a tracer for
      # its sharding builds an error message that walks the whole jaxpr
      # traced so far: quadratic in the model's size. Tracing the train step
      # took 6.3 -> 3.0 s for S, 20 -> 4.8 s for L (benchmarks/README.md,
      # change 12).
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


# Eval-mode 1x1 convolutions with at least this many output rows (batch x
# height x width) run as oneDNN convolutions with the BN folded in; smaller
# ones stay XLA dots, which fuse the neighbouring BN, SE gate and residual
# work. Inference on 2 cores, batch 8, alternating steps in one process:
# from 1,500 rows S 224 px +3.5-4.6%, B0 224 px +2.1-3.1%, 128 px within
# +-1.5%, at batch 32 S 128 px +4.6%; with every 1x1 on oneDNN the batch-8
# 128 px cells lost 2-3%; train steps lost with them (benchmarks/README.md,
# changes 14 and 15).
ONEDNN_POINTWISE_MIN_ROWS = 1536


def _folds_into_onednn(conv, x) -> bool:
  """Whether eval-mode `conv_bn(conv, ..., x)` is one oneDNN call."""
  if isinstance(conv, Conv2D) and conv._pointwise():
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    return (rows >= ONEDNN_POINTWISE_MIN_ROWS
            and resolve_conv_impl(conv.impl, conv.dtype) == 'onednn')
  return conv.runs_on_onednn()


def conv_bn(conv, bn: BatchNorm, x, *, training: bool, groups: int = 1,
            activation=None):
  """`bn(conv(x), ...)`. In eval mode, when `conv` runs through oneDNN, one
  custom call instead: the BN folded into the kernel and a bias, SiLU
  applied as the output is written, which saves a pass over the activations
  (benchmarks/README.md, change 14); 1x1 convolutions join on large maps
  (`ONEDNN_POINTWISE_MIN_ROWS`)."""
  _check_activation(activation)
  if training or not _folds_into_onednn(conv, x):
    return bn(conv(x), training=training, groups=groups,
              activation=activation)
  # x * scale + shift per output channel, folded into the kernel's last axis
  # (HWIO, and [k, k, 1, C] for depthwise alike) and a bias.
  scale, shift = bn.eval_affine()
  bias = shift
  if getattr(conv, 'bias', None) is not None:
    bias = bias + conv.bias[...] * scale
  conv_groups = x.shape[-1] if isinstance(conv, DepthwiseConv2D) else 1
  return _onednn_conv(x.astype(conv.dtype), conv.kernel[...] * scale,
                      conv.stride, conv_groups, bias=bias,
                      silu=activation == 'silu')


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


def drop_path(x, keep, survival_prob):
  """Per-example stochastic depth: zero the examples where `keep` [B] is
  False, rescale the kept ones by 1/p (`keep` drawn with probability p)."""
  scale = keep.astype(jnp.float32) / survival_prob
  return x * scale.astype(x.dtype)[:, None, None, None]
