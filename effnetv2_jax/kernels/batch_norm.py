"""Training-mode BatchNorm (+ SiLU) with its backward pass written out.

`train_reference` is the definition, left to autodiff; `train` computes the
same values with a backward pass that saves less and reads less
(`layers.BatchNorm` calls it).
"""

import functools
import math

import jax
import jax.numpy as jnp

from effnetv2_jax.kernels import cpu

ACTIVATIONS = {None: None, 'silu': jax.nn.silu}


def activation_fn(activation):
  """The function `activation` names (None: none); else a ValueError."""
  if activation not in ACTIVATIONS:
    choices = sorted(map(str, ACTIVATIONS))
    raise ValueError(f'activation must be one of {choices}, got '
                     f'{activation!r}')
  return ACTIVATIONS[activation]


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


def train_reference(x, scale, bias, groups: int, epsilon: float, activation,
                    out_dtype):
  """Training-mode BN (+ activation) left to autodiff: the definition.

  Returns (out, mean, var), the moments per group as [groups, C]. The output
  is cast to `out_dtype` before the activation, which runs in that dtype.
  """
  act = activation_fn(activation)
  grouped, _, mean, var = _group_moments(x, groups)
  inv = jax.lax.rsqrt(var + epsilon) * scale
  y = ((grouped - mean) * inv + bias).reshape(x.shape).astype(out_dtype)
  return (act(y) if act else y), mean.reshape(groups, -1), var.reshape(
      groups, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def train(x, scale, bias, groups: int, epsilon: float, activation,
          out_dtype):
  """`train_reference` with its backward pass written out.

  Autodiff of the moments formula leaves XLA several reductions per layer,
  and with an activation it keeps the normalised tensor alive for the
  backward pass. Here the forward saves only the input; the backward
  recomputes the normalised values and needs two reductions (sum of dy and of
  dy * x_hat, one fused pass) and one elementwise pass. Same forward values;
  the gradient is the exact gradient of the same function.
  """
  return train_reference(x, scale, bias, groups, epsilon, activation,
                         out_dtype)


def _train_fwd(x, scale, bias, groups, epsilon, activation, out_dtype):
  act = activation_fn(activation)
  grouped, _, mean, var = _group_moments(x, groups)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((grouped - mean) * (inv * scale) + bias).reshape(x.shape).astype(
      out_dtype)
  out = act(y) if act else y
  return ((out, mean.reshape(groups, -1), var.reshape(groups, -1)),
          (x, scale, bias, mean, inv))


def _train_bwd(groups, epsilon, activation, out_dtype, residuals, cotangents):
  del epsilon
  x, scale, bias, mean, inv = residuals
  d_out, d_mean, d_var = cotangents
  # XLA:CPU hands reductions to YNNPACK, whose fusions read per-channel
  # operands as full-size tensors: the reduction of dy * x_hat would read
  # mean and 1/std broadcast to the whole batch. On CPU it reads plain dy and
  # x instead, sum(dy x_hat) = inv (sum(dy x) - mean sum(dy))
  # (benchmarks/README.md). The subtraction loses about mean/std x float32
  # epsilon, relatively.
  on_cpu = cpu.tuned_backward()
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


train.defvjp(_train_fwd, _train_bwd)
