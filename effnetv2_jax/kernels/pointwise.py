"""1x1 convolutions as matmuls, with a kernel gradient tuned for XLA:CPU.

A 1x1 stride-1 convolution is a matmul over the channels, and XLA:CPU runs
dot faster than conv, so every convolution implementation computes them
here.
"""

import jax
import jax.numpy as jnp

from effnetv2_jax.kernels import cpu


def _channels_matmul(x, kernel):
  return jnp.einsum('...c,cd->...d', x, kernel)


def conv(x, kernel):
  """x [..., C] times kernel [C, D]; on CPU with the kernel gradient below."""
  if cpu.tuned_backward():
    return conv_cpu(x, kernel)
  return _channels_matmul(x, kernel)


conv_cpu = jax.custom_vjp(_channels_matmul)


def _conv_cpu_fwd(x, kernel):
  return conv_cpu(x, kernel), (x, kernel)


def _conv_cpu_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum('...d,cd->...c', dy, kernel)
  rows_x = x.reshape(-1, x.shape[-1])
  rows_dy = dy.reshape(-1, dy.shape[-1])
  over_rows = (((0,), (0,)), ((), ()))
  # Both orders are the same sum over rows. XLA:CPU leaves this dot to its
  # own emitter, which is faster when the operand with fewer channels comes
  # first (benchmarks/README.md). The transpose after is
  # kernel-sized; the barrier keeps XLA from folding it back into the slow
  # order.
  if rows_dy.shape[1] < rows_x.shape[1]:
    dk = jax.lax.optimization_barrier(
        jax.lax.dot_general(rows_dy, rows_x, over_rows)).T
  else:
    dk = jax.lax.dot_general(rows_x, rows_dy, over_rows)
  return dx, dk.astype(kernel.dtype)


conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)
