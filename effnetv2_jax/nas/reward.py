"""The search's reward, A * S^w * P^v (EfficientNetV2 §3.3), from raw records.

A is the trial's accuracy on the holdout split, S its training step time
divided by the reference architecture's (the backbone, timed in the same
search on the same hardware) and P its parameter count divided by the
reference's. The paper's exponents are w = -0.07 and v = -0.05: doubling the
step time costs 4.7% of reward, doubling the parameters 3.4%. Normalising by
the reference does not change rankings; it keeps the reward on the scale of
the accuracy, which matters to REINFORCE's advantage.

Trials keep the raw values (accuracy, seconds, parameters), so a reward is
always recomputed here: other exponents, or a reference median that more
re-timings have moved, re-score the whole search (`report --w --v`).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable, Mapping, Sequence

W = -0.07
V = -0.05


def reward(accuracy: float, step_time_ratio: float, params_ratio: float, *,
           w: float = W, v: float = V) -> float:
  """A * S^w * P^v."""
  if step_time_ratio <= 0 or params_ratio <= 0:
    raise ValueError('step time and parameter ratios must be positive, got '
                     f'S={step_time_ratio!r}, P={params_ratio!r}')
  return accuracy * step_time_ratio**w * params_ratio**v


@dataclasses.dataclass(frozen=True)
class Reference:
  """The reference architecture's timings on one kind of hardware."""

  hardware: str
  step_times_s: tuple[float, ...]
  params: int

  @property
  def step_time_s(self) -> float:
    return statistics.median(self.step_times_s)

  @property
  def spread(self) -> float:
    """(slowest - fastest) / median of the re-timings: how far apart two
    timings of the same network fall in this search."""
    times = self.step_times_s
    return (max(times) - min(times)) / self.step_time_s if times else 0.0


def references(records: Iterable[Mapping]) -> dict[str, Reference]:
  """Reference timings grouped by hardware, from completed reference
  records (`{'hardware', 'step_time_s', 'params'}`)."""
  times: dict[str, list[float]] = {}
  params: dict[str, int] = {}
  for r in records:
    times.setdefault(r['hardware'], []).append(float(r['step_time_s']))
    params[r['hardware']] = int(r['params'])
  return {h: Reference(h, tuple(t), params[h]) for h, t in times.items()}


@dataclasses.dataclass(frozen=True)
class Score:
  accuracy: float
  step_time_ratio: float  # S
  params_ratio: float  # P
  reward: float

  @property
  def objectives(self) -> tuple[float, float, float]:
    """(A, -S, -P): every objective maximised, for multi-objective search."""
    return (self.accuracy, -self.step_time_ratio, -self.params_ratio)


def score(metrics: Mapping, refs: Mapping[str, Reference], *, w: float = W,
          v: float = V) -> Score | None:
  """A candidate's score from its raw metrics (`accuracy`, `step_time_s`,
  `params`, `hardware`), or None while no reference was timed on its
  hardware."""
  ref = refs.get(metrics['hardware'])
  if ref is None:
    return None
  s = float(metrics['step_time_s']) / ref.step_time_s
  p = float(metrics['params']) / ref.params
  a = float(metrics['accuracy'])
  return Score(a, s, p, reward(a, s, p, w=w, v=v))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
  """Indices of the points no other point dominates (all maximised)."""
  def dominates(a, b):
    return all(x >= y for x, y in zip(a, b)) and any(
        x > y for x, y in zip(a, b))
  return [i for i, p in enumerate(points)
          if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
