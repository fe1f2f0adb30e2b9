"""Command line: convert a timm or Keras checkpoint into a model directory.

    python -m effnetv2_jax.convert --from timm --input tf_effnetv2_s.pth \
        --variant s --output effnetv2_s
    python -m effnetv2_jax.convert --from keras \
        --input efficientnetv2-b0.weights.h5 --variant b0 --output effnetv2_b0

The output directory (model.json + an orbax checkpoint) is what
`python -m effnetv2_jax.predict --checkpoint DIR` and the trainer's
fine-tuning (`init_from`) read. A file that does not fit the variant stops
with one line naming the first mismatched tensor and both shapes; exit
status 1 for such errors, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from effnetv2_jax.models import arch as arch_lib


def _variant(text: str) -> str:
  try:
    return arch_lib.normalize_variant_name(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m effnetv2_jax.convert',
      description='Convert timm tf_efficientnetv2_* or Keras EfficientNetV2 '
                  'weights into an effnetv2_jax model directory.')
  parser.add_argument('--from', dest='framework', required=True,
                      choices=('timm', 'keras'),
                      help='which implementation wrote the file')
  parser.add_argument('--input', required=True, metavar='FILE',
                      help='timm: .pth/.pt/.bin or .safetensors; keras: '
                           '.weights.h5, .h5 or .keras')
  parser.add_argument('--variant', required=True, type=_variant,
                      metavar='NAME',
                      help=f'one of {", ".join(arch_lib.VARIANTS)}')
  parser.add_argument('--output', required=True, metavar='DIR',
                      help='model directory to write')
  parser.add_argument('--normalization',
                      choices=('inception', 'imagenet', 'ft'),
                      help='input scaling the weights expect (default: the '
                           "variant's: inception for S-XL, imagenet for "
                           'B0-B3; timm B3 in21k weights want ft)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing non-empty output directory')
  parser.add_argument('--no-ema', dest='use_ema', action='store_false',
                      help='timm training checkpoints: take state_dict, not '
                           'state_dict_ema')
  return parser


def run(args: argparse.Namespace) -> str:
  """Converts and saves; returns the summary line."""
  # Imported here so `--help` and argument errors answer at once.
  from effnetv2_jax import convert
  from effnetv2_jax.models import count_params, weights

  architecture = arch_lib.get_architecture(args.variant)
  output = os.path.abspath(args.output)
  if (os.path.isdir(output) and os.listdir(output) and not args.overwrite):
    raise weights.WeightsError(
        f'{output} exists and is not empty (pass --overwrite to replace it)')
  if args.framework == 'timm':
    model = convert.from_timm(args.input, architecture, use_ema=args.use_ema,
                              conv_impl='xla')
  else:
    if args.variant not in convert.keras.KERAS_VARIANTS:
      raise convert.ConversionError(
          f'keras.applications has no EfficientNetV2-{args.variant.upper()} '
          f'(it offers {", ".join(convert.keras.KERAS_VARIANTS)})')
    model = convert.from_keras(args.input, architecture,
                               conv_impl='xla')
  source = f'{args.framework}:{os.path.abspath(args.input)}'
  path = weights.save_model(output, model, source=source,
                            normalization=args.normalization,
                            overwrite=args.overwrite)
  normalization = args.normalization or architecture.normalization
  return (f'wrote {path}: EfficientNetV2-{args.variant.upper()}, '
          f'{model.num_classes} classes, {count_params(model):,} parameters, '
          f'normalization {normalization}, from {args.framework} '
          f'{args.input}')


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from effnetv2_jax.convert.mapping import ConversionError
  from effnetv2_jax.models.weights import WeightsError
  try:
    print(run(args))
  except (ConversionError, WeightsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
