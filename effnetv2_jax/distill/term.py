"""The distillation loss: the model's own features pulled toward a second
extractor stacked on them (or, for the ablation, label heads on the same
taps).

For each tap, F1 is the model's feature there and F2 = extractor(F1):

    loss = weight * distance(F1, stop_gradient(F2))     (trains the model)
         + head_weight * task_loss(extractor head(F2))  (trains the extractor)

The extractor reads stop_gradient(F1): its own head loss trains the
extractor only, and no gradient reaches the extractor through the target, so
the model learns from the distance and its own task loss alone. Distances
are normalised per tap so that taps of different widths and scales weigh
alike: 'l2' is the mean squared difference over the mean square of F2;
'cosine' is 1 - cosine similarity along the channel axis, averaged.

The ablation (`LabelHeads`) puts a pooled linear head on each tap and adds
its task loss, with gradients into the model: the "deep supervision" that
Be Your Own Teacher (Zhang et al., ICCV 2019) is sometimes said to amount
to.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

DISTANCES = ('l2', 'cosine')
_EPS = 1e-6


def distance(f1: jax.Array, f2: jax.Array, kind: str) -> jax.Array:
  """A scale-free distance between two feature tensors of one shape."""
  f1 = f1.astype(jnp.float32)
  f2 = f2.astype(jnp.float32)
  if kind == 'l2':
    return jnp.mean((f1 - f2) ** 2) / (jnp.mean(f2 ** 2) + _EPS)
  if kind == 'cosine':
    dot = jnp.sum(f1 * f2, axis=-1)
    norms = jnp.linalg.norm(f1, axis=-1) * jnp.linalg.norm(f2, axis=-1)
    return jnp.mean(1.0 - dot / (norms + _EPS))
  raise ValueError(f'distance must be one of {DISTANCES}, got {kind!r}')


@dataclasses.dataclass(frozen=True)
class Tap:
  """A model feature (`features[feature]`) and the extra network on it."""

  feature: str
  extra: str


@dataclasses.dataclass(frozen=True)
class StackedDistillation:
  """The loss term of stacked self-distillation (a `task.LossTerm`)."""

  taps: tuple[Tap, ...]
  task_loss: Callable  # (logits, labels) -> per-example loss
  weight: float = 1.0
  head_weight: float = 1.0
  distance: str = 'l2'
  name: str = 'distill'
  needs_features: bool = True

  def __call__(self, inputs) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    labels = inputs.batch['label']
    for index, tap in enumerate(self.taps):
      f1 = inputs.features[tap.feature]
      extractor = inputs.extras[tap.extra]
      f2, logits = extractor(jax.lax.stop_gradient(f1), training=True,
                             rng=jax.random.fold_in(inputs.rng, index))
      total = total + self.weight * distance(
          f1, jax.lax.stop_gradient(f2), self.distance)
      total = total + self.head_weight * self.task_loss(logits, labels).mean()
    return total / len(self.taps)


class LabelHead(nnx.Module):
  """Mean-pool over the spatial or token axes, then a linear classifier."""

  def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.classifier = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, features, *, training: bool = False, rng=None):
    del training, rng
    pooled = jnp.mean(features.astype(jnp.float32),
                      axis=tuple(range(1, features.ndim - 1)))
    return self.classifier(pooled).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LabelHeadSpec:
  """What `task.ExtraNetwork` builds for the ablation's head on one tap."""

  width: int
  num_classes: int

  def build(self, seed):
    return LabelHead(self.width, self.num_classes, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class LabelHeads:
  """The ablation: a task loss from a label head on each tap, with
  gradients into the model; no stacked extractor."""

  taps: tuple[Tap, ...]
  task_loss: Callable
  head_weight: float = 1.0
  name: str = 'label_heads'
  needs_features: bool = True

  def __call__(self, inputs) -> jax.Array:
    labels = inputs.batch['label']
    total = jnp.zeros((), jnp.float32)
    for tap in self.taps:
      logits = inputs.extras[tap.extra](inputs.features[tap.feature],
                                        training=True)
      total = total + self.head_weight * self.task_loss(logits, labels).mean()
    return total / len(self.taps)
