"""`python -m effnetv2_jax.export`: a model directory to a deployable file.

    python -m effnetv2_jax.export --checkpoint DIR \
        --format {onnx,saved_model,tflite,stablehlo} --output PATH \
        [--batch N|dynamic] [--size S] [--preprocessing [--input_dtype T]] \
        [--quantize int8 --calibration NAME [--calibration_steps K]] \
        [--platforms cpu,cuda,tpu]

Prints one line naming the file, its size and its input. A mistake on the
command line or an unusable DIR is one line `error: ...` on stderr and exit
status 2; a converter failure is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from effnetv2_jax import export
from effnetv2_jax.export.serving import ConversionError, ExportError

USAGE_EXIT_STATUS = 2


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are one `error:` line, not usage + error."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='python -m effnetv2_jax.export',
      description='Export a model directory as ONNX, a TF SavedModel, '
      'TFLite (float32 or int8) or serialized StableHLO.')
  parser.add_argument('--checkpoint', required=True, metavar='DIR',
                      help='model directory (model.json + state/), or a '
                           'training workdir with a finished model/')
  parser.add_argument('--format', required=True, metavar='FORMAT',
                      help=f'one of {", ".join(export.FORMATS)}')
  parser.add_argument('--output', required=True, metavar='PATH',
                      help='file to write (a directory for saved_model)')
  parser.add_argument('--batch', default='1', metavar='N|dynamic',
                      help='fixed batch size (default 1), or "dynamic" for '
                           'a symbolic batch (not with --quantize)')
  parser.add_argument('--size', type=int, metavar='S',
                      help="image side (default: the model's eval size)")
  parser.add_argument('--preprocessing', action='store_true',
                      help='bake the model.json normalisation in: the input '
                           'is 0-255 pixels')
  parser.add_argument('--input_dtype', choices=('uint8', 'float32'),
                      help='with --preprocessing: the pixels\' dtype '
                           '(default uint8)')
  parser.add_argument('--quantize', metavar='int8',
                      help='tflite only: post-training full-integer '
                           'quantization')
  parser.add_argument('--calibration', metavar='NAME',
                      help='calibration images for --quantize: digits, a '
                           'tfds name or imagefolder:<root> (train split)')
  parser.add_argument('--calibration_steps', type=int,
                      default=export.DEFAULT_CALIBRATION_STEPS, metavar='K',
                      help='calibration batches of --batch images '
                           f'(default {export.DEFAULT_CALIBRATION_STEPS})')
  parser.add_argument('--calibration_split', metavar='SPLIT',
                      help='split to calibrate on (default: the train split)')
  parser.add_argument('--data_dir', metavar='DIR',
                      help='tfds data_dir of --calibration')
  parser.add_argument('--platforms', default=','.join(export.DEFAULT_PLATFORMS),
                      metavar='LIST',
                      help='saved_model and stablehlo: platforms to lower '
                           'for (default %(default)s)')
  return parser


def _file_size(size_bytes: int) -> str:
  if size_bytes < 1e6:
    return f'{size_bytes / 1e3:.0f} kB'
  return f'{size_bytes / 1e6:.1f} MB'


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  calibration = None
  if args.calibration is not None:
    calibration = export.Calibration(
        source=args.calibration, steps=args.calibration_steps,
        split=args.calibration_split, data_dir=args.data_dir)
  try:
    result = export.export_model(
        args.checkpoint, args.format, args.output, batch=args.batch,
        size=args.size, preprocessing=args.preprocessing,
        input_dtype=args.input_dtype, quantize=args.quantize,
        calibration=calibration, platforms=args.platforms.split(','))
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return USAGE_EXIT_STATUS
  serving = result.serving
  quantized = ' int8' if args.quantize else ''
  print(f'wrote {result.format}{quantized} {result.path} '
        f'({_file_size(result.size_bytes)}, {result.seconds:.1f} s): '
        f'{serving.name}, input {serving.describe_input()} -> logits '
        f'[{"batch" if serving.batch is None else serving.batch}, '
        f'{serving.num_classes}]')
  return 0


if __name__ == '__main__':
  sys.exit(main())
