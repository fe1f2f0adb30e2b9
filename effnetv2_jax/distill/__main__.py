r"""Chooses a run's second extractor under memory, MAC and accuracy budgets.

    python -m effnetv2_jax.distill --config=configs/distill.py:digits \
        --config.distill.budget.min_accuracy=0.9 --workdir=DIR

Prints each candidate's measured costs, the short trials' holdout top-1,
the table with the chosen extractor marked, why, and the training command
with `--config.distill.extractor=<chosen>` (see `distill.determine`).
Mistakes end in one `error:` line, exit status 2; a restart on the same
--workdir reuses the finished trials.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), 'configs', 'distill.py')


def _config_argument(argv) -> str | None:
  for arg in argv:
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def main(argv) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from effnetv2_jax import cli  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      cli.CONFIG_FLAG, None, 'The run\'s config with its setting, e.g. '
      'configs/distill.py:digits.', lock_config=True)
  workdir = flags.DEFINE_string(
      'workdir', None, 'The determination directory (costs, trials, '
      'determination.json).')

  def run(unused_argv):
    from effnetv2_jax.distill import determine  # pylint: disable=g-import-not-at-top
    logging.getLogger().setLevel(logging.WARNING)
    try:
      determination = determine.Determination(config.value, workdir.value)
      determination.run(_config_argument(argv))
    except determine.DetermineError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(cli.USAGE_EXIT_STATUS)

  app.run(run, argv=argv, flags_parser=functools.partial(
      cli.parse_flags, default_config=_DEFAULT_CONFIG, required=['workdir']))


if __name__ == '__main__':
  main(sys.argv)
