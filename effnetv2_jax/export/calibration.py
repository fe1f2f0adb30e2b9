"""Calibration images for post-training int8 quantization.

The TFLite converter runs the float model on a representative dataset to
pick each tensor's int8 range. The images come from our eval pipeline
(`data.make_eval_iterator`: its resize and crop, at the export size, in the
model's normalisation) on the dataset's train split, so the test split stays
unseen. With baked preprocessing the export's input is pixels, so the
pipeline's normalisation is undone to give 0-255 values in the input dtype.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from effnetv2_jax.export.serving import ExportError, ServingFunction

CALIBRATION_BATCH = 32  # images read per pipeline batch


def check_source(name: str) -> str:
  """The train split of a `--calibration` name (digits, a tfds name,
  imagefolder:<root>); raises ExportError for an unknown one."""
  from effnetv2_jax.data import sources
  try:
    return sources.default_splits(name)[0]
  except ValueError as e:
    raise ExportError(f'--calibration: {str(e).strip().splitlines()[0]}'
                      ) from None


def denormalize(images: np.ndarray, normalization: str) -> np.ndarray:
  """Network input -> 0-255 float pixels (the inverse of `normalize`)."""
  from effnetv2_jax import predict

  images = images.astype(np.float32)
  if normalization == 'inception':
    return images * np.float32(128) + np.float32(128)
  if normalization == 'ft':
    return (images * np.float32(0.5) + np.float32(0.5)) * np.float32(255)
  if normalization == 'imagenet':
    return images * predict.IMAGENET_STD + predict.IMAGENET_MEAN
  raise ExportError(f'unknown normalization {normalization!r}')


def as_input(images: np.ndarray, serving: ServingFunction) -> np.ndarray:
  """Pipeline images (normalised) in the form the export takes."""
  if not serving.preprocessing:
    return images.astype(np.float32)
  pixels = denormalize(images, serving.normalization)
  if serving.input_dtype == 'uint8':
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
  return pixels


def calibration_images(name: str, serving: ServingFunction, *,
                       count: int, split: str | None = None,
                       data_dir: str | None = None) -> np.ndarray:
  """Up to `count` train images of `name`, as the export's input [n, s, s, 3].

  Fewer when the split is smaller.
  """
  from effnetv2_jax.data import pipeline

  split = split or check_source(name)
  batches = pipeline.make_eval_iterator(
      name, data_dir=data_dir, split=split,
      global_batch_size=min(CALIBRATION_BATCH, count),
      image_size=serving.size, normalization=serving.normalization,
      process_index=0, process_count=1)
  images, have = [], 0
  for batch in batches:
    real = batch['image'][np.asarray(batch['mask']) > 0]
    images.append(real[:count - have])
    have += len(images[-1])
    if have >= count:
      break
  if not have:
    raise ExportError(f'--calibration {name}: split {split!r} has no images')
  return as_input(np.concatenate(images), serving)


def representative_batches(images: np.ndarray, batch: int
                           ) -> Iterator[list[np.ndarray]]:
  """The TFLite converter's representative dataset: [input] per step, in
  batches of the export's fixed size (the last partial batch dropped, or
  the only one repeated up to size)."""
  if len(images) < batch:
    images = np.resize(images, (batch,) + images.shape[1:])
  for start in range(0, len(images) - batch + 1, batch):
    yield [images[start:start + batch]]
