"""The stage loop: ask the planner for a stage, train it, evaluate, save.

Per stage: the input pipeline is rebuilt for the stage's size and
regularisation, the stage's programs come from the `Compiler` (compiled
ahead, perhaps in the background), the steps run, and at the stage's end
the evaluation (on the holdout when the run has one) and a checkpoint
follow. Weights, optimizer state, EMA and step carry over.

Exact resume: a checkpoint holds the whole state (including the base PRNG
key; each step folds its step number in), the stage being trained, how many
of its batches were consumed, its train-metric sums so far and the
planner's own state; the input pipeline restarts at that batch and yields
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import compilation
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import progressive
from effnetv2_jax.training import reporting


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; training stopped without saving it."""


class PreemptionWatch:
  """Turns SIGTERM (a TPU preemption notice) or a first Ctrl-C into a flag
  the loop polls: it writes a checkpoint and stops. A second Ctrl-C
  interrupts at once."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the signal's name, once one came
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self._SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested == 'SIGINT':
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must stop (and save) at the same step.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return (multihost_utils.reached_preemption_sync_point(step) or
              self.requested is not None)
    return self.requested is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False


@dataclasses.dataclass
class Run:
  """What every stage of one run shares; built by `train_and_evaluate`.

  `train_iterator(settings, start_batch)` makes a stage's input pipeline;
  `stage_eval_split` is the split evaluated at stage ends.
  """

  task: Any
  planner: progressive.StagePlanner
  compiler: compilation.Compiler
  reporter: reporting.Reporter
  ckpt: Any
  evaluate: Callable[..., dict]
  preemption: PreemptionWatch
  train_iterator: Callable[[progressive.StageSettings, int], Any]
  every: Mapping[str, int]  # log / checkpoint / eval every N steps (0: never)
  stage_eval_split: str
  eval_at_stage_end: bool
  probe_split: str | None  # evaluated at stage ends when the planner asks
  compile_ahead: bool
  model_description: dict
  history: list = dataclasses.field(default_factory=list)

  def checkpoint_meta(self, step: int, stage=None, batches: int = 0,
                      elapsed: float = 0.0, sums=None) -> dict:
    return checkpointing.ResumePoint(
        step=step, history=list(self.history), model=self.model_description,
        stage=stage, stage_batches=batches, stage_elapsed_s=elapsed,
        stage_sums=dict(sums or {}),
        planner=self.planner.state_dict()).to_meta()


def run_stages(run: Run, state, resume: checkpointing.ResumePoint | None
               ) -> tuple[Any, str]:
  """Trains every stage the planner gives; -> (state, 'completed' or
  'preempted')."""
  settings = (resume.stage if resume and resume.stage
              else run.planner.next_stage(run.history))
  while settings is not None:
    mid_stage = resume is not None and resume.stage is not None
    if not mid_stage:
      progressive.check_next_stage(settings, run.history,
                                   run.planner.total_steps)
      config_checks.check_stage(settings,
                                mesh_lib.data_axis_size(run.task.mesh))
    state, result = _run_stage(run, settings, state,
                               resume if mid_stage else None)
    resume = None
    if result is None:
      return state, 'preempted'
    run.history.append(result)
    run.ckpt.save(settings.end_step, state,
                  run.checkpoint_meta(settings.end_step))
    settings = run.planner.next_stage(run.history)
    decision = run.planner.describe_decision()
    if decision and settings is not None:
      run.reporter.text(decision)
  run.ckpt.wait()
  return state, 'completed'


class _Metrics:
  """Step metrics on their way to the host: an interval's means for the
  progress line, and the stage's running sums for its record."""

  def __init__(self, sums: Mapping[str, float] | None):
    self.sums = dict(sums or {})  # includes 'count'
    self._entries: list[tuple[int, dict]] = []
    self._images = 0
    self._since = time.time()

  def add(self, step: int, metrics: dict, images: int) -> None:
    self._entries.append((step, metrics))
    self._images += images

  def read(self, on_non_finite: Callable[[int, dict], None]
           ) -> dict[str, float]:
    """Host-reads what is pending (this syncs); {} when nothing is."""
    if not self._entries:
      return {}
    fetched = jax.device_get([m for _, m in self._entries])
    for (step, _), metrics in zip(self._entries, fetched):
      if not np.isfinite(metrics['loss']):
        on_non_finite(step, metrics)
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    for key in fetched[0]:
      self.sums[key] = self.sums.get(key, 0.0) + float(
          np.sum([m[key] for m in fetched]))
    self.sums['count'] = self.sums.get('count', 0) + len(fetched)
    elapsed = time.time() - self._since
    means['images_per_sec'] = self._images / max(elapsed, 1e-9)
    means['step_time_s'] = elapsed / len(fetched)
    self._entries.clear()
    self._images = 0
    self._since = time.time()
    return means

  def stage_means(self) -> dict[str, float]:
    count = max(self.sums.get('count', 0), 1)
    return {k: v / count for k, v in self.sums.items() if k != 'count'}


def _programs(run: Run, settings, history):
  """The stage's two programs (compiled before it runs, perhaps already in
  the background); then the later stages' shapes start compiling."""
  compiled, waited = run.compiler.get('gradient', settings.batch_size,
                                      settings.image_size)
  update, update_waited = run.compiler.get('update')
  waited += update_waited
  memory = compilation.step_memory(
      compiled.memory, update.memory,
      state_bytes=compilation.per_device_bytes(run.task.target),
      batch_bytes=compilation.per_device_bytes(run.task.batch_spec(
          settings.batch_size, settings.image_size)))
  run.reporter.text(
      f'stage {settings.index + 1} step for batch {settings.batch_size} at '
      f'{settings.image_size}px: compiled in {compiled.seconds:.1f}s'
      f'{" from the persistent cache" if compiled.cache_hit else ""} '
      f'(waited {waited:.1f}s); memory '
      f'{compilation.format_memory(memory)}')
  run.reporter.scalars(settings.start_step, 'compile',
                       {'seconds': compiled.seconds, 'waited_s': waited,
                        'update_seconds': update.seconds,
                        **{k: float(v) for k, v in memory.items()}})
  if run.compile_ahead:
    for shape in progressive.upcoming_shapes(run.planner, history):
      run.compiler.prefetch('gradient', *shape)
    if not compilation.compile_beside_training(jax.default_backend()):
      ahead = run.compiler.wait_all()
      if ahead >= 0.1:
        run.reporter.text(
            f'later stages\' steps and the eval step compiled before this '
            f'stage trains ({ahead:.1f}s), not beside it: on this backend '
            'the autotuner shares the device')
  return compiled, update, waited, memory


@dataclasses.dataclass
class _Progress:
  """Where a stage is: for checkpoints, the log and the stage's record."""

  settings: progressive.StageSettings
  metrics: _Metrics
  batches: int  # of this stage consumed
  elapsed_before: float  # wall seconds of earlier processes' parts
  started: float = dataclasses.field(default_factory=time.time)
  train_seconds: float = 0.0  # stepping only: no compile, eval, checkpoints

  @property
  def elapsed(self) -> float:
    return self.elapsed_before + time.time() - self.started


def _run_stage(run: Run, settings: progressive.StageSettings, state,
               resume: checkpointing.ResumePoint | None):
  """Trains `settings` to its end (from where `resume` left it); ->
  (state, its StageResult), or (state, None) when asked to stop (SIGTERM,
  Ctrl-C)."""
  run.reporter.text(settings.describe())
  progress = _Progress(
      settings, _Metrics(resume.stage_sums if resume else None),
      batches=resume.stage_batches if resume else 0,
      elapsed_before=resume.stage_elapsed_s if resume else 0.0)
  history = list(run.history)
  compiled, update, waited, memory = _programs(run, settings, history)
  first_step = settings.start_step + progress.batches
  train_data = run.train_iterator(settings, progress.batches)
  try:
    state, step, preempted = _train_steps(
        run, progress, history, state, train_data,
        (compiled.executable, update.executable))
  finally:
    train_data.close()
  if preempted:
    return state, None
  eval_metrics = {}
  if run.eval_at_stage_end or settings.end_step >= run.planner.total_steps:
    eval_metrics = run.evaluate(state, settings.end_step,
                                run.stage_eval_split)
  controller_evals = {}
  if run.planner.wants_train_probe and run.probe_split:
    controller_evals = {
        split: run.evaluate(state, settings.end_step, split,
                            settings.image_size)
        for split in (run.stage_eval_split, run.probe_split)}
  wall = progress.elapsed
  return state, progressive.StageResult(
      settings=settings, train_metrics=progress.metrics.stage_means(),
      eval_metrics=eval_metrics, eval_split=run.stage_eval_split,
      wall_time_s=wall, compile_time_s=compiled.seconds,
      images_per_sec=settings.num_steps * settings.batch_size / max(wall,
                                                                     1e-9),
      step_time_s=progress.train_seconds / max(1, step - first_step),
      compile_wait_s=waited, compile_cache_hit=compiled.cache_hit,
      update_compile_time_s=update.seconds, memory=memory,
      controller_evals=controller_evals)


def _train_steps(run: Run, progress: _Progress, history, state, train_data,
                 programs) -> tuple[Any, int, bool]:
  """Steps to the stage's end or a stop request; -> (state, step, preempted)."""
  settings, every = progress.settings, run.every
  gradient_program, update_program = programs
  hparams = run.task.stage_hparams(settings)
  on_non_finite = functools.partial(_stop_on_non_finite, run, settings)
  step = settings.start_step + progress.batches
  resumed_at = time.time()
  while step < settings.end_step:
    grads, batch_stats, step_metrics = gradient_program(
        state, next(train_data), hparams)
    state, update_metrics = update_program(state, grads, batch_stats,
                                           hparams)
    progress.metrics.add(step, dict(step_metrics, **update_metrics),
                         settings.batch_size)
    step += 1
    progress.batches += 1
    stage_end = step == settings.end_step
    stop = run.preemption.should_stop(step)
    want_log = step % every['log'] == 0 or stage_end
    want_ckpt = (bool(every['checkpoint'] and step % every['checkpoint'] == 0)
                 and not stage_end)
    want_eval = bool(every['eval'] and step % every['eval'] == 0
                     and not stage_end)
    if want_log or want_ckpt or stop:
      means = progress.metrics.read(on_non_finite)
      if want_log and means:
        _log_progress(run, settings, history, step, means)
    if want_ckpt or stop or want_eval:
      progress.train_seconds += time.time() - resumed_at
    if want_ckpt or stop:
      run.ckpt.save(step, state, run.checkpoint_meta(
          step, settings, progress.batches, progress.elapsed,
          progress.metrics.sums))
    if stop:
      run.ckpt.wait()
      run.reporter.text(
          f'{run.preemption.requested or "preemption"}: wrote a checkpoint '
          f'at step {step} (stage {settings.index + 1}, batch '
          f'{progress.batches}); stopping (the same command resumes)')
      return state, step, True
    if want_eval:
      run.evaluate(state, step)
    if want_ckpt or want_eval:
      resumed_at = time.time()
  jax.block_until_ready(state)
  progress.train_seconds += time.time() - resumed_at
  return state, step, False


def _stop_on_non_finite(run: Run, settings, step: int, values) -> None:
  run.ckpt.wait()
  good = run.ckpt.latest_step()
  kept = (f'the last good checkpoint is step {good} in {run.ckpt.directory}'
          if good is not None else 'no checkpoint had been written')
  raise NonFiniteLossError(
      f'loss is {values["loss"]} at step {step + 1} (stage '
      f'{settings.index + 1}/{settings.num_stages}, image size '
      f'{settings.image_size}, learning rate '
      f'{values["learning_rate"]:.4g}); training stopped and {kept}')


def _log_progress(run: Run, settings, history, step: int,
                  means: Mapping[str, float]) -> None:
  run.reporter.scalars(step, 'train', means)
  run.reporter.text(reporting.progress_line(
      stage=settings.index + 1, num_stages=settings.num_stages, step=step,
      total_steps=run.planner.total_steps,
      images_per_sec=means['images_per_sec'],
      eta_s=reporting.eta_seconds(run.planner, history, settings, step,
                                    means['step_time_s']),
      loss=means['loss'], learning_rate=means['learning_rate']))
  run.reporter.advance(step, f'stage {settings.index + 1}/'
                       f'{settings.num_stages}')
