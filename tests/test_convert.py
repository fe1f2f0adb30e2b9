"""Converters without reference models: naming, layouts, formats, errors, CLI.

Reference state dicts here are synthesised from the naming tables (random
arrays of the reference shapes); test_convert_parity.py checks the tables
against real timm and Keras models.
"""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from effnetv2_jax import convert
from effnetv2_jax.convert import __main__ as cli
from effnetv2_jax.convert import keras as keras_convert
from effnetv2_jax.convert import mapping
from effnetv2_jax.convert import timm as timm_convert
from effnetv2_jax.models import arch, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B0 = arch.get_architecture('b0')
# Block kinds no released variant has: MBConv e=1 and a Fused block with SE.
UNUSUAL = arch.Architecture(
    name='unusual', stages=tuple(arch.parse_block_string(s) for s in (
        'r2_k3_s1_e1_i16_o16_se0.25',
        'r2_k3_s2_e4_i16_o24_c1_se0.25',
        'r1_k5_s2_e6_i24_o32_se0.25')),
    head_channels=64)


def fake_tensors(naming, architecture, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=shape).astype(np.float32)
          for name, shape in naming.expected_names(architecture, num_classes)}


@pytest.mark.parametrize('naming', [timm_convert.NAMING, keras_convert.NAMING],
                         ids=['timm', 'keras'])
@pytest.mark.parametrize('architecture', [B0, UNUSUAL], ids=['b0', 'unusual'])
def test_every_variable_is_named_once(naming, architecture):
  tensors = fake_tensors(naming, architecture)
  names = [n for n, _ in naming.expected_names(architecture, 10)]
  assert len(names) == len(set(names))
  params, stats = mapping.match_tensors(tensors, architecture, 10, naming,
                                        source='fake')
  # The pure dicts fit the real model exactly (structure and shapes).
  model = weights.model_from_variables(architecture, 10, params, stats)
  assert model.num_classes == 10


def test_timm_layouts():
  tensors = fake_tensors(timm_convert.NAMING, B0)
  params, stats, num_classes = convert.timm_variables(tensors, B0)
  assert num_classes == 10
  # Stage 3's first block (global index 5) is B0's first MBConv.
  block = params['blocks'][5]
  ref = 'blocks.3.0.'
  np.testing.assert_array_equal(block['dw_conv']['kernel'][1, 2, 0, 5],
                                tensors[ref + 'conv_dw.weight'][5, 0, 1, 2])
  np.testing.assert_array_equal(block['expand_conv']['kernel'][0, 0, 7, 9],
                                tensors[ref + 'conv_pw.weight'][9, 7, 0, 0])
  np.testing.assert_array_equal(block['se']['reduce']['bias'],
                                tensors[ref + 'se.conv_reduce.bias'])
  np.testing.assert_array_equal(
      params['stem']['conv']['kernel'][2, 0, 1, 4],
      tensors['conv_stem.weight'][4, 1, 2, 0])
  np.testing.assert_array_equal(params['head']['classifier']['kernel'][11, 3],
                                tensors['classifier.weight'][3, 11])
  np.testing.assert_array_equal(stats['blocks'][5]['project_bn']['var'],
                                tensors[ref + 'bn3.running_var'])
  np.testing.assert_array_equal(params['blocks'][0]['fused_bn']['scale'],
                                tensors['blocks.0.0.bn1.weight'])


def test_keras_layouts():
  tensors = fake_tensors(keras_convert.NAMING, B0)
  params, stats, num_classes = convert.keras_variables(
      _write_keras3(tensors, B0, named=True), B0)
  assert num_classes == 10
  block = params['blocks'][5]
  np.testing.assert_array_equal(block['dw_conv']['kernel'][1, 2, 0, 5],
                                tensors['block4a_dwconv2/kernel'][1, 2, 5, 0])
  np.testing.assert_array_equal(block['expand_conv']['kernel'],
                                tensors['block4a_expand_conv/kernel'])
  np.testing.assert_array_equal(params['blocks'][0]['fused_conv']['kernel'],
                                tensors['block1a_project_conv/kernel'])
  np.testing.assert_array_equal(stats['head']['bn']['mean'],
                                tensors['top_bn/moving_mean'])
  np.testing.assert_array_equal(params['head']['classifier']['kernel'],
                                tensors['predictions/kernel'])


# ----------------------------------------------------------------------------
# Keras files, written the way Keras writes them (h5py only, no Keras).

_CLASS = {'conv': 'conv2d', 'depthwise': 'depthwise_conv2d',
          'bn': 'batch_normalization', 'dense': 'dense'}


def _write_keras3(tensors, architecture, *, named, path=None, extra=()):
  """A Keras 3 .weights.h5: layers/<class>_<n>/vars/<i> (+ name attrs)."""
  import h5py
  path = path or os.path.join(os.environ.get('TMPDIR', '/tmp'),
                              f'k3_{os.getpid()}_{named}.weights.h5')
  counters = {}
  with h5py.File(path, 'w') as f:
    layers = f.create_group('layers')
    for layer in mapping.model_layers(architecture, 1):
      cls = _CLASS[layer.kind]
      n = counters.get(cls, 0)
      counters[cls] = n + 1
      group = layers.create_group(cls if n == 0 else f'{cls}_{n}')
      variables = group.create_group('vars')
      name = keras_convert.NAMING.layer_name(layer)
      if named:
        variables.attrs['name'] = name
      leaves = keras_convert._VARIABLE_ORDER[cls]
      for i, leaf in enumerate(leaves):
        if f'{name}/{leaf}' in tensors:
          variables.create_dataset(str(i), data=tensors[f'{name}/{leaf}'])
    for group_name, arrays in extra:
      variables = layers.create_group(group_name).create_group('vars')
      if named:
        variables.attrs['name'] = group_name
      for i, a in enumerate(arrays):
        variables.create_dataset(str(i), data=a)
    f.create_group('vars')
  return path


def _write_legacy(tensors, path):
  """A Keras 2 HDF5 weights file (root layer_names, per layer weight_names)."""
  import h5py
  by_layer = {}
  for name, value in tensors.items():
    layer, leaf = name.split('/')
    by_layer.setdefault(layer, []).append((f'{layer}/{leaf}:0', value))
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [n.encode() for n in by_layer]
    for layer, items in by_layer.items():
      group = f.create_group(layer)
      group.attrs['weight_names'] = [n.encode() for n, _ in items]
      for weight_name, value in items:
        group.create_dataset(weight_name, data=value)
  return path


@pytest.mark.parametrize('form', ['keras3', 'structural', 'legacy', 'archive'])
def test_keras_file_forms(form, tmp_path):
  tensors = fake_tensors(keras_convert.NAMING, B0, seed=3)
  if form == 'legacy':
    path = _write_legacy(tensors, str(tmp_path / 'w.h5'))
  else:
    # Preprocessing constants (include_preprocessing=True) are ignored.
    extra = [('normalization', [np.zeros(3), np.ones(3), np.zeros(())])]
    path = _write_keras3(tensors, B0, named=form != 'structural',
                         path=str(tmp_path / 'w.weights.h5'), extra=extra)
    if form == 'archive':
      archive = str(tmp_path / 'model.keras')
      with zipfile.ZipFile(archive, 'w') as z:
        z.write(path, 'model.weights.h5')
        z.writestr('config.json', '{}')
      path = archive
  params, _, _ = convert.keras_variables(path, B0)
  np.testing.assert_array_equal(
      params['blocks'][7]['se']['expand']['kernel'],
      tensors['block4c_se_expand/kernel'])


# ----------------------------------------------------------------------------
# Sources and wrappers.


def test_timm_checkpoint_wrappers():
  tensors = fake_tensors(timm_convert.NAMING, B0)
  tensors['blocks.0.0.bn1.num_batches_tracked'] = np.array(7)  # ignored
  ema = {k: v + 1 for k, v in tensors.items()}
  wrapped = {'epoch': 3,
             'state_dict': {'module.' + k: v for k, v in tensors.items()},
             'state_dict_ema': {'module.' + k: v for k, v in ema.items()}}
  params, _, _ = convert.timm_variables(wrapped, B0)
  np.testing.assert_array_equal(params['stem']['bn']['scale'],
                                ema['bn1.weight'])
  params, _, _ = convert.timm_variables(wrapped, B0, use_ema=False)
  np.testing.assert_array_equal(params['stem']['bn']['scale'],
                                tensors['bn1.weight'])


def test_timm_files(tmp_path):
  torch = pytest.importorskip('torch')
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  tensors = fake_tensors(timm_convert.NAMING, B0, seed=1)
  pth = str(tmp_path / 'w.pth')
  torch.save({k: torch.from_numpy(v).to(torch.bfloat16)
              for k, v in tensors.items()}, pth)
  st = str(tmp_path / 'w.safetensors')
  safetensors_numpy.save_file(tensors, st)
  from_pth, _, _ = convert.timm_variables(pth, B0)
  from_st, _, _ = convert.timm_variables(st, B0)
  want = tensors['blocks.5.7.conv_pwl.weight'].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(
      from_st['blocks'][20]['project_conv']['kernel'], want)
  # bfloat16 on disk: upcast to float32, within bfloat16 precision.
  got = from_pth['blocks'][20]['project_conv']['kernel']
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------
# Errors: one line, naming the first tensor that does not fit.


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(convert.ConversionError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_wrong_variant_names_tensor_and_both_shapes():
  s_tensors = fake_tensors(timm_convert.NAMING, arch.get_architecture('s'))
  message = _one_line_error(convert.timm_variables, s_tensors, 'b0')
  assert message == (
      "state dict does not fit EfficientNetV2-B0: tensor 'conv_stem.weight' "
      'has shape (24, 3, 3, 3), expected (32, 3, 3, 3); it fits '
      'EfficientNetV2-S')
  k_tensors = fake_tensors(keras_convert.NAMING, arch.get_architecture('s'))
  message = _one_line_error(convert.keras_variables,
                            _write_legacy(k_tensors, _tmp('s_legacy.h5')),
                            'b0')
  assert message.endswith(
      "does not fit EfficientNetV2-B0: tensor 'stem_conv/kernel' has shape "
      '(3, 3, 3, 24), expected (3, 3, 3, 32); it fits EfficientNetV2-S')


def _tmp(name):
  return os.path.join(os.environ.get('TMPDIR', '/tmp'),
                      f'{os.getpid()}_{name}')


def test_smaller_and_bigger_variants_are_refused():
  b1 = arch.get_architecture('b1')
  b0_tensors = fake_tensors(timm_convert.NAMING, B0)
  message = _one_line_error(convert.timm_variables, b0_tensors, b1)
  assert message.endswith("tensor 'blocks.0.1.conv.weight' is missing "
                          '(expected shape (16, 16, 3, 3)); it fits '
                          'EfficientNetV2-B0')
  b1_tensors = fake_tensors(timm_convert.NAMING, b1)
  message = _one_line_error(convert.timm_variables, b1_tensors, B0)
  assert "unexpected tensor 'blocks.0.1.conv.weight' with shape " \
         '(16, 16, 3, 3)' in message
  assert message.endswith('; it fits EfficientNetV2-B1')
  # A file of no known variant gets no hint.
  b1_tensors['conv_head.weight'] = np.zeros((1280, 320, 1, 1), np.float32)
  assert 'it fits' not in _one_line_error(convert.timm_variables, b1_tensors,
                                          B0)


def test_headless_and_malformed_sources():
  tensors = fake_tensors(timm_convert.NAMING, B0)
  del tensors['classifier.weight'], tensors['classifier.bias']
  assert 'no classifier tensor' in _one_line_error(
      convert.timm_variables, tensors, B0)
  tensors = fake_tensors(timm_convert.NAMING, B0)
  tensors['bn1.weight'] = 'not a tensor'
  assert "entry 'bn1.weight' is a str" in _one_line_error(
      convert.timm_variables, tensors, B0)
  assert 'got list' in _one_line_error(convert.timm_variables, [1, 2], B0)
  assert 'got dict' in _one_line_error(convert.keras_variables, {}, B0)
  assert "entry 'state_dict' is a list" in _one_line_error(
      convert.timm_variables, {'state_dict': [1]}, B0)


@pytest.mark.parametrize('suffix, reader', [
    ('.pth', convert.timm_variables), ('.safetensors', convert.timm_variables),
    ('.weights.h5', convert.keras_variables), ('.h5', convert.keras_variables),
    ('.keras', convert.keras_variables)])
def test_corrupt_and_missing_files(tmp_path, suffix, reader):
  if suffix == '.pth':
    pytest.importorskip('torch')
  path = tmp_path / f'corrupt{suffix}'
  path.write_bytes(b'\x00garbage' * 50)
  message = _one_line_error(reader, str(path), B0)
  assert str(path) in message and 'not a readable' in message
  message = _one_line_error(reader, str(tmp_path / f'missing{suffix}'), B0)
  assert message.endswith('no such file')


def test_hdf5_without_keras_weights(tmp_path):
  import h5py
  path = str(tmp_path / 'other.h5')
  with h5py.File(path, 'w') as f:
    f.create_dataset('x', data=np.zeros(3))
  assert 'without Keras weights' in _one_line_error(
      convert.keras_variables, path, B0)


# ----------------------------------------------------------------------------
# The command line.


@pytest.fixture(scope='module')
def b0_safetensors(tmp_path_factory):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  path = str(tmp_path_factory.mktemp('cli') / 'b0.safetensors')
  tensors = fake_tensors(timm_convert.NAMING, B0, num_classes=1000, seed=4)
  tensors['bn1.num_batches_tracked'] = np.array(3, np.int64)
  safetensors_numpy.save_file(tensors, path)
  return path, tensors


def test_cli_writes_a_loadable_model_directory(b0_safetensors, tmp_path,
                                               capsys):
  path, tensors = b0_safetensors
  output = str(tmp_path / 'out')
  status = cli.main(['--from', 'timm', '--input', path, '--variant', 'b0',
                     '--output', output])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert out.startswith(f'wrote {output}: EfficientNetV2-B0, 1000 classes, '
                        '7,139,704 parameters, normalization imagenet')
  meta, params, stats = weights.load_variables(output)
  assert meta['source'] == f'timm:{path}'
  np.testing.assert_array_equal(stats['blocks'][7]['dw_bn']['mean'],
                                tensors['blocks.3.2.bn2.running_mean'])
  # A second run refuses to replace the output unless told to.
  status = cli.main(['--from', 'timm', '--input', path, '--variant', 'b0',
                     '--output', output, '--normalization', 'ft'])
  assert status == 1
  assert '--overwrite' in capsys.readouterr().err
  assert cli.main(['--from', 'timm', '--input', path, '--variant', 'b0',
                   '--output', output, '--normalization', 'ft',
                   '--overwrite']) == 0
  assert weights.read_meta(output)['normalization'] == 'ft'


@pytest.mark.parametrize('args, expected', [
    (['--from', 'timm', '--variant', 'b1'],
     "tensor 'blocks.0.1.conv.weight' is missing"),
    (['--from', 'timm', '--variant', 's'],
     "tensor 'conv_stem.weight' has shape (32, 3, 3, 3), expected "
     '(24, 3, 3, 3)'),
    (['--from', 'keras', '--variant', 'xl'],
     'keras.applications has no EfficientNetV2-XL'),
    (['--from', 'keras', '--variant', 'b0'], 'not a readable HDF5'),
])
def test_cli_errors_are_one_line(b0_safetensors, tmp_path, capsys, args,
                                 expected):
  path, _ = b0_safetensors
  status = cli.main(args + ['--input', path, '--output',
                            str(tmp_path / 'o')])
  _, err = capsys.readouterr()
  assert status == 1
  assert err.startswith('error: ') and err.count('\n') == 1
  assert expected in err
  assert not os.path.exists(tmp_path / 'o')


def test_cli_missing_input_and_bad_variant(tmp_path, capsys):
  assert cli.main(['--from', 'timm', '--input', str(tmp_path / 'x.pth'),
                   '--variant', 's', '--output', str(tmp_path / 'o')]) == 1
  assert 'no such file' in capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    cli.main(['--from', 'timm', '--input', 'x', '--variant', 'b7',
              '--output', 'o'])
  assert info.value.code == 2
  assert 'unknown EfficientNetV2 variant' in capsys.readouterr().err


def test_module_entry_point_without_tensorflow(b0_safetensors, tmp_path):
  """`python -m effnetv2_jax.convert`: one-line error; no tf, no torch."""
  path, _ = b0_safetensors
  argv = ['effnetv2_jax.convert', '--from', 'timm', '--input', path,
          '--output', str(tmp_path / 'o')]
  code = ('import runpy, sys\n'
          f'sys.argv = {argv + ["--variant", "b3"]!r}\n'
          'try:\n'
          '  runpy.run_module("effnetv2_jax.convert", run_name="__main__")\n'
          'except SystemExit as e:\n'
          '  failed = e.code\n'
          'from effnetv2_jax.convert import __main__ as cli\n'
          f'converted = cli.main({argv[1:] + ["--variant", "b0"]!r})\n'
          'assert "tensorflow" not in sys.modules, "tensorflow imported"\n'
          'assert "torch" not in sys.modules, "torch imported"\n'
          'sys.exit(10 * failed + converted)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 10, result.stderr[-2000:]
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert "'conv_stem.weight' has shape (32, 3, 3, 3), expected (40, 3, 3, 3)" \
      in result.stderr
  assert weights.is_model_dir(tmp_path / 'o')
