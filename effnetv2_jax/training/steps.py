"""Losses and evaluation sums: pure functions of logits and labels.

`task.TrainTask` composes them into the train and eval steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0,
                  normalize_labels: bool = False):
  """Per-example softmax cross-entropy with soft labels [B, C].

  Label smoothing follows `tf.losses.softmax_cross_entropy`: labels become
  `labels * (1 - s) + s / C`. `normalize_labels` divides multi-hot labels by
  their sum first (ImageNet-21k images can carry several classes).
  """
  labels = labels.astype(jnp.float32)
  if normalize_labels:
    labels = labels / jnp.maximum(labels.sum(-1, keepdims=True), 1e-12)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)


def sigmoid_cross_entropy(logits, labels, *, label_smoothing: float = 0.0):
  """Per-example sigmoid loss, summed over classes (multi-label 21k)."""
  labels = labels.astype(jnp.float32)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
  return optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), labels).sum(-1)


def topk_correct(logits, labels, k: int):
  """1.0 where any of the k highest logits is a positive class of the label."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = jnp.take_along_axis(labels, top, axis=-1) > 0
  return hit.any(-1).astype(jnp.float32)


def eval_sums(logits, batch) -> dict[str, jax.Array]:
  """Masked sums over one eval batch: loss, top-1 and top-5 hits, count.

  Padded examples (mask 0) count for nothing, so the caller adds batches up
  and divides once at the end (`summarize_eval`).
  """
  labels = batch['label'].astype(jnp.float32)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, labels, normalize_labels=True)
  return {
      'count': jnp.sum(mask),
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(topk_correct(logits, labels, 1) * mask),
      'top5': jnp.sum(topk_correct(logits, labels, 5) * mask),
  }


def summarize_eval(total: dict[str, Any]) -> dict[str, float]:
  """Sums over the eval set -> means: loss, top1, top5 (and ema_*)."""
  count = max(float(total['count']), 1.0)
  return {key: float(value) / count for key, value in total.items()
          if key != 'count'}
