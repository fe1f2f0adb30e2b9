"""Train input-pipeline throughput, in images per second per host core.

Measures the whole per-host training pipeline (read file, decode JPEG,
Inception crop, bilinear resize, flip, RandAugment with 2 layers, mixup,
normalise, batch) on synthetic JPEGs with ImageNet-like sizes and byte
counts, for every (image size, RandAugment magnitude) pair:

    python benchmarks/input_pipeline.py            # 128/192/300/384 px x 5/10/15
    python benchmarks/input_pipeline.py --quick    # magnitude 10 only, < 1 min
    python benchmarks/input_pipeline.py --json     # one JSON object on stdout

Per core = images / CPU seconds of the whole process (all threads), which
is what a dedicated core delivers even when the machine is shared; the wall
clock rate over the threads used is reported alongside.

Reference point: a TPU v3-8 host feeding EfficientNetV2-S at the paper's
pace needs about 45 images/sec per host core. Nothing here asserts a timing;
numbers depend on the CPU and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

SIZES = (128, 192, 300, 384)
MAGNITUDES = (5.0, 10.0, 15.0)
MIXUP_ALPHA = 0.2
TARGET_PER_CORE = 45.0

# Width x height of typical ImageNet photos (most are 500 px on the long side).
_IMAGENET_LIKE_SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500),
                         (500, 500), (500, 400), (400, 300), (640, 480))


def write_synthetic_jpegs(root: str, count: int, seed: int = 0) -> float:
  """Writes `count` photo-like JPEGs into root/<class>/; returns mean KiB.

  Content is low-frequency colour structure plus fine texture, so files
  compress to roughly ImageNet's ~110 KiB rather than to noise or to flat
  colour.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(count):
    width, height = _IMAGENET_LIKE_SHAPES[i % len(_IMAGENET_LIKE_SHAPES)]
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3),
                          dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                      Image.BICUBIC),
                       dtype=np.float32)
    image += rng.normal(0.0, 18.0, image.shape)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    directory = os.path.join(root, f'class_{i % 4}')
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
    with open(os.path.join(directory, f'{i:05d}.jpg'), 'wb') as f:
      f.write(buffer.getvalue())
    total += len(buffer.getvalue())
  return total / count / 1024


def measure(root: str, *, image_size: int, magnitude: float, batch_size: int,
            batches: int, warmup: int, threads: int) -> dict:
  """Images/sec of the train pipeline at one setting, after warm-up."""
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  iterator = data.make_train_iterator(
      f'imagefolder:{root}', global_batch_size=batch_size,
      image_size=image_size, seed=0, augment='randaugment',
      randaug_magnitude=magnitude, mixup_alpha=MIXUP_ALPHA,
      normalization='inception', process_index=0, process_count=1,
      num_threads=threads)
  build_start = time.perf_counter()
  for _ in range(warmup):  # tracing, graph start-up, buffers filling
    next(iterator)
  warm_seconds = time.perf_counter() - build_start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start
  iterator.close()
  assert batch['image'].shape == (batch_size, image_size, image_size, 3)
  images = batch_size * batches
  return {'image_size': image_size, 'randaug_magnitude': magnitude,
          'mixup_alpha': MIXUP_ALPHA, 'threads': threads,
          'images_per_sec': images / seconds,
          # CPU time of all the process's threads: what one fully available
          # core does per second, even on a shared, busy machine.
          'images_per_sec_per_core': images / cpu_seconds,
          'wall_images_per_sec_per_thread': images / seconds / threads,
          'timed_images': images, 'warmup_seconds': warm_seconds}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='magnitude 10 only and fewer images (< 1 min)')
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of a table')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='tf.data worker threads = cores counted')
  parser.add_argument('--images', type=int, default=None,
                      help='synthetic JPEGs to generate (default 64 quick, '
                           '256 full)')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

  magnitudes = (10.0,) if args.quick else MAGNITUDES
  batch_size = 16 if args.quick else 32
  batches = 3 if args.quick else 8
  warmup = 2
  count = args.images or (64 if args.quick else 256)
  results = []
  with tempfile.TemporaryDirectory() as root:
    kib = write_synthetic_jpegs(root, count)
    for image_size in SIZES:
      for magnitude in magnitudes:
        results.append(measure(root, image_size=image_size,
                               magnitude=magnitude, batch_size=batch_size,
                               batches=batches, warmup=warmup,
                               threads=args.threads))
        if not args.json:
          r = results[-1]
          print(f'{image_size:>5d} px  magnitude {magnitude:>4.1f}  '
                f'{r["images_per_sec_per_core"]:7.1f} img/s/core (CPU time)  '
                f'{r["images_per_sec"]:8.1f} img/s wall on {args.threads} '
                'threads', flush=True)
  summary = {
      'benchmark': 'input_pipeline', 'quick': args.quick,
      'threads': args.threads, 'cpu': platform.processor() or platform.machine(),
      'synthetic_jpegs': count, 'mean_jpeg_kib': kib,
      'batch_size': batch_size, 'target_per_core': TARGET_PER_CORE,
      'results': results,
      'slowest_per_core': min(r['images_per_sec_per_core'] for r in results),
  }
  if args.json:
    json.dump(summary, sys.stdout, indent=1)
    print()
  else:
    print(f'{count} synthetic JPEGs, mean {kib:.0f} KiB, {args.threads} '
          f'threads; the paper-pace v3-8 host needs ~{TARGET_PER_CORE:.0f} '
          f'img/s/core; slowest setting here: '
          f'{summary["slowest_per_core"]:.1f} img/s/core')
  return 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  sys.exit(main())
