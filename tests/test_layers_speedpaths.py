"""The layers with their speed paths compute what the reference paths do.

The BatchNorm with SiLU folded in equals SiLU after it; a whole small
model's loss gradient with the fast paths (the shifted or oneDNN
convolutions, the written-out BatchNorm backward) equals the one with XLA's
convolutions and autodiff. The kernels themselves: tests/test_kernels.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax.kernels import batch_norm
from effnetv2_jax.models import arch, create_model, layers


# ------------------------------------------------------------ BatchNorm


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
  monkeypatch.setattr(batch_norm, 'train', bn_fn)
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
  fast = _loss_and_grads(conv_impl, batch_norm.train, monkeypatch)
  ref = _loss_and_grads('xla', batch_norm.train_reference, monkeypatch)
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
