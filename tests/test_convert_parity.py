"""Parity with timm and Keras: converted weights give the reference's logits.

For every variant each reference offers (timm: all eight; Keras: S, M, L,
B0-B3) and two input sizes, 64 (every stride-2 layer sees an even input:
TF-'SAME' pads 0 before and 1 after) and 65 (all odd: 1 and 1), a randomly
initialised reference is calibrated on a batch of 8 random inputs (see
reference_models.py) and converted, and on that batch our float32 eval-mode
logits must match the reference's within 1e-4 (max abs).
Running with -s prints the table of the largest differences.

The conversion under test is the library path (`timm_variables` /
`keras_variables`, the naming tables, every transpose); our model (XLA
depthwise kernels) is built once per variant and compiled once per size, and
both references run through that same compiled forward. The last two tests
take real files (a torch .pth; Keras .weights.h5, legacy .h5 and .keras)
through the convert and predict command lines, which run the default compile
and the CPU's 'shifted' depthwise kernels.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import reference_models as refs
from effnetv2_jax import convert
from effnetv2_jax.convert import keras as keras_convert
from effnetv2_jax.models import arch, weights

TOLERANCE = 1e-4
SIZES = (64, 65)
# Logits are compared on the calibration batch itself (see reference_models).
BATCH = 8
RESULTS = {}  # (reference, variant, size) -> (max |diff|, max |logit|)


@functools.lru_cache(maxsize=1)
def ours(variant):
  """Our model's eval forward for `variant`, as f(params, batch_stats, x).

  One variant at a time is cached (the cases are grouped by variant), so the
  previous variant's compiled executables are released.
  """
  architecture = arch.get_architecture(variant)
  abstract = weights.abstract_model(architecture, 1000, conv_impl='xla')
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  # LLVM optimisation level 0 halves XLA:CPU compile time; float semantics
  # are the same (no fast-math either way).
  return jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(x, training=False),
                 compiler_options={'xla_backend_optimization_level': 0})


def check(reference, variant, size, ref_logits, params, stats, num_classes,
          x):
  assert num_classes == 1000
  got = np.asarray(ours(variant)(params, stats, x))
  diff = float(np.abs(got - ref_logits).max())
  scale = float(np.abs(ref_logits).max())
  RESULTS[(reference, variant, size)] = (diff, scale)
  # Calibration keeps logits O(1): 1e-4 is then a real bound.
  assert 0.05 < scale < 50, scale
  assert diff <= TOLERANCE, (
      f'{reference} {variant} @{size}px: max |diff| {diff:.2e} '
      f'(max |logit| {scale:.2f})')


@pytest.fixture(scope='module', autouse=True)
def parity_table():
  yield
  if RESULTS:
    print('\nlargest |ours - reference| over the logits (max |logit|)')
    for (reference, variant, size), (diff, scale) in sorted(RESULTS.items()):
      print(f'  {reference:9s} {variant:3s} {size:3d}px  {diff:.2e}  '
            f'({scale:.2f})')


_models = {}  # the reference model of the current variant, per reference


def _timm(variant, size):
  batch = refs.random_batch(size, BATCH, seed=size)
  # One model per variant, re-calibrated for each size.
  reference = refs.timm_reference(variant, batch, seed=0,
                                  model=_models.pop('timm', None))
  _models['timm'] = reference
  x = batch
  return refs.timm_logits(reference, x), x, convert.timm_variables(
      refs.timm_state_dict(reference), variant)


def _keras(variant, size):
  batch = refs.random_batch(size, BATCH, seed=size + 1)
  model = refs.keras_reference(variant, batch, seed=0,
                               model=_models.pop('keras', None))
  _models['keras'] = model
  x = batch
  return refs.keras_logits(model, x), x, convert.keras_variables(model,
                                                                 variant)


# Grouped by variant, so both references share one compiled forward per size.
CASES = [(v, r) for v in arch.VARIANTS for r in ('timm', 'keras')
         if r == 'timm' or v in keras_convert.KERAS_VARIANTS]


@pytest.mark.parametrize('variant, reference', CASES)
def test_parity(variant, reference):
  build = _timm if reference == 'timm' else _keras
  _models.clear()
  try:
    for size in SIZES:
      expected, x, (params, stats, num_classes) = build(variant, size)
      check(reference, variant, size, expected, params, stats, num_classes,
            x)
  finally:
    _models.clear()  # free the model before the next case


def _predict_npy(checkpoint, x, tmp_path):
  """Logits from `python -m effnetv2_jax.predict` on an .npy batch."""
  from effnetv2_jax import predict
  inputs, logits = str(tmp_path / 'x.npy'), str(tmp_path / 'logits.npy')
  np.save(inputs, x)
  assert predict.main(['--checkpoint', checkpoint, '--save-logits', logits,
                       inputs]) == 0
  return np.load(logits)


def test_timm_file_through_both_command_lines(tmp_path):
  """A real torch .pth -> convert CLI -> predict CLI (CPU 'auto' kernels)."""
  torch = pytest.importorskip('torch')
  from effnetv2_jax.convert import __main__ as convert_cli
  batch = refs.random_batch(65, BATCH, seed=7)
  reference = refs.timm_reference('b0', batch, seed=7)
  path = str(tmp_path / 'tf_efficientnetv2_b0.pth')
  torch.save({'state_dict': reference.state_dict()}, path)
  output = str(tmp_path / 'b0')
  assert convert_cli.main(['--from', 'timm', '--input', path, '--variant',
                           'b0', '--output', output]) == 0
  x = batch
  got = _predict_npy(output, x, tmp_path)
  assert np.abs(got - refs.timm_logits(reference, x)).max() <= TOLERANCE


def test_keras_files_through_the_command_line(tmp_path):
  """Files Keras itself writes: .weights.h5, legacy .h5 and .keras."""
  pytest.importorskip('keras')
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  from effnetv2_jax.convert import __main__ as convert_cli
  batch = refs.random_batch(64, BATCH, seed=8)
  model = refs.keras_reference('b0', batch, seed=8)
  x = batch
  expected = refs.keras_logits(model, x)
  weights_h5 = str(tmp_path / 'b0.weights.h5')
  model.save_weights(weights_h5)
  output = str(tmp_path / 'b0')
  assert convert_cli.main(['--from', 'keras', '--input', weights_h5,
                           '--variant', 'b0', '--output', output]) == 0
  assert np.abs(_predict_npy(output, x, tmp_path) - expected).max() \
      <= TOLERANCE
  # Keras 2 style HDF5 (what keras-applications downloads are).
  legacy = str(tmp_path / 'b0_legacy.h5')
  with h5py.File(legacy, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  archive = str(tmp_path / 'b0.keras')
  model.save(archive)
  for label, path in (('keras .h5', legacy), ('.keras', archive)):
    params, stats, num_classes = convert.keras_variables(path, 'b0')
    check(label, 'b0', 64, expected, params, stats, num_classes, x)
