"""Pure train and eval steps over `TrainState` pytrees.

The steps close over static things only (graph definition, the optimizer's
kind, the schedule's shape, BN grouping); everything that changes during
training is an argument, including the stage's dropout rate and
learning-rate numbers (`hparams`, traced scalars). So an executable depends
on the input shapes alone: one compile per distinct (batch, image size), and
a planner that changes only regularisation reuses it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effnetv2_jax.training import ema as ema_lib
from effnetv2_jax.training import optimizer as optimizer_lib
from effnetv2_jax.training.state import TrainState


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


def _topk_correct(logits, labels, k: int):
  """1.0 where any of the k highest logits is a positive class of the label."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = jnp.take_along_axis(labels, top, axis=-1) > 0
  return hit.any(-1).astype(jnp.float32)


def make_train_step(graphdef, make_optimizer: Callable, *,
                    lr_fn: Callable, label_smoothing: float = 0.1,
                    loss: str = 'softmax', normalize_labels: bool = False,
                    weight_decay: float = 0.0, drop_path_rate: float = 0.2,
                    bn_groups: int = 1, ema_decay: float = 0.9999,
                    ema_ramp: bool = True) -> Callable:
  """`train_step(state, batch, hparams) -> (state, metrics)`.

  `hparams` holds traced scalars: `dropout_rate` and the learning-rate
  numbers of `schedules.stage_hparams`.

  Args:
    graphdef: static graph of the model (`ModelSpec.graphdef()`).
    make_optimizer: learning rate -> optax transformation (its state layout
      must not depend on the rate); called inside the trace with this step's
      rate, which is how TF1 RMSProp sees the schedule.
    lr_fn: `lr(step, hparams)`, see `schedules.learning_rate_fn`.
    label_smoothing, loss, normalize_labels: the loss.
    weight_decay: only to report the L2 term; the optimizer applies it.
    drop_path_rate: stochastic-depth drop rate of the last block.
    bn_groups: >1 computes BN moments over that many equal batch groups.
    ema_decay, ema_ramp: the weight average (ignored when the state has none).
  """

  def loss_fn(params, batch_stats, batch, rng, dropout_rate):
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(batch['image'], training=True, rng=rng,
                   dropout_rate=dropout_rate, drop_path_rate=drop_path_rate,
                   bn_groups=bn_groups)
    new_batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    if loss == 'sigmoid':
      per_example = sigmoid_cross_entropy(logits, batch['label'],
                                          label_smoothing=label_smoothing)
    else:
      per_example = cross_entropy(logits, batch['label'],
                                  label_smoothing=label_smoothing,
                                  normalize_labels=normalize_labels)
    return per_example.mean(), (logits, new_batch_stats)

  def train_step(state: TrainState, batch, hparams):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss_value, (logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, batch, rng, hparams['dropout_rate'])
    learning_rate = lr_fn(state.step, hparams)
    tx = make_optimizer(learning_rate)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if state.ema_params is not None:
      decay = ema_lib.ema_decay(step, ema_decay, ema_ramp)
      ema_params = ema_lib.ema_update(state.ema_params, params, decay)
      ema_batch_stats = ema_lib.ema_update(state.ema_batch_stats, batch_stats,
                                           decay)
    else:
      ema_params = ema_batch_stats = None
    new_state = state.replace(
        step=step, params=params, batch_stats=batch_stats,
        opt_state=opt_state, ema_params=ema_params,
        ema_batch_stats=ema_batch_stats)
    metrics = {
        'loss': loss_value,
        'l2_loss': optimizer_lib.l2_loss(state.params, weight_decay),
        'learning_rate': learning_rate,
        'grad_norm': optax.tree.norm(grads),
        # Against mixed labels this is the share of dominant-class hits.
        'train_top1': _topk_correct(
            logits, jax.nn.one_hot(batch['label'].argmax(-1),
                                   batch['label'].shape[-1]), 1).mean(),
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable:
  """`eval_step(params, batch_stats, batch) -> sums` for one set of weights.

  Returns masked sums (loss, top-1, top-5 hits, example count) so padded
  examples count for nothing and the caller divides once at the end. The
  raw and the EMA weights go through the same compiled program.
  """

  def eval_step(params, batch_stats, batch):
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(batch['image'], training=False)
    labels = batch['label'].astype(jnp.float32)
    mask = batch['mask'].astype(jnp.float32)
    loss = cross_entropy(logits, labels, normalize_labels=True)
    return {
        'count': jnp.sum(mask),
        'loss': jnp.sum(loss * mask),
        'top1': jnp.sum(_topk_correct(logits, labels, 1) * mask),
        'top5': jnp.sum(_topk_correct(logits, labels, 5) * mask),
    }

  return eval_step


def summarize_eval(total: dict[str, Any]) -> dict[str, float]:
  """Sums over the eval set -> means: loss, top1, top5 (and ema_*)."""
  count = max(float(total['count']), 1.0)
  return {key: float(value) / count for key, value in total.items()
          if key != 'count'}
