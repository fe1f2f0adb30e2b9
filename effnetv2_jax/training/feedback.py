"""Feedback-driven progressive learning: the next stage's regularisation and
image size set from what the last stages produced.

The paper's Algorithm 1 (and google/automl) raise image size and
regularisation on a fixed linear ramp. Here one regularisation *level* in
[0, 1] places every magnitude between the config's (first, last) values
(RandAugment magnitude, mixup and CutMix alpha, dropout) and picks the image
size from a fixed ladder (the linear plan's sizes, so every program stays
cacheable); the level after each stage comes from the stage's outputs:

  gap = clean-train top-1 - holdout top-1, where clean-train is the same
        model evaluated on un-augmented training images (the train probe)
        and the holdout is carved from train (never the test set).

  * gap <= hold_gap: the model does not fit its training images better
    than unseen ones (it underfits, or generalises well): there is no
    overfitting to counter yet, and the level is held;
  * otherwise it rises by the linear ramp's step (1 / (stages - 1)) times
    gap / target_gap, times (1 + growth_gain * growth / target_gap) when the
    gap grew since the stage before, at most max_speedup linear steps.

With a constant gap of target_gap the plan is the linear one. `decide` is
that rule as a pure function; `FeedbackStagePlanner` applies it between
stages (the trainer's `config.progressive.controller='feedback'`). The last
stage always trains at the ladder's top size, which the eval size expects.
Stage lengths are the linear plan's, so the learning-rate schedule, fixed
at the start, stays defined.

Importable without tensorflow or ml_collections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from effnetv2_jax.training import progressive

MAGNITUDES = ('randaug_magnitude', 'mixup_alpha', 'cutmix_alpha',
              'dropout_rate')


@dataclasses.dataclass(frozen=True)
class FeedbackRule:
  """The policy's constants (config.progressive.feedback)."""

  hold_gap: float = 0.02
  target_gap: float = 0.05
  growth_gain: float = 1.0
  max_speedup: float = 3.0

  def __post_init__(self):
    for name in ('hold_gap', 'growth_gain'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'progressive.feedback.{name} must be >= 0, got '
                         f'{getattr(self, name)!r}')
    if not self.target_gap > 0:
      raise ValueError('progressive.feedback.target_gap must be > 0, got '
                       f'{self.target_gap!r}')
    if not self.max_speedup >= 1:
      raise ValueError('progressive.feedback.max_speedup must be >= 1, got '
                       f'{self.max_speedup!r}')


@dataclasses.dataclass(frozen=True)
class Signals:
  """What a finished stage tells the controller (fractions, not %)."""

  train_loss: float  # means over the stage, on the augmented stream
  train_top1: float
  holdout_loss: float
  holdout_top1: float
  probe_loss: float  # the clean-train probe at the stage's end
  probe_top1: float

  @property
  def gap(self) -> float:
    return self.probe_top1 - self.holdout_top1

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), gap=self.gap)


@dataclasses.dataclass(frozen=True)
class Decision:
  """The level for the next stage and why."""

  level: float
  step: float  # level - previous level
  speed: float  # step in linear steps
  reason: str


def decide(level: float, signals: Sequence[Signals], *, base_step: float,
           rule: FeedbackRule) -> Decision:
  """The next level from the current one and every finished stage's
  signals (last one last); see the module docstring."""
  if not signals:
    raise ValueError('decide needs the signals of at least one stage')
  gap = signals[-1].gap
  growth = gap - signals[-2].gap if len(signals) > 1 else 0.0
  if gap <= rule.hold_gap:
    return Decision(level, 0.0, 0.0,
                    f'gap {gap:+.3f} <= hold {rule.hold_gap:g}: not '
                    'overfitting, held')
  speed = gap / rule.target_gap
  if growth > 0:
    speed *= 1 + rule.growth_gain * growth / rule.target_gap
  speed = min(speed, rule.max_speedup)
  new_level = min(1.0, level + speed * base_step)
  since = (f' ({growth:+.3f} since the stage before)' if len(signals) > 1
           else '')
  return Decision(new_level, new_level - level, speed,
                  f'gap {gap:+.3f}{since}: {speed:.2f} linear steps' +
                  (', capped at 1' if new_level == 1.0 else ''))


def magnitudes_at(level: float, bounds: Mapping[str, tuple[float, float]]
                  ) -> dict[str, float]:
  """Each regularisation magnitude at `level`: first + level * (last - first)."""
  return {name: float(low + level * (high - low))
          for name, (low, high) in bounds.items()}


def rung_at(level: float, rungs: int) -> int:
  """The ladder rung (0 = smallest size) a level reaches: with one rung per
  linear step, the linear plan's."""
  if rungs < 1:
    raise ValueError(f'a ladder needs at least one size, got {rungs}')
  return min(rungs - 1, int(math.floor(level * (rungs - 1) + 1e-9)))


def signals_of(result: progressive.StageResult, *, holdout_split: str,
               probe_split: str) -> Signals:
  """A stage record's signals: its train means, and its holdout and
  clean-train probe evals at the stage's own image size.

  Raises:
    ValueError: the record lacks one of the two evaluations.
  """
  evals = result.controller_evals
  for what, split in (('holdout', holdout_split),
                      ('clean-train probe', probe_split)):
    if 'top1' not in evals.get(split, {}):
      raise ValueError(
          f'stage {result.settings.index + 1} has no {what} evaluation; the '
          'feedback controller needs config.data.holdout > 0 and '
          'config.eval.at_stage_end')
  train = result.train_metrics
  holdout, probe = evals[holdout_split], evals[probe_split]
  return Signals(
      train_loss=float(train.get('loss', math.nan)),
      train_top1=float(train.get('train_top1', math.nan)),
      holdout_loss=float(holdout.get('loss', math.nan)),
      holdout_top1=float(holdout['top1']),
      probe_loss=float(probe.get('loss', math.nan)),
      probe_top1=float(probe['top1']))


class FeedbackStagePlanner(progressive.StagePlanner):
  """Stages with the linear plan's lengths, sizes from its ladder, and the
  regularisation level set by `decide` after each stage.

  The decisions are a pure function of the stage history, which the
  checkpoint keeps, so a resumed run replays them; `state_dict` holds them
  too, for the summary's `controller` section.
  """

  wants_train_probe = True

  def __init__(self, linear_plan: Sequence[progressive.StageSettings], *,
               bounds: Mapping[str, tuple[float, float]],
               rule: FeedbackRule = FeedbackRule(),
               holdout_split: str = 'holdout',
               probe_split: str = 'train_probe'):
    if not linear_plan:
      raise ValueError('a stage plan needs at least one stage')
    self.linear_plan = tuple(linear_plan)
    if len({s.batch_size for s in self.linear_plan}) > 1:
      raise ValueError(
          "the feedback controller keeps the linear plan's stage lengths "
          "in steps; it needs progressive.batch_size_rule='constant'")
    self.ladder = tuple(sorted({s.image_size for s in self.linear_plan}))
    self.bounds = {name: tuple(map(float, bounds[name]))
                   for name in MAGNITUDES}
    self.rule = rule
    # The splits of StageResult.controller_evals (data.HOLDOUT_SPLIT and
    # data.TRAIN_PROBE_SPLIT in the trainer).
    self.holdout_split, self.probe_split = holdout_split, probe_split
    self.num_stages = len(self.linear_plan)
    self.total_steps = self.linear_plan[-1].end_step
    self.total_epochs = self.linear_plan[-1].end_epoch
    self.base_step = 1.0 / max(1, self.num_stages - 1)
    self.decisions: list[dict] = []

  def _levels(self, history: Sequence[progressive.StageResult]
              ) -> list[float]:
    """The level of every stage so far and of the next (stage 1 at 0, or
    at the last values when there is only one stage); records decisions."""
    levels = [0.0 if self.num_stages > 1 else 1.0]
    signals = []
    self.decisions = []
    for result in history:
      signals.append(signals_of(result, holdout_split=self.holdout_split,
                                probe_split=self.probe_split))
      decision = decide(levels[-1], signals, base_step=self.base_step,
                        rule=self.rule)
      levels.append(decision.level)
      self.decisions.append(dict(
          after_stage=result.settings.index + 1, inputs=signals[-1].to_dict(),
          level=decision.level, step=decision.step, speed=decision.speed,
          reason=decision.reason))
    return levels

  def _settings(self, index: int, level: float) -> progressive.StageSettings:
    linear = self.linear_plan[index]
    last = index == self.num_stages - 1
    rung = len(self.ladder) - 1 if last else rung_at(level, len(self.ladder))
    return dataclasses.replace(linear, image_size=self.ladder[rung],
                               **magnitudes_at(level, self.bounds))

  def next_stage(self, history):
    if len(history) >= self.num_stages:
      return None
    return self._settings(len(history), self._levels(history)[-1])

  def expected_stages(self, history):
    """The next stage, then the rest as if each rose one linear step."""
    if len(history) >= self.num_stages:
      return ()
    level = self._levels(history)[-1] if history else (
        0.0 if self.num_stages > 1 else 1.0)
    out = []
    for index in range(len(history), self.num_stages):
      out.append(self._settings(index, level))
      level = min(1.0, level + self.base_step)
    return tuple(out)

  def describe_decision(self) -> str | None:
    """One line for the last decision made (None before any)."""
    if not self.decisions:
      return None
    d = self.decisions[-1]
    i = d['inputs']
    return (f'controller after stage {d["after_stage"]}: clean-train top-1 '
            f'{i["probe_top1"]:.4f}, holdout {i["holdout_top1"]:.4f}, '
            f'train loss {i["train_loss"]:.4f}; {d["reason"]} -> level '
            f'{d["level"]:.3f}')

  def state_dict(self) -> dict:
    return {'controller': 'feedback', 'decisions': list(self.decisions)}

  def summary(self) -> dict[str, Any]:
    return dict(kind='feedback', rule=dataclasses.asdict(self.rule),
                ladder=list(self.ladder), bounds={
                    k: list(v) for k, v in self.bounds.items()},
                decisions=list(self.decisions))
