"""Running an export in its own runtime, to check it against JAX.

onnx in onnxruntime (CPU), saved_model with `tf.saved_model.load`, tflite in
TF's TFLite interpreter and stablehlo with `load_stablehlo`: each loaded once
and called on numpy batches, whatever batch a symbolic-batch export takes.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def load_runner(format: str, path: str | os.PathLike) -> Runner:
  """images [n, s, s, 3] -> logits [n, classes] with the format's runtime."""
  loaders = {'onnx': _onnx, 'saved_model': _saved_model, 'tflite': _tflite,
             'stablehlo': _stablehlo}
  if format not in loaders:
    raise ValueError(f'format must be one of {tuple(loaders)}, got '
                     f'{format!r}')
  return loaders[format](os.fspath(path))


def _onnx(path: str) -> Runner:
  import onnxruntime

  session = onnxruntime.InferenceSession(
      path, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name
  dtype = _ONNX_DTYPES[session.get_inputs()[0].type]

  def run(images):
    return session.run(None, {name: np.asarray(images, dtype)})[0]

  return run


_ONNX_DTYPES = {'tensor(float)': np.float32, 'tensor(uint8)': np.uint8}


def _saved_model(path: str) -> Runner:
  import tensorflow as tf

  from effnetv2_jax.export import tf as tf_export

  serve = tf.saved_model.load(path).signatures[tf_export.SIGNATURE]
  dtype = serve.structured_input_signature[1][tf_export.INPUT_NAME].dtype

  def run(images):
    out = serve(**{tf_export.INPUT_NAME: tf.constant(images, dtype)})
    return out[tf_export.OUTPUT_NAME].numpy()

  return run


def _tflite(path: str) -> Runner:
  from effnetv2_jax.export import tf as tf_export

  interpreters = {}

  def run(images):
    # A symbolic-batch model is resized per batch size; keep one of each.
    if len(images) not in interpreters:
      interpreters[len(images)] = tf_export.tflite_interpreter(
          path, batch=len(images))
    return tf_export.run_tflite(interpreters[len(images)], images)

  return run


def _stablehlo(path: str) -> Runner:
  from effnetv2_jax.export import stablehlo

  model = stablehlo.load_stablehlo(path)
  return lambda images: np.asarray(model(np.asarray(images,
                                                    model.input_dtype)))
