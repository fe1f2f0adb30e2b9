"""ViT and MLP-Mixer: published sizes, timm parity, image sizes, training.

The parameter counts are timm's for vit_{tiny,small,base}_patch16_224 and
mixer_{s,b}16_224 at 1000 classes (its results tables: 5.72M, 22.05M,
86.57M, 18.53M, 59.88M), counted abstractly. Parity: a small timm ViT and
Mixer with every parameter randomised, copied into ours, give the same
logits and encoded tokens. Then the call contract the trainer relies on at
progressive learning's sizes, the reusable blocks, and real runs through
the trainer with no BatchNorm.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reference_models as refs
from config_files import load_config
from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import families, mixer, token_arch, vit
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import task as task_lib
from effnetv2_jax.training import trainer

# timm's trainable parameter counts at 1000 classes, 224 px.
PUBLISHED = {
    'vit-ti/16': 5_717_416,
    'vit-s/16': 22_050_664,
    'vit-b/16': 86_567_656,
    'mixer-s/16': 18_528_264,
    'mixer-b/16': 59_880_472,
}
TOKEN_NAMES = token_arch.VIT_VARIANTS + token_arch.MIXER_VARIANTS
CLASSES = 10


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_parameter_counts(name):
  assert state_lib.ModelSpec(name, 1000).num_params() == PUBLISHED[name]
  assert token_arch.PUBLISHED_PARAMS[name] == PUBLISHED[name]


@pytest.mark.parametrize('name', TOKEN_NAMES)
def test_names_route_to_their_family_and_round_trip(name, tmp_path):
  family, description = families.resolve(name)
  assert family.name == ('vit' if name.startswith('vit') else 'mixer')
  assert description.name == name
  # No EfficientNet spelling, and a name with a '/' is not a file's path.
  with pytest.raises(ValueError, match='unknown EfficientNet'):
    arch_lib.canonical_name(name)
  assert not families.is_description_file(name)
  spec = state_lib.ModelSpec(name, CLASSES)
  stored = spec.to_dict()
  assert stored['family'] == family.name
  assert state_lib.ModelSpec(stored, CLASSES).description == description
  path = tmp_path / 'arch.json'
  path.write_text(json.dumps(stored))
  assert state_lib.ModelSpec(str(path), CLASSES).description == description


def test_timm_names_and_bad_descriptions():
  assert families.resolve('vit_small_patch16_224')[1].name == 'vit-s/16'
  assert families.resolve('MIXER_B16_224')[1].name == 'mixer-b/16'
  with pytest.raises(ValueError, match='unknown ViT variant .vit-l/16.*'
                     'vit-ti/16, vit-s/16'):
    families.resolve('vit-l/16')
  with pytest.raises(ValueError, match='unknown MLP-Mixer variant'):
    families.resolve('mixer-l/16')
  base = token_arch.vit_architecture('vit-digits')
  with pytest.raises(ValueError, match='num_heads=5 does not divide width=64'):
    base.replace(num_heads=5)
  with pytest.raises(ValueError, match='train_size=30 is not a multiple of '
                     'patch_size=4'):
    base.replace(train_size=30)
  with pytest.raises(ValueError, match='normalization=.torch.'):
    base.replace(normalization='torch')
  with pytest.raises(ValueError, match='has no field.*heads'):
    token_arch.ViTArchitecture.from_dict(dict(base.to_dict(), heads=4))
  with pytest.raises(ValueError, match='token_mlp_dim must be a positive'):
    token_arch.mixer_architecture('mixer-digits').replace(token_mlp_dim=0)


# ------------------------------------------------------------ timm parity --


def _timm_to_ours(model, state_dict):
  """Copies a timm ViT / Mixer state dict into our model (test-local
  mapping: Linear weights transposed, the patch conv to HWIO)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for key, tensor in state_dict.items():
    value = tensor.detach().numpy()
    parts = key.replace('patch_embed.proj', 'patch_embed').replace(
        'stem.proj', 'stem').split('.')
    *path, leaf = [int(p) if p.isdigit() else p for p in parts]
    node = params
    for part in path:
      node = node[part]
    if value.ndim == 4:  # the patch convolution, OIHW -> HWIO
      node['kernel'] = value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:
      node['kernel'] = value.T
    elif leaf == 'weight':  # LayerNorm
      node['scale'] = value
    else:
      node[leaf] = value
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _randomise(torch_model, seed):
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      noise = 0.1 * torch.randn(p.shape, generator=generator)
      is_norm_scale = 'norm' in name and name.endswith('weight')
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return torch_model.eval()


def _compare(reference, ours, x):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    tensor = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    want_encoded = reference.forward_features(tensor).numpy()
    want_logits = reference.forward_head(
        reference.forward_features(tensor)).numpy()
  logits, features = ours(jnp.asarray(x), return_features=True)
  assert 0.1 < np.abs(want_logits).max() < 100
  np.testing.assert_allclose(features['encoded'], want_encoded, atol=1e-4)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)


def test_vit_matches_timm_with_the_same_weights():
  timm = refs.import_timm()
  reference = _randomise(timm.create_model(
      'vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2,
      num_classes=CLASSES), seed=0)
  ours = vit.ViT(token_arch.vit_architecture('vit-ti/16').replace(
      patch_size=4, depth=2, train_size=32, eval_size=32), CLASSES,
                 rngs=nnx.Rngs(0))
  _timm_to_ours(ours, reference.state_dict())
  _compare(reference, ours, refs.random_batch(32, 4, seed=1))


def test_mixer_matches_timm_with_the_same_weights():
  timm = refs.import_timm()
  # mixer_s16_224 is this class with its defaults (token MLP 0.5 x width,
  # channel MLP 4 x width, LayerNorm eps 1e-6, GELU) at 16 px, 8 x 512.
  reference = _randomise(timm.models.mlp_mixer.MlpMixer(
      num_classes=CLASSES, img_size=32, patch_size=4, num_blocks=2,
      embed_dim=64), seed=0)
  ours = mixer.MlpMixer(token_arch.MixerArchitecture(
      name='timm-small', patch_size=4, width=64, depth=2, token_mlp_dim=32,
      channel_mlp_dim=256, train_size=32, eval_size=32), CLASSES,
                        rngs=nnx.Rngs(0))
  _timm_to_ours(ours, reference.state_dict())
  _compare(reference, ours, refs.random_batch(32, 4, seed=1))


# ------------------------------------------------- the trainer's contract --


def _images(size, batch=2, seed=0):
  return jnp.asarray(refs.random_batch(size, batch, seed))


def _compiled(module, **settings):
  """module(x, rng=rng, **settings) as one compiled program per shape
  (eagerly, every operation compiles its own)."""
  graphdef, variables = nnx.split(module)
  run = jax.jit(lambda variables, x, rng: nnx.merge(graphdef, variables)(
      x, rng=rng, **settings))
  return lambda x, rng=None: run(variables, x, rng)


@pytest.mark.parametrize('name', ['vit-digits', 'mixer-digits'])
def test_forward_and_features_at_two_image_sizes(name):
  model = state_lib.ModelSpec(name, CLASSES).build(0)
  class_tokens = 1 if name.startswith('vit') else 0
  forward = _compiled(model, return_features=True)
  for size in (32, 16):
    tokens = class_tokens + (size // 4) ** 2
    logits, features = forward(_images(size))
    assert logits.shape == (2, CLASSES) and logits.dtype == jnp.float32
    assert set(features) == ({'embed', 'encoded', 'pre_logits'}
                             | {f'block{i}' for i in range(1, 5)})
    for key in ('embed', 'block1', 'block4', 'encoded'):
      assert features[key].shape == (2, tokens, 64), (size, key)
    pooled = (features['encoded'][:, 0] if class_tokens
              else features['encoded'].mean(axis=1))
    np.testing.assert_allclose(features['pre_logits'], pooled, rtol=1e-6)
    assert np.isfinite(np.asarray(features['encoded'])).all()
  # Training at a stage size: stochastic depth draws from the rng (the
  # head starts at zero, so the encoded tokens show it, not the logits).
  train = dict(training=True, dropout_rate=0.2, drop_path_rate=0.3)
  stochastic = _compiled(model, return_features=True, **train)
  first = stochastic(_images(24), jax.random.key(1))[1]['encoded']
  second = stochastic(_images(24), jax.random.key(2))[1]['encoded']
  assert first.shape == second.shape == (2, class_tokens + 36, 64)
  assert not np.allclose(first, second)
  with pytest.raises(ValueError, match='needs rng='):
    model(_images(24), **train)
  # A deterministic training call (zero rates) needs no rng.
  deterministic = _compiled(model, training=True, dropout_rate=0.0,
                            drop_path_rate=0.0)
  np.testing.assert_allclose(deterministic(_images(24)),
                             _compiled(model)(_images(24)), atol=1e-6)


def test_patches_are_cut_valid_as_the_papers_convolution():
  model = state_lib.ModelSpec('vit-digits', CLASSES).build(0)
  x = _images(35)
  tokens, grid = model.patch_embed(x)
  assert grid == (8, 8)
  np.testing.assert_array_equal(tokens, model.patch_embed(x[:, :32, :32])[0])
  # One patch is the patch kernel's dot product with its pixels.
  np.testing.assert_allclose(
      tokens[:, 9],  # row 1, column 1
      np.einsum('bhwc,hwcd->bd', x[:, 4:8, 4:8], model.patch_embed.kernel[...])
      + model.patch_embed.bias[...], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='3x3 image is smaller than one 4 px'):
    model.patch_embed(jnp.zeros((1, 3, 3, 3)))


def test_bfloat16_computes_in_bfloat16_with_float32_logits():
  model = state_lib.ModelSpec('vit-digits', CLASSES,
                              dtype=jnp.bfloat16).build(0)
  logits, features = model(_images(16), return_features=True)
  assert logits.dtype == jnp.float32
  assert features['block2'].dtype == jnp.bfloat16
  assert features['pre_logits'].dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}


def test_vit_position_embeddings_resample_with_the_class_token_apart():
  model = state_lib.ModelSpec('vit-digits', CLASSES).build(0)
  # The class token's embedding 5, every stored grid position 2 + channel
  # index: bilinear resampling of a field constant over the grid keeps it.
  stored = np.broadcast_to(2.0 + np.arange(64, dtype=np.float32),
                           (1, 65, 64)).copy()
  stored[0, 0] = 5.0
  model.pos_embed[...] = jnp.asarray(stored)
  embed = _compiled(model, return_features=True)
  for size in (16, 32, 48):
    grid = size // 4
    x = _images(size)
    tokens, _ = model.patch_embed(x)
    features = embed(x)[1]
    added = np.asarray(features['embed'][:, 1:] - tokens)
    np.testing.assert_allclose(added, np.broadcast_to(
        stored[:, 1:2], (2, grid * grid, 64)), atol=1e-5)
    np.testing.assert_allclose(features['embed'][:, 0] - model.cls_token[0],
                               np.full((2, 64), 5.0), atol=1e-6)

  # At a smaller grid every stored position still gets a gradient.
  graphdef, params = nnx.split(model)

  def loss(params):
    features = nnx.merge(graphdef, params)(_images(16), return_features=True)[1]
    return jnp.sum(features['block1'] ** 2)
  grad = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))['pos_embed']
  assert (np.abs(np.asarray(grad[0])).sum(axis=-1) > 0).all()


def test_blocks_keep_tokens_shape_and_drop_whole_branches():
  rngs = nnx.Rngs(0)
  transformer = vit.TransformerBlock(32, 4, 64, rngs=rngs)
  mixer_block = mixer.MixerBlock(16, 32, 8, 64, rngs=rngs)
  x = jax.random.normal(jax.random.key(0), (64, 16, 32))
  for block in (transformer, mixer_block):
    out = _compiled(block, training=False)(x)
    assert out.shape == x.shape
    assert not np.allclose(out, x)
    with pytest.raises(ValueError, match='needs rng='):
      block(x, training=True, drop_path_rate=0.5)
    # Both branches dropped (a quarter of the examples at 0.5): the block
    # is the identity for that example.
    dropped = _compiled(block, training=True, drop_path_rate=0.5)(
        x, jax.random.key(3))
    unchanged = np.all(np.asarray(dropped) == np.asarray(x), axis=(1, 2))
    assert 4 <= unchanged.sum() <= 30, unchanged.sum()
  # The Mixer block resamples other square grids to its 4x4 one.
  for count in (9, 36):
    y = jax.random.normal(jax.random.key(1), (2, count, 32))
    assert _compiled(mixer_block)(y).shape == (2, count, 32)
  with pytest.raises(ValueError, match='mixes 16 tokens; 10 tokens'):
    mixer_block(jnp.zeros((2, 10, 32)))
  # A ViT-shaped sequence (class token + grid) through a transformer block.
  assert _compiled(transformer)(jnp.zeros((2, 17, 32))).shape == (2, 17, 32)


# ------------------------------------------------------------ the trainer --


def test_mixer_trains_at_stage_sizes_other_than_its_grid():
  task = task_lib.TrainTask(
      state_lib.ModelSpec('mixer-digits', CLASSES),
      mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]),
      make_optimizer=optax.sgd,
      schedule={'lr_per_256': 1.0, 'kind': 'constant', 'warmup_epochs': 0.0},
      total_epochs=1.0, num_train_examples=100, drop_path_rate=0.1)
  state = jax.jit(task.init)()
  assert state.batch_stats == {}
  hparams = task.hparams(batch_size=8, start_step=0, start_epoch=0.0,
                         dropout_rate=0.1)
  step = jax.jit(task.train_step)
  rng = np.random.default_rng(0)
  token_mixing = lambda s: np.asarray(
      s.params['blocks'][0]['mlp_tokens']['fc1']['kernel'])
  initial = token_mixing(state)
  for size in (16, 24):
    batch = {'image': _images(size, batch=8, seed=size),
             'label': jnp.asarray(np.eye(CLASSES, dtype=np.float32)[
                 rng.integers(0, CLASSES, 8)])}
    state, metrics = step(state, batch, hparams)
    assert np.isfinite(float(metrics['loss']))
  # The 8x8 grid's token-mixing weights learned from 4x4 and 6x6 grids (the
  # zero head passes the body no gradient on the first step).
  assert not np.allclose(initial, token_mixing(state))


def test_vit_digits_trains_through_train_and_evaluate(tmp_path):
  # tiny.py's stages are 16 and 24 px (4x4 and 6x6 patches of 4 px), its
  # evaluation at vit-digits' 32: no stage trains at the stored 8x8 grid.
  config = load_config('tiny', None, **{'model.arch': 'vit-digits'})
  options = trainer.RunOptions(tensorboard=False, plots=False)
  state, summary = trainer.train_and_evaluate(config, str(tmp_path),
                                              options=options)
  assert summary['status'] == 'completed' and summary['final_step'] == 8
  assert [s['settings']['image_size'] for s in summary['stages']] == [16, 24]
  assert summary['architecture']['family'] == 'vit'
  assert summary['eval_image_size'] == 32
  for stage in summary['stages']:
    assert np.isfinite(stage['train_metrics']['loss'])
  assert np.isfinite(summary['eval']['loss'])
  assert state.batch_stats == {}
  initial = state_lib.ModelSpec('vit-digits', CLASSES).build(config.seed)
  assert not np.allclose(state.params['pos_embed'], initial.pos_embed[...])
