"""Fast paths in models/layers.py compute what their reference paths compute.

Forward values and gradients of: the shifted depthwise convolution (with its
hand-written backward) against XLA's grouped convolution, the 1x1
convolution's CPU backward against autodiff of its einsum, and the training
BatchNorm (+ SiLU) with its hand-written backward against plain autodiff;
then a whole small model's loss gradient with the fast paths against the
reference ones.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax.models import arch, create_model, layers


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
  fast = lambda x, w: layers.depthwise_conv_shifted(x, w, stride)
  ref = lambda x, w: layers.depthwise_conv_xla(x, w, stride)
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
  monkeypatch.setattr(layers, 'DEPTHWISE_GRAD_CHUNK_BYTES', chunk_bytes)
  k1, k2 = jax.random.split(jax.random.key(stride))
  x = jax.random.normal(k1, (6, 7, 7, 4))
  w = jax.random.normal(k2, (3, 3, 1, 4))
  fast = lambda x, w: layers.depthwise_conv_shifted(x, w, stride)
  ref = lambda x, w: layers.depthwise_conv_xla(x, w, stride)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert _rel_err(gf[0], gr[0]) < 1e-6
  assert _rel_err(gf[1], gr[1]) < 1e-6
  chunked = jax.make_jaxpr(jax.grad(lambda w: fast(x, w).sum()))(w)
  assert 'scan' in str(chunked)  # the chunked path (lax.map) really ran


def test_shifted_depthwise_bfloat16_keeps_dtype_and_float32_kernel_grad():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, 8), jnp.bfloat16)
  fast = lambda x, w: layers.depthwise_conv_shifted(x, w, 2)
  ref = lambda x, w: layers.depthwise_conv_xla(x, w, 2)
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
  fast = layers._pointwise_conv_cpu
  ref = lambda x, w: jnp.einsum('bhwc,cd->bhwd', x, w)
  (yf, gf), (yr, gr) = _vjp_both(fast, ref, (x, w))
  assert gf[1].shape == w.shape
  assert _rel_err(yf, yr) < 1e-6
  assert _rel_err(gf[0], gr[0]) < 1e-6
  assert _rel_err(gf[1], gr[1]) < 1e-6


def test_pointwise_conv_takes_the_cpu_form_only_on_cpu(monkeypatch):
  x, w = jnp.ones((2, 3, 3, 4)), jnp.ones((4, 6))
  for cpu_form in (True, False):
    monkeypatch.setattr(layers, '_cpu_tuned_backward', lambda: cpu_form)
    # A fresh function each time: make_jaxpr caches traces per function.
    jaxpr = str(jax.make_jaxpr(lambda x, w: layers.pointwise_conv(x, w))(x, w))
    assert ('custom_vjp_call' in jaxpr) == cpu_form


def test_auto_conv_impl_on_cpu_and_names_are_checked(monkeypatch):
  assert jax.default_backend() == 'cpu'
  # The test session's eight fake devices: no custom call XLA would replicate.
  assert layers.resolve_conv_impl('auto') == 'shifted'
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  expected = 'onednn' if layers.onednn.status().available else 'shifted'
  assert layers.resolve_conv_impl('auto') == expected
  assert layers.resolve_conv_impl('auto', jnp.bfloat16) == 'shifted'
  with pytest.raises(ValueError, match='conv_impl'):
    layers.resolve_conv_impl('fast')


# ------------------------------------------------------------ BatchNorm


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('cpu_form', [True, False])
def test_batchnorm_fast_backward_matches_autodiff(groups, activation,
                                                  cpu_form, monkeypatch):
  # Both backward forms, whatever backend runs the test. The CPU form sums
  # dy * x and subtracts mean * sum(dy): a mean 20x the standard deviation
  # checks that the cancellation stays small.
  monkeypatch.setattr(layers, '_cpu_tuned_backward', lambda: cpu_form)
  k1, k2, k3 = jax.random.split(jax.random.key(groups), 3)
  x = 20.0 + jax.random.normal(k1, (8, 5, 4, 6))
  scale = 1.0 + 0.3 * jax.random.normal(k2, (6,))
  bias = 0.5 * jax.random.normal(k3, (6,))

  def bind(fn):
    return lambda x, s, b: fn(x, s, b, groups, 1e-3, activation, jnp.float32)

  (out_f, g_f), (out_r, g_r) = _vjp_both(
      bind(layers.batch_norm_train), bind(layers.batch_norm_train_reference),
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
      bind(layers.batch_norm_train), bind(layers.batch_norm_train_reference),
      (x, scale, bias))
  assert out_f[0].dtype == jnp.bfloat16 and g_f[0].dtype == jnp.bfloat16
  assert g_f[1].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out_f[0], np.float32),
                                np.asarray(out_r[0], np.float32))
  for a, b in zip(g_f, g_r):
    assert _rel_err(a, b) < 2e-2


def test_batchnorm_activation_equals_silu_after_and_rejects_unknown():
  bn = layers.BatchNorm(6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3, 3, 6))
  for training in (True, False):
    fused = bn(x, training=training, activation='silu')
    plain = jax.nn.silu(bn(x, training=training))
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain),
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='activation'):
    bn(x, training=False, activation='relu6')


# ------------------------------------------------------------ whole model


# Every block kind the fast paths touch: Fused e=1, MBConv e=2 with SE, a
# stride-2 depthwise and a residual one; small, so two compiles stay short.
TINY = arch.Architecture(
    name='speedpath_tiny',
    stages=(arch.parse_block_string('r1_k3_s1_e1_i8_o8_c1'),
            arch.parse_block_string('r2_k3_s2_e2_i8_o16_se0.25')),
    head_channels=32)


def _loss_and_grads(conv_impl, bn_fn, monkeypatch):
  monkeypatch.setattr(layers, 'batch_norm_train', bn_fn)
  model = create_model(TINY, 10, conv_impl=conv_impl, rngs=0)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = jax.random.normal(jax.random.key(5), (4, 24, 24, 3))
  labels = jnp.arange(4) % 10

  def loss_fn(params):
    m = nnx.merge(graphdef, params, stats, copy=True)
    logits = m(x, training=True, dropout_rate=0.0, drop_path_rate=0.0)
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return loss, nnx.state(m, nnx.BatchStat)

  (loss, new_stats), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, new_stats, grads


@pytest.mark.parametrize('conv_impl', ['shifted', 'onednn'])
def test_model_gradients_fast_paths_equal_reference_paths(conv_impl,
                                                          monkeypatch):
  fast = _loss_and_grads(conv_impl, layers.batch_norm_train, monkeypatch)
  ref = _loss_and_grads('xla', layers.batch_norm_train_reference,
                        monkeypatch)
  np.testing.assert_allclose(float(fast[0]), float(ref[0]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
  grads_f, grads_r = jax.tree.leaves(fast[2]), jax.tree.leaves(ref[2])
  assert len(grads_f) == len(grads_r) > 20
  # Float32 rounding differs through a dozen BN layers, and some leaves'
  # exact gradient is zero (a bias right before a BN), so errors are measured
  # against the larger of the leaf's and 1e-3 of the mean leaf's norm; a
  # wrong formula would be off by O(1).
  norms = [float(jnp.linalg.norm(b)) for b in grads_r]
  floor = 1e-3 * sum(norms) / len(norms)
  for a, b, norm in zip(grads_f, grads_r, norms):
    assert float(jnp.linalg.norm(a - b)) <= 1e-3 * max(norm, floor)


# --------------------------------------------------------------------------
# Compiler options (models/xla_options.py).

from effnetv2_jax.models import xla_options  # noqa: E402


def _entry_ops(compiled) -> list[str]:
  text = compiled.as_text()
  entry = text[text.index('\nENTRY'):]
  return re.findall(r'\n\s*(?:ROOT )?%([a-z_\-]+)[.\d]* = ', entry)


def _conv_kernel_gradient():
  """The kernel gradient of a dense 3x3 convolution: the case YNNPACK's
  convolution ran at 3-6 GMAC/s in the model's train step."""
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 48))
  k = jax.random.normal(jax.random.key(1), (3, 3, 48, 192)) * 0.05
  dy = jax.random.normal(jax.random.key(2), (8, 32, 32, 192))

  def kernel_grad(x, k, dy):
    conv = lambda k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.vjp(conv, k)[1](dy)[0]

  return jax.jit(kernel_grad).lower(x, k, dy), (x, k, dy)


def test_cpu_options_keep_convolutions_out_of_ynnpack_with_equal_results():
  assert xla_options.compiler_options('tpu') == {}
  assert 'xla_cpu_experimental_ynn_fusion_type' in (
      xla_options.compiler_options('cpu'))
  lowered, args = _conv_kernel_gradient()
  default, ours = lowered.compile(), xla_options.compile_lowered(lowered, 'cpu')
  # XLA's default hands the convolution to YNNPACK (a library fusion); ours
  # leaves it to XLA's own convolution.
  assert 'ynn_fusion' in _entry_ops(default)
  assert 'convolution' in _entry_ops(ours)
  assert 'ynn_fusion' not in _entry_ops(ours)
  np.testing.assert_allclose(np.asarray(ours(*args)),
                             np.asarray(default(*args)), rtol=1e-4, atol=1e-3)


def test_options_this_xla_rejects_fall_back_to_defaults(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, 'CPU_OPTIONS',
                      {'xla_cpu_no_such_option_in_any_version': 'true'})
  lowered, args = _conv_kernel_gradient()
  with caplog.at_level('WARNING'):
    compiled = xla_options.compile_lowered(lowered, 'cpu')
  assert np.isfinite(np.asarray(compiled(*args))).all()
  assert 'compiling with defaults' in caplog.text


def test_gpu_options_are_options_this_xla_knows():
  """The GPU options parse as XLA debug options (XLA:CPU accepts and ignores
  GPU-only ones; a misspelt name is rejected, as the fallback test shows)."""
  options = xla_options.compiler_options('gpu')
  assert options == {'xla_gpu_enable_triton_gemm': False}
  lowered, args = _conv_kernel_gradient()
  compiled = lowered.compile(compiler_options=options)
  assert np.isfinite(np.asarray(compiled(*args))).all()
