"""What a search found: the ranked table, the Pareto plot, the cost split.

Everything is recomputed from the ledger's raw records, so `--w`/`--v`
re-score the whole search with other exponents, and the reward uses the
median of every reference timing the search made (the driver fed the
algorithm with the median known at the time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any, Mapping, Sequence

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import reward as reward_lib
from effnetv2_jax.nas import search as search_lib
from effnetv2_jax.nas import settings

PARETO_FILE = 'pareto.png'


class NoSearchError(ValueError):
  """The workdir holds no search ledger."""


@dataclasses.dataclass(frozen=True)
class Row:
  trial_id: int
  description: str
  architecture: dict
  accuracy: float
  step_time_s: float
  params: int
  score: reward_lib.Score


def load(workdir: str) -> tuple[dict, dict[int, dict]]:
  """(stored flat search config, trial records) of a search workdir."""
  path = os.path.join(workdir, search_lib.LEDGER_FILE)
  if not os.path.exists(path):
    raise NoSearchError(f'--workdir={workdir}: no {search_lib.LEDGER_FILE} '
                        'here; start a search with python -m effnetv2_jax.nas'
                        f' --config=configs/nas.py:<setting> --workdir={workdir}')
  config = ledger_lib.read_json(
      os.path.join(workdir, settings.CONFIG_FILE)) or {}
  records = ledger_lib.trials(ledger_lib.Ledger(path).events())
  return config, {int(k): v for k, v in records.items()}


def exponents(config: Mapping[str, Any], w: float | None, v: float | None
              ) -> tuple[float, float]:
  return (config.get('search.w', reward_lib.W) if w is None else w,
          config.get('search.v', reward_lib.V) if v is None else v)


def ranked(records: Mapping[int, dict], w: float, v: float) -> list[Row]:
  """Completed candidates, best reward first."""
  refs = reward_lib.references(
      r['metrics'] for r in records.values()
      if r['kind'] == 'reference' and r['status'] == 'completed')
  rows = []
  for r in records.values():
    if r['kind'] != 'candidate' or r['status'] != 'completed':
      continue
    score = reward_lib.score(r['metrics'], refs, w=w, v=v)
    if score is None:
      continue
    m = r['metrics']
    rows.append(Row(r['trial_id'], r.get('description', ''),
                    r['architecture'], float(m['accuracy']),
                    float(m['step_time_s']), int(m['params']), score))
  return sorted(rows, key=lambda row: -row.score.reward)


def table(rows: Sequence[Row], top_k: int) -> str:
  """The top-k rows: stage summary (block letter, layers, kernel,
  expansion per stage), A, S, P, parameters, reward."""
  width = max([len(r.description) for r in rows[:top_k]] + [6])
  header = (f'{"rank":>4} {"trial":>5}  {"stages":<{width}} {"A":>7} '
            f'{"S":>6} {"P":>6} {"params":>9} {"reward":>7}')
  lines = [header, '-' * len(header)]
  for rank, row in enumerate(rows[:top_k], 1):
    lines.append(
        f'{rank:>4} {row.trial_id:>5}  {row.description:<{width}} '
        f'{row.accuracy:>7.4f} {row.score.step_time_ratio:>6.3f} '
        f'{row.score.params_ratio:>6.3f} {row.params:>9,} '
        f'{row.score.reward:>7.4f}')
  return '\n'.join(lines)


def statistics_text(records: Mapping[int, dict]) -> str:
  """Counts, the reference spread, the wall-time split, cache savings."""
  lines = []
  candidates = [r for r in records.values() if r['kind'] == 'candidate']
  by_status = {s: sum(1 for r in candidates if r['status'] == s)
               for s in ledger_lib.STATUSES}
  lines.append('candidates: ' + ', '.join(
      f'{n} {s}' for s, n in by_status.items() if n))
  refs = reward_lib.references(
      r['metrics'] for r in records.values()
      if r['kind'] == 'reference' and r['status'] == 'completed')
  for ref in refs.values():
    lines.append(
        f'reference step time on {ref.hardware}: median '
        f'{1000 * ref.step_time_s:.2f} ms over {len(ref.step_times_s)} '
        f'timings, spread (max-min)/median {100 * ref.spread:.1f}%')
  cost = cost_split(records)
  if cost:
    lines.append(
        'trial time: ' + ', '.join(f'{k} {v / 60:.1f} min' for k, v in
                                   cost.items())
        + ' (summed over trials; they overlap when several run at once)')
  saved = cache_savings(records)
  if saved:
    lines.append(
        f'compilation cache: {saved["hits"]} of {saved["programs"]} programs '
        f'loaded instead of compiled; compiling them would have taken about '
        f'{saved["saved_s"]:.0f} s more (the mean fresh compile of its kind)')
  failures = [r for r in records.values() if r['status'] == 'failed']
  for r in failures[:5]:
    lines.append(f'failed trial {r["trial_id"]}: {r.get("reason", "")}')
  return '\n'.join(lines)


def cost_split(records: Mapping[int, dict]) -> dict[str, float]:
  """Seconds of trial time spent compiling, training, timing and starting
  (process start-up, data set-up, evals)."""
  totals = dict(compile=0.0, train=0.0, timing=0.0, other=0.0)
  seen = False
  for r in records.values():
    m = r.get('metrics') or {}
    if r['status'] != 'completed' or not m:
      continue
    seen = True
    timing = m.get('timing', {})
    compile_s = m.get('train_compile_time_s', 0.0) + timing.get(
        'compile_time_s', 0.0)
    train_s = max(0.0, m.get('train_wall_time_s', 0.0) -
                  m.get('train_compile_time_s', 0.0))
    timing_s = max(0.0, m.get('timing_wall_time_s', 0.0) -
                   timing.get('compile_time_s', 0.0))
    totals['compile'] += compile_s
    totals['train'] += train_s
    totals['timing'] += timing_s
    totals['other'] += max(0.0, r.get('wall_time_s', 0.0) - compile_s -
                           train_s - timing_s)
  return totals if seen else {}


def cache_savings(records: Mapping[int, dict]) -> dict[str, float]:
  """Programs served by the shared cache, and the compile time that saved:
  each hit costed at the mean fresh compile of its kind in this search."""
  kinds: dict[str, dict[str, list[float]]] = {}
  for r in records.values():
    for program in (r.get('metrics') or {}).get('programs', []):
      slot = kinds.setdefault(program['kind'], {'hit': [], 'miss': []})
      slot['hit' if program['cache_hit'] else 'miss'].append(
          program['seconds'])
  hits = sum(len(k['hit']) for k in kinds.values())
  if not kinds:
    return {}
  saved = sum(max(0.0, statistics.mean(k['miss']) * len(k['hit']) -
                  sum(k['hit'])) for k in kinds.values() if k['miss'])
  return dict(hits=hits, programs=hits + sum(len(k['miss'])
                                             for k in kinds.values()),
              saved_s=saved)


def plot_pareto(rows: Sequence[Row], path: str, *, title: str = '') -> str:
  """Accuracy against normalised step time, marker area by parameters,
  the (A, S) front drawn, the reference at S = 1."""
  # A Figure of its own, not pyplot's: a notebook keeps its backend.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 5), dpi=120)
  ax = fig.subplots()
  if rows:
    s = [r.score.step_time_ratio for r in rows]
    a = [100 * r.accuracy for r in rows]
    largest = max(r.params for r in rows)
    sizes = [20 + 300 * r.params / largest for r in rows]
    points = ax.scatter(s, a, s=sizes, c=[r.score.reward for r in rows],
                        cmap='viridis', alpha=0.8, edgecolors='k',
                        linewidths=0.5)
    fig.colorbar(points, ax=ax, label='reward A·S^w·P^v')
    front = sorted(reward_lib.pareto_front([(r.accuracy, -r.score.step_time_ratio)
                                            for r in rows]),
                   key=lambda i: s[i])
    ax.plot([s[i] for i in front], [a[i] for i in front], 'r-', lw=1,
            drawstyle='steps-post', label='Pareto front (A, S)')
    ax.margins(x=0.12, y=0.08)
    for rank, r in enumerate(rows[:3], 1):
      ax.annotate(f'#{rank} (trial {r.trial_id})',
                  (r.score.step_time_ratio, 100 * r.accuracy),
                  textcoords='offset points', xytext=(5, 5), fontsize=8)
  ax.axvline(1.0, color='gray', ls=':', label='reference step time')
  ax.set_xlabel('training step time / reference (S)')
  ax.set_ylabel('holdout top-1 (%)')
  ax.set_title(title or 'architecture search: marker area ∝ parameters')
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  return path


def export_architecture(rows: Sequence[Row], rank: int, output: str) -> Row:
  """Writes the rank-th architecture (1 = best) as JSON the trainer reads
  with --config.model.arch=<output>."""
  if not 1 <= rank <= len(rows):
    raise ValueError(f'--rank={rank}: the search has {len(rows)} scored '
                     'candidates; choose 1..' + str(len(rows)))
  row = rows[rank - 1]
  architecture = dict(row.architecture)
  architecture.setdefault('family', 'efficientnetv2')
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  with open(output, 'w', encoding='utf-8') as f:
    json.dump(architecture, f, indent=1)
    f.write('\n')
  return row


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ties get their mean rank)."""
  if len(x) != len(y) or len(x) < 2:
    raise ValueError(f'need two equal-length sequences of >= 2 values, got '
                     f'{len(x)} and {len(y)}')

  def ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
      j = i
      while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
        j += 1
      for k in range(i, j + 1):
        out[order[k]] = (i + j) / 2 + 1
      i = j + 1
    return out

  rx, ry = ranks(list(x)), ranks(list(y))
  mx, my = statistics.mean(rx), statistics.mean(ry)
  cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
  norm = (sum((a - mx)**2 for a in rx) * sum((b - my)**2 for b in ry))**0.5
  return cov / norm if norm else float('nan')
