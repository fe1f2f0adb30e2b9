"""Exports (effnetv2_jax.export) against the JAX model they came from.

The model is the 'tiny' architecture with random convolutions, its BatchNorm
statistics set from 192 digits (so activations are O(1), not the shrinking
ones of a fresh init) and a linear probe fitted on its pooled features
(least squares): its logits are O(10) and depend on the image, so a 1e-4
agreement means something, and so does int8 top-1 agreement on held-out
digits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from effnetv2_jax import export
from effnetv2_jax import predict
from effnetv2_jax.export import __main__ as export_cli
from effnetv2_jax.export import rewrite, runtimes
from effnetv2_jax.export import serving as serving_lib
from effnetv2_jax.models import efficientnetv2, small, weights

TOLERANCE = 1e-4  # max |logits difference| of a float export
SIZE = 32
TRAIN_IMAGES = 192
TEST_IMAGES = 48
CALIBRATION_IMAGES = 64  # int8 calibration: 64 batches of 1 train digit
# int8 top-1 agreement with float32 on the 48 held-out digits: measured 41/48
# (85%) with 16 or 64 calibration digits, 44/48 with 128. This random
# network's margins are small (the probe's own top-1 is 65%), so some flips
# are expected; below 75% (36/48) the quantization would be broken, not
# coarse.
MIN_INT8_AGREEMENT = 0.75


def _digits(split: str, count: int):
  from effnetv2_jax.data import pipeline
  batches = pipeline.make_eval_iterator(
      'digits', split=split, global_batch_size=count, image_size=SIZE,
      normalization='inception', process_index=0, process_count=1)
  batch = next(iter(batches))
  return batch['image'], batch['label'].argmax(1)


def _fit_probe(model, images, labels) -> None:
  """Least-squares classifier on the pooled features, written into the
  model's classifier (kernel and bias)."""
  features = np.asarray(jax.jit(lambda x: model(
      x, training=False, return_features=True)[1]['pre_logits'])(images),
                        np.float64)
  mean, scale = features.mean(0), features.std(0) + 1e-6
  design = np.concatenate([(features - mean) / scale,
                           np.ones((len(features), 1))], 1)
  solution = np.linalg.lstsq(design, 10.0 * np.eye(10)[labels],
                             rcond=None)[0]
  kernel = solution[:-1] / scale[:, None]
  model.head.classifier.kernel[...] = kernel.astype(np.float32)
  model.head.classifier.bias[...] = (solution[-1] - mean @ kernel).astype(
      np.float32)


@pytest.fixture(scope='module')
def digits():
  train = _digits('train', TRAIN_IMAGES)
  test = _digits('test', TEST_IMAGES)
  return train, test


def _set_batch_norm_statistics(model, images) -> None:
  """One training-mode pass with momentum 0: running statistics := batch
  statistics of `images`."""
  nnx.jit(lambda m, x: m(x, training=True, dropout_rate=0.0,
                         drop_path_rate=0.0))(model, images)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, digits):
  model = efficientnetv2.create_model(small.TINY, 10, rngs=0,
                                      conv_impl='xla', bn_momentum=0.0)
  _set_batch_norm_statistics(model, digits[0][0])
  _fit_probe(model, *digits[0])
  return weights.save_model(tmp_path_factory.mktemp('export') / 'tiny',
                            model, source='test_export probe')


@pytest.fixture(scope='module')
def reference(model_dir):
  """The JAX logits of normalised images."""
  model = weights.load_model(model_dir, conv_impl='xla')
  forward = jax.jit(lambda x: model(x, training=False))
  return lambda images: np.asarray(forward(images))


@pytest.fixture(scope='module')
def images(digits):
  return np.asarray(digits[1][0][:3], np.float32)


def _serving(model_dir, **kwargs):
  return export.load_serving(model_dir, **kwargs)


def _check_close(got, want):
  assert got.shape == want.shape
  assert np.abs(want).max() > 1.0  # the comparison is not of near-zeros
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


# ----------------------------------------------------------------------------
# Float formats.


@pytest.mark.parametrize('format', export.FORMATS)
def test_dynamic_batch_export_runs_two_batch_sizes(format, model_dir,
                                                   reference, images,
                                                   tmp_path):
  serving = _serving(model_dir, batch=None)
  result = export.export_serving(serving, format, str(tmp_path / 'm'))
  run = runtimes.load_runner(format, result.path)
  for batch in (1, 3):
    _check_close(run(images[:batch]), reference(images[:batch]))


# The default fixed batch of 1 with baked preprocessing: each format once.
# (At batch 1 the TFLite converter needs `export.rewrite`.)
@pytest.mark.parametrize('format,input_dtype', [
    ('onnx', 'uint8'), ('saved_model', 'uint8'), ('tflite', 'float32'),
    ('stablehlo', 'uint8')])
def test_baked_preprocessing_equals_preprocess_then_model(
    format, input_dtype, model_dir, reference, images, tmp_path):
  # A digit's pixels (the inverse of 'inception' scaling), not noise: the
  # probe's logits stay O(10) on images like those it was fitted on.
  pixels = np.clip(np.rint(images[:1] * 128 + 128), 0, 255)
  serving = _serving(model_dir, preprocessing=True, input_dtype=input_dtype)
  result = export.export_serving(serving, format, str(tmp_path / 'm'))
  run = runtimes.load_runner(format, result.path)
  want = reference(predict.normalize(pixels.astype(np.float32), 'inception'))
  _check_close(run(pixels.astype(input_dtype)), want)


def test_stablehlo_loader_round_trip_needs_only_jax(model_dir, reference,
                                                     images, tmp_path):
  path = str(tmp_path / 'tiny.stablehlo')
  export.export_serving(_serving(model_dir, batch=None), 'stablehlo', path)
  loaded = export.load_stablehlo(path)
  assert loaded.input_shape == (None, SIZE, SIZE, 3)
  assert 'cpu' in loaded.platforms and 'cuda' in loaded.platforms
  _check_close(np.asarray(loaded(images)), reference(images))
  # Only JAX's own check of the symbolic batch; no effnetv2_jax kernels.
  assert serving_lib.custom_call_targets(
      loaded.exported.mlir_module()) == {'shape_assertion'}
  # A fresh interpreter with jax alone: nothing of effnetv2_jax is imported.
  np.save(tmp_path / 'x.npy', images)
  script = (
      'import sys, jax, numpy as np\n'
      f'e = jax.export.deserialize(bytearray(open({path!r}, "rb").read()))\n'
      f'y = np.asarray(e.call(np.load({str(tmp_path / "x.npy")!r})))\n'
      'assert not [m for m in sys.modules if m.startswith("effnetv2_jax")]\n'
      f'np.save({str(tmp_path / "y.npy")!r}, y)\n')
  subprocess.run([sys.executable, '-c', script], check=True,
                 env=dict(os.environ, JAX_PLATFORMS='cpu'))
  _check_close(np.load(tmp_path / 'y.npy'), reference(images))


def test_exports_refuse_our_cpu_kernels(model_dir):
  assert serving_lib.custom_call_targets(
      serving_lib.lowered_text(_serving(model_dir))) == set()

  def calls_onednn(x):
    return jax.ffi.ffi_call('effnetv2_onednn_conv_forward',
                            jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

  text = jax.jit(calls_onednn).lower(np.zeros((1, 4), np.float32)).as_text()
  with pytest.raises(export.ExportError, match='effnetv2_onednn_conv_forward'):
    serving_lib.check_no_own_kernels(text)


# ----------------------------------------------------------------------------
# int8 TFLite, through the command line.


def test_int8_tflite_top1_agrees_with_float(model_dir, reference, digits,
                                            tmp_path, capsys):
  path = str(tmp_path / 'tiny_int8.tflite')
  status = export_cli.main([
      '--checkpoint', model_dir, '--format', 'tflite', '--output', path,
      '--quantize', 'int8', '--calibration', 'digits',
      '--calibration_steps', str(CALIBRATION_IMAGES)])
  assert status == 0, capsys.readouterr().err
  assert 'int8' in capsys.readouterr().out
  test_images, _ = digits[1]
  run = runtimes.load_runner('tflite', path)
  quantized = np.concatenate([run(image[None]) for image in test_images])
  floating = reference(test_images)
  agreement = np.mean(quantized.argmax(1) == floating.argmax(1))
  assert agreement >= MIN_INT8_AGREEMENT, agreement
  # Quantized, not float: the logits move by more than float rounding.
  assert np.abs(quantized - floating).max() > 1e-3
  float_size = os.path.getsize(export.export_serving(
      _serving(model_dir), 'tflite', str(tmp_path / 'float.tflite')).path)
  assert os.path.getsize(path) < float_size


def _dots_of_4d_tensors(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general' and eqn.invars[0].aval.ndim == 4:
      count += 1
    for value in eqn.params.values():
      if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
        count += _dots_of_4d_tensors(value.jaxpr)
  return count


def test_tflite_rewrite_makes_1x1_dots_convolutions(model_dir, images):
  serving = _serving(model_dir)
  rewritten = rewrite.pointwise_dots_as_convolutions(serving.fn)
  spec = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.float32)
  assert _dots_of_4d_tensors(jax.make_jaxpr(serving.fn)(spec).jaxpr) > 0
  assert _dots_of_4d_tensors(jax.make_jaxpr(rewritten)(spec).jaxpr) == 0
  _check_close(np.asarray(jax.jit(rewritten)(images[:1])),
               np.asarray(jax.jit(serving.fn)(images[:1])))


# ----------------------------------------------------------------------------
# The command line: directories and mistakes.


def test_cli_accepts_a_finished_training_workdir(model_dir, reference, images,
                                                 tmp_path, capsys):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copytree(model_dir, workdir / 'model')
  path = str(tmp_path / 'from_workdir.stablehlo')
  assert export_cli.main(['--checkpoint', str(workdir), '--format',
                          'stablehlo', '--output', path]) == 0
  assert 'float32[1, 32, 32, 3]' in capsys.readouterr().out
  _check_close(np.asarray(export.load_stablehlo(path)(images[:1])),
               reference(images[:1]))


def _cli_error(argv, capsys) -> str:
  try:
    status = export_cli.main(argv)
  except SystemExit as e:  # argparse's own mistakes
    status = e.code
  err = capsys.readouterr().err.strip()
  assert status == 2, err
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  return err


def test_cli_errors_are_one_line_and_status_2(model_dir, tmp_path, capsys):
  unfinished = tmp_path / 'unfinished_run'
  (unfinished / 'checkpoints').mkdir(parents=True)
  out = str(tmp_path / 'out.onnx')
  base = ['--checkpoint', model_dir, '--output', out]
  cases = {
      'png': (base + ['--format', 'png'], '--format must be one of'),
      'missing': (['--checkpoint', str(tmp_path / 'nope'), '--format', 'onnx',
                   '--output', out], 'no such directory'),
      'unfinished': (['--checkpoint', str(unfinished), '--format', 'onnx',
                      '--output', out], 'without a finished model/'),
      'not a model': (['--checkpoint', str(tmp_path), '--format', 'onnx',
                       '--output', out], 'not a model directory'),
      'no parent': (['--checkpoint', model_dir, '--format', 'onnx',
                     '--output', str(tmp_path / 'no' / 'm.onnx')],
                    'does not exist'),
      'directory': (['--checkpoint', model_dir, '--format', 'tflite',
                     '--output', str(tmp_path)], 'is a directory'),
      'quantize onnx': (base + ['--format', 'onnx', '--quantize', 'int8',
                                '--calibration', 'digits'],
                        '--quantize is for --format tflite'),
      'quantize dynamic': (base + ['--format', 'tflite', '--quantize', 'int8',
                                   '--calibration', 'digits', '--batch',
                                   'dynamic'], 'needs a fixed --batch'),
      'no calibration': (base + ['--format', 'tflite', '--quantize', 'int8'],
                         'needs --calibration'),
      'bad calibration': (base + ['--format', 'tflite', '--quantize', 'int8',
                                  '--calibration', 'nmist'],
                          "unknown dataset 'nmist'"),
      'batch 0': (base + ['--format', 'onnx', '--batch', '0'],
                  '--batch must be a positive number'),
      'uint8 unnormalised': (base + ['--format', 'onnx', '--input_dtype',
                                     'uint8'], 'needs --preprocessing'),
      'platform': (base + ['--format', 'stablehlo', '--platforms', 'gpu'],
                   '--platforms must name'),
      'no format': (['--checkpoint', model_dir, '--output', out],
                    'required: --format'),
  }
  for name, (argv, expected) in cases.items():
    assert expected in _cli_error(argv, capsys), name
  assert not os.path.exists(out)
