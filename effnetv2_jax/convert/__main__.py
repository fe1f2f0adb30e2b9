"""Command line: convert a timm, Keras or official checkpoint into a model
directory.

    python -m effnetv2_jax.convert --from timm --input tf_effnetv2_s.pth \
        --variant s --output effnetv2_s
    python -m effnetv2_jax.convert --from keras \
        --input efficientnetv2-b0.weights.h5 --variant b0 --output effnetv2_b0
    python -m effnetv2_jax.convert --from official \
        --input efficientnetv2-s-21k-ft1k.tgz --output effnetv2_s_21k_ft1k

An official google/automl checkpoint is a released .tgz, the directory it
unpacks to, or a TF checkpoint prefix; its variant is read from the variable
prefix when --variant is left out, its EMA weights are taken unless
`--weights raw`, and model.json records the official evaluation
preprocessing of the release (normalization and eval size).

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
      description='Convert timm tf_efficientnetv2_*, Keras EfficientNetV2 '
                  'or official google/automl EfficientNetV2 weights into an '
                  'effnetv2_jax model directory.')
  parser.add_argument('--from', dest='framework', required=True,
                      choices=('timm', 'keras', 'official'),
                      help='which implementation wrote the file')
  parser.add_argument('--input', required=True, metavar='PATH',
                      help='timm: .pth/.pt/.bin or .safetensors; keras: '
                           '.weights.h5, .h5 or .keras; official: a released '
                           '.tgz, the directory it unpacks to, or a TF '
                           'checkpoint prefix')
  parser.add_argument('--variant', type=_variant, metavar='NAME',
                      help=f'one of {", ".join(arch_lib.VARIANTS)} (required '
                           'for timm and keras; official checkpoints name '
                           'theirs)')
  parser.add_argument('--weights', choices=('ema', 'raw'),
                      help='official and timm training checkpoints: the '
                           'exponential moving average copies (default) or '
                           'the raw trained weights')
  parser.add_argument('--output', required=True, metavar='DIR',
                      help='model directory to write')
  parser.add_argument('--normalization',
                      choices=('inception', 'imagenet', 'ft'),
                      help='input scaling the weights expect (default: the '
                           "variant's: inception for S-XL, imagenet for "
                           'B0-B3; timm B3 in21k weights want ft; official: '
                           "the release's evaluation scaling)")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing non-empty output directory')
  parser.add_argument('--no-ema', dest='use_ema', action='store_false',
                      help='timm training checkpoints: take state_dict, not '
                           'state_dict_ema (same as --weights raw)')
  return parser


def check_arguments(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> None:
  """Exits with status 2 on options that do not fit the source."""
  if args.variant is None and args.framework != 'official':
    parser.error(f'--variant is required with --from {args.framework}')
  if args.weights is not None and args.framework == 'keras':
    parser.error('--weights applies to official and timm checkpoints; Keras '
                 'weight files hold one set of weights')


def run(args: argparse.Namespace) -> str:
  """Converts and saves; returns the summary line."""
  # Imported here so `--help` and argument errors answer at once.
  from effnetv2_jax import convert
  from effnetv2_jax.models import count_params, weights

  output = os.path.abspath(args.output)
  if (os.path.isdir(output) and os.listdir(output) and not args.overwrite):
    raise weights.WeightsError(
        f'{output} exists and is not empty (pass --overwrite to replace it)')
  if args.framework == 'official':
    return _run_official(args, output)
  architecture = arch_lib.get_architecture(args.variant)
  if args.framework == 'timm':
    use_ema = args.use_ema and args.weights != 'raw'
    model = convert.from_timm(args.input, architecture, use_ema=use_ema,
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


def _run_official(args: argparse.Namespace, output: str) -> str:
  """Converts an official checkpoint; model.json gets its eval recipe."""
  from effnetv2_jax import predict
  from effnetv2_jax.convert import mapping, official
  from effnetv2_jax.models import count_params, weights

  architecture = (arch_lib.get_architecture(args.variant)
                  if args.variant else None)
  converted = official.official_variables(
      args.input, architecture, use_ema=args.weights != 'raw')
  model = converted.to_model(conv_impl='xla')
  normalization, eval_size = converted.preprocessing()
  normalization = args.normalization or normalization
  preprocessing = predict.describe_preprocessing(eval_size, normalization)
  extra = {
      # predict evaluates at this size rather than the variant's (the
      # ImageNet-21k pretraining was evaluated at 224 px).
      'eval_size': eval_size,
      'eval_preprocessing': preprocessing,
      'official': {'model_name': converted.model_name,
                   'release': converted.release,
                   'weights': 'ema' if converted.ema_tensors else 'raw',
                   'global_step': converted.global_step},
  }
  path = weights.save_model(output, model,
                            source=f'official:{os.path.abspath(args.input)}',
                            normalization=normalization, extra=extra,
                            overwrite=args.overwrite)
  which = (f'EMA weights ({converted.ema_tensors} tensors)'
           if converted.ema_tensors else 'raw weights')
  return (f'wrote {path}: {mapping.variant_label(converted.architecture)}, '
          f'{model.num_classes} classes, {count_params(model):,} parameters, '
          f'{which}, {converted.release} release, eval: {preprocessing}; '
          f'from official {args.input}')


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_arguments(parser, args)
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
