"""Exports against JAX: logits parity, file size, export time, int8 accuracy.

    python -m benchmarks.export_parity [--variant b0 s] [--model_dir DIR ...]
        [--digits_model DIR | --digits_workdir DIR] [--quick]

Part 1, per model and format (onnx, saved_model, tflite, stablehlo; float32,
the default fixed batch of 1, the model's eval size): max |logits
difference| between the export, run in its own runtime (onnxruntime, TF, the
TFLite interpreter, JAX), and the JAX model on two N(0, 1) images; the file
size; the export's wall time (conversion and writing; loading the weights
excluded; the first TF format also pays for importing TensorFlow). Without
--model_dir the weights are random: convolutions from the initialiser,
BatchNorm statistics from one training-mode pass over four N(0, 1) images at
the eval size (so activations stay O(1) instead of shrinking through the
network) and the classifier as initialised; the table gives max |logits| and
the difference relative to it.

Part 2, the digits quickstart model (configs/digits.py): top-1 on the 360
test digits of the JAX model, the float32 TFLite export and the int8 one
(full-integer, batch 1, calibrated on 200 train digits), with the file
sizes. The model comes from --digits_model (a model directory or finished
workdir), or is trained into --digits_workdir first (about 1-4 minutes on 2
cores) unless that already holds model/.

Prints markdown tables; appends nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import harness

FLOAT_FORMATS = ('onnx', 'saved_model', 'tflite', 'stablehlo')
PARITY_IMAGES = 2
STATISTICS_BATCH = 4
DIGITS_TEST = 360


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', nargs='+', default=['b0', 's'],
                      help='architectures with random weights (default b0 s)')
  parser.add_argument('--model_dir', nargs='+', default=[],
                      help='model directories to compare instead of random '
                           'weights')
  parser.add_argument('--formats', nargs='+', default=list(FLOAT_FORMATS),
                      choices=FLOAT_FORMATS)
  parser.add_argument('--digits_model', default=None,
                      help='trained digits model directory (or workdir)')
  parser.add_argument('--digits_workdir',
                      default=os.path.join(tempfile.gettempdir(),
                                           'effnetv2_digits_export'),
                      help='where to train the digits model when '
                           '--digits_model is not given')
  parser.add_argument('--calibration_steps', type=int, default=200,
                      help='int8 calibration train digits (default 200)')
  parser.add_argument('--skip_digits', action='store_true',
                      help='only the parity table')
  parser.add_argument('--quick', action='store_true',
                      help="'tiny' only, no digits part: checks the script "
                           'runs')
  args = parser.parse_args(argv)
  if args.quick:
    args.variant, args.model_dir, args.skip_digits = ['tiny'], [], True
  return args


# ----------------------------------------------------------------------------
# Part 1: parity.


def random_model_dir(variant: str, directory: str) -> str:
  """A model directory of `variant` with random weights and O(1)
  activations (see the module docstring)."""
  import jax
  from flax import nnx

  from effnetv2_jax.models import arch as arch_lib
  from effnetv2_jax.models import efficientnetv2, small, weights

  architecture = small.ARCHITECTURES.get(variant) or arch_lib.get_architecture(
      variant)
  model = efficientnetv2.create_model(architecture, 1000, rngs=0,
                                      conv_impl='xla', bn_momentum=0.0)
  size = architecture.eval_size
  images = jax.random.normal(jax.random.key(1),
                             (STATISTICS_BATCH, size, size, 3))
  nnx.jit(lambda m, x: m(x, training=True, dropout_rate=0.0,
                         drop_path_rate=0.0))(model, images)
  return weights.save_model(os.path.join(directory, variant), model,
                            source='export_parity random weights',
                            overwrite=True)


def parity_rows(model_dir: str, formats, directory: str) -> list[dict]:
  import jax

  from effnetv2_jax import export
  from effnetv2_jax.export import runtimes

  serving = export.load_serving(model_dir)
  images = np.random.default_rng(0).standard_normal(
      (PARITY_IMAGES, serving.size, serving.size, 3)).astype(np.float32)
  reference = _one_by_one(jax.jit(serving.fn), images)
  rows = []
  for format in formats:
    path = os.path.join(directory, f'{serving.name}.{format}')
    result = export.export_serving(serving, format, path)
    logits = _one_by_one(runtimes.load_runner(format, result.path), images)
    rows.append(dict(
        model=f'{serving.name} @ {serving.size}', format=format,
        max_abs_diff=float(np.abs(logits - reference).max()),
        max_abs_logit=float(np.abs(reference).max()),
        relative_diff=float(np.abs(logits - reference).max()
                            / np.abs(reference).max()),
        size_mb=result.size_bytes / 1e6, export_s=result.seconds))
    harness.eprint(f'{serving.name} {format}: max |d| '
                   f'{rows[-1]["max_abs_diff"]:.2e}, '
                   f'{rows[-1]["size_mb"]:.1f} MB, {result.seconds:.1f} s')
  return rows


# ----------------------------------------------------------------------------
# Part 2: int8 on digits.


def digits_model(args) -> str:
  if args.digits_model:
    return args.digits_model
  if not os.path.isfile(os.path.join(args.digits_workdir, 'model',
                                     'model.json')):
    harness.eprint(f'training the digits model in {args.digits_workdir}')
    subprocess.run([sys.executable, '-m', 'effnetv2_jax.main',
                    '--config=configs/digits.py',
                    f'--workdir={args.digits_workdir}'],
                   check=True, cwd=harness.REPO_ROOT)
  return args.digits_workdir


def digits_test_set(size: int, normalization: str):
  from effnetv2_jax.data import pipeline

  batches = pipeline.make_eval_iterator(
      'digits', split='test', global_batch_size=DIGITS_TEST, image_size=size,
      normalization=normalization, process_index=0, process_count=1)
  batch = next(iter(batches))
  return batch['image'], batch['label'].argmax(1)


def digits_rows(args, directory: str) -> list[dict]:
  import jax

  from effnetv2_jax import export
  from effnetv2_jax.export import runtimes

  serving = export.load_serving(digits_model(args))
  images, labels = digits_test_set(serving.size, serving.normalization)
  jax_logits = _one_by_one(jax.jit(serving.fn), images)
  rows = [dict(model='JAX float32', top1=_top1(jax_logits, labels),
               agreement=1.0, size_mb=None, export_s=None)]
  calibration = export.Calibration('digits', steps=args.calibration_steps)
  for name, quantize in (('TFLite float32', None), ('TFLite int8', 'int8')):
    path = os.path.join(directory, f'digits_{quantize or "float"}.tflite')
    result = export.export_serving(
        serving, 'tflite', path, quantize=quantize,
        calibration=calibration if quantize else None)
    logits = _one_by_one(runtimes.load_runner('tflite', result.path), images)
    rows.append(dict(model=name, top1=_top1(logits, labels),
                     agreement=float(np.mean(logits.argmax(1)
                                             == jax_logits.argmax(1))),
                     size_mb=result.size_bytes / 1e6,
                     export_s=result.seconds))
  return rows


def _one_by_one(run, images: np.ndarray) -> np.ndarray:
  """Logits of `images` from a batch-1 model."""
  return np.concatenate([np.asarray(run(image[None])) for image in images])


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(logits.argmax(1) == labels))


def main(argv=None) -> None:
  args = parse_args(argv)
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as directory:
    model_dirs = list(args.model_dir) or [
        random_model_dir(v, directory) for v in args.variant]
    parity = [row for d in model_dirs
              for row in parity_rows(d, args.formats, directory)]
    digits = [] if args.skip_digits else digits_rows(args, directory)
  print(harness.format_environment(harness.environment(os.cpu_count())))
  print()
  print(harness.markdown_table(parity, [
      ('model', 'model @ px'), ('format', 'format'),
      ('max_abs_diff', 'max abs logit diff vs JAX'),
      ('max_abs_logit', 'max abs logit'),
      ('relative_diff', 'diff / max abs logit'), ('size_mb', 'file MB'),
      ('export_s', 'export s')]))
  if digits:
    print()
    print(harness.markdown_table(
        [dict(r, top1=f'{100 * r["top1"]:.2f}%',
              agreement=f'{100 * r["agreement"]:.1f}%') for r in digits], [
            ('model', 'digits quickstart model'),
            ('top1', f'test top-1 ({DIGITS_TEST})'),
            ('agreement', 'top-1 = JAX'), ('size_mb', 'file MB'),
            ('export_s', 'export s')]))
  print(f'\n(total {time.perf_counter() - started:.0f} s)')


if __name__ == '__main__':
  main()
