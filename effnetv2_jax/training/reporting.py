"""What a run shows and leaves behind: progress lines, clu metrics, summary.json,
and a plot of the curves.

Scalars go three ways: clu metric writers (TensorBoard event files plus log
lines), a `metrics.jsonl` mirror in the workdir (the plot and notebooks read
it; one JSON object per write), and, on a terminal, a tqdm bar. Only process
0 writes files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax

log = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
PLOT_FILE = 'curves.png'


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def progress_line(*, stage: int, num_stages: int, step: int, total_steps: int,
                  images_per_sec: float, eta_s: float, loss: float,
                  learning_rate: float) -> str:
  """One human-readable line per log interval."""
  return (f'stage {stage}/{num_stages} | step {step}/{total_steps} '
          f'| {images_per_sec:,.0f} img/s | ETA {format_duration(eta_s)} '
          f'| loss {loss:.4f} | lr {learning_rate:.4g}')


def eta_seconds(planner, history: Sequence[Any], current, step: int,
                step_time: float) -> float:
  """Time left: the current stage's steps at today's speed, later stages'
  scaled by their pixels per batch (a step's cost grows about with
  batch * size**2, so a stage at 300 px costs 5.5x one at 128 px)."""
  cost = lambda s: s.batch_size * s.image_size**2
  left = (current.end_step - step) * step_time
  for later in planner.expected_stages(history):
    if later.index > current.index:
      left += later.num_steps * step_time * cost(later) / cost(current)
  return left


class Reporter:
  """Writes scalars everywhere they belong; owns the progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, progress_bar: str,
               start_step: int = 0, tensorboard: bool = True):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not (self.is_main and tensorboard),
        asynchronous=True)
    # metrics.jsonl is rewritten whole (GCS objects cannot be appended to);
    # a resumed run starts from what the killed one had flushed.
    self._records = _read_records(workdir) if self.is_main else []
    self._unflushed = 0
    show_bar = (progress_bar == 'on' or
                (progress_bar == 'auto' and sys.stderr.isatty()))
    self._bar = None
    if show_bar and self.is_main:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                       dynamic_ncols=True, leave=True)

  def scalars(self, step: int, kind: str, values: Mapping[str, float]) -> None:
    prefixed = {f'{kind}/{k}': v for k, v in values.items()}
    self.writer.write_scalars(step, prefixed)
    if self.is_main:
      record = {'step': int(step), 'kind': kind, 'time': time.time()}
      record.update({k: float(v) for k, v in values.items()})
      self._records.append(record)
      self._unflushed += 1
      if kind != 'train' or self._unflushed >= 50:
        self.flush()

  def flush(self) -> None:
    self.writer.flush()
    if self.is_main and self._unflushed:
      _write_text(os.path.join(self.workdir, METRICS_FILE),
                  ''.join(json.dumps(r) + '\n' for r in self._records))
      self._unflushed = 0

  def hparams(self, flat: Mapping[str, Any]) -> None:
    self.writer.write_hparams(dict(flat))

  def text(self, line: str) -> None:
    """A progress line: through the bar when there is one, else logging."""
    if self._bar is not None:
      self._bar.write(line)
    log.info('%s', line)

  def advance(self, step: int, description: str | None = None) -> None:
    if self._bar is not None:
      self._bar.n = step
      if description:
        self._bar.set_description(description, refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    self.flush()
    self.writer.close()
    if self._bar is not None:
      self._bar.close()


def _path(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _write_text(path: str, text: str) -> None:
  """Writes a whole file via a temporary name, so readers never see half."""
  tmp = _path(path + '.tmp')
  tmp.write_text(text)
  tmp.replace(_path(path))


def _read_records(workdir: str) -> list[dict]:
  path = _path(os.path.join(workdir, METRICS_FILE))
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a kill
      continue
  return records


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl records; where a resumed run repeated a step, the latest."""
  latest: dict[tuple[str, int], dict] = {}
  for record in _read_records(workdir):
    latest[(record['kind'], record['step'])] = record
  return sorted(latest.values(), key=lambda r: (r['step'], r['kind']))


def write_summary(workdir: str, summary: Mapping[str, Any]) -> str:
  path = os.path.join(workdir, SUMMARY_FILE)
  _write_text(path, json.dumps(summary, indent=2, sort_keys=True,
                               default=float))
  return path


def plot_curves(workdir: str, history: Sequence[Any], title: str = ''
                ) -> str | None:
  """PNG of train loss, eval top-1 and each stage's regularisation against
  the step, stages marked with their image size.

  Args:
    workdir: holds metrics.jsonl; the PNG is written next to it.
    history: the run's `progressive.StageResult`s. With the feedback
      controller, the accuracy panel also shows each stage's clean-train
      probe and holdout at the stage's size: the gap it decided on.
    title: figure title (the experiment name).
  """
  records = read_metrics(workdir)
  train = [r for r in records if r['kind'] == 'train' and 'loss' in r]
  evals = [r for r in records if r['kind'] == 'eval']
  holdout = [r for r in records if r['kind'] == 'eval_holdout']
  if not train and not evals and not holdout:
    return None
  # A Figure of its own, not pyplot's: a notebook keeps its backend.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(16, 4))
  ax_loss, ax_acc, ax_reg = fig.subplots(1, 3)
  if train:
    ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train],
                 label='train loss')
  ax_loss.set_ylabel('cross-entropy')
  for rows, key, label in ((evals, 'top1', 'top-1'),
                           (evals, 'ema_top1', 'top-1 (EMA)'),
                           (holdout, 'top1', 'holdout top-1'),
                           (holdout, 'ema_top1', 'holdout top-1 (EMA)')):
    points = [(r['step'], 100 * r[key]) for r in rows if key in r]
    if points:
      ax_acc.plot(*zip(*points), marker='o', label=label)
  _plot_controller_evals(ax_acc, history)
  ax_acc.set_ylabel('eval top-1 (%)')
  _plot_regularisation(ax_reg, history)
  for ax in (ax_loss, ax_acc, ax_reg):
    ax.set_xlabel('step')
    for h in history:
      ax.axvline(h.settings.start_step, color='grey', linestyle=':',
                 linewidth=1)
      ax.annotate(f'{h.settings.image_size}px', (h.settings.start_step, 1.0),
                  xycoords=('data', 'axes fraction'), fontsize=8,
                  color='grey', va='top', ha='left')
    ax.grid(alpha=0.3)
    if ax is not ax_reg and ax.get_legend_handles_labels()[0]:
      ax.legend(loc='best', fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  path = os.path.join(workdir, PLOT_FILE)
  _path(path).write_bytes(buffer.getvalue())
  return path


def _plot_controller_evals(ax, history) -> None:
  for split, label, marker in (('train_probe', 'clean-train @ stage size',
                                's'),
                               ('holdout', 'holdout @ stage size', 'D')):
    points = [(h.settings.end_step, 100 * h.controller_evals[split]['top1'])
              for h in history
              if 'top1' in h.controller_evals.get(split, {})]
    if points:
      ax.plot(*zip(*points), marker=marker, linestyle='--', label=label)


def _plot_regularisation(ax, history) -> None:
  """Each stage's magnitudes as steps: RandAugment on the left axis, the
  rates and alphas (0-1) on the right."""
  if not history:
    return
  edges = [h.settings.start_step for h in history] + [
      history[-1].settings.end_step]
  values = lambda name: [getattr(h.settings, name) for h in history] + [
      getattr(history[-1].settings, name)]
  ax.step(edges, values('randaug_magnitude'), where='post', color='C0',
          label='RandAugment magnitude')
  ax.set_ylabel('RandAugment magnitude')
  right = ax.twinx()
  for i, (name, label) in enumerate((('dropout_rate', 'dropout'),
                                     ('mixup_alpha', 'mixup alpha'),
                                     ('cutmix_alpha', 'CutMix alpha'))):
    if any(values(name)):
      right.step(edges, values(name), where='post', color=f'C{i + 1}',
                 label=label)
  right.set_ylabel('rate / alpha')
  handles = [*ax.get_legend_handles_labels()[0],
             *right.get_legend_handles_labels()[0]]
  labels = [*ax.get_legend_handles_labels()[1],
            *right.get_legend_handles_labels()[1]]
  right.legend(handles, labels, loc='upper left', fontsize=8)
  ax.set_title('regularisation per stage', fontsize=10)


def build_summary(*, experiment: str, status: str, final_step: int,
                  total_steps: int, final_eval: Mapping[str, float],
                  eval_image_size: int, history: Sequence[Any],
                  **extra) -> dict[str, Any]:
  """summary.json: the final eval, each stage's record, run totals.

  `history` holds `progressive.StageResult`s; `extra` adds run facts (the
  model, dataset, devices, ...) as they are.
  """
  stages = [h.to_dict() for h in history]
  steps_of = lambda h: h.settings.num_steps
  timed = [(h.step_time_s, steps_of(h)) for h in history if h.step_time_s]
  images = sum(steps_of(h) * h.settings.batch_size for h in history)
  wall = sum(h.wall_time_s for h in history)
  return dict(
      experiment=experiment, status=status, final_step=final_step,
      total_steps=total_steps, eval=dict(final_eval),
      eval_image_size=eval_image_size, stages=stages,
      mean_step_time_s=(sum(t * n for t, n in timed) /
                        sum(n for _, n in timed) if timed else None),
      images_per_sec=images / wall if wall else None,
      # Gradient programs per stage, plus the update program once.
      compile_time_s=(sum(h.compile_time_s for h in history) +
                      max([h.update_compile_time_s for h in history] or
                          [0.0])),
      **extra)
