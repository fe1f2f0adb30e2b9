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
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  return [sys.executable, '-m', 'effnetv2_jax.main',
          f'--config={os.path.join(ROOT, "configs", "distill.py")}:'
          f'{setting},{mode}', f'--config.seed={seed}',
          f'--workdir={workdir}', '--config.progress_bar=off']


def summary_of(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get('status') == 'completed' else None


def mean_std(values) -> str:
  values = [100 * v for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{statistics.mean(values):.2f} ± {std:.2f}'


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
        summary = summary_of(workdir)
        if summary is None:
          start = time.time()
          print(f'{setting} {mode} seed {seed}: training', flush=True)
          subprocess.run(argv_, check=True, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
          summary = summary_of(workdir)
          print(f'  test top-1 {summary["eval"]["top1"]:.4f} in '
                f'{time.time() - start:.0f} s', flush=True)
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
    print(f'{setting:<13} {mode:<12} {mean_std(row["top1"]):>14} '
          f'{mean_std(row["ema_top1"]):>14} {row["wall_time_s"]:>7.0f} '
          f'{1000 * row["step_time_s"]:>8.1f} {row["num_params"]:>9,}')
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'ablation.json'), 'w',
            encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
