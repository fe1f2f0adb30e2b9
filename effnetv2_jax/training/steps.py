"""Pure train and eval steps over `TrainState` pytrees.

The steps close over static things only (graph definition, the optimizer's
kind, the schedule's shape, BN grouping); everything that changes during
training is an argument, including the stage's dropout rate and
learning-rate numbers (`hparams`, traced scalars). So an executable depends
on the input shapes alone: one compile per distinct (batch, image size), and
a planner that changes only regularisation reuses it.

A train step is two functions: the gradient step (forward and backward; its
program depends on the image size) and the update step (optimizer and EMA;
one program for the whole run). `make_train_step` composes them.
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


def make_gradient_step(graphdef, *, label_smoothing: float = 0.1,
                       loss: str = 'softmax', normalize_labels: bool = False,
                       drop_path_rate: float = 0.2, bn_groups: int = 1
                       ) -> Callable:
  """`gradient_step(state, batch, hparams) -> (grads, batch_stats, metrics)`.

  The part of a train step that depends on the input shape: forward and
  backward pass, and the BatchNorm statistics of this batch. `hparams` holds
  traced scalars, of which this part reads `dropout_rate`.

  Args:
    graphdef: static graph of the model (`ModelSpec.graphdef()`).
    label_smoothing, loss, normalize_labels: the loss.
    drop_path_rate: stochastic-depth drop rate of the last block.
    bn_groups: >1 computes BN moments over that many equal batch groups.
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

  def gradient_step(state: TrainState, batch, hparams):
    # The step number folded into the base key: a resumed run draws the
    # same dropout and stochastic-depth masks as an uninterrupted one.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss_value, (logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, batch, rng, hparams['dropout_rate'])
    labels = batch['label']
    metrics = {
        'loss': loss_value,
        # Against mixed labels this is the share of dominant-class hits.
        'train_top1': _topk_correct(
            logits, jax.nn.one_hot(labels.argmax(-1), labels.shape[-1]),
            1).mean(),
    }
    return grads, batch_stats, metrics

  return gradient_step


def make_update_step(make_optimizer: Callable, *, lr_fn: Callable,
                     weight_decay: float = 0.0, ema_decay: float = 0.9999,
                     ema_ramp: bool = True) -> Callable:
  """`update_step(state, grads, batch_stats, hparams) -> (state, metrics)`.

  The part of a train step that does not depend on the input shape:
  optimizer, weight average and step counter. Compiled once per run, not
  once per stage; on CPU it is as costly to compile as the model's backward
  pass (hundreds of small per-variable kernels).

  Args:
    make_optimizer: learning rate -> optax transformation (its state layout
      must not depend on the rate); called inside the trace with this step's
      rate, which is how TF1 RMSProp sees the schedule.
    lr_fn: `lr(step, hparams)`, see `schedules.learning_rate_fn`.
    weight_decay: only to report the L2 term; the optimizer applies it.
    ema_decay, ema_ramp: the weight average (ignored when the state has none).
  """

  def update_step(state: TrainState, grads, batch_stats, hparams):
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
    metrics = {'learning_rate': learning_rate,
               'grad_norm': optax.tree.norm(grads)}
    if weight_decay:
      metrics['l2_loss'] = optimizer_lib.l2_loss(state.params, weight_decay)
    return new_state, metrics

  return update_step


def make_train_step(graphdef, make_optimizer: Callable, *, lr_fn: Callable,
                    label_smoothing: float = 0.1, loss: str = 'softmax',
                    normalize_labels: bool = False, weight_decay: float = 0.0,
                    drop_path_rate: float = 0.2, bn_groups: int = 1,
                    ema_decay: float = 0.9999, ema_ramp: bool = True
                    ) -> Callable:
  """`train_step(state, batch, hparams) -> (state, metrics)`: both parts.

  One function for users who jit a whole step (tests, notebooks); the
  trainer compiles the two parts separately (see `make_update_step`). The
  arguments are those of `make_gradient_step` and `make_update_step`.
  """
  gradient_step = make_gradient_step(
      graphdef, label_smoothing=label_smoothing, loss=loss,
      normalize_labels=normalize_labels, drop_path_rate=drop_path_rate,
      bn_groups=bn_groups)
  update_step = make_update_step(make_optimizer, lr_fn=lr_fn,
                                 weight_decay=weight_decay,
                                 ema_decay=ema_decay, ema_ramp=ema_ramp)

  def train_step(state: TrainState, batch, hparams):
    grads, batch_stats, metrics = gradient_step(state, batch, hparams)
    state, update_metrics = update_step(state, grads, batch_stats, hparams)
    return state, dict(metrics, **update_metrics)

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
