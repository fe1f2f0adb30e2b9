"""The oneDNN convolutions (kernels/onednn.py, onednn_conv.cc): values and
gradients against XLA's convolution, the layers and the eval-mode BatchNorm
fold that use them, the build and its cache, and every way of being
unavailable."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from config_files import load_config
from effnetv2_jax import kernels
from effnetv2_jax.kernels import onednn
from effnetv2_jax.models import create_model, layers

# setup.py installs oneDNN on Linux x86-64, and CI has a compiler: there the
# kernels must build, not quietly fall back.
REQUIRED = sys.platform == 'linux' and platform.machine() == 'x86_64'


@pytest.fixture
def fresh_status():
  """A status() computed under the test's environment, forgotten after."""
  onednn.reset()
  yield
  onednn.reset()


@pytest.fixture
def available():
  current = onednn.status()
  if not current.available:
    if REQUIRED:
      pytest.fail(f'oneDNN convolutions unavailable: {current.reason}')
    pytest.skip(current.reason)


def test_kernels_build_where_the_package_installs_onednn():
  current = onednn.status()
  if REQUIRED:
    assert current.available, current.reason
    assert current.library.is_file()
    assert 'oneDNN 3.' in current.reason


def _xla_conv(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _value_and_grads(conv, x, kernel):
  y, vjp = jax.vjp(conv, x, kernel)
  dy = jax.random.normal(jax.random.key(9), y.shape)
  return (y, *vjp(dy))


# (input H, W, channels in, out, kernel, stride, groups): the stem, the Fused
# stages, asymmetric TF-'SAME' padding (even sizes at stride 2), a 5x5,
# depthwise at both strides, a grouped convolution that is not depthwise.
CASES = [
    (17, 17, 3, 8, 3, 2, 1),
    (16, 12, 3, 8, 3, 2, 1),
    (12, 12, 6, 6, 3, 1, 1),
    (14, 14, 6, 10, 3, 2, 1),
    (9, 11, 4, 7, 5, 1, 1),
    (12, 12, 16, 16, 3, 1, 16),
    (13, 13, 16, 16, 5, 2, 16),
    (10, 10, 8, 12, 3, 1, 4),
    # Depthwise on maps smaller than the kernel (kernel gradient by XLA).
    (2, 2, 16, 16, 3, 1, 16),
    (1, 1, 8, 8, 3, 1, 8),
    (3, 2, 8, 8, 5, 2, 8),
]


@pytest.mark.parametrize('h,w,cin,cout,k,stride,groups', CASES)
def test_values_and_gradients_equal_xla(available, h, w, cin, cout, k, stride,
                                        groups):
  x = jax.random.normal(jax.random.key(0), (3, h, w, cin))
  kernel = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
  padding = tuple(kernels.same_padding(size, k, stride) for size in (h, w))
  ours = jax.jit(lambda x, kernel: _value_and_grads(
      lambda x, kernel: onednn.conv2d(x, kernel, (stride, stride), padding,
                                      groups), x, kernel))(x, kernel)
  ref = jax.jit(lambda x, kernel: _value_and_grads(
      lambda x, kernel: _xla_conv(x, kernel, (stride, stride), padding,
                                  groups), x, kernel))(x, kernel)
  for name, a, b in zip(('output', 'input grad', 'kernel grad'), ours, ref):
    assert a.shape == b.shape, name
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale, name


THREADED_CHECK = """
import jax, jax.numpy as jnp
from effnetv2_jax.kernels import onednn
assert onednn.status().available
for groups, cin, cout in ((1, 8, 16), (16, 16, 16)):
  x = jax.random.normal(jax.random.key(0), (4, 20, 20, cin))
  k = jax.random.normal(jax.random.key(1), (3, 3, cin // groups, cout))
  pad = ((1, 1), (1, 1))
  def grads(conv):
    y, vjp = jax.vjp(conv, x, k)
    return (y, *vjp(jnp.cos(y)))
  ours = grads(lambda x, k: onednn.conv2d(x, k, (1, 1), pad, groups))
  ref = grads(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups))
  for a, b in zip(ours, ref):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
print('threaded ok')
"""


def test_threaded_calls_equal_xla(available):
  """Every call above the serial threshold runs on an OpenMP team; the
  shapes above are all below the default, so here the threshold is 0."""
  env = dict(os.environ, EFFNETV2_ONEDNN_SERIAL_MACS='0')
  env['XLA_FLAGS'] = ' '.join(flag for flag in env.get('XLA_FLAGS', '').split()
                              if 'device_count' not in flag)
  proc = subprocess.run([sys.executable, '-c', THREADED_CHECK], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'threaded ok' in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-3000:])


@pytest.mark.parametrize('silu', [False, True])
@pytest.mark.parametrize('groups', [1, 6])
def test_bias_and_silu_epilogue_values_and_gradients(available, silu, groups):
  x = jax.random.normal(jax.random.key(0), (2, 11, 11, 6))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 6 // groups, 6))
  bias = jax.random.normal(jax.random.key(2), (6,))
  padding = ((1, 1), (1, 1))

  def reference(x, kernel, bias):
    y = _xla_conv(x, kernel, (2, 2), padding, groups) + bias
    return jax.nn.silu(y) if silu else y

  def fused(x, kernel, bias):
    return onednn.conv2d_bias(x, kernel, bias, (2, 2), padding, groups, silu)

  def value_and_grads(f):
    y, vjp = jax.vjp(f, x, kernel, bias)
    return (y, *vjp(jax.random.normal(jax.random.key(3), y.shape)))

  ours = jax.jit(lambda: value_and_grads(fused))()
  ref = jax.jit(lambda: value_and_grads(reference))()
  for name, a, b in zip(('output', 'dx', 'dkernel', 'dbias'), ours, ref):
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * scale, name


def test_eval_mode_folds_batch_norm_into_the_convolution(available):
  model = create_model('b0', 10, conv_impl='onednn', rngs=0)
  x = jnp.ones((1, 32, 32, 3))
  evaluation = str(jax.make_jaxpr(lambda x: model(x, training=False))(x))
  # stem, the three Fused stages' k x k convs, every depthwise: all folded.
  assert 'effnetv2_onednn_conv_forward_bias' in evaluation
  assert "'effnetv2_onednn_conv_forward'" not in evaluation
  graphdef, state = nnx.split(model)
  training = str(jax.make_jaxpr(lambda x: nnx.merge(graphdef, state, copy=True)(
      x, training=True, dropout_rate=0.0, drop_path_rate=0.0))(x))
  assert 'effnetv2_onednn_conv_forward_bias' not in training


@pytest.mark.parametrize('silu', [False, True])
def test_eval_mode_1x1_convolutions_join_oneDNN_on_large_maps(available,
                                                             silu):
  bn = layers.BatchNorm(16, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(7), 4)
  bn.scale.set_value(1 + 0.3 * jax.random.normal(keys[0], (16,)))
  bn.bias.set_value(0.3 * jax.random.normal(keys[1], (16,)))
  bn.mean.set_value(0.3 * jax.random.normal(keys[2], (16,)))
  bn.var.set_value(jax.random.uniform(keys[3], (16,), minval=0.5, maxval=2))
  activation = 'silu' if silu else None

  def loss_for(impl):
    conv = layers.Conv2D(8, 16, 1, impl=impl, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split((conv, bn), nnx.Param, ...)

    def loss(params, x):
      c, b = nnx.merge(graphdef, params, stats, copy=True)
      y = layers.ConvBN.apply(c, b, x, training=False, activation=activation)
      return jnp.sum(jnp.sin(y))

    return loss, params

  rows = kernels.ONEDNN_POINTWISE_MIN_ROWS
  for height, joins in ((rows // 32, True), (rows // 32 - 1, False)):
    x = jax.random.normal(jax.random.key(height), (1, height, 32, 8))
    (loss, params), (ref_loss, _) = loss_for('onednn'), loss_for('xla')
    jaxpr = str(jax.make_jaxpr(loss)(params, x))
    assert ('effnetv2_onednn_conv_forward_bias' in jaxpr) == joins, height
    assert 'effnetv2_onednn' not in str(jax.make_jaxpr(ref_loss)(params, x))
    ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      scale = float(jnp.max(jnp.abs(b)))
      assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * max(scale, 1.0)


def test_gradients_through_eval_mode_equal_xla(available):
  """Fine-tuning with frozen BatchNorm differentiates through the fold:
  into the kernels, and through scale / shift into the BN parameters."""
  def grads(impl):
    model = create_model('b0', 10, conv_impl=impl, rngs=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # 64 px: stage 1 (32 x 32 x 2 rows) takes the 1x1 oneDNN route too.
    x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))

    def loss(params):
      logits = nnx.merge(graphdef, params, rest, copy=True)(x, training=False)
      return jnp.sum(jax.nn.log_softmax(logits)[:, 3])

    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

  ours, ref = grads('onednn'), grads('xla')
  norms = [float(jnp.linalg.norm(b)) for b in ref]
  floor = 1e-3 * sum(norms) / len(norms)
  for a, b, norm in zip(ours, ref, norms):
    assert float(jnp.linalg.norm(a - b)) <= 1e-4 * max(norm, floor)


def test_layers_take_the_onednn_form(available):
  conv = layers.Conv2D(4, 6, 3, 2, impl='onednn', rngs=nnx.Rngs(0))
  dw = layers.DepthwiseConv2D(6, 3, 1, impl='onednn', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
  jaxpr = str(jax.make_jaxpr(lambda x: dw(conv(x)))(x))
  assert jaxpr.count('effnetv2_onednn_conv_forward') == 2
  conv.impl = dw.impl = kernels.choose_conv_impl('xla')
  expected = dw(conv(x))
  conv.impl = dw.impl = kernels.choose_conv_impl('onednn')
  np.testing.assert_allclose(np.asarray(dw(conv(x))), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)


def test_only_float32(available):
  x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
  with pytest.raises(TypeError, match='float32'):
    onednn.conv2d(x, jnp.ones((3, 3, 3, 4), jnp.bfloat16), (1, 1),
                  ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="'onednn' computes in float32"):
    create_model('b0', 10, conv_impl='onednn', dtype=jnp.bfloat16)


def test_handler_rejects_inconsistent_shapes(available):
  x = jnp.ones((1, 8, 8, 3))
  kernel = jnp.ones((3, 3, 3, 4))
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match='output shape does not follow'):
    jax.block_until_ready(onednn._call(  # 8 px out cannot come from stride 2
        'effnetv2_onednn_conv_forward', (1, 8, 8, 4), x, kernel,
        strides=(2, 2), padding=((1, 1), (1, 1)), groups=1))


# ------------------------------------------------------------ build, cache


def _library_of(tmp_path, monkeypatch):
  monkeypatch.setenv('EFFNETV2_CACHE_DIR', str(tmp_path / 'cache'))
  return onednn.library_path(onednn.find_compiler(), onednn.find_onednn())


def test_build_is_cached_and_a_corrupt_cache_file_is_rebuilt(
    available, fresh_status, tmp_path, monkeypatch):
  path = _library_of(tmp_path, monkeypatch)
  path.parent.mkdir(parents=True)
  path.write_bytes(b'not a shared library')  # as a killed build might leave
  current = onednn.status()
  assert current.available, current.reason
  assert current.library == path and path.read_bytes()[:4] == b'\x7fELF'
  built = path.stat().st_mtime_ns
  onednn.reset()
  assert onednn.status().available
  assert path.stat().st_mtime_ns == built  # loaded, not compiled again
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temps


def test_cache_key_follows_the_source(available, tmp_path, monkeypatch):
  first = _library_of(tmp_path, monkeypatch)
  source = tmp_path / 'onednn_conv.cc'
  source.write_text(onednn.SOURCE.read_text() + '\n// changed\n')
  monkeypatch.setattr(onednn, 'SOURCE', source)
  assert _library_of(tmp_path, monkeypatch) != first


def _fake_onednn_root(root: Path, major: int, header_body: str) -> Path:
  include = root / 'include' / 'oneapi' / 'dnnl'
  include.mkdir(parents=True)
  (include / 'dnnl_version.h').write_text(
      f'#define DNNL_VERSION_MAJOR {major}\n#define DNNL_VERSION_MINOR 0\n'
      '#define DNNL_VERSION_PATCH 0\n')
  (include / 'dnnl.hpp').write_text(header_body)
  (root / 'lib').mkdir()
  (root / 'lib' / 'libdnnl.so').write_bytes(b'')
  return root


def test_missing_onednn_falls_back_and_explains(fresh_status, tmp_path,
                                                monkeypatch):
  monkeypatch.setenv('EFFNETV2_ONEDNN_ROOT', str(tmp_path))
  current = onednn.status()
  assert not current.available
  assert 'oneDNN >= 3.0 not found' in current.reason
  assert 'pip install onednn-cpu-gomp' in current.reason
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert kernels.resolve_conv_impl('auto') == 'shifted'
  model = create_model('b0', 10, conv_impl='onednn')  # builds abstractly
  with pytest.raises(onednn.OneDnnUnavailable, match="conv_impl='onednn'"):
    model(jnp.ones((1, 32, 32, 3)))


def test_onednn_2_is_refused_by_version(fresh_status, tmp_path, monkeypatch):
  root = _fake_onednn_root(tmp_path / 'old', 2, '')
  monkeypatch.setenv('EFFNETV2_ONEDNN_ROOT', str(root))
  current = onednn.status()
  assert not current.available
  assert 'version (2, 0, 0)' in current.reason


def test_missing_compiler_is_named(available, fresh_status, tmp_path,
                                   monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))
  monkeypatch.delenv('CXX', raising=False)
  current = onednn.status()
  assert not current.available
  assert 'no C++ compiler' in current.reason


def test_failed_build_reports_the_compiler_error(fresh_status, tmp_path,
                                                 monkeypatch, caplog):
  root = _fake_onednn_root(tmp_path / 'broken', 3,
                           '#error this oneDNN header is broken\n')
  monkeypatch.setenv('EFFNETV2_ONEDNN_ROOT', str(root))
  monkeypatch.setenv('EFFNETV2_CACHE_DIR', str(tmp_path / 'cache'))
  try:
    onednn.find_compiler()
  except onednn.OneDnnUnavailable:
    pytest.skip('no C++ compiler here')
  current = onednn.status()
  assert not current.available
  assert 'compiling onednn_conv.cc failed' in current.reason
  assert 'this oneDNN header is broken' in current.reason
  assert 'oneDNN convolutions unavailable' in caplog.text  # a warning
  assert not any((tmp_path / 'cache').iterdir())  # no half-written library


def test_a_malformed_serial_threshold_is_named(fresh_status, monkeypatch):
  monkeypatch.setenv('EFFNETV2_ONEDNN_SERIAL_MACS', '16M')
  current = onednn.status()
  assert not current.available
  assert "EFFNETV2_ONEDNN_SERIAL_MACS must be a whole number" in current.reason
  assert "'16M'" in current.reason


def test_onednn_is_refused_off_the_cpu(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(onednn.OneDnnUnavailable, match='runs on CPU'):
    onednn.require()


def test_trainer_names_the_key_when_onednn_cannot_run(fresh_status, tmp_path,
                                                     monkeypatch):
  from effnetv2_jax.training import trainer
  monkeypatch.setenv('EFFNETV2_ONEDNN_ROOT', str(tmp_path / 'nowhere'))
  config = load_config('tiny')
  config.model.conv_impl = 'onednn'
  with pytest.raises(trainer.ConfigError,
                     match=r"config.model.conv_impl='onednn': .*not found"):
    trainer.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not (tmp_path / 'workdir' / 'checkpoints').exists()


def test_several_devices_keep_auto_off_the_custom_call():
  assert jax.device_count() > 1  # conftest's fake mesh
  assert kernels.resolve_conv_impl('auto') == 'shifted'


# ------------------------------------------------------------ in the trainer

REPO = Path(__file__).resolve().parent.parent


def test_single_device_runs_train_with_onednn_and_reload_it_from_the_cache(
    available, tmp_path):
  """The entry point as a user runs it on one CPU: `auto` picks oneDNN beside
  TensorFlow's input pipeline, and a second run loads each stage's program,
  custom calls included, from the persistent cache and trains identically."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(flag for flag in env.get('XLA_FLAGS', '').split()
                              if 'device_count' not in flag)
  cache = tmp_path / 'xla_cache'
  summaries = []
  for run in ('first', 'second'):
    workdir = tmp_path / run
    proc = subprocess.run(
        [sys.executable, '-m', 'effnetv2_jax.main',
         f'--config={REPO / "configs" / "tiny.py"}', f'--workdir={workdir}',
         f'--config.compilation_cache_dir={cache}',
         '--config.progress_bar=off', '--config.export_model=False'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'convolutions: onednn (oneDNN 3.' in log, log[-4000:]
    summaries.append(json.loads((workdir / 'summary.json').read_text()))
  first, second = summaries
  assert first['devices'] == 1
  assert first['conv_impl'] == second['conv_impl'] == 'onednn'
  assert len(second['stages']) == 2
  assert all(stage['compile_cache_hit'] for stage in second['stages'])
  assert np.isfinite(first['eval']['loss'])
  metrics = ('top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss')
  assert {k: second['eval'][k] for k in metrics} == {
      k: first['eval'][k] for k in metrics}
