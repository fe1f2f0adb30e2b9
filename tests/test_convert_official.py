"""Official google/automl checkpoints: names, EMA, inputs, errors, model.json.

The checkpoints are written here in the official TF1 name-based format
(`tf.raw_ops.SaveV2`, as a TF1 Saver writes them), from random arrays in our
layout renamed with a table written from the official naming rules
(google/automl efficientnetv2/effnetv2_model.py), not with the converter's
own mapping. Each weight gets a different `/ExponentialMovingAverage` copy,
RMSProp slots and `global_step` sit beside them, as in a training checkpoint.
"""

import os
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax import predict
from effnetv2_jax.convert import __main__ as cli
from effnetv2_jax.convert import official
from effnetv2_jax.models import arch, weights
from model_variables import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B0 = arch.get_architecture('b0')
S = arch.get_architecture('s')
# S's block layout (two residual Fused e=1 blocks, Fused e=4, MBConv 4 and 6)
# at a fraction of its size.
SMALL_S = arch.scaled(S, width=0.25, depth=0.3, head_channels=64,
                      name='small_s')

# ----------------------------------------------------------------------------
# Writing official checkpoints.

_BN_LEAVES = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean',
              'var': 'moving_variance'}
_OUTER = {'conv': 'conv2d', 'bn': 'tpu_batch_normalization',
          'classifier': 'dense'}
# Our layer names -> the official ones, per block type.
_FUSED_EXPANDED = {'fused_conv': 'conv2d',
                   'fused_bn': 'tpu_batch_normalization',
                   'project_conv': 'conv2d_1',
                   'project_bn': 'tpu_batch_normalization_1'}
_FUSED_SINGLE = {'fused_conv': 'conv2d', 'fused_bn': 'tpu_batch_normalization'}
_MBCONV = {'expand_conv': 'conv2d', 'expand_bn': 'tpu_batch_normalization',
           'dw_conv': 'depthwise_conv2d',
           'dw_bn': 'tpu_batch_normalization_1', 'project_conv': 'conv2d_1',
           'project_bn': 'tpu_batch_normalization_2'}
_SE = {'reduce': 'se/conv2d', 'expand': 'se/conv2d_1'}


def _block_table(block):
  if 'fused_conv' in block:
    return _FUSED_EXPANDED if 'project_conv' in block else _FUSED_SINGLE
  return _MBCONV


def official_tensors(params, stats, prefix):
  """Official name -> array (official layout) of our trees."""
  out = {}

  def put(layer, leaf, value):
    if leaf == 'kernel' and layer.endswith('depthwise_conv2d'):
      out[f'{layer}/depthwise_kernel'] = value.transpose(0, 1, 3, 2)
    elif layer.endswith(('batch_normalization', '_normalization_1',
                         '_normalization_2')):
      out[f'{layer}/{_BN_LEAVES[leaf]}'] = value
    else:
      out[f'{layer}/{leaf}'] = value

  for tree in (params, stats):
    for part in ('stem', 'head'):
      for layer, leaves in tree[part].items():
        for leaf, value in leaves.items():
          put(f'{prefix}/{part}/{_OUTER[layer]}', leaf, value)
    for index, block in tree['blocks'].items():
      table = _block_table(params['blocks'][index])
      for layer, leaves in block.items():
        if layer == 'se':
          for conv, conv_leaves in leaves.items():
            for leaf, value in conv_leaves.items():
              put(f'{prefix}/blocks_{index}/{_SE[conv]}', leaf, value)
          continue
        for leaf, value in leaves.items():
          put(f'{prefix}/blocks_{index}/{table[layer]}', leaf, value)
  return out


def write_checkpoint(prefix, tensors):
  import tensorflow as tf
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tensors[n] for n in names])


class Release:
  """An official-format checkpoint of random weights.

  With `training_state`, a training checkpoint: every weight also has a
  different EMA copy (`ema`, what a conversion takes by default) and two
  RMSProp slots, and `global_step` is stored; without, only the weights
  (`raw`, which `ema` then equals).
  """

  def __init__(self, root, architecture, num_classes, *, name, seed,
               training_state=True, archive=False):
    self.raw = random_variables(architecture, num_classes, seed)
    self.ema = self.raw
    model_name = f'efficientnetv2-{architecture.name}'
    raw = official_tensors(*self.raw, model_name)
    tensors = dict(raw)
    if training_state:
      self.ema = random_variables(architecture, num_classes, seed + 1)
      for tensor, value in official_tensors(*self.ema, model_name).items():
        tensors[tensor + '/ExponentialMovingAverage'] = value
      rng = np.random.default_rng(seed + 2)
      for tensor, value in raw.items():
        if 'moving_' not in tensor:
          for slot in ('RMSProp', 'RMSProp_1'):
            tensors[f'{tensor}/{slot}'] = rng.random(value.shape, np.float32)
      tensors['global_step'] = np.array(218_750, np.int64)
    self.tensors = tensors
    self.directory = os.path.join(root, name)
    os.makedirs(self.directory)
    self.prefix = os.path.join(self.directory, 'model.ckpt-218750')
    write_checkpoint(self.prefix, tensors)
    # The state file names the training machine's path, as released ones do.
    with open(os.path.join(self.directory, 'checkpoint'), 'w') as f:
      f.write('model_checkpoint_path: "gs://bucket/run/model.ckpt-218750"\n'
              'all_model_checkpoint_paths: '
              '"gs://bucket/run/model.ckpt-218750"\n')
    if archive:
      self.archive = os.path.join(root, f'{name}.tgz')
      # Random weights do not compress: level 0 keeps it a valid gzip
      # without spending seconds on deflate.
      with tarfile.open(self.archive, 'w:gz', compresslevel=0) as tar:
        tar.add(self.directory, arcname=name)


@pytest.fixture(scope='module')
def b0(tmp_path_factory):
  return Release(str(tmp_path_factory.mktemp('b0')), B0, 1000,
                 name='efficientnetv2-b0', seed=0, archive=True)


def assert_trees_equal(got, want):
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(
      jax.tree.map(np.asarray, want)))
  assert len(got_leaves) == len(want_leaves)
  for path, value in got_leaves:
    np.testing.assert_array_equal(np.asarray(value), want_leaves[path],
                                  err_msg=jax.tree_util.keystr(path))


def max_abs_diff(got, want):
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def logits_of(models, x):
  """Eval logits of models of one graph (compiled once)."""
  graphdef, _ = nnx.split(models[0])
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, training=False))
  return [np.asarray(forward(nnx.split(m)[1], x)) for m in models]


def convert(args, capsys):
  status = cli.main(['--from', 'official'] + args)
  out, err = capsys.readouterr()
  return status, out, err


# ----------------------------------------------------------------------------
# Round trips.


def test_names_fit_the_official_layout():
  """The converter's names for every block type of the released variants."""
  naming = official.official_naming('efficientnetv2-s')
  names = {n for n, _ in naming.expected_names(S, 1000)}
  params, stats = random_variables(S, 1000, 0)
  want = official_tensors(params, stats, 'efficientnetv2-s')
  assert names == set(want)
  assert 'efficientnetv2-s/blocks_39/se/conv2d_1/bias' in names
  assert 'efficientnetv2-s/blocks_1/conv2d_1/kernel' not in names  # Fused e=1
  assert 'efficientnetv2-s/blocks_2/conv2d_1/kernel' in names  # Fused e=4
  assert 'efficientnetv2-s/blocks_10/tpu_batch_normalization_2/gamma' in names


def test_ema_copies_by_default_raw_on_request(b0):
  converted = official.official_variables(b0.prefix)
  assert converted.architecture == B0
  assert converted.model_name == 'efficientnetv2-b0'
  assert converted.num_classes == 1000 and converted.release == 'imagenet'
  assert converted.global_step == 218_750
  assert_trees_equal(converted.params, b0.ema[0])
  assert_trees_equal(converted.batch_stats, b0.ema[1])
  raw = official.official_variables(b0.prefix, 'b0', use_ema=False)
  assert raw.ema_tensors == 0
  assert_trees_equal(raw.params, b0.raw[0])
  assert_trees_equal(raw.batch_stats, b0.raw[1])
  assert max_abs_diff(raw.params, converted.params) > 0.1


def test_small_s_layout_round_trip(tmp_path):
  release = Release(str(tmp_path), SMALL_S, 10, name='run', seed=5)
  converted = official.official_variables(release.prefix, SMALL_S)
  assert converted.model_name == 'efficientnetv2-small_s'
  assert_trees_equal(converted.params, release.ema[0])
  assert_trees_equal(converted.batch_stats, release.ema[1])


def test_logits_equal_a_model_built_from_the_same_arrays(b0):
  model = official.from_official(b0.prefix, conv_impl='xla')
  reference = weights.model_from_variables(B0, 1000, *b0.ema,
                                           bn_epsilon=1e-3, conv_impl='xla')
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  got, want = logits_of([model, reference], x)
  assert np.abs(want).max() > 1e-3
  assert float(np.max(np.abs(got - want))) == 0.0
  assert float(model.stem.bn.epsilon) == 1e-3


def test_cli_converts_a_release_archive(b0, tmp_path, capsys):
  output = str(tmp_path / 'out')
  status, out, err = convert(['--input', b0.archive, '--output', output],
                             capsys)
  assert status == 0, err
  assert out.startswith(f'wrote {output}: EfficientNetV2-B0, 1000 classes, '
                        '7,139,704 parameters, EMA weights')
  meta, params, stats = weights.load_variables(output)
  assert_trees_equal(params, b0.ema[0])
  assert_trees_equal(stats, b0.ema[1])
  assert meta['source'] == f'official:{os.path.abspath(b0.archive)}'
  assert meta['extra']['official'] == {
      'model_name': 'efficientnetv2-b0', 'release': 'imagenet',
      'weights': 'ema', 'global_step': 218_750}


@pytest.mark.parametrize('form', ['directory', 'prefix', 'index', 'data'])
def test_unpacked_directory_and_prefix_inputs(b0, form):
  source = {'directory': b0.directory, 'prefix': b0.prefix,
            'index': b0.prefix + '.index',
            'data': b0.prefix + '.data-00000-of-00001'}[form]
  converted = official.official_variables(source)
  assert converted.architecture == B0
  assert_trees_equal(converted.params, b0.ema[0])


def test_cli_raw_weights_explicit_variant_and_normalization(b0, tmp_path,
                                                            capsys):
  output = str(tmp_path / 'raw')
  status, out, err = convert(['--input', b0.directory, '--variant', 'b0',
                              '--weights', 'raw', '--normalization', 'ft',
                              '--output', output], capsys)
  assert status == 0, err
  assert 'raw weights' in out
  meta, params, stats = weights.load_variables(output)
  assert_trees_equal(params, b0.raw[0])
  assert_trees_equal(stats, b0.raw[1])
  assert meta['normalization'] == 'ft'
  assert meta['extra']['eval_preprocessing'].endswith('(x / 255 - 0.5) / 0.5')
  assert meta['extra']['official']['weights'] == 'raw'


def test_directory_with_several_checkpoints(b0, tmp_path):
  """The `checkpoint` state file picks one; without it the choice is the
  user's."""
  directory = tmp_path / 'run'
  directory.mkdir()
  for step in (100, 218_750):
    for suffix in ('.index', '.data-00000-of-00001'):
      os.link(b0.prefix + suffix, directory / f'model.ckpt-{step}{suffix}')
  with pytest.raises(official.mapping.ConversionError, match='holds 2 '):
    official.official_variables(str(directory))
  (directory / 'checkpoint').write_text(
      'model_checkpoint_path: "/train/model.ckpt-218750"\n')
  assert official.official_variables(str(directory)).global_step == 218_750


# ----------------------------------------------------------------------------
# model.json: the official evaluation preprocessing of each family and
# release.


@pytest.fixture(scope='module')
def releases(tmp_path_factory, b0):
  """Input paths of B0 and S (1k), B0 fine-tuned from 21k (the same
  tensors, under a release name that says so), and B0 21k pretraining."""
  root = tmp_path_factory.mktemp('releases')
  s = Release(str(root), S, 1000, name='efficientnetv2-s', seed=10,
              training_state=False)
  finetuned = root / 'efficientnetv2-b0-21k-ft1k'
  finetuned.mkdir()
  for name in os.listdir(b0.directory):
    os.link(os.path.join(b0.directory, name), finetuned / name)
  b0_21k = Release(str(root), B0, 21843, name='efficientnetv2-b0-21k',
                   seed=20, training_state=False)
  return {'b0': (b0.archive, b0.ema), 's': (s.directory, s.ema),
          'b0-21k-ft1k': (str(finetuned), b0.ema),
          'b0-21k': (b0_21k.directory, b0_21k.ema)}


@pytest.mark.parametrize('release, variant, classes, normalization, size, '
                         'description', [
    ('b0', 'b0', 1000, 'imagenet', 224,
     'centre crop 224/256, bicubic to 224, ImageNet mean/std'),
    ('s', 's', 1000, 'inception', 384,
     'whole image bilinear to 384x384, (x - 128) / 128'),
    ('b0-21k-ft1k', 'b0', 1000, 'ft', 224,
     'whole image bilinear to 224x224, (x / 255 - 0.5) / 0.5'),
    ('b0-21k', 'b0', 21843, 'inception', 224,
     'centre crop 224/256, bilinear to 224, (x - 128) / 128'),
])
def test_model_json_records_the_official_eval_preprocessing(
    releases, tmp_path, capsys, release, variant, classes, normalization,
    size, description):
  source, want = releases[release]
  output = str(tmp_path / 'out')
  status, out, err = convert(['--input', source, '--output', output], capsys)
  assert status == 0, err
  meta = weights.read_meta(output)
  assert meta['architecture_obj'] == arch.get_architecture(variant)
  assert meta['num_classes'] == classes
  assert meta['normalization'] == normalization
  assert meta['extra']['eval_size'] == size
  assert meta['extra']['eval_preprocessing'] == description
  assert f'eval: {description}' in out
  if release == 'b0-21k':
    # predict evaluates at the recorded size, the official way.
    _, info = predict.load_checkpoint(output)
    assert (info['normalization'], info['eval_size']) == (normalization, size)
    _, params, stats = weights.load_variables(output)
    assert params['head']['classifier']['kernel'].shape == (1280, 21843)
    assert_trees_equal(params, want[0])
    assert_trees_equal(stats, want[1])


# ----------------------------------------------------------------------------
# Errors: one line, exit status 1, nothing written.


def _edited(b0, root, edit):
  tensors = {n: v for n, v in b0.tensors.items()
             if not n.endswith(('/RMSProp', '/RMSProp_1'))}
  edit(tensors)
  directory = os.path.join(root, 'efficientnetv2-b0')
  os.makedirs(directory)
  prefix = os.path.join(directory, 'model.ckpt-1')
  write_checkpoint(prefix, tensors)
  return prefix


_P = 'efficientnetv2-b0/'


def _drop(name):
  return lambda t: (t.pop(name), t.pop(name + '/ExponentialMovingAverage'))


def _add(name, shape):
  return lambda t: t.__setitem__(name, np.zeros(shape, np.float32))


def _reshape(name, shape):
  def edit(t):
    t[name] = np.zeros(shape, np.float32)
    t[name + '/ExponentialMovingAverage'] = np.zeros(shape, np.float32)
  return edit


@pytest.mark.parametrize('edit, args, expected', [
    (None, ['--variant', 's'],
     f"tensor '{_P}stem/conv2d/kernel' has shape (3, 3, 3, 32), expected "
     '(3, 3, 3, 24); it fits EfficientNetV2-B0'),
    (None, ['--variant', 'b1'],
     f"tensor '{_P}blocks_1/conv2d/kernel' has shape (3, 3, 16, 64), "
     'expected (3, 3, 16, 16); it fits EfficientNetV2-B0'),
    (_drop(f'{_P}blocks_7/se/conv2d/bias'), [],
     f"tensor '{_P}blocks_7/se/conv2d/bias' is missing (expected shape "
     '(24))'),
    (_add(f'{_P}blocks_21/conv2d/kernel', (1, 1, 192, 1152)), [],
     f"unexpected tensor '{_P}blocks_21/conv2d/kernel' with shape "
     '(1, 1, 192, 1152)'),
    (_reshape(f'{_P}blocks_5/depthwise_conv2d/depthwise_kernel',
              (3, 3, 1, 192)), [],
     f"tensor '{_P}blocks_5/depthwise_conv2d/depthwise_kernel' has shape "
     '(3, 3, 1, 192), expected (3, 3, 192, 1)'),
], ids=['wrong-variant', 'smaller-variant', 'missing', 'extra', 'shape'])
def test_cli_errors_are_one_line(b0, tmp_path, capsys, edit, args, expected):
  source = b0.prefix if edit is None else _edited(b0, str(tmp_path), edit)
  output = tmp_path / 'out'
  status, out, err = convert(args + ['--input', source, '--output',
                                     str(output)], capsys)
  assert status == 1, out
  assert err.startswith('error: ') and err.count('\n') == 1
  assert expected in err
  assert 'does not fit EfficientNetV2-' in err
  assert not output.exists()


def test_unsafe_or_unreadable_inputs(tmp_path, capsys):
  outside = tmp_path / 'escaped.index'
  archive = tmp_path / 'evil.tgz'
  payload = tmp_path / 'payload'
  payload.write_bytes(b'x')
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(payload, arcname='../escaped.index')
  status, _, err = convert(['--input', str(archive), '--output',
                            str(tmp_path / 'o')], capsys)
  assert status == 1 and err.count('\n') == 1
  assert "member '../escaped.index' points outside the archive" in err
  assert not outside.exists()

  broken = tmp_path / 'broken.tgz'
  broken.write_bytes(b'\x1f\x8b not really gzip' * 20)
  status, _, err = convert(['--input', str(broken), '--output',
                            str(tmp_path / 'o')], capsys)
  assert status == 1 and 'not a readable .tgz archive' in err
  status, _, err = convert(['--input', str(tmp_path / 'none'), '--output',
                            str(tmp_path / 'o')], capsys)
  assert status == 1 and 'no such .tgz archive, directory or TF' in err
  empty = tmp_path / 'empty'
  empty.mkdir()
  status, _, err = convert(['--input', str(empty), '--output',
                            str(tmp_path / 'o')], capsys)
  assert status == 1 and 'no TF checkpoint inside' in err


def test_unknown_prefix_needs_a_variant(tmp_path, capsys):
  params, stats = random_variables(B0, 10, 3)
  prefix = str(tmp_path / 'ckpt')
  write_checkpoint(prefix, official_tensors(params, stats, 'my-net'))
  status, _, err = convert(['--input', prefix, '--output',
                            str(tmp_path / 'o')], capsys)
  assert status == 1
  assert "cannot tell the variant from the variable prefix 'my-net'" in err
  status, _, err = convert(['--input', prefix, '--variant', 'b0',
                            '--output', str(tmp_path / 'o')], capsys)
  assert status == 0, err


def test_variant_still_required_for_timm_and_keras(capsys):
  for framework in ('timm', 'keras'):
    with pytest.raises(SystemExit) as info:
      cli.main(['--from', framework, '--input', 'x', '--output', 'o'])
    assert info.value.code == 2
    assert f'--variant is required with --from {framework}' in \
        capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    cli.main(['--from', 'keras', '--input', 'x', '--variant', 'b0',
              '--weights', 'raw', '--output', 'o'])
  assert info.value.code == 2


def test_importing_the_converter_does_not_import_tensorflow():
  code = ('import sys\n'
          'from effnetv2_jax.convert import official, __main__\n'
          'assert "tensorflow" not in sys.modules\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
