r"""The feedback controller against the linear ramp, on digits, several seeds.

    python -m benchmarks.controller_comparison --settings digits digits300 \
        --seeds 0 1 2 --out /tmp/controllers

Settings: `digits` is the quickstart (1,293 train digits, 144 held out for
the stage-end evals and the controller's decisions); `digits300` trains on
300 digits and holds out the other 1,137 (`--config.data.holdout=1137`),
where a network overfits sooner. The 360 test digits are evaluated once at
the end. Each run is `python -m effnetv2_jax.main --config=configs/digits.py:
controller=<linear|feedback>` in its own workdir under --out (finished runs
are reused). Prints mean ± std of test top-1 (raw and EMA) and wall time per
(setting, controller), and each feedback run's regularisation level after
every stage with the gap it was decided on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks import seeded_runs

CONTROLLERS = ('linear', 'feedback')
SETTINGS = {'digits': (), 'digits300': ('--config.data.holdout=1137',)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--settings', nargs='+', default=list(SETTINGS),
                      choices=list(SETTINGS))
  parser.add_argument('--controllers', nargs='+', default=list(CONTROLLERS),
                      choices=list(CONTROLLERS))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--out', required=True)
  parser.add_argument('--print-commands', action='store_true')
  return parser.parse_args(argv)


def decisions_text(summary: dict) -> str:
  """'gap +0.031 -> level 0.52, ...' for a feedback run."""
  decisions = summary.get('controller', {}).get('decisions', [])
  return ', '.join(f'{d["inputs"]["gap"]:+.3f}->{d["level"]:.2f}'
                   for d in decisions)


def main(argv=None) -> int:
  args = parse_args(argv)
  results: dict[tuple[str, str], list[dict]] = {}
  for setting in args.settings:
    for controller in args.controllers:
      for seed in args.seeds:
        workdir = os.path.join(args.out, f'{setting}_{controller}_seed{seed}')
        command = seeded_runs.train_command(
            f'digits.py:controller={controller}', workdir, seed,
            SETTINGS[setting])
        if args.print_commands:
          print(' '.join(command))
          continue
        results.setdefault((setting, controller), []).append(
            seeded_runs.run_or_reuse(command, workdir,
                                     f'{setting} {controller} seed {seed}'))
  if args.print_commands:
    return 0
  print(f'{"setting":<10} {"controller":<10} {"test top-1 %":>14} '
        f'{"EMA top-1 %":>14} {"wall s":>7}  decisions (gap->level per seed)')
  rows = []
  for (setting, controller), summaries in results.items():
    row = dict(
        setting=setting, controller=controller, seeds=args.seeds,
        top1=[s['eval']['top1'] for s in summaries],
        ema_top1=[s['eval'].get('ema_top1') for s in summaries],
        wall_time_s=statistics.mean(s['wall_time_s'] for s in summaries),
        decisions=[s.get('controller', {}).get('decisions', [])
                   for s in summaries])
    rows.append(row)
    decided = ' | '.join(filter(None, map(decisions_text, summaries)))
    print(f'{setting:<10} {controller:<10} '
          f'{seeded_runs.mean_std(row["top1"]):>14} '
          f'{seeded_runs.mean_std(row["ema_top1"]):>14} '
          f'{row["wall_time_s"]:>7.0f}  {decided}')
  seeded_runs.write_json(os.path.join(args.out, 'comparison.json'), rows)
  return 0


if __name__ == '__main__':
  sys.exit(main())
