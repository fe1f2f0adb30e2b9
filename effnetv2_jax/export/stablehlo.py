"""StableHLO: a `jax.export` artifact that JAX serves without our model code.

The file is `jax.export.Exported.serialize()`: the StableHLO module with its
weights as constants, the input and output shapes, and the platforms it was
lowered for. Any JAX (same or newer, within the serialization's
compatibility window) runs it:

    exported = jax.export.deserialize(open(path, 'rb').read())
    logits = exported.call(images)

which is what `load_stablehlo` does, adding a jit and a look at the input.
"""

from __future__ import annotations

import os
from typing import Sequence

from effnetv2_jax.export import output
from effnetv2_jax.export.serving import (ExportError, ServingFunction,
                                         check_no_own_kernels, input_spec)

# Lowered for all three, one file serves on any of them: the convolutions
# lower the same way, so the module is shared and the file barely grows.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(p.strip().lower() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ExportError(f'--platforms must name some of {PLATFORMS}, got '
                      f'{",".join(platforms) or "nothing"}')
  return platforms


def export_program(serving: ServingFunction,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """The `jax.export.Exported` of the serving function."""
  import jax

  exported = jax.export.export(jax.jit(serving.fn),
                               platforms=check_platforms(platforms))(
                                   input_spec(serving))
  check_no_own_kernels(exported.mlir_module())
  return exported


def export_stablehlo(serving: ServingFunction, path: str, *,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> str:
  """Writes the serialized export to `path` (a file); returns its path."""
  final = output.check_output(path, directory=False)
  data = export_program(serving, platforms).serialize()
  with output.staged(final) as staging:
    with open(staging, 'wb') as f:
      f.write(data)
  return final


class StableHLOModel:
  """A deserialized export: call it on images to get logits.

  Attributes:
    exported: the `jax.export.Exported`.
    input_shape: the input's shape; None where the batch is symbolic.
    input_dtype: the input's numpy dtype.
    platforms: the platforms it was lowered for.
  """

  def __init__(self, exported):
    import jax

    self.exported = exported
    aval = exported.in_avals[0]
    self.input_shape = tuple(d if isinstance(d, int) else None
                             for d in aval.shape)
    self.input_dtype = aval.dtype
    self.platforms = tuple(exported.platforms)
    self._call = jax.jit(exported.call)

  def __call__(self, images):
    return self._call(images)


def load_stablehlo(path: str | os.PathLike) -> StableHLOModel:
  """Reads a file written by `export_stablehlo` (or `--format stablehlo`).

  Needs only JAX: no effnetv2_jax model code runs.
  """
  import jax

  with open(os.fspath(path), 'rb') as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # flatbuffer and version errors have many types
    reason = str(e).strip().splitlines()
    raise ExportError(f'{path}: not a jax.export StableHLO file '
                      f'({reason[0] if reason else type(e).__name__})'
                      ) from None
  return StableHLOModel(exported)
