"""The function every export format serialises: images in, logits out.

A model directory (model.json + state/) is loaded with XLA's convolutions
(`conv_impl='xla'`), so the traced program holds only standard StableHLO:
no custom calls to this package's oneDNN CPU kernels, which no other runtime
has. Its weights are closed over, so each format stores them as constants.

Without baked preprocessing the input is the network's own: float32 NHWC,
already normalised. With it, the input is the pixels, 0-255 (uint8 or
float32) NHWC at the export size, and the model.json normalisation runs
inside the exported graph, exactly as `effnetv2_jax.predict.normalize` does
it. Resizing and cropping stay outside: the caller brings images at the
export size.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import numpy as np

from effnetv2_jax.models import weights

MODEL_SUBDIR = 'model'  # what training writes into its workdir when it ends
INPUT_DTYPES = ('uint8', 'float32')
DYNAMIC = 'dynamic'
# The custom-call targets of effnetv2_jax's own CPU kernels start with it
# (`kernels.onednn`).
OWN_KERNEL_PREFIX = 'effnetv2_'
_CUSTOM_CALL = re.compile(r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*'
                          r'"([^"]+)"')


class ExportError(ValueError):
  """An export cannot be made as asked; the message is one line."""


class ConversionError(ExportError):
  """A converter failed on a valid request; the message is one line."""

  @classmethod
  def of(cls, converter: str, error: BaseException) -> 'ConversionError':
    """`converter failed: <the first line of error>` (converters raise
    long, multi-line messages such as MLIR dumps)."""
    lines = str(error).strip().splitlines()
    return cls(f'{converter} failed: '
               f'{lines[0] if lines else type(error).__name__}')


@dataclasses.dataclass(frozen=True)
class ServingFunction:
  """A model as a pure function, and what its input looks like.

  Attributes:
    fn: images [batch, size, size, 3] -> float32 logits [batch, classes].
    model_dir: the model directory it was loaded from.
    name: the architecture's name ('s', 'b0', 's_digits', ...).
    num_classes: logits per image.
    size: image height and width.
    normalization: the model.json input scaling ('inception', ...).
    preprocessing: whether `fn` normalises 0-255 pixels itself.
    input_dtype: 'float32', or 'uint8' with baked preprocessing.
    batch: the fixed batch, or None for a symbolic one.
  """

  fn: Callable
  model_dir: str
  name: str
  num_classes: int
  size: int
  normalization: str
  preprocessing: bool
  input_dtype: str
  batch: int | None

  @property
  def input_shape(self) -> tuple[int | None, int, int, int]:
    return (self.batch, self.size, self.size, 3)

  def describe_input(self) -> str:
    batch = 'batch' if self.batch is None else str(self.batch)
    what = (f'pixels 0-255, normalised inside ({self.normalization})'
            if self.preprocessing else
            f'normalised images ({self.normalization})')
    return f'{self.input_dtype}[{batch}, {self.size}, {self.size}, 3], {what}'


def parse_batch(text: str | int) -> int | None:
  """`--batch`: a positive count, or 'dynamic' (None: a symbolic batch)."""
  if isinstance(text, int):
    value = text
  elif str(text).strip().lower() == DYNAMIC:
    return None
  else:
    try:
      value = int(text)
    except ValueError:
      raise ExportError(f'--batch must be a positive number or {DYNAMIC!r}, '
                        f'got {text!r}') from None
  if value < 1:
    raise ExportError(f'--batch must be a positive number or {DYNAMIC!r}, '
                      f'got {value}')
  return value


def resolve_model_dir(path: str | os.PathLike) -> str:
  """The model directory `path` names: itself, or a workdir's model/.

  Raises:
    ExportError: no such directory, a training workdir whose run has not
      exported model/ yet, or neither kind of directory.
  """
  path = os.fspath(path)
  if weights.is_model_dir(path):
    return path
  if not os.path.isdir(path):
    raise ExportError(f'--checkpoint {path}: no such directory')
  inner = os.path.join(path, MODEL_SUBDIR)
  if weights.is_model_dir(inner):
    return inner
  if _looks_like_workdir(path):
    raise ExportError(
        f'--checkpoint {path}: a training workdir without a finished '
        f'{MODEL_SUBDIR}/ (training writes it when the run ends); export a '
        'model directory instead')
  raise ExportError(
      f'--checkpoint {path}: not a model directory (no {weights.META_FILE}) '
      f'nor a training workdir with {MODEL_SUBDIR}/')


def _looks_like_workdir(path: str) -> bool:
  entries = os.listdir(path)
  return ('checkpoints' in entries or 'summary.json' in entries
          or any(e.startswith(f'.{MODEL_SUBDIR}.partial-') for e in entries))


def normalize(images, normalization: str):
  """0-255 pixels -> network input, in jnp; `predict.normalize`'s arithmetic
  (float32, the same operations in the same order)."""
  import jax.numpy as jnp

  from effnetv2_jax import predict

  x = images.astype(jnp.float32)
  if normalization == 'inception':
    return (x - np.float32(128)) / np.float32(128)
  if normalization == 'ft':
    return (x / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  if normalization == 'imagenet':
    return (x - predict.IMAGENET_MEAN) / predict.IMAGENET_STD
  raise ExportError(f'normalization must be one of {weights.NORMALIZATIONS}, '
                    f'got {normalization!r}')


def load_serving(checkpoint: str | os.PathLike, *, batch: int | None = 1,
                 size: int | None = None, preprocessing: bool = False,
                 input_dtype: str | None = None) -> ServingFunction:
  """The serving function of a model directory or finished training workdir.

  Args:
    checkpoint: a model directory, or a training workdir with model/.
    batch: fixed batch size, or None for a symbolic one.
    size: image side; default the architecture's eval size.
    preprocessing: bake the model.json normalisation in (input 0-255).
    input_dtype: 'uint8' (the default with preprocessing) or 'float32' (the
      only choice without it).

  Raises:
    ExportError: bad options or an unusable directory (a WeightsError from
      loading becomes one, same message).
  """
  from effnetv2_jax.models import families

  input_dtype = check_input_dtype(input_dtype, preprocessing)
  if size is not None and size < 1:
    raise ExportError(f'--size must be positive, got {size}')
  model_dir = resolve_model_dir(checkpoint)
  try:
    meta = weights.read_meta(model_dir)
    model = weights.load_model(model_dir, conv_impl='xla')
  except weights.WeightsError as e:
    raise ExportError(str(e).strip().splitlines()[0]) from None
  description = meta['architecture_obj']
  family = families.family_of(description)
  normalization = meta['normalization']
  fn = _logits_function(model, normalization if preprocessing else None)
  serving = ServingFunction(
      fn=fn, model_dir=os.path.abspath(model_dir),
      name=getattr(description, 'name', family.name),
      num_classes=int(meta['num_classes']),
      size=int(size or family.eval_size(description)),
      normalization=normalization, preprocessing=preprocessing,
      input_dtype=input_dtype, batch=batch)
  check_no_own_kernels(lowered_text(serving))
  return serving


def check_input_dtype(input_dtype: str | None, preprocessing: bool) -> str:
  """The input dtype an export gets; raises ExportError for a bad pairing."""
  if input_dtype is None:
    return 'uint8' if preprocessing else 'float32'
  if input_dtype not in INPUT_DTYPES:
    raise ExportError(f'--input_dtype must be one of {INPUT_DTYPES}, got '
                      f'{input_dtype!r}')
  if input_dtype == 'uint8' and not preprocessing:
    raise ExportError('--input_dtype uint8 needs --preprocessing (without it '
                      'the input is the normalised float32 tensor)')
  return input_dtype


def _logits_function(model, normalization: str | None) -> Callable:
  from flax import nnx

  graphdef, state = nnx.split(model)

  def logits(images):
    x = images if normalization is None else normalize(images, normalization)
    return nnx.merge(graphdef, state)(x, training=False)

  return logits


def input_spec(serving: ServingFunction, batch: int | None = None):
  """The ShapeDtypeStruct of the input; a symbolic batch 'b' when the export
  has none (or `batch` fixes one, e.g. for a lowering check)."""
  import jax

  batch = batch or serving.batch
  if batch is None:
    shape = jax.export.symbolic_shape(
        f'b, {serving.size}, {serving.size}, 3')
  else:
    shape = (batch, serving.size, serving.size, 3)
  return jax.ShapeDtypeStruct(shape, np.dtype(serving.input_dtype))


def lowered_text(serving: ServingFunction) -> str:
  """The StableHLO text of the serving function at batch 1."""
  import jax
  return jax.jit(serving.fn).lower(input_spec(serving, batch=1)).as_text()


def custom_call_targets(stablehlo_text: str) -> set[str]:
  """The custom-call target names a StableHLO module's text mentions."""
  return {a or b for a, b in _CUSTOM_CALL.findall(stablehlo_text)}


def check_no_own_kernels(stablehlo_text: str) -> None:
  """Raises ExportError when a program calls effnetv2_jax's CPU kernels,
  which only a process that loaded this package can run."""
  own = sorted(t for t in custom_call_targets(stablehlo_text)
               if t.startswith(OWN_KERNEL_PREFIX))
  if own:
    raise ExportError(
        f'the program calls effnetv2_jax kernels ({", ".join(own)}); exports '
        "need a model loaded with conv_impl='xla'")
