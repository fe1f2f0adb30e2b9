"""Command line inference: top-5 classes per image, official eval preprocessing.

    python -m effnetv2_jax.predict --checkpoint DIR [--variant NAME] \
        [--image-size N] [--save-logits FILE.npy] IMAGE_OR_NPY...

DIR is a model directory (model.json + state/, written by the converters,
the trainer's export or `weights.save_model`) or a training workdir (its
latest checkpoint, EMA weights preferred; `--variant` is then required).
Any registered model family works (`models.families`: EfficientNetV2, ViT
as 'vit-s/16' or 'vit-digits', MLP-Mixer as 'mixer-b/16', ...).
`--variant`, when given, must agree with model.json.

Preprocessing follows the official code (google/automl efficientnetv2), by the
checkpoint's normalisation (for ViT and Mixer, their description's
'inception' or 'imagenet'), at the variant's eval size:
  inception (S/M/L/XL): below 320 px, centre crop of side
      int(s / (s + 32) * min(h, w)) at ((h - c) // 2, (w - c) // 2), then
      bilinear resize; at 320 px and above the whole image is resized (aspect
      ratio not kept); then (x - 128) / 128.
  imagenet (B0-B3, `preprocess_legacy.py`): centre crop with the same side at
      (((h - c) + 1) // 2, ...), bicubic resize, then ImageNet mean/std.
  ft (fine-tuned models): whole image, bilinear, then (x / 255 - 0.5) / 0.5.
The resizes reproduce TensorFlow's exactly, without TensorFlow: bilinear is
`tf.image.resize(..., 'bilinear', antialias=False)` (half-pixel centres, edge
clamping) and bicubic is TF1's `resize_bicubic` (no half-pixel centres, Keys
a = -0.75, the 1024-entry weight table, edge clamping). Neither antialiases,
unlike PIL's own resize, which averages over the whole footprint when
shrinking and so gives visibly different inputs. Images are decoded by PIL
(EXIF orientation ignored, as TF ignores it) and converted to RGB. One
difference remains for JPEG files: PIL decodes with libjpeg's accurate
integer IDCT (TF's dct_method='INTEGER_ACCURATE'), while TF's default, and so
the official pipeline, uses the fast one; some pixels then differ by a few
levels.

An input ending in `.npy` is an already preprocessed float32 NHWC batch (a
single HWC image is also accepted): no resize, no normalisation, so logits
can be compared with other implementations on identical tensors.
Unreadable inputs are reported by name on stderr and skipped; the exit status
is then 1 (0 when every input was classified).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Iterator, Sequence

import numpy as np

NORMALIZATIONS = ('inception', 'imagenet', 'ft')
CROP_PADDING = 32
WHOLE_IMAGE_EVAL_SIZE = 320
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32) * 255
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32) * 255
# Where each family keeps its classifier: EfficientNetV2's Head module, the
# token models' bare Linear.
CLASSIFIER_KERNELS = ('head/classifier/kernel', 'head/kernel')


class InputError(ValueError):
  """One input cannot be used; the message names it."""


# ----------------------------------------------------------------------------
# Preprocessing (numpy only).


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB [H, W, 3]."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      image.load()
      rgb = image.convert('RGB')
  except Exception as e:  # PIL raises many types for a bad file
    reason = str(e).strip().splitlines()
    reason = reason[0] if reason else type(e).__name__
    raise InputError(f'{path}: unreadable image ({reason})') from None
  return np.asarray(rgb, dtype=np.uint8)


def _tf_crop_side(height: int, width: int, size: int) -> int:
  # TF multiplies a float32 ratio by a float32 side and truncates.
  ratio = np.float32(size / (size + CROP_PADDING))
  return max(int(ratio * np.float32(min(height, width))), 1)


def center_crop_window(height: int, width: int, size: int, *,
                       legacy: bool) -> tuple[int, int, int]:
  """(top, left, side) of the official eval centre crop.

  `legacy` (the B0-B3 code) rounds the offsets up instead of down.
  """
  side = _tf_crop_side(height, width, size)
  bump = 1 if legacy else 0
  return (height - side + bump) // 2, (width - side + bump) // 2, side


def _bilinear_taps(in_size: int, out_size: int):
  """Indices and weights [out, 2] of TF2 half-pixel bilinear resizing."""
  scale = np.float32(in_size) / np.float32(out_size)
  position = ((np.arange(out_size, dtype=np.float32) + np.float32(0.5))
              * scale - np.float32(0.5))
  floor = np.floor(position)
  lerp = (position - floor).astype(np.float64)
  lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
  upper = np.clip(np.ceil(position), 0, in_size - 1).astype(np.int64)
  return np.stack([lower, upper], 1), np.stack([1 - lerp, lerp], 1)


def _legacy_cubic_table(a: float = -0.75, table_size: int = 1024):
  x = np.arange(table_size + 1, dtype=np.float64) / table_size
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far_x = x + 1
  far = ((a * far_x - 5 * a) * far_x + 8 * a) * far_x - 4 * a
  return near.astype(np.float32), far.astype(np.float32)


def _legacy_bicubic_taps(in_size: int, out_size: int):
  """Indices and weights [out, 4] of TF1 `resize_bicubic` (legacy mode)."""
  table_size = 1024
  near, far = _legacy_cubic_table(table_size=table_size)
  scale = np.float32(in_size) / np.float32(out_size)
  position = np.arange(out_size, dtype=np.float32) * scale
  start = np.floor(position)
  delta = position - start
  offset = np.rint(delta * np.float32(table_size)).astype(np.int64)
  weights = np.stack([far[offset], near[offset], near[table_size - offset],
                      far[table_size - offset]], 1).astype(np.float64)
  start = start.astype(np.int64)
  indices = np.clip(start[:, None] + np.arange(-1, 3)[None], 0, in_size - 1)
  return indices, weights


def _resample(image: np.ndarray, taps_fn, out_h: int, out_w: int):
  """Separable resampling: rows then columns, float64 accumulation."""
  x = image.astype(np.float64)
  rows, row_w = taps_fn(x.shape[0], out_h)
  x = np.einsum('ot,otwc->owc', row_w, x[rows])
  cols, col_w = taps_fn(x.shape[1], out_w)
  x = np.einsum('pt,optc->opc', col_w, x[:, cols])
  return x.astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """`tf.image.resize(image, (h, w), 'bilinear', antialias=False)`."""
  return _resample(image, _bilinear_taps, height, width)


def resize_bicubic_legacy(image: np.ndarray, height: int,
                          width: int) -> np.ndarray:
  """TF1 `tf.image.resize_bicubic(image, (h, w))` (no half-pixel centres)."""
  return _resample(image, _legacy_bicubic_taps, height, width)


def normalize(image: np.ndarray, normalization: str) -> np.ndarray:
  """Float pixels in [0, 255] -> network input."""
  image = image.astype(np.float32)
  if normalization == 'inception':
    return (image - np.float32(128)) / np.float32(128)
  if normalization == 'ft':
    return (image / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  if normalization == 'imagenet':
    return (image - IMAGENET_MEAN) / IMAGENET_STD
  raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got '
                   f'{normalization!r}')


def preprocess(image: np.ndarray, size: int,
               normalization: str) -> np.ndarray:
  """The official eval preprocessing of one uint8 RGB image -> [s, s, 3]."""
  height, width = image.shape[:2]
  if normalization == 'imagenet':
    top, left, side = center_crop_window(height, width, size, legacy=True)
    crop = image[top:top + side, left:left + side]
    return normalize(resize_bicubic_legacy(crop, size, size), normalization)
  if normalization == 'inception' and size < WHOLE_IMAGE_EVAL_SIZE:
    top, left, side = center_crop_window(height, width, size, legacy=False)
    image = image[top:top + side, left:left + side]
  return normalize(resize_bilinear(image, size, size), normalization)


def describe_preprocessing(size: int, normalization: str) -> str:
  if normalization == 'imagenet':
    return (f'centre crop {size}/{size + CROP_PADDING}, bicubic to {size}, '
            'ImageNet mean/std')
  if normalization == 'inception' and size < WHOLE_IMAGE_EVAL_SIZE:
    return (f'centre crop {size}/{size + CROP_PADDING}, bilinear to {size}, '
            '(x - 128) / 128')
  scale = '(x - 128) / 128' if normalization == 'inception' else \
      '(x / 255 - 0.5) / 0.5'
  return f'whole image bilinear to {size}x{size}, {scale}'


def read_npy(path: str) -> np.ndarray:
  """A preprocessed float NHWC batch from a .npy file."""
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as e:
    reason = str(e).strip().splitlines()
    raise InputError(f'{path}: unreadable .npy file '
                     f'({reason[0] if reason else type(e).__name__})'
                     ) from None
  if array.ndim == 3:
    array = array[None]
  if array.ndim != 4 or array.shape[-1] != 3 or not np.issubdtype(
      array.dtype, np.floating):
    raise InputError(
        f'{path}: expected a preprocessed float32 NHWC batch with 3 '
        f'channels, got {array.dtype} {tuple(array.shape)}')
  return array.astype(np.float32)


# ----------------------------------------------------------------------------
# Loading.


def load_checkpoint(path: str, variant: str | None = None, *,
                    normalization: str | None = None,
                    conv_impl: str = 'auto'):
  """(model, info) from a model directory or a training workdir.

  `info` has 'normalization', 'eval_size', 'num_classes', 'name', 'source'.
  A model directory's eval size is the one model.json's extra.eval_size
  records, if any (the official ImageNet-21k checkpoints evaluate at 224),
  else the architecture's.

  Raises:
    WeightsError: missing/malformed checkpoint, or `variant` disagrees.
  """
  from effnetv2_jax.models import families
  from effnetv2_jax.models import weights

  wanted = _resolve_variant(variant) if variant else None
  recorded_size = None
  if weights.is_model_dir(path):
    meta = weights.read_meta(path)
    stored = meta['architecture_obj']
    family = families.family_of(stored)
    if wanted is not None and (family.to_dict(stored)
                               != wanted[0].to_dict(wanted[1])):
      raise weights.WeightsError(
          f'{path} holds architecture {_name(family, stored)!r} '
          f'(model.json), not {variant!r}; drop --variant or pass the '
          'matching one')
    model = weights.load_model(path, conv_impl=conv_impl)
    description = stored
    normalization = normalization or meta['normalization']
    source = meta.get('source') or path
    recorded_size = (meta.get('extra') or {}).get('eval_size')
  elif _is_workdir(path):
    if wanted is None:
      raise weights.WeightsError(
          f'{path} is a training workdir without model.json; pass --variant')
    family, description = wanted
    model = _load_workdir(path, description, conv_impl)
    normalization = normalization or family.normalization(description)
    source = f'training workdir {path}'
  else:
    raise weights.WeightsError(
        f'{path}: neither a model directory (no model.json) nor a training '
        'workdir')
  info = dict(normalization=normalization,
              eval_size=recorded_size or family.eval_size(description),
              num_classes=model.num_classes,
              name=_name(family, description), source=source)
  return model, info


def _resolve_variant(variant: str):
  """(family, description) of `--variant`, as a one-line WeightsError."""
  from effnetv2_jax.models import families
  from effnetv2_jax.models import weights
  try:
    return families.resolve(variant)
  except (TypeError, ValueError, KeyError) as e:
    raise weights.WeightsError(str(e).strip().splitlines()[0]) from None


def _name(family, description) -> str:
  return getattr(description, 'name', family.name)


def _is_workdir(path: str) -> bool:
  if not os.path.isdir(path):
    return False
  entries = os.listdir(path)
  return ('checkpoints' in entries or 'state' in entries
          or any(e.isdigit() for e in entries))


def _load_workdir(path: str, architecture, conv_impl: str):
  from effnetv2_jax.models import weights
  from effnetv2_jax.training import checkpointing
  try:
    flat_params, flat_stats, _ = checkpointing.read_pretrained(
        path, prefer_ema=True)
  except Exception as e:  # orbax raises many types for a damaged directory
    lines = str(e).strip().splitlines()
    raise weights.WeightsError(
        f'{path}: unreadable training checkpoint '
        f'({type(e).__name__}: {lines[0] if lines else ""})') from None
  kernel = _classifier_kernel(flat_params)
  if kernel is None or np.ndim(kernel) != 2:
    raise weights.WeightsError(
        f'{path}: no 2-D classifier kernel ({" or ".join(CLASSIFIER_KERNELS)})'
        ' in the checkpoint')
  return weights.model_from_variables(
      architecture, int(kernel.shape[1]), _unflatten(flat_params),
      _unflatten(flat_stats), what=path, conv_impl=conv_impl)


def _classifier_kernel(flat_params: dict):
  for name in CLASSIFIER_KERNELS:
    if name in flat_params:
      return flat_params[name]
  return None


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


# ----------------------------------------------------------------------------
# Running.


def class_name(index: int, num_classes: int) -> str:
  if num_classes == 1000:
    from effnetv2_jax.imagenet_classes import IMAGENET_CLASSES
    return f'{IMAGENET_CLASSES[index]} ({index})'
  return f'class {index}'


def top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
  """(class, probability) of the k largest softmax probabilities."""
  shifted = logits.astype(np.float64) - logits.max()
  probs = np.exp(shifted) / np.exp(shifted).sum()
  order = np.argsort(-probs, kind='stable')[:k]
  return [(int(i), float(probs[i])) for i in order]


def _inputs(paths: Sequence[str], size: int, normalization: str
            ) -> Iterator[tuple[str, np.ndarray] | InputError]:
  """(label, [H, W, 3] float32) per example, or the error of a bad input."""
  for path in paths:
    try:
      if path.endswith('.npy'):
        batch = read_npy(path)
        for i, example in enumerate(batch):
          yield f'{path}[{i}]', example
      else:
        yield path, preprocess(read_image(path), size, normalization)
    except InputError as e:
      yield e


@functools.lru_cache(maxsize=4)
def _forward(graphdef):
  """The jitted eval forward of a model graph (shared by equal graphs)."""
  import jax
  from flax import nnx
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x,
                                                             training=False))


def _batched_logits(model, examples: list[np.ndarray], batch_size: int):
  """Logits of equally shaped examples, in fixed-size (padded) batches."""
  from flax import nnx

  graphdef, state = nnx.split(model)
  forward = _forward(graphdef)
  out = []
  for start in range(0, len(examples), batch_size):
    chunk = np.stack(examples[start:start + batch_size])
    count = len(chunk)
    if count < batch_size:  # pad: one compiled shape for every batch
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - count,) + chunk.shape[1:],
                           np.float32)])
    out.append(np.asarray(forward(state, chunk))[:count])
  return np.concatenate(out)


def predict(model, paths: Sequence[str], *, size: int, normalization: str,
            batch_size: int = 8, on_error=None):
  """(labels, logits [N, classes]) for the readable inputs, in input order.

  `on_error(InputError)` is called for each unreadable input.
  """
  labels, examples = [], []
  for item in _inputs(paths, size, normalization):
    if isinstance(item, InputError):
      if on_error is not None:
        on_error(item)
      continue
    labels.append(item[0])
    examples.append(item[1])
  if not examples:
    return [], np.zeros((0, model.num_classes), np.float32)
  # Examples of one shape share a compiled forward; keep the input order.
  logits = np.zeros((len(examples), model.num_classes), np.float32)
  shapes: dict[tuple, list[int]] = {}
  for i, example in enumerate(examples):
    shapes.setdefault(example.shape, []).append(i)
  for indices in shapes.values():
    rows = _batched_logits(model, [examples[i] for i in indices],
                           min(batch_size, len(indices)))
    logits[indices] = rows
  return labels, logits


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m effnetv2_jax.predict',
      description='Top-k classes of images with a model directory or a '
      'training checkpoint (EfficientNetV2, ViT, MLP-Mixer, ...).')
  parser.add_argument('inputs', nargs='+', metavar='IMAGE',
                      help='image files, or .npy preprocessed NHWC batches')
  parser.add_argument('--checkpoint', required=True, metavar='DIR',
                      help='model directory or training workdir')
  parser.add_argument('--variant', metavar='NAME',
                      help='expected variant of any family, e.g. s, b0, '
                           'vit-digits, mixer-b/16 (checked against '
                           'model.json; required for a training workdir)')
  parser.add_argument('--image-size', type=int, metavar='N',
                      help='eval size (default: the variant\'s eval size)')
  parser.add_argument('--normalization', choices=NORMALIZATIONS,
                      help='override the checkpoint\'s input scaling')
  parser.add_argument('--top-k', type=int, default=5, metavar='K')
  parser.add_argument('--batch-size', type=int, default=8, metavar='B')
  parser.add_argument('--save-logits', metavar='FILE.npy',
                      help='save the logits [N, classes] (rows in the '
                           'printed order)')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from effnetv2_jax.models.weights import WeightsError

  if args.variant:
    try:
      _resolve_variant(args.variant)
    except WeightsError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  if args.image_size is not None and args.image_size < 1:
    print('error: --image-size must be positive', file=sys.stderr)
    return 2
  if args.save_logits:
    folder = os.path.dirname(os.path.abspath(args.save_logits))
    if not args.save_logits.endswith('.npy') or not os.path.isdir(folder):
      print('error: --save-logits needs a .npy file name in an existing '
            'directory', file=sys.stderr)
      return 2
  try:
    model, info = load_checkpoint(args.checkpoint, args.variant,
                                  normalization=args.normalization)
  except WeightsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  size = args.image_size or info['eval_size']
  normalization = info['normalization']
  print(f'{info["name"]} ({info["num_classes"]} classes) from '
        f'{args.checkpoint}; images: '
        f'{describe_preprocessing(size, normalization)}', file=sys.stderr)

  failures = []

  def report(error: InputError):
    failures.append(error)
    print(f'skipping {error}', file=sys.stderr)

  labels, logits = predict(model, args.inputs, size=size,
                           normalization=normalization,
                           batch_size=max(1, args.batch_size),
                           on_error=report)
  for label, row in zip(labels, logits):
    print(label)
    for rank, (index, prob) in enumerate(top_k(row, args.top_k), 1):
      print(f'  {rank}. {prob:7.2%}  {class_name(index, info["num_classes"])}')
  if args.save_logits:
    np.save(args.save_logits, logits)
    print(f'saved logits {logits.shape} to {args.save_logits}',
          file=sys.stderr)
  if not labels:
    print('error: no input could be classified', file=sys.stderr)
    return 1
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
