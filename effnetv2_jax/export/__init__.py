"""Deployable models: ONNX, SavedModel, TFLite and StableHLO exports.

    python -m effnetv2_jax.export --checkpoint DIR --format FORMAT \
        --output PATH [--batch N|dynamic] [--size S] [--preprocessing] \
        [--quantize int8 --calibration digits|<tfds name>|imagefolder:<root>]

DIR is a model directory (model.json + state/: a training run's model/, a
converted timm/Keras/official checkpoint, `weights.save_model`) or a
training workdir whose run has finished and written model/.

| format      | writes      | through                   | symbolic batch  |
| ----------- | ----------- | ------------------------- | --------------- |
| onnx        | a .onnx     | jax2onnx                  | yes ('batch')   |
| saved_model | a directory | jax2tf (XlaCallModule)    | yes (None)      |
| tflite      | a .tflite   | jax2tf + TFLite converter | float32 only    |
| stablehlo   | a file      | jax.export                | yes ('b')       |

Every format takes one input 'images' [batch, size, size, 3] and returns
'logits' [batch, classes]: the normalised float32 tensor by default, or,
with `--preprocessing`, 0-255 pixels (uint8, or float32 with
`--input_dtype float32`) normalised inside the graph (see `serving`). The
model is always loaded with XLA's convolutions: no custom calls.

`load_stablehlo(path)` serves a StableHLO export from JAX alone;
`tf.tflite_interpreter` / `tf.run_tflite` run a .tflite.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from effnetv2_jax.export import output
from effnetv2_jax.export.serving import (DYNAMIC, ExportError,
                                         ServingFunction, load_serving,
                                         parse_batch)
from effnetv2_jax.export.stablehlo import (DEFAULT_PLATFORMS, StableHLOModel,
                                           check_platforms, load_stablehlo)

FORMATS = ('onnx', 'saved_model', 'tflite', 'stablehlo')
DEFAULT_CALIBRATION_STEPS = 100

__all__ = ['DYNAMIC', 'ExportError', 'ExportResult', 'FORMATS',
           'ServingFunction', 'StableHLOModel', 'export_model',
           'export_serving', 'load_serving', 'load_stablehlo', 'parse_batch']


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What an export wrote: `path` (a file, or the SavedModel directory), its
  `size_bytes`, the export's wall time in `seconds` (conversion and
  writing, not loading the model), and the `serving` function exported."""

  format: str
  path: str
  size_bytes: int
  seconds: float
  serving: ServingFunction


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Where int8 calibration images come from (`calibration.py`)."""

  source: str
  steps: int = DEFAULT_CALIBRATION_STEPS
  split: str | None = None
  data_dir: str | None = None


def check_options(format: str, output_path: str, *, batch: int | None,
                  quantize: str | None = None,
                  calibration: Calibration | None = None,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
  """Raises ExportError for a bad combination, before any model loads."""
  from effnetv2_jax.export import calibration as calibration_lib
  from effnetv2_jax.export import tf as tf_export

  if format not in FORMATS:
    raise ExportError(f'--format must be one of {", ".join(FORMATS)}, got '
                      f'{format!r}')
  if quantize is not None and format != 'tflite':
    raise ExportError(f'--quantize is for --format tflite, not {format}')
  if calibration is not None and quantize is None:
    raise ExportError('--calibration is only used with --quantize int8')
  tf_export.check_quantization(quantize, batch)
  if quantize is not None:
    if calibration is None:
      raise ExportError('--quantize int8 needs --calibration (digits, a tfds '
                        'name or imagefolder:<root>)')
    if calibration.steps < 1:
      raise ExportError(f'--calibration_steps must be positive, got '
                        f'{calibration.steps}')
    calibration_lib.check_source(calibration.source)
  check_platforms(platforms)
  output.check_output(output_path, directory=format == 'saved_model')


def export_serving(serving: ServingFunction, format: str, output_path: str, *,
                   quantize: str | None = None,
                   calibration: Calibration | None = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS
                   ) -> ExportResult:
  """Exports a loaded serving function (see `export_model`)."""
  check_options(format, output_path, batch=serving.batch, quantize=quantize,
                calibration=calibration, platforms=platforms)
  start = time.perf_counter()
  if format == 'onnx':
    from effnetv2_jax.export import onnx as onnx_export
    path = onnx_export.export_onnx(serving, output_path)
  elif format == 'saved_model':
    from effnetv2_jax.export import tf as tf_export
    path = tf_export.export_saved_model(serving, output_path,
                                       platforms=platforms)
  elif format == 'tflite':
    from effnetv2_jax.export import tf as tf_export
    images = None
    if quantize is not None:
      from effnetv2_jax.export import calibration as calibration_lib
      images = calibration_lib.calibration_images(
          calibration.source, serving,
          count=calibration.steps * serving.batch, split=calibration.split,
          data_dir=calibration.data_dir)
    path = tf_export.export_tflite(serving, output_path, quantize=quantize,
                                   calibration=images)
  else:
    from effnetv2_jax.export import stablehlo
    path = stablehlo.export_stablehlo(serving, output_path,
                                      platforms=platforms)
  seconds = time.perf_counter() - start
  return ExportResult(format=format, path=path,
                      size_bytes=output.size_bytes(path), seconds=seconds,
                      serving=serving)


def export_model(checkpoint: str | os.PathLike, format: str,
                 output_path: str, *, batch: int | str | None = 1,
                 size: int | None = None, preprocessing: bool = False,
                 input_dtype: str | None = None, quantize: str | None = None,
                 calibration: Calibration | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS
                 ) -> ExportResult:
  """Exports a model directory (or finished training workdir).

  Args:
    checkpoint: a model directory, or a training workdir with model/.
    format: one of FORMATS.
    output_path: the file to write (a directory for 'saved_model').
    batch: a fixed batch, or None / 'dynamic' for a symbolic one.
    size: image side; default the model's eval size.
    preprocessing: bake the model.json normalisation in (input 0-255).
    input_dtype: with preprocessing, 'uint8' (default) or 'float32'.
    quantize: 'int8' for a fully integer TFLite model.
    calibration: with quantize, where the calibration images come from.
    platforms: what a SavedModel or StableHLO export is lowered for.

  Raises:
    ExportError: bad options or an unusable model directory.
  """
  batch = parse_batch(batch) if batch is not None else None
  # Cheap checks first: a typo should not wait for the model to load.
  check_options(format, output_path, batch=batch, quantize=quantize,
                calibration=calibration, platforms=platforms)
  serving = load_serving(checkpoint, batch=batch, size=size,
                         preprocessing=preprocessing, input_dtype=input_dtype)
  return export_serving(serving, format, output_path, quantize=quantize,
                        calibration=calibration, platforms=platforms)
