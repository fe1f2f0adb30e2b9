r"""Does the search's short-trial reward rank full training correctly?

Takes a finished search, retrains its top-k and bottom-k candidates by reward
with the full recipe of a trainer config (by default the digits quickstart's:
30 epochs, 16 -> 32 px, evaluated on the test split), several seeds each, and
reports Spearman's rank correlations, with a scatter plot: the search's
reward against the full-training reward (the same S and P with the
full-training test top-1: what the search means to predict), against the
full-training top-1 alone, and the short trial's holdout top-1 against the
full-training top-1.

    python -m benchmarks.nas_ranking --workdir=/tmp/nas_digits \
        --top 3 --bottom 3 --seeds 0 1

Each retraining is `python -m effnetv2_jax.main --config=<config>
--config.model.arch=<exported arch.json> --config.seed=<seed>` in its own
workdir under WORKDIR/ranking/; one that finished is not run again, so the
command resumes. --print-commands lists them without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from effnetv2_jax.nas import report
from effnetv2_jax.nas import reward as reward_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished search')
  parser.add_argument('--top', type=int, default=3)
  parser.add_argument('--bottom', type=int, default=3)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs',
                                                       'digits.py'),
                      help='the full training recipe')
  parser.add_argument('--print-commands', action='store_true')
  return parser.parse_args(argv)


def selected(rows, top: int, bottom: int):
  """(rank, row) of the top and bottom candidates, best first, no repeats."""
  ranks = list(range(1, min(top, len(rows)) + 1))
  ranks += [r for r in range(max(1, len(rows) - bottom + 1), len(rows) + 1)
            if r not in ranks]
  return [(r, rows[r - 1]) for r in ranks]


def commands(args, picks):
  out_dir = os.path.join(args.workdir, 'ranking')
  for rank, row in picks:
    arch_path = os.path.join(out_dir, f'rank{rank:02d}.json')
    for seed in args.seeds:
      workdir = os.path.join(out_dir, f'rank{rank:02d}_seed{seed}')
      yield rank, row, seed, arch_path, workdir, [
          sys.executable, '-m', 'effnetv2_jax.main', f'--config={args.config}',
          f'--config.model.arch={arch_path}', f'--config.seed={seed}',
          f'--workdir={workdir}']


def finished_top1(workdir: str):
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if summary.get('status') != 'completed':
    return None
  return summary['eval']['top1']


def plot(points, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  for p in points:
    ax.errorbar(p['reward'], 100 * p['full_top1_mean'],
                yerr=100 * p['full_top1_spread'] / 2, fmt='o', capsize=3)
    ax.annotate(f'#{p["rank"]}', (p['reward'], 100 * p['full_top1_mean']),
                textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax.set_xlabel('search reward (short trial, holdout)')
  ax.set_ylabel('full training test top-1 (%), mean over seeds')
  ax.set_title('short-trial reward against full training')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  config, records = report.load(args.workdir)
  w, v = report.exponents(config, None, None)
  picks = selected(report.ranked(records, w, v), args.top, args.bottom)
  if len(picks) < 2:
    print('error: need at least 2 scored candidates', file=sys.stderr)
    return 2
  out_dir = os.path.join(args.workdir, 'ranking')
  os.makedirs(out_dir, exist_ok=True)
  results: dict[int, list[float]] = {}
  for rank, row, seed, arch_path, workdir, command in commands(args, picks):
    if args.print_commands:
      print(' '.join(command))
      continue
    if not os.path.exists(arch_path):
      report.export_architecture([row], 1, arch_path)
    top1 = finished_top1(workdir)
    if top1 is None:
      start = time.time()
      print(f'rank {rank} (trial {row.trial_id}) seed {seed}: training',
            flush=True)
      subprocess.run(command, check=True, cwd=ROOT,
                     stdout=subprocess.DEVNULL)
      top1 = finished_top1(workdir)
      print(f'  test top-1 {top1:.4f} in {time.time() - start:.0f} s',
            flush=True)
    results.setdefault(rank, []).append(top1)
  if args.print_commands:
    return 0
  points = []
  for rank, row in picks:
    full = results[rank]
    mean = statistics.mean(full)
    points.append(dict(
        rank=rank, trial_id=row.trial_id, description=row.description,
        reward=row.score.reward, proxy_top1=row.accuracy,
        step_time_ratio=row.score.step_time_ratio,
        params_ratio=row.score.params_ratio, full_top1=full,
        full_top1_mean=mean, full_top1_spread=max(full) - min(full),
        # The same S and P (they do not depend on training) with the
        # full-training accuracy: what the search was trying to predict.
        full_reward=reward_lib.reward(mean, row.score.step_time_ratio,
                                      row.score.params_ratio, w=w, v=v)))
  column = lambda key: [p[key] for p in points]
  rho = dict(
      reward_vs_full_reward=report.spearman(column('reward'),
                                            column('full_reward')),
      reward_vs_full_top1=report.spearman(column('reward'),
                                          column('full_top1_mean')),
      proxy_top1_vs_full_top1=report.spearman(column('proxy_top1'),
                                              column('full_top1_mean')))
  print(f'{"rank":>4} {"trial":>5} {"reward":>7} {"proxy A":>8} '
        f'{"S":>6} {"P":>6} {"full top-1 % (seeds)":>22} {"full reward":>11}')
  for p in points:
    seeds = ' '.join(f'{100 * t:.2f}' for t in p['full_top1'])
    print(f'{p["rank"]:>4} {p["trial_id"]:>5} {p["reward"]:>7.4f} '
          f'{p["proxy_top1"]:>8.4f} {p["step_time_ratio"]:>6.3f} '
          f'{p["params_ratio"]:>6.3f} {seeds:>22} {p["full_reward"]:>11.4f}')
  print(f'Spearman over {len(points)} architectures x {len(args.seeds)} '
        'seeds: ' + ', '.join(f'{k} {v:.3f}' for k, v in rho.items()))
  with open(os.path.join(out_dir, 'ranking.json'), 'w',
            encoding='utf-8') as f:
    json.dump(dict(points=points, spearman=rho, seeds=args.seeds), f,
              indent=1)
  plot(points, os.path.join(out_dir, 'ranking.png'))
  print(f'wrote {out_dir}/ranking.json and ranking.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
