r"""Self-distillation against its ablations, on digits: plain training, the
stacked extractor, and label heads on the same tap, several seeds each.

    python -m benchmarks.distill_ablation --settings digits vit_digits \
        --seeds 0 1 2 --out /tmp/distill_ablation

Each run is `python -m effnetv2_jax.main --config=configs/distill.py:
<setting>,<mode> --config.seed=<seed>` in its own workdir under --out (the
holdout for stage-end evals, the test split once at the end); a finished
run is not repeated. Prints mean ± std of the test top-1 (raw and EMA), the
run's wall time and mean step time per (setting, mode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks import seeded_runs

MODES = ('plain', 'stacked', 'label_heads')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--settings', nargs='+', default=['digits'])
  parser.add_argument('--modes', nargs='+', default=list(MODES))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--out', required=True)
  parser.add_argument('--print-commands', action='store_true')
  return parser.parse_args(argv)


def command(setting: str, mode: str, seed: int, workdir: str) -> list[str]:
  return seeded_runs.train_command(f'distill.py:{setting},{mode}', workdir,
                                   seed)


def main(argv=None) -> int:
  args = parse_args(argv)
  results: dict[tuple[str, str], list[dict]] = {}
  for setting in args.settings:
    for mode in args.modes:
      for seed in args.seeds:
        workdir = os.path.join(args.out, f'{setting}_{mode}_seed{seed}')
        argv_ = command(setting, mode, seed, workdir)
        if args.print_commands:
          print(' '.join(argv_))
          continue
        summary = seeded_runs.run_or_reuse(argv_, workdir,
                                           f'{setting} {mode} seed {seed}')
        results.setdefault((setting, mode), []).append(summary)
  if args.print_commands:
    return 0
  print(f'{"setting":<13} {"mode":<12} {"test top-1 %":>14} '
        f'{"EMA top-1 %":>14} {"wall s":>7} {"step ms":>8} {"params":>9}')
  rows = []
  for (setting, mode), summaries in results.items():
    row = dict(
        setting=setting, mode=mode, seeds=args.seeds,
        top1=[s['eval']['top1'] for s in summaries],
        ema_top1=[s['eval'].get('ema_top1') for s in summaries],
        wall_time_s=statistics.mean(s['wall_time_s'] for s in summaries),
        step_time_s=statistics.mean(s['mean_step_time_s']
                                    for s in summaries),
        num_params=summaries[0]['num_params'])
    rows.append(row)
    print(f'{setting:<13} {mode:<12} '
          f'{seeded_runs.mean_std(row["top1"]):>14} '
          f'{seeded_runs.mean_std(row["ema_top1"]):>14} '
          f'{row["wall_time_s"]:>7.0f} '
          f'{1000 * row["step_time_s"]:>8.1f} {row["num_params"]:>9,}')
  seeded_runs.write_json(os.path.join(args.out, 'ablation.json'), rows)
  return 0


if __name__ == '__main__':
  sys.exit(main())
