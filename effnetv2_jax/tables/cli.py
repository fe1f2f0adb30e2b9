"""`python -m effnetv2_jax.tables <table>`: the command line of the tables."""

from __future__ import annotations

import argparse
import json
import os
import sys

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.tables import accuracy
from effnetv2_jax.tables import checkout
from effnetv2_jax.tables import fused
from effnetv2_jax.tables import params
from effnetv2_jax.tables import progressive
from effnetv2_jax.tables import registry
from effnetv2_jax.tables import speed
from effnetv2_jax.training import recipes


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive int, got {text}')
  return value


def _parser() -> argparse.ArgumentParser:
  output = argparse.ArgumentParser(add_help=False)
  group = output.add_mutually_exclusive_group()
  group.add_argument('--json', action='store_true', help='print JSON rows')
  group.add_argument('--markdown', action='store_true',
                     help='print a markdown table (for the README)')
  parser = argparse.ArgumentParser(
      prog='python -m effnetv2_jax.tables',
      description='The paper\'s tables beside ours, computed from this code '
                  'on the present device.')
  sub = parser.add_subparsers(dest='table', required=True, metavar='TABLE')

  p = sub.add_parser('params', parents=[output],
                     help='Table 7: params and FLOPs per variant')
  p.add_argument('--no-xla', dest='xla', action='store_false',
                 help="skip XLA's count (no compilation)")
  p.add_argument('--variant', action='append',
                 help='restrict to these variants (repeatable)')

  p = sub.add_parser('fused', parents=[output],
                     help='Table 3: B4 with Fused-MBConv stages')
  p.add_argument('--no-throughput', dest='throughput', action='store_false',
                 help='skip the timed train steps (no compilation)')
  _add_step_options(p, batch='4 on a CPU, else 32',
                    size='128 on a CPU, else 380')

  p = sub.add_parser('progressive', parents=[output],
                     help="Table 6: progressive settings as our configs "
                          'plan them')
  p.add_argument('--variant', action='append',
                 help='restrict to these variants (repeatable)')
  p.add_argument('--preset', action='append', choices=recipes.PRESETS,
                 help='restrict to these presets (repeatable)')

  p = sub.add_parser('speed', parents=[output],
                     help='training images/s per variant on this device')
  p.add_argument('--variants', nargs='+', default=None,
                 help='variants (default: b0 on a CPU, all elsewhere); '
                      'also micro, tiny, digits for quick checks')
  _add_step_options(p, batch='2 on a CPU, else 32',
                    size="each variant's train size")

  for name, what in (('imagenet', 'Table 7: ImageNet top-1, recipes and '
                      'commands'),
                     ('transfer', 'Table 8: transfer top-1, recipes and '
                      'commands')):
    p = sub.add_parser(name, parents=[output], help=what)
    p.add_argument('--registry', default=str(registry.DEFAULT_PATH),
                   help='the results registry (JSON; default %(default)s)')
    p.add_argument('--preset', action='append', choices=recipes.PRESETS,
                   help='restrict to these presets (repeatable)')

  p = sub.add_parser('record', help="add a finished run's top-1 to the "
                                    'results registry')
  p.add_argument('workdir', help='the run\'s workdir (holds summary.json)')
  p.add_argument('--registry', default=str(registry.DEFAULT_PATH),
                 help='the results registry (JSON; default %(default)s)')
  p.add_argument('--note', default='', help='kept with the entry')
  return parser


def _add_step_options(p: argparse.ArgumentParser, *, batch: str,
                      size: str) -> None:
  p.add_argument('--batch', type=_positive, default=None,
                 help=f'train batch size (default {batch})')
  p.add_argument('--size', type=_positive, default=None,
                 help=f'image size in px (default {size})')
  p.add_argument('--steps', type=_positive, default=3,
                 help='timed samples after warm-up (default %(default)s)')


def _variants(parser, names):
  try:
    return [arch_lib.normalize_variant_name(v)
            for v in (names or arch_lib.VARIANTS)]
  except ValueError as e:
    parser.error(str(e))


def _shown(path: str) -> str:
  """A registry path as the notes print it: relative to the checkout."""
  absolute = os.path.abspath(path)
  if absolute.startswith(str(checkout.ROOT) + os.sep):
    return os.path.relpath(absolute, checkout.ROOT)
  return path


def _record(args) -> int:
  try:
    experiment, entry = registry.record(args.workdir, path=args.registry,
                                        note=args.note)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'recorded {experiment}: top-1 {entry["top1"]:.2f}% '
        f'({entry["weights"]}) in {_shown(args.registry)}')
  return 0


def _build(parser, args):
  """The table a parsed command line asks for."""
  presets = args.preset if 'preset' in args and args.preset else (
      recipes.PRESETS)
  if args.table == 'fused':
    return fused.table(fused.rows(throughput=args.throughput,
                                  batch=args.batch, size=args.size,
                                  steps=args.steps))
  if args.table == 'progressive':
    return progressive.table(progressive.rows(
        _variants(parser, args.variant), presets))
  if args.table == 'speed':
    names = [n for item in (args.variants or speed.default_variants())
             for n in item.split(',') if n]
    try:
      architectures = [speed.architecture_for(n).name for n in names]
    except ValueError as e:
      parser.error(str(e))
    return speed.table(speed.rows(architectures,
                                  batch=args.batch or speed.default_batch(),
                                  size=args.size, steps=args.steps))
  try:
    runs = registry.load(args.registry)
  except (OSError, ValueError) as e:
    parser.error(f'--registry: {e}')
  if args.table == 'imagenet':
    return accuracy.imagenet_table(accuracy.imagenet_rows(runs, presets),
                                   _shown(args.registry))
  return accuracy.transfer_table(accuracy.transfer_rows(runs, presets),
                                 _shown(args.registry))


def _print_params(parser, args) -> None:
  rows = params.params_table(_variants(parser, args.variant),
                             with_xla=args.xla)
  if args.json:
    print(json.dumps(rows, indent=1))
  elif args.markdown:
    print(params.format_params_markdown(rows))
  else:
    print(params.format_params_table(rows))


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.table == 'record':
    return _record(args)
  if args.table == 'params':
    _print_params(parser, args)
    return 0
  table = _build(parser, args)
  if args.json:
    print(table.json())
  elif args.markdown:
    print(table.markdown())
  else:
    print(table.text())
  return 0
