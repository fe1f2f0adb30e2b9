"""ONNX through jax2onnx: the serving function's jaxpr as ONNX operators.

One input 'images' and one output 'logits'; a symbolic batch is the ONNX
dimension 'batch'. The weights are the graph's initializers. jax2onnx 0.13
is the release that installs beside orbax-checkpoint 0.12 (later ones cap
orbax below 0.11.37); it needs `pip install -e .[export]`.
"""

from __future__ import annotations

import logging
import pathlib

from effnetv2_jax.export import output
from effnetv2_jax.export.serving import (ConversionError, ExportError,
                                         ServingFunction)

INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
BATCH_DIM = 'batch'
OPSET = 23


def _import_converter():
  """jax2onnx's `to_onnx`, with only the plugins a jaxpr of lax ops needs.

  `to_onnx` otherwise imports every plugin module, including its Equinox
  and dm-pix ones, which build and compile example networks at import (8 of
  its 10 s on 2 cores) and, against jax 0.10, log tracebacks for the two
  dm-pix ones that no longer import. The serving function is a plain jax
  function, so the lax / jax.numpy plugins cover it. This uses jax2onnx
  0.13's private loader; where it is absent, `to_onnx` loads everything.
  """
  try:
    from jax2onnx import to_onnx
    from jax2onnx.plugins import plugin_system
  except ImportError as e:
    raise ExportError(
        f'--format onnx needs jax2onnx, onnx and onnxruntime ({e}); install '
        "them with `pip install -e '.[export]'`") from None
  if (hasattr(plugin_system, '_import_tree')
      and not getattr(plugin_system, '_already_imported_plugins', True)):
    root = pathlib.Path(plugin_system.__file__).parent
    quiet = logging.getLogger(plugin_system.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # pylint: disable=protected-access
    try:
      plugin_system._import_tree(root / 'jax', 'jax2onnx.plugins.jax')
    finally:
      quiet.setLevel(level)
    plugin_system._already_imported_plugins = True
    # pylint: enable=protected-access
  return to_onnx


def export_onnx(serving: ServingFunction, path: str, *,
                opset: int = OPSET) -> str:
  """Writes the ONNX model to `path`; returns its path."""
  import jax
  import numpy as np

  final = output.check_output(path, directory=False)
  to_onnx = _import_converter()
  batch = BATCH_DIM if serving.batch is None else serving.batch
  shape = jax.export.symbolic_shape(
      f'{batch}, {serving.size}, {serving.size}, 3')
  spec = jax.ShapeDtypeStruct(shape, np.dtype(serving.input_dtype))
  try:
    model = to_onnx(serving.fn, inputs=[spec], model_name=serving.name,
                    opset=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME])
  except Exception as e:  # a primitive without a jax2onnx plugin, ...
    raise ConversionError.of('jax2onnx', e) from None
  with output.staged(final) as staging:
    with open(staging, 'wb') as f:
      f.write(model.SerializeToString())
  return final
