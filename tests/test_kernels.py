"""The CPU speed paths in effnetv2_jax/kernels compute what their reference
paths compute, and the convolution implementations are chosen as documented.

Forward values and gradients of: the shifted depthwise convolution (with its
hand-written backward) against XLA's grouped convolution, the 1x1
convolution's CPU backward against autodiff of its einsum, and the training
BatchNorm (+ SiLU) with its hand-written backward against plain autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax import kernels
from effnetv2_jax.kernels import batch_norm, cpu, depthwise, onednn, pointwise


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _vjp_both(fast, ref, primals, seed=3):
  """(outputs, input cotangents) of `fast` and of `ref` for one random
  output cotangent, all in one jitted program (faster than op by op)."""
  out_shape = jax.eval_shape(ref, *primals)
  leaves = jax.tree.leaves(out_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  cts = jax.tree.unflatten(jax.tree.structure(out_shape), [
      jax.random.normal(k, l.shape, jnp.float32).astype(l.dtype)
      for k, l in zip(keys, leaves)])

  @jax.jit
  def both(primals, cts):
    results = []
    for fn in (fast, ref):
      out, vjp = jax.vjp(fn, *primals)
      results.append((out, vjp(cts)))
    return results

  return both(primals, cts)


# ------------------------------------------------------------ depthwise


@pytest.mark.parametrize('size,kernel,stride', [
    ((8, 8), 3, 1), ((9, 7), 3, 2), ((10, 10), 5, 2), ((7, 7), 5, 1),
    ((1, 1), 3, 1), ((2, 3), 3, 2)])
def test_shifted_depthwise_matches_xla_value_and_grads(size, kernel, stride):
  k1, k2 = jax.random.split(jax.random.key(sum(size) + kernel + stride))
  x = jax.random.normal(k1, (2,) + size + (6,))
  w = jax.random.normal(k2, (kernel, kernel, 1, 6))
  fast = lambda x, w: depthwise.shifted_conv(x, w, stride)
  ref = lambda x, w: depthwise.xla_conv(x, w, stride)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert yf.shape == yr.shape
  assert _rel_err(yf, yr) < 1e-6
  assert _rel_err(gf[0], gr[0]) < 1e-6
  assert _rel_err(gf[1], gr[1]) < 1e-6


@pytest.mark.parametrize('chunk_bytes', [1, 2 * 9 * 9 * 4 * 4])
@pytest.mark.parametrize('stride', [1, 2])
def test_shifted_depthwise_kernel_grad_in_image_chunks(monkeypatch,
                                                      chunk_bytes, stride):
  """The kernel gradient summed over chunks of the batch (a lax.map) equals
  XLA's: chunks of one image, and of two out of six."""
  monkeypatch.setattr(depthwise, 'GRAD_CHUNK_BYTES', chunk_bytes)
  k1, k2 = jax.random.split(jax.random.key(stride))
  x = jax.random.normal(k1, (6, 7, 7, 4))
  w = jax.random.normal(k2, (3, 3, 1, 4))
  fast = lambda x, w: depthwise.shifted_conv(x, w, stride)
  ref = lambda x, w: depthwise.xla_conv(x, w, stride)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert _rel_err(gf[0], gr[0]) < 1e-6
  assert _rel_err(gf[1], gr[1]) < 1e-6
  chunked = jax.make_jaxpr(jax.grad(lambda w: fast(x, w).sum()))(w)
  assert 'scan' in str(chunked)  # the chunked path (lax.map) really ran


def test_shifted_depthwise_bfloat16_keeps_dtype_and_float32_kernel_grad():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, 8), jnp.bfloat16)
  fast = lambda x, w: depthwise.shifted_conv(x, w, 2)
  ref = lambda x, w: depthwise.xla_conv(x, w, 2)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert yf.dtype == gf[0].dtype == gf[1].dtype == jnp.bfloat16
  for a, b in ((yf, yr), (gf[0], gr[0]), (gf[1], gr[1])):
    assert _rel_err(a, b) < 2e-2


# ------------------------------------------------------------ pointwise


@pytest.mark.parametrize('channels_in,channels_out', [(12, 5), (5, 12), (7, 7)])
def test_pointwise_conv_cpu_backward_matches_autodiff(channels_in,
                                                      channels_out):
  """The CPU form computes the kernel gradient with the narrower operand
  first (then transposes); both orders, and equal widths, match autodiff
  of the plain einsum."""
  k1, k2 = jax.random.split(jax.random.key(channels_in * 10 + channels_out))
  x = jax.random.normal(k1, (3, 5, 4, channels_in))
  w = jax.random.normal(k2, (channels_in, channels_out))
  fast = pointwise.conv_cpu
  ref = lambda x, w: jnp.einsum('bhwc,cd->bhwd', x, w)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert gf[1].shape == w.shape
  assert _rel_err(yf, yr) < 1e-6
  assert _rel_err(gf[0], gr[0]) < 1e-6
  assert _rel_err(gf[1], gr[1]) < 1e-6


def test_pointwise_conv_takes_the_cpu_form_only_on_cpu(monkeypatch):
  x, w = jnp.ones((2, 3, 3, 4)), jnp.ones((4, 6))
  for cpu_form in (True, False):
    monkeypatch.setattr(cpu, 'tuned_backward', lambda: cpu_form)
    # A fresh function each time: make_jaxpr caches traces per function.
    jaxpr = str(jax.make_jaxpr(lambda x, w: pointwise.conv(x, w))(x, w))
    assert ('custom_vjp_call' in jaxpr) == cpu_form


# ------------------------------------------------------------ BatchNorm


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('cpu_form', [True, False])
def test_batchnorm_fast_backward_matches_autodiff(groups, activation,
                                                  cpu_form, monkeypatch):
  # Both backward forms, whatever backend runs the test. The CPU form sums
  # dy * x and subtracts mean * sum(dy): a mean 20x the standard deviation
  # checks that the cancellation stays small.
  monkeypatch.setattr(cpu, 'tuned_backward', lambda: cpu_form)
  k1, k2, k3 = jax.random.split(jax.random.key(groups), 3)
  x = 20.0 + jax.random.normal(k1, (8, 5, 4, 6))
  scale = 1.0 + 0.3 * jax.random.normal(k2, (6,))
  bias = 0.5 * jax.random.normal(k3, (6,))

  def bind(fn):
    return lambda x, s, b: fn(x, s, b, groups, 1e-3, activation, jnp.float32)

  (out_f, g_f), (out_r, g_r) = _vjp_both(
      bind(batch_norm.train), bind(batch_norm.train_reference),
      (x, scale, bias))
  for a, b in zip(out_f, out_r):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert out_f[1].shape == (groups, 6)
  for a, b in zip(g_f, g_r):  # x, scale, bias
    assert a.shape == b.shape
    assert _rel_err(a, b) < 1e-5


def test_batchnorm_fast_backward_bfloat16():
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16), jnp.bfloat16)
  scale, bias = jnp.full((16,), 1.5), jnp.full((16,), 0.1)

  def bind(fn):
    return lambda x, s, b: fn(x, s, b, 1, 1e-3, 'silu', jnp.bfloat16)

  (out_f, g_f), (out_r, g_r) = _vjp_both(
      bind(batch_norm.train), bind(batch_norm.train_reference),
      (x, scale, bias))
  assert out_f[0].dtype == jnp.bfloat16 and g_f[0].dtype == jnp.bfloat16
  assert g_f[1].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out_f[0], np.float32),
                                np.asarray(out_r[0], np.float32))
  for a, b in zip(g_f, g_r):
    assert _rel_err(a, b) < 2e-2


# ------------------------------------------------------------ implementations


def test_auto_conv_impl_on_cpu_and_names_are_checked(monkeypatch):
  assert jax.default_backend() == 'cpu'
  # The test session's eight fake devices: no custom call XLA would replicate.
  assert kernels.resolve_conv_impl('auto') == 'shifted'
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  expected = 'onednn' if onednn.status().available else 'shifted'
  assert kernels.resolve_conv_impl('auto') == expected
  assert kernels.resolve_conv_impl('auto', jnp.bfloat16) == 'shifted'
  with pytest.raises(ValueError, match='conv_impl'):
    kernels.resolve_conv_impl('fast')


def test_choose_conv_impl_resolves_auto_and_describe_says_why():
  # The test session's fake devices keep 'auto' off the custom call.
  devices = jax.device_count()
  assert devices > 1
  assert kernels.choose_conv_impl('auto') == kernels.choose_conv_impl(
      'shifted') != kernels.choose_conv_impl('xla')
  assert (kernels.describe_conv_impl('auto')
          == f'shifted (not onednn: {devices} CPU devices)')
  assert (kernels.describe_conv_impl('auto', jnp.bfloat16)
          == 'shifted (not onednn: bfloat16 compute)')
  assert kernels.describe_conv_impl('xla') == 'xla'
  with pytest.raises(ValueError, match="'onednn' computes in float32"):
    kernels.choose_conv_impl('onednn', jnp.bfloat16)
  with pytest.raises(NotImplementedError, match='fold no BatchNorm'):
    kernels.choose_conv_impl('xla').conv_bias(None, None, None, 1, 1, False)
