"""SavedModel and TFLite through `jax.experimental.jax2tf`.

jax2tf wraps the serving function's StableHLO in one XlaCallModule op (the
only serialization jax2tf has in the JAX we pin). The SavedModel keeps it as
is: TF Serving and `tf.saved_model.load` run it through XLA on the platforms
it was lowered for. The TFLite converter legalizes the StableHLO into TFLite's
builtin operators (no Flex/Select TF ops), so the .tflite runs in any TFLite
or LiteRT interpreter; for it the 1x1 convolutions are traced as
convolutions, not channel matmuls (`rewrite.py`: at batch 1 the converter
rejects the matmul form).

Both have the signature `serving_default(images) -> {'logits': ...}`. A
symbolic batch is a None dimension: the SavedModel takes any batch, a TFLite
interpreter one set by `resize_tensor_input` before `allocate_tensors`.

int8: post-training full-integer quantization (weights and activations
int8, every operator an int8 builtin; the input and output stay float32, or
uint8 pixels in with baked preprocessing, quantized at the graph's edge).
The converter picks the activation ranges from calibration images
(`calibration.py`). A quantized model needs a fixed batch: with a symbolic
one the converted graph broadcasts constants (the mean's divisors among
them) at run time and quantizes them with the activations; the int8 model
then fails in the interpreter (division by zero) or, on trained digits
models, agrees with float on 1 in 24 images.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Sequence

import numpy as np

from effnetv2_jax.export import output
from effnetv2_jax.export.serving import (ConversionError, ExportError,
                                         ServingFunction)

INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
SIGNATURE = 'serving_default'
QUANTIZATIONS = ('int8',)


def _tf_module(serving: ServingFunction, platforms: Sequence[str], *,
               for_tflite: bool = False):
  """A tf.Module whose `serve` is the converted serving function; for the
  TFLite converter, with its 1x1 convolutions as convolutions
  (`rewrite.py` says why)."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  from effnetv2_jax.export import rewrite

  fn = (rewrite.pointwise_dots_as_convolutions(serving.fn) if for_tflite
        else serving.fn)
  polymorphic = (None if serving.batch is not None else
                 [f'(b, {serving.size}, {serving.size}, 3)'])
  converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic,
                             with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  spec = tf.TensorSpec(serving.input_shape, tf.as_dtype(serving.input_dtype),
                       name=INPUT_NAME)
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {OUTPUT_NAME: converted(images)},
      autograph=False, input_signature=[spec])
  return module


@contextlib.contextmanager
def _quiet_tensorflow():
  """TF's C++ INFO/WARNING lines and Python deprecation chatter are noise
  on an export's terminal; errors still show."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def export_saved_model(serving: ServingFunction, path: str, *,
                       platforms: Sequence[str] = ('cpu', 'cuda', 'tpu')
                       ) -> str:
  """Writes a SavedModel directory to `path`; returns its path.

  `platforms`: where its XlaCallModule may run (lowered for each).
  """
  final = output.check_output(path, directory=True)
  with _quiet_tensorflow():
    import tensorflow as tf
    module = _tf_module(serving, platforms)
    with output.staged(final) as staging:
      # The module's one tf.function becomes the serving_default signature;
      # naming it in `signatures=` as well would store the XlaCallModule,
      # weights included, twice.
      tf.saved_model.save(module, staging)
  return final


def check_quantization(quantize: str | None, batch: int | None) -> None:
  if quantize is None:
    return
  if quantize not in QUANTIZATIONS:
    raise ExportError(f'--quantize must be one of {QUANTIZATIONS}, got '
                      f'{quantize!r}')
  if batch is None:
    raise ExportError('--quantize int8 needs a fixed --batch: a symbolic-batch '
                      'int8 TFLite model fails or gives wrong logits')


def export_tflite(serving: ServingFunction, path: str, *,
                  quantize: str | None = None,
                  calibration: np.ndarray | None = None) -> str:
  """Writes a .tflite flatbuffer to `path`; returns its path.

  Args:
    serving: the serving function.
    path: the output file.
    quantize: None (float32) or 'int8'.
    calibration: with 'int8', the calibration images in the export's input
      form [n, size, size, 3] (`calibration.calibration_images`).
  """
  check_quantization(quantize, serving.batch)
  if quantize and (calibration is None or not len(calibration)):
    raise ExportError('--quantize int8 needs calibration images '
                      '(--calibration)')
  final = output.check_output(path, directory=False)
  with _quiet_tensorflow():
    import tensorflow as tf
    from effnetv2_jax.export import calibration as calibration_lib

    # The converter legalizes a single-platform module only.
    module = _tf_module(serving, ('cpu',), for_tflite=True)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == 'int8':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: (
          calibration_lib.representative_batches(calibration, serving.batch))
      converter.target_spec.supported_ops = [
          tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
      flatbuffer = converter.convert()
    except Exception as e:  # the converter's errors are long MLIR dumps
      raise ConversionError.of('the TFLite converter', e) from None
  with output.staged(final) as staging:
    with open(staging, 'wb') as f:
      f.write(flatbuffer)
  return final


def tflite_interpreter(path: str, batch: int | None = None):
  """A TFLite interpreter of `path`, allocated for `batch` (a symbolic-batch
  model is resized to it; None keeps the stored shape)."""
  import warnings

  with _quiet_tensorflow(), warnings.catch_warnings():
    # tf.lite.Interpreter warns that LiteRT replaces it; it still runs.
    warnings.simplefilter('ignore')
    import tensorflow as tf
    interpreter = tf.lite.Interpreter(model_path=os.fspath(path))
  if batch is not None:
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(
        detail['index'], [batch] + list(detail['shape'][1:]))
  interpreter.allocate_tensors()
  return interpreter


def run_tflite(interpreter, images: np.ndarray) -> np.ndarray:
  """Logits of `images` (its batch must be the interpreter's)."""
  detail = interpreter.get_input_details()[0]
  interpreter.set_tensor(detail['index'], images.astype(detail['dtype']))
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])
