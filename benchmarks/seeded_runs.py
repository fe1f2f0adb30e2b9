"""Training runs repeated over seeds, for the ablations and comparisons whose
answer is a mean ± std of test accuracy (distill_ablation.py,
controller_comparison.py).

Each run is one `python -m effnetv2_jax.main` in its own workdir; a run whose
summary.json says 'completed' is read, not repeated, so an interrupted
comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(config_arg: str, workdir: str, seed: int,
                  overrides: Sequence[str] = ()) -> list[str]:
  """The trainer's command line for configs/<config_arg> (a path relative
  to configs/, with its ':argument')."""
  return [sys.executable, '-m', 'effnetv2_jax.main',
          f'--config={os.path.join(ROOT, "configs", config_arg)}',
          f'--config.seed={seed}', f'--workdir={workdir}',
          '--config.progress_bar=off', *overrides]


def summary_of(workdir: str) -> dict | None:
  """A completed run's summary.json, else None."""
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get('status') == 'completed' else None


def run_or_reuse(command: list[str], workdir: str, label: str) -> dict:
  """The run's summary, training it first unless it completed before."""
  summary = summary_of(workdir)
  if summary is not None:
    return summary
  start = time.time()
  print(f'{label}: training', flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'stdout.txt'), 'w', encoding='utf-8') as log:
    subprocess.run(command, check=True, cwd=ROOT, stdout=log,
                   stderr=subprocess.STDOUT)
  summary = summary_of(workdir)
  print(f'  test top-1 {summary["eval"]["top1"]:.4f} in '
        f'{time.time() - start:.0f} s', flush=True)
  return summary


def mean_std(values) -> str:
  """Percentages 'mean ± std' of fractions (std 0 for one value)."""
  values = [100 * v for v in values if v is not None]
  if not values:
    return '-'
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{statistics.mean(values):.2f} ± {std:.2f}'


def write_json(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
