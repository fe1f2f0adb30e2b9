"""The network: structure, parameter counts, shapes, modes, init, dtypes."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax import kernels
from effnetv2_jax.kernels import same_padding
from effnetv2_jax.models import arch, count_params, create_model, param_rngs
from effnetv2_jax.models import layers
from effnetv2_jax.models.layers import BatchNorm, Conv2D, DepthwiseConv2D


# Behaviour tests use a B0 scaled down to a few blocks: every block kind
# (Fused e=1, Fused e=4, MBConv with SE, residual and not) is still there,
# and compiles take seconds instead of a minute.
TINY = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.34,
                   head_channels=64, name='b0_tiny')


@functools.lru_cache(maxsize=None)
def _b0(num_classes=10, impl='auto', dtype=jnp.float32, architecture=TINY):
  return create_model(architecture, num_classes, conv_impl=impl,
                      dtype=dtype, rngs=nnx.Rngs(0))


def _jit_forward(model, **kwargs):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x, rng):
    m = nnx.merge(graphdef, state)
    out = m(x, rng=rng, **kwargs)
    return out, nnx.state(m)

  return lambda x, rng=None: forward(state, x, rng)


# ---------------------------------------------------------------- arch table


@pytest.mark.parametrize('variant', arch.VARIANTS)
def test_trainable_parameter_count_is_official(variant):
  model = nnx.eval_shape(lambda: create_model(variant, 1000))
  assert count_params(model) == arch.OFFICIAL_PARAMS[variant]


@pytest.mark.parametrize('variant,blocks,stem,head', [
    ('s', 40, 24, 1280), ('m', 57, 24, 1280), ('l', 79, 32, 1280),
    ('xl', 100, 32, 1280), ('b0', 21, 32, 1280), ('b1', 27, 32, 1280),
    ('b2', 28, 32, 1408), ('b3', 32, 40, 1536)])
def test_block_counts_and_widths(variant, blocks, stem, head):
  a = arch.get_architecture(variant)
  stages = a.stage_blocks()
  assert sum(len(s) for s in stages) == blocks
  assert a.stem_channels == stem
  assert a.head_width == head


def test_b_series_rounding_matches_official_table():
  outs = {v: [s[-1].out_channels for s in arch.get_architecture(v).stage_blocks()]
          for v in ('b0', 'b1', 'b2', 'b3')}
  reps = {v: [len(s) for s in arch.get_architecture(v).stage_blocks()]
          for v in ('b0', 'b1', 'b2', 'b3')}
  assert outs['b2'] == [16, 32, 56, 104, 120, 208]
  assert outs['b3'] == [16, 40, 56, 112, 136, 232]
  assert reps['b1'] == [2, 3, 3, 4, 6, 9]
  assert reps['b3'] == [2, 3, 3, 5, 7, 12]


def test_se_width_comes_from_block_input_channels():
  stage4 = arch.get_architecture('s').stage_blocks()[3]
  assert (stage4[0].in_channels, stage4[0].se_channels,
          stage4[0].mid_channels) == (64, 16, 256)
  assert (stage4[1].in_channels, stage4[1].se_channels) == (128, 32)


def test_stochastic_depth_schedule_is_linear_in_global_block_index():
  blocks = [b for s in arch.get_architecture('s').stage_blocks() for b in s]
  assert blocks[0].survival_prob == 1.0
  assert blocks[-1].survival_prob == pytest.approx(1 - 0.2 * 39 / 40)
  probs = [b.survival_prob for b in blocks]
  assert np.allclose(np.diff(probs), -0.2 / 40)


def test_block_string_round_trip_and_errors():
  for v in arch.VARIANTS:
    a = arch.get_architecture(v)
    assert arch.Architecture.from_dict(json.loads(json.dumps(a.to_dict()))) == a
  with pytest.raises(ValueError, match='lacks'):
    arch.parse_block_string('r1_k3_s1_i3_o4')
  with pytest.raises(ValueError, match='bad token'):
    arch.parse_block_string('r1_k3_s1_e1_i3_o4_zz')
  with pytest.raises(ValueError, match="unknown EfficientNetV2 variant 'q'"):
    arch.get_architecture('q')
  assert arch.normalize_variant_name('tf_efficientnetv2_b2') == 'b2'


def test_same_padding_puts_the_extra_pixel_after():
  assert same_padding(224, 3, 2) == (0, 1)
  assert same_padding(225, 3, 2) == (1, 1)
  assert same_padding(10, 3, 1) == (1, 1)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize('size,architecture', [
    (32, TINY), (33, TINY), (97, TINY), (65, arch.get_architecture('b0'))])
def test_output_and_feature_shapes(size, architecture):
  forward = _jit_forward(_b0(architecture=architecture), training=False,
                         return_features=True)
  (logits, feats), _ = forward(jnp.zeros((2, size, size, 3)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  side = size
  expected = {'stem': 2, 'stage1': 1, 'stage2': 2, 'stage3': 2, 'stage4': 2,
              'stage5': 1, 'stage6': 2}
  for name, stride in expected.items():
    side = math.ceil(side / stride)
    assert feats[name].shape[1:3] == (side, side), name
  width = architecture.head_width
  assert feats['pre_logits'].shape == (2, width)
  assert feats['head'].shape == (2, side, side, width)


@pytest.mark.parametrize('impl', ['shifted', 'onednn'])
def test_conv_implementations_agree_on_the_whole_model(impl):
  x = jax.random.normal(jax.random.key(0), (2, 37, 37, 3))
  fast = _jit_forward(_b0(impl=impl), training=False)(x)[0]
  xla = _jit_forward(_b0(impl='xla'), training=False)(x)[0]
  assert float(jnp.max(jnp.abs(fast - xla))) < 1e-5


@pytest.mark.parametrize('impl', ['xla', 'shifted'])
def test_every_convolution_takes_the_models_conv_impl(impl, monkeypatch):
  # One device, where 'auto' would pick oneDNN if a layer fell back to it.
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  model = create_model(TINY, 10, conv_impl=impl)
  convs = [node for _, node in nnx.iter_graph(model)
           if isinstance(node, (Conv2D, DepthwiseConv2D))]
  assert len(convs) > 20
  assert {conv.impl for conv in convs} == {kernels.choose_conv_impl(impl)}


def test_eval_mode_ignores_rng_and_regularisation_rates():
  model = _b0()
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  base = _jit_forward(model, training=False)(x)[0]
  noisy = _jit_forward(model, training=False, dropout_rate=0.9,
                       drop_path_rate=0.9)(x, jax.random.key(3))[0]
  np.testing.assert_array_equal(np.asarray(base), np.asarray(noisy))


def test_training_mode_regularisers_are_random_and_off_at_rate_zero():
  model = _b0()
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  off = _jit_forward(model, training=True, dropout_rate=0.0,
                     drop_path_rate=0.0)
  a, b = off(x, jax.random.key(1))[0], off(x, jax.random.key(2))[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  on = _jit_forward(model, training=True, dropout_rate=0.5,
                    drop_path_rate=0.5)
  c, d = on(x, jax.random.key(1))[0], on(x, jax.random.key(2))[0]
  assert float(jnp.max(jnp.abs(c - d))) > 1e-3
  with pytest.raises(ValueError, match='needs rng'):
    model(x, training=True)


def test_training_mode_uses_batch_statistics_and_updates_running_ones():
  model = _b0()
  before = nnx.state(model, nnx.BatchStat)
  x = 3.0 + jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
  (_, feats), state = _jit_forward(
      model, training=True, dropout_rate=0.0, drop_path_rate=0.0,
      return_features=True)(x)
  stem_bn_mean = state['stem']['bn']['mean'][...]
  assert not np.allclose(stem_bn_mean, before['stem']['bn']['mean'][...])
  # Training-mode stem output is normalised per channel by batch moments:
  # before SiLU that has mean beta=0, so the activations' mean is small.
  eval_out = _jit_forward(model, training=False, return_features=True)(x)[0][1]
  assert abs(float(feats['stem'].mean())) < abs(float(eval_out['stem'].mean()))


def test_tracing_a_train_step_asks_no_tracer_for_its_sharding(monkeypatch):
  # A tracer's missing `sharding` builds an error message that walks the
  # whole jaxpr traced so far; asked once per BatchNorm (flax's indexed
  # assignment does), that made tracing S's train step quadratic and twice
  # as slow. Count the asks instead of timing them.
  asks = []

  def sharding(tracer):
    asks.append(type(tracer).__name__)
    raise AttributeError('sharding')

  monkeypatch.setattr(jax.core.Tracer, 'sharding', property(sharding))
  graphdef, params, stats = nnx.split(_b0(), nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

  def loss(params, stats, x):
    model = nnx.merge(graphdef, params, stats)
    out = model(x, training=True, dropout_rate=0.0, drop_path_rate=0.0)
    return out.sum(), nnx.state(model, nnx.BatchStat)

  x = jnp.ones((2, 32, 32, 3))
  jax.jit(jax.grad(loss, has_aux=True)).trace(params, stats, x)
  assert asks == []
  # The patch is live: a plain `[...] =` on a traced BatchStat asks.
  jax.jit(lambda p, s, x: _indexed_stat_update(graphdef, p, s, x)).trace(
      params, stats, x)
  assert asks


def test_building_a_model_abstractly_asks_no_tracer_for_its_sharding(
    monkeypatch):
  # Same cost as above, once per parameter: nnx.Rngs' draw counter. The
  # models' own Rngs (`param_rngs`) keeps it in a ref, with the same keys.
  asks = []

  def sharding(tracer):
    asks.append(type(tracer).__name__)
    raise AttributeError('sharding')

  monkeypatch.setattr(jax.core.Tracer, 'sharding', property(sharding))
  nnx.eval_shape(lambda: create_model(TINY, 10))
  nnx.eval_shape(lambda: create_model(TINY, 10, rngs=param_rngs(3)))
  assert asks == []
  nnx.eval_shape(lambda: create_model(TINY, 10, rngs=nnx.Rngs(params=3)))
  assert asks  # the patch is live: a plain Rngs asks
  monkeypatch.undo()

  def weights(rngs):
    model = create_model(TINY, 10, rngs=rngs)
    return jax.tree.leaves(nnx.state(model, nnx.Param))

  for ours, plain in zip(weights(param_rngs(3)), weights(nnx.Rngs(params=3))):
    np.testing.assert_array_equal(ours, plain)


def test_eager_build_compiles_per_size_bucket_and_matches_a_jitted_build():
  # Eagerly, each new kernel shape used to compile its own random-normal
  # program (101 compiles, 15 of the 20 s `create_model('s')` took).
  # A width no other test uses, so its shapes are new to this process.
  architecture = arch.scaled(arch.get_architecture('b0'), width=0.41,
                             depth=0.34, head_channels=72, name='b0_odd')
  compiles = []

  def listen(event, duration, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    eager = create_model(architecture, 10, rngs=5)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  shapes = {p.shape for p in jax.tree.leaves(nnx.state(eager, nnx.Param))}
  # Fresh process: 22 compiles (~9 size buckets, the rest key handling);
  # 79 with a compile per shape.
  assert len(shapes) > 40 and len(compiles) < 35, (len(shapes), len(compiles))

  jitted = nnx.jit(lambda: create_model(architecture, 10, rngs=5))()
  for a, b in zip(jax.tree.leaves(nnx.state(eager)),
                  jax.tree.leaves(nnx.state(jitted))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('shape', [(1,), (3, 3, 1, 8), (1, 1, 16, 16),
                                   (3, 3, 24, 96)])
def test_eager_scaled_normal_is_the_plain_draw(shape):
  key = jax.random.key(11)
  plain = jax.jit(lambda k: 0.25 * jax.random.normal(k, shape))(key)
  np.testing.assert_array_equal(
      layers.eager_scaled_normal(key, shape, jnp.float32, 0.25), plain)


def _indexed_stat_update(graphdef, params, stats, x):
  model = nnx.merge(graphdef, params, stats)
  bn = model.stem.bn
  bn.mean[...] = bn.mean[...] + x.mean()
  return bn.mean[...]


def _numpy_bn(x, groups, eps):
  g = x.reshape((groups, -1) + x.shape[1:])
  mean = g.mean(axis=(1, 2, 3), keepdims=True)
  var = g.var(axis=(1, 2, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape), mean, var


@pytest.mark.parametrize('groups', [1, 4])
def test_batchnorm_matches_numpy_including_groups(groups):
  bn = BatchNorm(5, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 5)).astype(np.float32)
  y = bn(jnp.asarray(x), training=True, groups=groups)
  ref, mean, var = _numpy_bn(x.astype(np.float64), groups, 1e-3)
  np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean.mean(0).ravel(),
                             rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var.mean(0).ravel(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='does not divide'):
    bn(jnp.asarray(x), training=True, groups=3)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  f32 = _jit_forward(_b0(), training=False)(x)[0]
  bf16_model = _b0(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nnx.state(bf16_model, nnx.Param)))
  bf16, _ = _jit_forward(bf16_model, training=False, return_features=True)(x)
  logits, feats = bf16
  assert logits.dtype == jnp.float32
  assert feats['stage3'].dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(f32)))
  assert float(jnp.max(jnp.abs(logits - f32))) < 0.05 * scale + 1e-3


# ---------------------------------------------------------------- init


def test_official_initialisation():
  rngs = nnx.Rngs(3)
  stem = np.asarray(Conv2D(3, 24, 3, 2, rngs=rngs).kernel[...])
  assert stem.std() == pytest.approx(math.sqrt(2 / (3 * 3 * 24)), rel=0.15)
  # Depthwise fan-out is k*k*1 (TF's (k,k,C,1) layout), not k*k*C.
  dw = np.asarray(DepthwiseConv2D(1536, 3, rngs=rngs).kernel[...])
  assert dw.shape == (3, 3, 1, 1536)
  assert dw.std() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
  proj = np.asarray(Conv2D(1536, 256, 1, rngs=rngs).kernel[...])
  assert proj.std() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
  model = _b0(num_classes=1000)
  block = model.blocks[-1]
  assert not np.any(np.asarray(block.se.reduce.bias[...]))
  fc = np.asarray(model.head.classifier.kernel[...])
  limit = 1 / math.sqrt(1000)
  assert fc.min() >= -limit and fc.max() <= limit
  assert fc.min() < -0.9 * limit and fc.max() > 0.9 * limit
  assert abs(fc.mean()) < 0.05 * limit
  assert not np.any(np.asarray(model.head.classifier.bias[...]))
  bn = model.blocks[0].fused_bn
  assert np.all(bn.scale[...] == 1) and np.all(bn.var[...] == 1)
  assert not np.any(bn.bias[...]) and not np.any(bn.mean[...])


def test_create_model_input_errors():
  with pytest.raises(TypeError, match='variant name'):
    create_model(3.0)
  with pytest.raises(ValueError, match='num_classes'):
    create_model('b0', 0)
  with pytest.raises(ValueError, match='dropout_rate'):
    create_model('b0', 10, dropout_rate=1.5)
  with pytest.raises(ValueError, match='conv_impl'):
    create_model('b0', 10, conv_impl='fast')
  tiny = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.25,
                     head_channels=64)
  model = create_model(tiny.to_dict(), 3)
  assert model.architecture == tiny
