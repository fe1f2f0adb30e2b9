"""The results registry: the runs of this repository's recipes that finished.

The `imagenet` and `transfer` tables print a row's accuracy from here when
its run was recorded, and "not yet run here" otherwise. The registry is a
JSON file, by default `results.json` beside this module:

    {
      "schema": 1,
      "runs": {
        "<experiment>": {        # the config's `experiment`, e.g.
                                 # "imagenet_s_paper" or
                                 # "transfer_cifar10_s_paper"
          "top1": 83.12,         # final top-1 in %, on the config's eval split
          "weights": "ema",      # "ema" (the EMA copy) or "raw"
          "eval_image_size": 384,
          "steps": 107336,       # the run's final step
          "hardware": "tpu, 32 devices",
          "date": "2025-06-01",  # when summary.json was written (UTC)
          "workdir": "gs://bucket/effnetv2/imagenet_s_paper",
          "note": ""             # optional: anything a reader should know
        }
      }
    }

`python -m effnetv2_jax.tables record WORKDIR` adds a finished run from its
summary.json (the EMA top-1 where the run kept an EMA, else the raw one);
a second record of the same experiment replaces the first.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

SCHEMA = 1
DEFAULT_PATH = Path(__file__).resolve().with_name('results.json')
FIELDS = ('top1', 'weights', 'eval_image_size', 'steps', 'hardware', 'date',
          'workdir', 'note')


def load(path: str | os.PathLike = DEFAULT_PATH) -> dict[str, dict]:
  """experiment -> its recorded run."""
  with open(path) as f:
    data = json.load(f)
  if data.get('schema') != SCHEMA:
    raise ValueError(f'{path}: schema {data.get("schema")!r}; this code '
                     f'reads schema {SCHEMA}')
  for experiment, run in data['runs'].items():
    if not isinstance(run.get('top1'), (int, float)):
      raise ValueError(f'{path}: run {experiment!r} has no numeric top1')
  return data['runs']


def entry_from_summary(summary: dict[str, Any], *, workdir: str,
                       date: str, note: str = '') -> dict[str, Any]:
  """The registry entry of a finished run's summary.json.

  Raises:
    ValueError: the run did not complete, or its summary has no top-1.
  """
  if summary.get('status') != 'completed':
    raise ValueError(f'{workdir}: the run is {summary.get("status")!r}, not '
                     "'completed'; only finished runs are recorded")
  final = summary.get('eval') or {}
  weights = 'ema' if 'ema_top1' in final else 'raw'
  top1 = final.get('ema_top1', final.get('top1'))
  if top1 is None:
    raise ValueError(f'{workdir}: summary.json has no final top-1')
  return {
      'top1': round(100 * float(top1), 3),
      'weights': weights,
      'eval_image_size': summary.get('eval_image_size'),
      'steps': summary.get('final_step'),
      'hardware': f'{summary.get("backend", "?")}, '
                  f'{summary.get("devices", "?")} devices',
      'date': date,
      'workdir': workdir,
      'note': note,
  }


def record(workdir: str, *, path: str | os.PathLike = DEFAULT_PATH,
           note: str = '') -> tuple[str, dict]:
  """Adds the run in `workdir` (its summary.json) to the registry at `path`;
  returns (experiment, entry)."""
  summary_path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(summary_path):
    raise FileNotFoundError(f'{summary_path} not found: record a finished '
                            'run\'s workdir (copy a remote one here first)')
  with open(summary_path) as f:
    summary = json.load(f)
  written = datetime.datetime.fromtimestamp(
      os.path.getmtime(summary_path), datetime.timezone.utc)
  entry = entry_from_summary(summary, workdir=workdir, note=note,
                             date=written.strftime('%Y-%m-%d'))
  runs = load(path) if os.path.exists(path) else {}
  runs[summary['experiment']] = entry
  with open(path, 'w') as f:
    json.dump({'schema': SCHEMA, 'runs': dict(sorted(runs.items()))}, f,
              indent=2)
    f.write('\n')
  return summary['experiment'], entry
