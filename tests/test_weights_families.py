"""Model directories, the trainer's export and predict for token models.

ViT and MLP-Mixer ('vit-digits', 'mixer-digits': 32 px, 10 classes) are
stored like EfficientNetV2 but have no BatchNorm: their batch_stats is empty
and their classifier is `head/kernel`.
"""

from __future__ import annotations

import json
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax import predict
from effnetv2_jax.models import arch, families, token_arch, weights
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import state as state_lib

NUM_CLASSES = 10
TINY = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.25,
                   head_channels=32, name='tiny')


def random_params(description, seed: int) -> dict:
  """Random arrays for every Param: Mixer's zero-initialised head would
  otherwise give all-zero logits, which any loader reproduces."""
  abstract = weights.abstract_model(description, NUM_CLASSES)
  _, params, batch_stats, _ = weights._split(abstract)
  assert not jax.tree.leaves(batch_stats)  # token models: no BatchNorm
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
      nnx.to_pure_dict(params))


def logits_of(model, x: np.ndarray) -> np.ndarray:
  return np.asarray(model(jnp.asarray(x), training=False))


def images(seed: int, count: int = 3, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).normal(
      size=(count, size, size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def vit_dir(tmp_path_factory):
  params = random_params('vit-digits', 0)
  model = weights.model_from_variables('vit-digits', NUM_CLASSES, params, {})
  directory = tmp_path_factory.mktemp('vit') / 'model'
  weights.save_model(directory, model, source='unit test')
  return str(directory), model


# ----------------------------------------------------------------------------
# weights: save, read, load.


@pytest.mark.parametrize('variant, family', [('vit-digits', 'vit'),
                                             ('mixer-digits', 'mixer')])
def test_token_model_round_trips_through_a_model_directory(
    variant, family, tmp_path):
  params = random_params(variant, 1)
  # A dict naming its family is a description too.
  description = families.get(family).to_dict(
      families.get(family).parse(variant))
  model = weights.model_from_variables(description, NUM_CLASSES, params, {})
  saved = weights.save_model(tmp_path / 'm', model)

  meta, stored_params, batch_stats = weights.load_variables(saved)
  assert meta['architecture']['family'] == family
  assert meta['architecture_obj'] == families.get(family).parse(variant)
  assert 'bn_epsilon' not in meta  # nothing to record without BatchNorm
  assert batch_stats == {}
  np.testing.assert_array_equal(stored_params['head']['kernel'],
                                params['head']['kernel'])

  loaded = weights.load_model(saved)
  assert type(loaded) is type(model)
  x = images(2)
  expected = logits_of(model, x)
  assert expected.shape == (3, NUM_CLASSES) and np.ptp(expected) > 1e-3
  np.testing.assert_array_equal(logits_of(loaded, x), expected)


def test_model_json_names_the_family_except_for_efficientnetv2(vit_dir,
                                                               tmp_path):
  abstract = weights.abstract_model(TINY, 7, conv_impl='xla')
  _, params, stats, _ = weights._split(abstract)
  zeros = lambda tree: jax.tree.map(  # pylint: disable=g-long-lambda
      lambda s: np.zeros(s.shape, np.float32), nnx.to_pure_dict(tree))
  # Even a dict naming the family is stored as Architecture.to_dict(), so
  # directories read before other families existed stay as they were.
  tagged = dict(TINY.to_dict(), family='efficientnetv2')
  saved = weights.save_variables(
      tmp_path / 'tiny', architecture=tagged, num_classes=7,
      params=zeros(params), batch_stats=zeros(stats), bn_epsilon=1e-5)
  with open(f'{saved}/model.json') as f:
    tiny_meta = json.load(f)
  assert tiny_meta['architecture'] == TINY.to_dict()
  assert 'family' not in tiny_meta['architecture']
  assert tiny_meta['bn_epsilon'] == 1e-5
  assert weights.read_meta(saved)['architecture_obj'] == TINY

  with open(f'{vit_dir[0]}/model.json') as f:
    vit_meta = json.load(f)
  assert vit_meta['architecture']['family'] == 'vit'
  assert vit_meta['architecture']['name'] == 'vit-digits'
  assert vit_meta['normalization'] == (
      token_arch.vit_architecture('vit-digits').normalization)


def test_stored_arrays_that_do_not_fit_model_json_are_one_line(vit_dir,
                                                               tmp_path):
  directory = str(tmp_path / 'narrow')
  shutil.copytree(vit_dir[0], directory)
  with open(f'{directory}/model.json') as f:
    meta = json.load(f)
  meta['architecture']['width'] = 32  # the stored arrays are 64 wide
  with open(f'{directory}/model.json', 'w') as f:
    json.dump(meta, f)
  with pytest.raises(weights.WeightsError) as error:
    weights.load_model(directory)
  message = str(error.value)
  assert '\n' not in message
  shapes = re.search(r"variable '[^']+' has shape \(([\d, ]+)\), expected "
                     r"\(([\d, ]+)\)", message)
  assert shapes, message
  assert '64' in shapes.group(1).split(', ')
  assert '32' in shapes.group(2).split(', ')

  meta['architecture']['family'] = 'resnet'
  with open(f'{directory}/model.json', 'w') as f:
    json.dump(meta, f)
  with pytest.raises(weights.WeightsError, match='unknown model family'):
    weights.read_meta(directory)


# ----------------------------------------------------------------------------
# The trainer's export.


@pytest.mark.parametrize('use_ema', [False, True])
def test_export_model_writes_a_loadable_token_model(use_ema, tmp_path):
  spec = state_lib.ModelSpec('mixer-digits', NUM_CLASSES)
  params = random_params('mixer-digits', 3)
  ema_params = random_params('mixer-digits', 4)
  to_device = lambda tree: jax.tree.map(jnp.asarray, tree)
  fake_state = types.SimpleNamespace(
      step=jnp.asarray(12, jnp.int32), params=to_device(params),
      batch_stats={}, ema_params=to_device(ema_params) if use_ema else None,
      ema_batch_stats={} if use_ema else None)
  directory = checkpointing.export_model(
      fake_state, str(tmp_path), model=spec, normalization='imagenet',
      experiment='unit', bn_epsilon=1e-3)
  assert directory == str(tmp_path / 'model')

  meta = weights.read_meta(directory)
  assert meta['architecture_obj'] == spec.description
  assert meta['normalization'] == 'imagenet'
  assert 'step 12' in meta['source']
  assert ('EMA' in meta['source']) == use_ema
  exported = weights.load_model(directory)
  x = images(5)
  wanted = weights.model_from_variables(
      'mixer-digits', NUM_CLASSES, ema_params if use_ema else params, {})
  np.testing.assert_array_equal(logits_of(exported, x), logits_of(wanted, x))


# ----------------------------------------------------------------------------
# predict.


def test_predict_cli_runs_a_vit_model_directory(vit_dir, tmp_path, capsys):
  directory, model = vit_dir
  batch = images(6, count=2)
  inputs = str(tmp_path / 'batch.npy')
  np.save(inputs, batch)
  logits_file = str(tmp_path / 'logits.npy')
  status = predict.main(['--checkpoint', directory, '--variant', 'vit-digits',
                         '--top-k', '3', '--save-logits', logits_file,
                         inputs])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert f'vit-digits ({NUM_CLASSES} classes)' in err
  # vit-digits evaluates at 32 px with inception scaling.
  assert 'centre crop 32/64, bilinear to 32, (x - 128) / 128' in err
  logits = np.load(logits_file)
  np.testing.assert_allclose(logits, logits_of(model, batch), rtol=1e-5,
                             atol=1e-5)
  lines = out.splitlines()
  for k in range(2):
    at = lines.index(f'{inputs}[{k}]')
    ranked = lines[at + 1:at + 4]
    best = np.argsort(-logits[k])[:3]
    for rank, (line, index) in enumerate(zip(ranked, best), 1):
      assert line.strip().startswith(f'{rank}.')
      assert line.endswith(f'class {index}')


def test_predict_cli_variant_of_another_family_disagrees(vit_dir, tmp_path,
                                                         capsys):
  inputs = str(tmp_path / 'batch.npy')
  np.save(inputs, images(7, count=1))
  status = predict.main(['--checkpoint', vit_dir[0], '--variant',
                         'mixer-digits', inputs])
  _, err = capsys.readouterr()
  assert status == 1
  assert err.count('\n') == 1 and 'model.json' in err
  assert "'vit-digits'" in err and "'mixer-digits'" in err
  assert predict.main(['--checkpoint', vit_dir[0], '--variant', 'vit-xl',
                       inputs]) == 2
  assert 'unknown ViT variant' in capsys.readouterr().err


def test_predict_cli_reads_a_vit_training_workdir(tmp_path, capsys):
  import orbax.checkpoint as ocp
  params = random_params('vit-digits', 8)
  state = dict(step=np.int32(3), params=params, batch_stats={})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / 'checkpoints' / '3' / 'state'), state)
  checkpointer.wait_until_finished()
  batch = images(9, count=2)
  inputs = str(tmp_path / 'batch.npy')
  np.save(inputs, batch)
  logits_file = str(tmp_path / 'l.npy')
  status = predict.main(['--checkpoint', str(tmp_path), '--variant',
                         'vit-digits', '--save-logits', logits_file, inputs])
  assert status == 0, capsys.readouterr().err
  # head/kernel gives the classifier width: 10 classes, named by index.
  wanted = weights.model_from_variables('vit-digits', NUM_CLASSES, params, {})
  np.testing.assert_allclose(np.load(logits_file), logits_of(wanted, batch),
                             rtol=1e-5, atol=1e-5)
