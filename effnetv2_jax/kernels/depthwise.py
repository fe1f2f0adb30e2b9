"""Depthwise convolutions as shifted multiply-adds, and as XLA's grouped one.

XLA:CPU's grouped convolution is many times slower than k*k strided slices
times per-channel weights, so `conv_impl='shifted'` computes the depthwise
convolutions with `shifted_conv`; `xla_conv` is the reference.
"""

import functools
import math

import jax
import jax.numpy as jnp

from effnetv2_jax.kernels import cpu
from effnetv2_jax.kernels.padding import same_padding

# Bytes of one operand per chunk of the kernel gradient (`_kernel_grad`).
GRAD_CHUNK_BYTES = 1 << 20


def xla_conv(x, kernel, stride: int):
  """The depthwise convolution as one grouped XLA convolution."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


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
def shifted_conv(x, kernel, stride: int):
  """Depthwise conv as k*k strided slices times per-channel weights.

  Same result as `xla_conv` (TF-'SAME' padding). `kernel` has the Flax
  depthwise layout (kh, kw, 1, C). The backward pass is written out:
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
  dk = _kernel_grad(x_pad, dy, kh, kw, stride)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


shifted_conv.defvjp(_shifted_fwd, _shifted_bwd)


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def _kernel_grad(x_pad, dy, kh: int, kw: int, stride: int):
  """[kh*kw, C] float32: per tap, sum over batch and space of tap * dy.

  On XLA:CPU each tap's strided window is written out before its reduction
  (the reduction library reads contiguous arrays only), k*k full-size
  copies; over chunks of images small enough to stay in the core's L2 cache
  the same work is several times faster (benchmarks/README.md).
  """
  batch, out_h, out_w = dy.shape[:3]

  def taps_dot_dy(x_pad, dy):
    return jnp.stack([
        jnp.sum(tap.astype(jnp.float32) * dy.astype(jnp.float32),
                axis=(0, 1, 2))
        for _, _, tap in _strided_taps(x_pad, kh, kw, stride, out_h, out_w)])

  if not cpu.tuned_backward():
    # A GPU (shifted form chosen by hand) has no small cache to fit and
    # would run the chunks one after another.
    return taps_dot_dy(x_pad, dy)
  per_image = math.prod(x_pad.shape[1:]) * 4
  chunk = _largest_divisor_at_most(batch, GRAD_CHUNK_BYTES // per_image)
  if chunk == batch:
    return taps_dot_dy(x_pad, dy)
  n = batch // chunk
  parts = jax.lax.map(
      lambda args: taps_dot_dy(*args),
      (x_pad.reshape((n, chunk) + x_pad.shape[1:]),
       dy.reshape((n, chunk) + dy.shape[1:])))
  return parts.sum(0)
