"""Progressive learning: the stage plan, and the planner the loop asks.

Paper Algorithm 1 trains M stages; stage i uses image size S_i and
regularisation (RandAugment magnitude, mixup/CutMix alpha, dropout) linearly
interpolated from the first stage's values to the last's, and inherits every
weight from the stage before. `plan_stages` is that interpolation as a pure
function. Two rules exist for the image sizes:

  'linear'   (paper):    round(linspace(min_size, max_size, M)), so the first
                         stage trains at min_size (128).
  'official' (google/automl main.py): int(min + (max - min) * (k + 1) / M),
                         so S trains at 171/214/257/300 and never at 128.

The training loop does not read a constant plan: it asks a `StagePlanner`
for the next stage, giving it what the finished stages produced. The default
`LinearStagePlanner` returns the precomputed plan; `feedback` has the
controller that sets the next stage's size and regularisation from the last
stages' outputs.

Importable without tensorflow or ml_collections.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from typing import Any, Mapping, Sequence

SIZE_RULES = ('linear', 'official')
BATCH_RULES = ('constant', 'constant_memory')


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """Everything that changes from one stage to the next.

  Steps are global train steps: the stage runs steps [start_step, end_step).
  Epochs are fractional epochs of the train set at the stage boundaries.
  """

  index: int
  num_stages: int
  start_step: int
  end_step: int
  image_size: int
  batch_size: int
  randaug_magnitude: float
  mixup_alpha: float
  cutmix_alpha: float
  dropout_rate: float
  start_epoch: float = 0.0
  end_epoch: float = 0.0

  @property
  def num_steps(self) -> int:
    return self.end_step - self.start_step

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'StageSettings':
    return cls(**dict(d))

  def describe(self) -> str:
    return (f'stage {self.index + 1}/{self.num_stages}: steps '
            f'{self.start_step}-{self.end_step}, size {self.image_size}, '
            f'batch {self.batch_size}, randaug {self.randaug_magnitude:g}, '
            f'mixup {self.mixup_alpha:g}, cutmix {self.cutmix_alpha:g}, '
            f'dropout {self.dropout_rate:g}')


@dataclasses.dataclass(frozen=True)
class StageResult:
  """A finished stage: the planner's input for the next one, and the record
  the checkpoint keeps and the summary lists.

  `train_metrics` are means over every step of the stage (a resumed stage
  included). `eval_metrics` come from the stage-end evaluation on
  `eval_split`: the holdout carved from train when the run has one (so a
  planner never selects on the test set), else the eval split; {} if none
  ran.
  """

  settings: StageSettings
  train_metrics: Mapping[str, float]
  eval_metrics: Mapping[str, float]
  wall_time_s: float = 0.0
  compile_time_s: float = 0.0  # the stage's gradient program
  images_per_sec: float = 0.0
  eval_split: str = ''
  step_time_s: float = 0.0  # stepping only: no compile, eval, checkpoints
  compile_wait_s: float = 0.0
  compile_cache_hit: bool = False
  update_compile_time_s: float = 0.0
  memory: Mapping[str, int] = dataclasses.field(default_factory=dict)
  # When the planner asks (`wants_train_probe`): split -> eval metrics at
  # the stage's own image size, for the holdout and for un-augmented
  # training images (data.TRAIN_PROBE_SPLIT).
  controller_evals: Mapping[str, Mapping[str, float]] = dataclasses.field(
      default_factory=dict)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['settings'] = self.settings.to_dict()
    d['controller_evals'] = {k: dict(v)
                             for k, v in self.controller_evals.items()}
    for key in ('train_metrics', 'eval_metrics', 'memory'):
      d[key] = dict(getattr(self, key))
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'StageResult':
    d = dict(d)
    d['settings'] = StageSettings.from_dict(d['settings'])
    return cls(**d)


class StagePlanner:
  """What the training loop asks for stages; subclass it for a new policy.

  The loop calls `next_stage(history)` before each stage. Everything else
  the run needs to know about the future also comes from the planner, never
  from the config's linear plan: `total_steps` and `total_epochs` (the
  learning-rate schedule's period), `expected_stages` (the shapes to compile
  ahead, the ETA, the eval-size check). A planner that keeps state of its
  own returns it from `state_dict` (JSON) and takes it back in
  `load_state_dict`; the checkpoint stores it, so a resumed run replays the
  same decisions. A planner whose `wants_train_probe` is true gets each
  stage's evals on the holdout and on un-augmented training images at the
  stage's image size (`StageResult.controller_evals`);
  `describe_decision` (a line, or None) is logged after
  each `next_stage` and `summary` goes to summary.json's `controller`.
  """

  total_steps: int
  total_epochs: float
  num_stages: int
  wants_train_probe: bool = False

  def describe_decision(self) -> str | None:
    return None

  def summary(self) -> dict[str, Any]:
    return {'kind': 'linear'}

  def next_stage(self, history: Sequence[StageResult]
                 ) -> StageSettings | None:
    """The stage after `history` (starting at its last stage's end_step, or
    0, and ending by total_steps), or None when training is done."""
    raise NotImplementedError

  def expected_stages(self, history: Sequence[StageResult]
                      ) -> tuple[StageSettings, ...]:
    """The stages the planner now expects to run after `history`, next one
    first (its best guess; adaptive planners may change them later)."""
    raise NotImplementedError

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    del state


def stage_seed(seed: int, stage_index: int) -> int:
  """The input pipeline's seed for a stage: each stage reshuffles
  differently, and identically across restarts."""
  return int(np.random.SeedSequence([seed, stage_index]).generate_state(1)[0]
             % (2**31 - 1))


def _interpolate(low: float, high: float, index: int, count: int) -> float:
  # With a single stage train at the target (last-stage) values.
  if count == 1:
    return float(high)
  return float(low + (high - low) * index / (count - 1))


def stage_image_sizes(min_size: int, max_size: int, num_stages: int,
                      rule: str = 'linear') -> list[int]:
  """Per-stage train image sizes under the 'linear' or 'official' rule."""
  if rule == 'linear':
    return [int(round(_interpolate(min_size, max_size, k, num_stages)))
            for k in range(num_stages)]
  if rule == 'official':
    return [int(min_size + (max_size - min_size) * (k + 1) / num_stages)
            for k in range(num_stages)]
  raise ValueError(
      f'progressive.size_rule must be one of {SIZE_RULES}, got {rule!r}')


def stage_batch_sizes(batch_size: int, sizes: Sequence[int], *,
                      rule: str = 'constant', multiple: int = 1,
                      max_batch_size: int | None = None) -> list[int]:
  """Per-stage global batch sizes.

  'constant_memory' grows the batch as images shrink, by (S_max / S_k)**2 so
  that activation memory stays roughly constant (paper Table 2: smaller
  images allow larger batches), rounded down to `multiple` (the device
  count) and capped at `max_batch_size`.
  """
  if rule == 'constant':
    return [batch_size] * len(sizes)
  if rule != 'constant_memory':
    raise ValueError(
        f'progressive.batch_size_rule must be one of {BATCH_RULES}, '
        f'got {rule!r}')
  largest = max(sizes)
  out = []
  for size in sizes:
    scaled = batch_size * (largest / size) ** 2
    if max_batch_size:
      scaled = min(scaled, max_batch_size)
    out.append(max(multiple, int(scaled // multiple) * multiple))
  return out


def plan_stages(*, num_stages: int, epochs: float, num_train_examples: int,
                batch_size: int, min_image_size: int, max_image_size: int,
                size_rule: str = 'linear',
                randaug_magnitude: tuple[float, float] = (5.0, 15.0),
                mixup_alpha: tuple[float, float] = (0.0, 0.0),
                cutmix_alpha: tuple[float, float] = (0.0, 0.0),
                dropout_rate: tuple[float, float] = (0.1, 0.3),
                batch_size_rule: str = 'constant', batch_multiple: int = 1,
                max_batch_size: int | None = None,
                total_steps: int | None = None
                ) -> tuple[StageSettings, ...]:
  """The linear progressive plan (paper Algorithm 1) as a tuple of stages.

  Stage lengths follow the official code: at the base batch size the run has
  `epochs * N // batch_size` steps and stage k ends at
  `int((k + 1) / M * total)`. When a stage runs at another batch size it
  keeps the same number of examples, so its step count is scaled by
  `batch_size / stage_batch_size`.

  Args:
    num_stages: M (1 disables progressive learning: one stage at the
      target values).
    epochs: total training epochs.
    num_train_examples: N, the train-set size.
    batch_size: the base global batch size.
    min_image_size, max_image_size: first-stage and last-stage sizes.
    size_rule: 'linear' or 'official' (module docstring).
    randaug_magnitude, mixup_alpha, cutmix_alpha, dropout_rate: (first,
      last) stage values, linearly interpolated.
    batch_size_rule, batch_multiple, max_batch_size: see
      `stage_batch_sizes`.
    total_steps: the run length in steps at the base batch size, instead of
      `epochs` (fine-tuning recipes are written in steps); `epochs` is then
      ignored.
  """
  if num_stages < 1:
    raise ValueError(f'progressive.num_stages must be >= 1, got {num_stages}')
  if min_image_size > max_image_size:
    raise ValueError(
        f'progressive.min_image_size ({min_image_size}) is larger than the '
        f'last-stage size ({max_image_size})')
  if total_steps:
    total = int(total_steps)
  else:
    total = int(epochs * num_train_examples // batch_size)
  if total < num_stages:
    raise ValueError(
        f'{epochs} epochs of {num_train_examples} examples at batch '
        f'{batch_size} is {total} steps, fewer than {num_stages} stages')
  sizes = stage_image_sizes(min_image_size, max_image_size, num_stages,
                            size_rule)
  batches = stage_batch_sizes(batch_size, sizes, rule=batch_size_rule,
                              multiple=batch_multiple,
                              max_batch_size=max_batch_size)
  stages = []
  start_step, base_start, examples = 0, 0, 0
  for k in range(num_stages):
    base_end = int((k + 1) / num_stages * total)
    stage_examples = (base_end - base_start) * batch_size
    steps = max(1, int(round(stage_examples / batches[k])))
    end_examples = examples + steps * batches[k]
    stages.append(StageSettings(
        index=k, num_stages=num_stages, start_step=start_step,
        end_step=start_step + steps, image_size=sizes[k],
        batch_size=batches[k],
        randaug_magnitude=_interpolate(*randaug_magnitude, k, num_stages),
        mixup_alpha=_interpolate(*mixup_alpha, k, num_stages),
        cutmix_alpha=_interpolate(*cutmix_alpha, k, num_stages),
        dropout_rate=_interpolate(*dropout_rate, k, num_stages),
        start_epoch=examples / num_train_examples,
        end_epoch=end_examples / num_train_examples))
    start_step += steps
    base_start = base_end
    examples = end_examples
  return tuple(stages)


def plan_from_config(progressive: Mapping[str, Any], *, epochs: float,
                     num_train_examples: int, batch_size: int,
                     batch_multiple: int = 1,
                     total_steps: int | None = None
                     ) -> tuple[StageSettings, ...]:
  """`plan_stages` from a config's `progressive` block (resolved values)."""
  p = progressive
  return plan_stages(
      num_stages=p['num_stages'], epochs=epochs, total_steps=total_steps,
      num_train_examples=num_train_examples, batch_size=batch_size,
      min_image_size=p['min_image_size'], max_image_size=p['max_image_size'],
      size_rule=p.get('size_rule', 'linear'),
      randaug_magnitude=tuple(p['randaug_magnitude']),
      mixup_alpha=tuple(p['mixup_alpha']),
      cutmix_alpha=tuple(p['cutmix_alpha']),
      dropout_rate=tuple(p['dropout_rate']),
      batch_size_rule=p.get('batch_size_rule', 'constant'),
      batch_multiple=batch_multiple,
      max_batch_size=p.get('max_batch_size') or None)


class LinearStagePlanner(StagePlanner):
  """The default planner: hands out a precomputed plan in order."""

  def __init__(self, stages: Sequence[StageSettings]):
    if not stages:
      raise ValueError('a stage plan needs at least one stage')
    self.stages = tuple(stages)
    self.total_steps = self.stages[-1].end_step
    self.total_epochs = self.stages[-1].end_epoch
    self.num_stages = len(self.stages)

  def next_stage(self, history: Sequence[StageResult]
                 ) -> StageSettings | None:
    done = len(history)
    return self.stages[done] if done < len(self.stages) else None

  def expected_stages(self, history: Sequence[StageResult]
                      ) -> tuple[StageSettings, ...]:
    return self.stages[len(history):]


def upcoming_shapes(planner: StagePlanner,
                    history: Sequence[StageResult]) -> list[tuple[int, int]]:
  """(batch, size) of the stages expected after the next one, each once."""
  shapes = []
  for stage in planner.expected_stages(history)[1:]:
    shape = (stage.batch_size, stage.image_size)
    if shape not in shapes:
      shapes.append(shape)
  return shapes


def check_next_stage(settings: StageSettings, history: Sequence[StageResult],
                     total_steps: int) -> None:
  """Raises if a planner's stage does not continue where the last one ended."""
  expected = history[-1].settings.end_step if history else 0
  if settings.start_step != expected:
    raise ValueError(
        f'planner returned stage {settings.index} starting at step '
        f'{settings.start_step}; the previous stage ended at {expected}')
  if not settings.start_step < settings.end_step <= total_steps:
    raise ValueError(
        f'planner returned stage {settings.index} with steps '
        f'[{settings.start_step}, {settings.end_step}); it must be non-empty '
        f'and end by total_steps={total_steps}')
  if math.isnan(settings.dropout_rate) or not 0 <= settings.dropout_rate < 1:
    raise ValueError(
        f'planner returned dropout_rate={settings.dropout_rate} for stage '
        f'{settings.index}; it must be in [0, 1)')
