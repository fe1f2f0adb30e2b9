"""Learning-rate schedules, as pure functions of the (fractional) epoch.

The official schedule is written in steps at one batch size. Progressive
learning may change the batch size from stage to stage, so here a schedule is
a function of *epochs seen* and the batch-size rule (`lr = lr_per_256 * B /
256`) is applied per stage; a stage converts its step counter to epochs. At a
constant batch size this is the official schedule:

    warmup:  lr = peak * epoch / warmup_epochs               (epoch < warmup)
    decay:   lr = peak * decay_rate ** floor(epoch / decay_epochs)

with the exponential staircase counted from epoch 0, not from the end of the
warmup, so right after a 5-epoch warmup the rate is already peak * 0.97**2.
As in the official code the warmup lasts int(warmup_epochs * steps per
epoch) whole steps (`warmup_epochs_in_steps`).
After decay (not during the warmup) the rate is floored at `min_lr_per_256 *
B / 256`, the official `lr_min` scaled by the batch size like the peak.

Importable without tensorflow or ml_collections.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp

KINDS = ('exponential', 'cosine', 'constant')


def peak_learning_rate(lr_per_256: float, batch_size: int) -> float:
  """The linear batch-size rule of the official code (0.016 * 4096/256)."""
  return lr_per_256 * batch_size / 256.0


def learning_rate_at(epoch, *, peak: float, kind: str = 'exponential',
                     warmup_epochs: float = 5.0, total_epochs: float = 350.0,
                     decay_epochs: float = 2.4, decay_rate: float = 0.97,
                     min_lr: float = 0.0, warmup_until=None):
  """Learning rate at a fractional epoch (python float or traced array).

  Args:
    epoch: epochs seen so far (examples / train-set size).
    peak: the rate reached at the end of the warmup.
    kind: 'exponential' (staircase, the ImageNet-1k recipe), 'cosine' (21k
      pretraining, the paper's fine-tuning) or 'constant' (the official
      fine-tuning code).
    warmup_epochs: linear warmup length from 0; 0 disables it.
    total_epochs: length of the run (the cosine period).
    decay_epochs, decay_rate: the staircase.
    min_lr: floor after decay (absolute; `learning_rate_fn` scales the
      config's per-256 floor by the stage's batch size, as the official
      code scales `lr_min`).
    warmup_until: the epoch from which the decayed rate applies (default
      warmup_epochs); `learning_rate_fn` puts it half a step before the
      warmup's last step so float32 epochs cannot land on the wrong side.
      warmup_epochs may then be traced.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  peak = jnp.asarray(peak, jnp.float32)
  if kind == 'exponential':
    decayed = peak * jnp.power(decay_rate, jnp.floor(epoch / decay_epochs))
  elif kind == 'cosine':
    # Official `CosineLrSchedule`: the cosine is over the whole run, counted
    # from step 0; the warmup only overrides its start.
    progress = jnp.clip(epoch / total_epochs, 0.0, 1.0)
    decayed = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
  elif kind == 'constant':
    decayed = peak * jnp.ones_like(epoch)
  else:
    raise ValueError(f'schedule.kind must be one of {KINDS}, got {kind!r}')
  decayed = jnp.maximum(decayed, min_lr)
  if warmup_until is None:
    if not warmup_epochs > 0:
      return decayed
    warmup_until = warmup_epochs
  warm = peak * epoch / warmup_epochs
  return jnp.where(epoch < warmup_until, warm, decayed)


STAGE_HPARAM_NAMES = ('peak_lr', 'start_step', 'start_epoch',
                      'epochs_per_step', 'warmup_epochs')


def warmup_epochs_in_steps(warmup_epochs: float, *, batch_size: int,
                           num_train_examples: int) -> float:
  """The warmup length the official code uses, in epochs: it warms up for
  int(warmup_epochs * steps_per_epoch) whole steps (1533 steps = 4.99876
  epochs for ImageNet at batch 4096), not warmup_epochs exactly."""
  steps_per_epoch = num_train_examples / batch_size
  return int(warmup_epochs * steps_per_epoch) / steps_per_epoch


def stage_hparams(schedule: Mapping[str, Any], *, batch_size: int,
                  start_step: int, start_epoch: float,
                  num_train_examples: int) -> dict[str, float]:
  """The per-stage numbers the step needs to compute its learning rate.

  They are passed to the jitted step as traced scalars, so the compiled
  program depends on shapes only: a stage whose batch size changes the peak
  rate, or a planner that changes regularisation, reuses an executable (and
  the persistent compilation cache) compiled for the same shapes.
  """
  return {
      'peak_lr': peak_learning_rate(schedule['lr_per_256'], batch_size),
      'start_step': float(start_step),
      'start_epoch': float(start_epoch),
      'epochs_per_step': batch_size / num_train_examples,
      'warmup_epochs': warmup_epochs_in_steps(
          schedule.get('warmup_epochs', 5.0), batch_size=batch_size,
          num_train_examples=num_train_examples),
  }


def learning_rate_fn(schedule: Mapping[str, Any], *,
                     total_epochs: float) -> Callable:
  """`lr(step, stage_hparams)` for the config's `schedule` block.

  The schedule's shape (kind, warmup, staircase) is static; the stage's peak
  rate, step-to-epoch conversion and warmup length in whole steps come from
  `stage_hparams` (traced). The
  floor `min_lr_per_256` scales with the stage's batch like the peak, i.e.
  it is the peak times min_lr_per_256 / lr_per_256.
  """
  warms_up = schedule.get('warmup_epochs', 5.0) > 0
  kwargs = dict(
      kind=schedule.get('kind', 'exponential'),
      total_epochs=total_epochs,
      decay_epochs=schedule.get('decay_epochs', 2.4),
      decay_rate=schedule.get('decay_rate', 0.97))
  floor_per_256 = schedule.get('min_lr_per_256', 0.0)
  floor_ratio = floor_per_256 / schedule['lr_per_256'] if floor_per_256 else 0.0

  def lr_fn(step, hparams):
    step = jnp.asarray(step, jnp.float32)
    epoch = (hparams['start_epoch'] +
             (step - hparams['start_step']) * hparams['epochs_per_step'])
    if warms_up:
      warmup = dict(warmup_epochs=hparams['warmup_epochs'],
                    warmup_until=(hparams['warmup_epochs']
                                  - 0.5 * hparams['epochs_per_step']))
    else:
      warmup = dict(warmup_epochs=0.0)
    return learning_rate_at(epoch, peak=hparams['peak_lr'],
                            min_lr=hparams['peak_lr'] * floor_ratio,
                            **warmup, **kwargs)

  return lr_fn
