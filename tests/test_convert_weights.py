"""The model directory format: save/load round trips and error paths."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax.models import arch, weights

# A tiny sibling of B0: every block kind, compiles in seconds.
TINY = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.25,
                   head_channels=32, name='tiny')


def random_model(architecture=TINY, num_classes=10, seed=0, **model_kwargs):
  """A model with random (not initialiser) values in every variable."""
  abstract = weights.abstract_model(architecture, num_classes,
                                    conv_impl='xla', **model_kwargs)
  _, params, stats, _ = weights._split(abstract)
  rng = np.random.default_rng(seed)

  def fill(tree, low):
    return jax.tree.map(
        lambda s: rng.uniform(low, 1.0, s.shape).astype(np.float32), tree)

  return weights.model_from_variables(
      architecture, num_classes, fill(nnx.to_pure_dict(params), -1.0),
      fill(nnx.to_pure_dict(stats), 0.5), conv_impl='xla', **model_kwargs)


def logits(model, x):
  """Eval-mode logits through one jitted call (eager dispatch is slow)."""
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(
      lambda s, x: nnx.merge(graphdef, s)(x, training=False))(state, x))


# Not the default BN epsilon (1e-3): a loader that ignored model.json's value
# would give other logits.
BN_EPSILON = 1e-5


@pytest.fixture(scope='module')
def tiny_model():
  return random_model(bn_epsilon=BN_EPSILON)


@pytest.fixture(scope='module')
def saved(tiny_model, tmp_path_factory):
  directory = tmp_path_factory.mktemp('w') / 'tiny'
  weights.save_model(directory, tiny_model, source='unit test',
                     extra={'note': 'x'})
  return str(directory)


def test_round_trip_gives_identical_logits(tiny_model, saved):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 35, 35, 3)),
                  jnp.float32)
  loaded = weights.load_model(saved, conv_impl='xla')
  np.testing.assert_array_equal(logits(tiny_model, x), logits(loaded, x))
  assert loaded.stem.bn.epsilon == BN_EPSILON
  assert loaded.num_classes == 10
  assert loaded.architecture == TINY


def test_model_json_describes_the_model(saved):
  with open(os.path.join(saved, weights.META_FILE)) as f:
    meta = json.load(f)
  assert arch.Architecture.from_dict(meta['architecture']) == TINY
  assert meta['num_classes'] == 10
  assert meta['normalization'] == 'imagenet'  # B-family default
  assert meta['bn_epsilon'] == BN_EPSILON
  assert meta['source'] == 'unit test'
  assert meta['extra'] == {'note': 'x'}


def test_load_variables_returns_model_shaped_pure_dicts(tiny_model, saved):
  meta, params, batch_stats = weights.load_variables(saved)
  assert meta['architecture_obj'] == TINY
  _, want_params, want_stats, _ = weights._split(tiny_model)
  for want, got in ((nnx.to_pure_dict(want_params), params),
                    (nnx.to_pure_dict(want_stats), batch_stats)):
    assert (jax.tree_util.tree_structure(want)
            == jax.tree_util.tree_structure(got))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), b)


def test_trainer_reads_a_model_directory(tiny_model, saved):
  """The trainer's fine-tuning reader accepts our directories as they are."""
  from effnetv2_jax.training import checkpointing
  flat_params, flat_stats, used_ema = checkpointing.read_pretrained(saved)
  assert not used_ema
  np.testing.assert_array_equal(
      flat_params['head/classifier/kernel'],
      np.asarray(tiny_model.head.classifier.kernel[...]))
  assert 'blocks/0/fused_bn/mean' in flat_stats


def test_existing_directory_is_kept_unless_overwrite(tiny_model, saved,
                                                     tmp_path):
  with pytest.raises(weights.WeightsError, match='exists and is not empty'):
    weights.save_model(saved, tiny_model)
  other = random_model(seed=5)
  target = tmp_path / 'm'
  weights.save_model(target, tiny_model)
  weights.save_model(target, other, overwrite=True)
  _, params, _ = weights.load_variables(target)
  np.testing.assert_array_equal(
      params['head']['classifier']['bias'],
      np.asarray(other.head.classifier.bias[...]))
  assert sorted(os.listdir(tmp_path)) == ['m']  # nothing left behind
  empty = tmp_path / 'empty'
  empty.mkdir()
  weights.save_model(empty, tiny_model)  # an empty directory is fine
  assert weights.is_model_dir(empty)


def test_interrupted_save_leaves_nothing(tiny_model, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(weights.json, 'dump', fail)
  with pytest.raises(KeyboardInterrupt):
    weights.save_model(tmp_path / 'm', tiny_model)
  assert os.listdir(tmp_path) == []


def test_unsupported_normalization_is_refused(tiny_model, tmp_path):
  with pytest.raises(weights.WeightsError, match='normalization'):
    weights.save_model(tmp_path / 'm', tiny_model, normalization='zscore')


def _copy(saved, tmp_path):
  import shutil
  target = tmp_path / 'copy'
  shutil.copytree(saved, target)
  return target


def _edit_meta(directory, **changes):
  path = directory / weights.META_FILE
  meta = json.loads(path.read_text())
  meta.update(changes)
  path.write_text(json.dumps(meta))


@pytest.mark.parametrize('change, message', [
    (dict(format='something.else'), 'format tag'),
    (dict(format_version=99), 'format_version 99 is not supported'),
    (dict(normalization='zscore'), 'unknown normalization'),
    (dict(architecture={'name': 'x'}), 'bad architecture'),
])
def test_bad_model_json_is_one_line_error(saved, tmp_path, change, message):
  directory = _copy(saved, tmp_path)
  _edit_meta(directory, **change)
  with pytest.raises(weights.WeightsError, match=message) as info:
    weights.load_model(directory)
  assert '\n' not in str(info.value)


def test_state_that_does_not_fit_model_json_names_the_variable(saved,
                                                               tmp_path):
  directory = _copy(saved, tmp_path)
  _edit_meta(directory, num_classes=7)
  with pytest.raises(weights.WeightsError) as info:
    weights.load_model(directory)
  message = str(info.value)
  assert "'params/head/classifier/bias' has shape (10), expected (7)" in \
      message.replace('(10,)', '(10)')


def test_missing_pieces_are_reported(saved, tmp_path):
  with pytest.raises(weights.WeightsError, match='no such model directory'):
    weights.load_model(tmp_path / 'nowhere')
  with pytest.raises(weights.WeightsError, match='no model.json'):
    weights.load_model(tmp_path)
  directory = _copy(saved, tmp_path)
  (directory / weights.META_FILE).write_text('{not json')
  with pytest.raises(weights.WeightsError, match='unreadable'):
    weights.read_meta(directory)
  directory = _copy(saved, tmp_path / 'b')
  import shutil
  shutil.rmtree(directory / weights.STATE_DIR)
  with pytest.raises(weights.WeightsError, match='checkpoint is missing'):
    weights.load_variables(directory)


def test_model_from_variables_checks_every_array(tiny_model):
  _, params, stats, _ = weights._split(tiny_model)
  params = nnx.to_pure_dict(params)
  stats = nnx.to_pure_dict(stats)
  params['blocks'][1]['fused_conv']['kernel'] = np.zeros((3, 3, 8, 9))
  with pytest.raises(weights.WeightsError, match=(
      r"'params/blocks/1/fused_conv/kernel' has shape \(3, 3, 8, 9\), "
      r'expected \(3, 3, 8, 32\)')):
    weights.model_from_variables(TINY, 10, params, stats)
  del params['blocks'][1]
  with pytest.raises(weights.WeightsError, match='is missing'):
    weights.model_from_variables(TINY, 10, params, stats)
