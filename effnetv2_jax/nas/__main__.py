r"""The architecture search's command line.

    python -m effnetv2_jax.nas --config=configs/nas.py:digits --workdir=DIR
    python -m effnetv2_jax.nas --config=configs/nas.py:digits --workdir=DIR \
        --backend=ray [--ray_address=HOST:PORT]
    python -m effnetv2_jax.nas report --workdir=DIR [--w=-0.07 --v=-0.05] [--top_k=10]
    python -m effnetv2_jax.nas export --workdir=DIR --rank 1 --output arch.json

`search` (the default command) proposes candidates and runs each as its own
process; restarting it on the same --workdir resumes from the ledger
(trials.jsonl). `report` prints the ranked table and the search's costs and
writes pareto.png; `export` writes a ranked architecture for
`python -m effnetv2_jax.main --config.model.arch=arch.json`. Mistakes end in
one `error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

COMMANDS = ('search', 'report', 'export')
USAGE_EXIT_STATUS = 2
_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), 'configs', 'nas.py')


def _quiet() -> None:
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger('effnetv2_jax').setLevel(logging.INFO)


# ---------------------------------------------------------------- search --
# absl flags (config_flags' --config.<key> overrides), defined only for the
# search command: absl owns -v, which report/export use for the exponent.

def _search_command(argv: list[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from effnetv2_jax import cli  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      cli.CONFIG_FLAG, None, 'NAS config file with its setting, e.g. '
      'configs/nas.py:digits.', lock_config=True)
  workdir = flags.DEFINE_string('workdir', None,
                                'The search directory (ledger, trials).')
  backend = flags.DEFINE_enum(
      'backend', 'local', ['local', 'ray'], 'Where trials run: processes on '
      'this host, or Ray Tune trials (pip install ".[nas]").')
  address = flags.DEFINE_string(
      'ray_address', None, 'A running Ray cluster (ray start --head); '
      'default: a local instance for this search.')

  def main(unused_argv):
    _quiet()
    sys.exit(_search(config.value, workdir.value, backend.value,
                     address.value))

  app.run(main, argv=argv, flags_parser=functools.partial(
      cli.parse_flags, default_config=_DEFAULT_CONFIG, required=['workdir']))


def _search(config, workdir: str, backend_name: str, address) -> int:
  from effnetv2_jax.nas import local, search, settings  # pylint: disable=g-import-not-at-top
  try:
    state = search.Search(config, workdir)
    if backend_name == 'ray':
      from effnetv2_jax.nas import ray_backend  # pylint: disable=g-import-not-at-top
      backend = ray_backend.RayBackend(state, address=address)
    else:
      backend = local.LocalBackend(state)
  except (settings.SearchConfigError, local.DeviceError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return USAGE_EXIT_STATUS
  print(state.progress_line(), flush=True)
  try:
    backend.run()
  except search.ReferenceFailedError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(state.progress_line(), flush=True)
  if state.done:
    print(f'done: python -m effnetv2_jax.nas report --workdir={workdir}')
  return 0


# -------------------------------------------------------- report, export --

def _parser(command: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f'python -m effnetv2_jax.nas {command}')
  parser.add_argument('--workdir', required=True, help='the search directory')
  parser.add_argument('--w', type=float, default=None,
                      help="step-time exponent (default: the search's, "
                      '-0.07)')
  parser.add_argument('--v', type=float, default=None,
                      help="parameter exponent (default: the search's, -0.05)")
  if command == 'report':
    parser.add_argument('--top_k', type=int, default=10,
                        help='rows in the table')
  else:
    parser.add_argument('--rank', type=int, default=1,
                        help='which architecture (1 = best reward)')
    parser.add_argument('--output', default='arch.json',
                        help='the JSON file to write')
  return parser


def _report(args) -> int:
  from effnetv2_jax.nas import report  # pylint: disable=g-import-not-at-top
  config, records = report.load(args.workdir)
  w, v = report.exponents(config, args.w, args.v)
  rows = report.ranked(records, w, v)
  print(f'{len(rows)} scored candidates, reward A * S^{w:g} * P^{v:g} '
        '(S, P relative to the reference network)')
  print(report.table(rows, args.top_k))
  print(report.statistics_text(records))
  path = report.plot_pareto(rows, os.path.join(args.workdir,
                                               report.PARETO_FILE),
                            title=config.get('experiment', ''))
  print(f'wrote {path}')
  return 0


def _export(args) -> int:
  from effnetv2_jax.nas import report  # pylint: disable=g-import-not-at-top
  config, records = report.load(args.workdir)
  w, v = report.exponents(config, args.w, args.v)
  row = report.export_architecture(report.ranked(records, w, v), args.rank,
                                   args.output)
  print(f'wrote {args.output}: rank {args.rank}, trial {row.trial_id} '
        f'({row.description}), reward {row.score.reward:.4f}; train it with '
        'python -m effnetv2_jax.main --config=configs/digits.py '
        f'--config.model.arch={args.output} --workdir=...')
  return 0


def main(argv: list[str]) -> None:
  command = 'search'
  if len(argv) > 1 and not argv[1].startswith('-'):
    command = argv[1]
    if command not in COMMANDS:
      print(f'error: unknown command {command!r}; choose one of '
            f'{", ".join(COMMANDS)}', file=sys.stderr)
      sys.exit(USAGE_EXIT_STATUS)
    argv = [argv[0]] + argv[2:]
  if command == 'search':
    _search_command(argv)
    return
  args = _parser(command).parse_args(argv[1:])
  try:
    sys.exit({'report': _report, 'export': _export}[command](args))
  except ValueError as e:  # no ledger here, a bad --rank
    print(f'error: {e}', file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


if __name__ == '__main__':
  main(sys.argv)
