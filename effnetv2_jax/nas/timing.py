"""Training step time, measured so that different trials compare.

The search's S needs timings that differ only by architecture: each is the
trainer's own step (the task's gradient and update programs, as the loop runs
them) at one fixed batch and the trial's final image size, compiled before
timing starts (from the search's shared compilation cache when another trial
had the same shapes), run for warm-up steps that are thrown away, then timed
one step at a time with the result waited for. The median of the timed steps
is the trial's step time. The driver gives each trial its own devices, so no
other trial computes on them while it times.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time

import jax
import numpy as np

from effnetv2_jax.training import compilation


@dataclasses.dataclass(frozen=True)
class StepTiming:
  batch_size: int
  image_size: int
  warmup_steps: int
  step_times_s: tuple[float, ...]
  compile_time_s: float
  programs: tuple[dict, ...]  # {'kind', 'seconds', 'cache_hit'} each

  @property
  def step_time_s(self) -> float:
    return statistics.median(self.step_times_s)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), step_times_s=list(self.step_times_s),
                programs=list(self.programs), step_time_s=self.step_time_s)


def hardware_signature() -> str:
  """What a step time depends on besides the network: the device kind and
  count (and, on CPU, the cores this process may use and their model)."""
  devices = jax.devices()
  text = f'{jax.default_backend()}:{devices[0].device_kind}x{len(devices)}'
  if jax.default_backend() == 'cpu':
    text += f' {len(os.sched_getaffinity(0))} cores {_cpu_model()}'
  return text


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown cpu'


def synthetic_batch(task, batch_size: int, image_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  classes = task.model.num_classes
  images = rng.standard_normal(
      (batch_size, image_size, image_size, 3)).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[
      rng.integers(0, classes, batch_size)]
  return jax.device_put({'image': images, 'label': labels},
                        task.batch_sharding)


def time_train_step(task, state, *, batch_size: int, image_size: int,
                    warmup_steps: int, steps: int, dropout_rate: float,
                    cache_enabled: bool) -> StepTiming:
  """Times `task`'s train step on `state` (donated: do not use it after)."""
  if steps < 1 or warmup_steps < 0:
    raise ValueError(f'need steps >= 1 and warmup_steps >= 0, got {steps}, '
                     f'{warmup_steps}')
  compiler = compilation.Compiler(task, cache_enabled=cache_enabled)
  try:
    gradient, _ = compiler.get('gradient', batch_size, image_size)
    update, _ = compiler.get('update')
  finally:
    compiler.close()
  batch = synthetic_batch(task, batch_size, image_size)
  hparams = task.hparams(batch_size=batch_size, start_step=0,
                         start_epoch=0.0, dropout_rate=dropout_rate)

  def step(state):
    grads, stats, metrics = gradient.executable(state, batch, hparams)
    state, _ = update.executable(state, grads, stats, hparams)
    jax.block_until_ready((state.step, metrics))
    return state

  for _ in range(warmup_steps):
    state = step(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state = step(state)
    times.append(time.perf_counter() - start)
  return StepTiming(
      batch_size=batch_size, image_size=image_size,
      warmup_steps=warmup_steps, step_times_s=tuple(times),
      compile_time_s=gradient.seconds + update.seconds,
      programs=tuple(
          dict(kind=kind, seconds=c.seconds, cache_hit=c.cache_hit)
          for kind, c in (('gradient', gradient), ('update', update))))
