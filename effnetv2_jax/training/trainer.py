"""`train_and_evaluate`: progressive training over a device mesh.

The loop, in the order it runs:
  Setup        validate the config, mesh, dataset info, compilation cache.
  Plan         the stage plan and the planner the loop asks for stages.
  State        born sharded (jax.eval_shape, then jax.jit with
               out_shardings), restored from the workdir, or initialised from
               a pretrained checkpoint.
  Stages       per stage: rebuild the input pipeline; get the train step
               compiled ahead of time for the stage's shape (logging compile
               time and memory before it runs); train; evaluate; checkpoint.
               Weights, optimizer state, EMA and step carry over.
               A train step runs as two programs: the gradient step (per
               image size) and the update step (optimizer and EMA, compiled
               once); later stages compile in the background meanwhile
               (on a GPU: all of them before the first step, see
               `compile_beside_training`).
  Outputs      summary.json, curves.png, clu metrics, model/ (EMA weights).

Exact resume: a checkpoint holds the whole state (including the base PRNG
key; each step folds its step number in), the stage settings and how many
batches of the stage were consumed; the input pipeline restarts at that batch
(`make_train_iterator(start_batch=...)` yields exactly the batches the
uninterrupted run would have seen).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from effnetv2_jax import host_memory
from effnetv2_jax.models import layers
from effnetv2_jax.models import onednn
from effnetv2_jax.models import xla_options
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer as optimizer_lib
from effnetv2_jax.training import progressive
from effnetv2_jax.training import recipes
from effnetv2_jax.training import reporting
from effnetv2_jax.training import schedules
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import steps as steps_lib

log = logging.getLogger(__name__)

ConfigError = config_checks.ConfigError
HPARAM_KEYS = ('dropout_rate', 'peak_lr', 'start_step', 'start_epoch',
               'epochs_per_step')


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; training stopped without saving it."""


# ----------------------------------------------------------------------------
# Setup helpers.


COMPILATION_CACHE_SUBDIR = 'compilation_cache'
# The cache directory the last run in this process set, so that the next
# run tells it apart from one the user set through `jax.config`.
_cache_set_by_trainer: str | None = None


def compilation_cache_dir(configured: str | None, workdir: str,
                          active: str | None = None) -> str | None:
  """The persistent compilation cache a run uses.

  Unset (None): the cache this process already has (`active`, e.g. set
  through `jax.config` in a notebook), else `workdir/compilation_cache` for
  a local workdir, so that a restarted or resumed run loads its stages'
  programs instead of compiling them again (S on an H100: 59-66 s per stage
  cold, ~5 s from the cache). A remote workdir gets none by default: JAX's
  cache then needs a filesystem library there, so name one explicitly.
  '' turns the cache off.
  """
  if configured is not None:
    return configured or None
  if active:
    return active
  if '://' in workdir:
    return None
  return os.path.join(workdir, COMPILATION_CACHE_SUBDIR)


def _cache_the_user_set() -> str | None:
  """This process's compilation cache, unless an earlier run here set it."""
  active = jax.config.jax_compilation_cache_dir
  return None if active == _cache_set_by_trainer else active


def enable_compilation_cache(directory: str | None) -> None:
  """Persistent XLA cache: a restarted job skips compiles it has done.
  None turns off a cache this process had."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  if not directory:
    if jax.config.jax_compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir', None)
      compilation_cache.reset_cache()
    return
  global _cache_set_by_trainer
  if '://' not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a mistyped or read-only path: name the key
      raise ConfigError(
          f'config.compilation_cache_dir={directory!r}: cannot create it '
          f'({e.strerror}); name a writable directory, or \'\' for no '
          'cache') from None
  jax.config.update('jax_compilation_cache_dir', directory)
  _cache_set_by_trainer = directory
  # Small models compile in about a second on CPU; cache every program.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()  # pick up a directory changed mid-process


def resolve_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}[name]


def bn_group_count(replicas_per_group: int, data_axis_size: int) -> int:
  """Number of BN groups of the global batch (the model's `bn_groups`).

  0: one group, moments over the global batch. N > 0: groups of N
  data-parallel replicas (N = 1 is per-device BN). -1: the official TPU
  BatchNorm, groups of min(8, replicas).
  """
  if replicas_per_group == 0:
    return 1
  if replicas_per_group < 0:
    replicas_per_group = min(8, data_axis_size)
  return data_axis_size // replicas_per_group


def _dataset_info(config):
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  try:
    return data.dataset_info(config.data.dataset,
                             data_dir=config.data.data_dir)
  except (ValueError, KeyError, data.DatasetNotPreparedError) as e:
    raise ConfigError(f'config.data.dataset={config.data.dataset!r}: {e}'
                      ) from None


def _stage_seed(seed: int, stage_index: int) -> int:
  # Each stage reshuffles differently, and identically across restarts.
  return int(np.random.SeedSequence([seed, stage_index]).generate_state(1)[0]
             % (2**31 - 1))


def _flatten_config(config) -> dict[str, Any]:
  out = {}
  for key in config_checks.flat_keys(config):
    value = config
    for part in key.split('.'):
      value = value[part]
    out[key] = value if isinstance(value, (int, float, str, bool)) else str(
        value)
  return out


class _PreemptionWatch:
  """Turns SIGTERM (a TPU preemption notice) into a flag the loop polls."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must stop (and save) at the same step.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return (multihost_utils.reached_preemption_sync_point(step) or
              self.requested)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


# ----------------------------------------------------------------------------
# Compilation, ahead of time and keyed by shape.


@dataclasses.dataclass
class Compiled:
  executable: Any
  seconds: float  # the compile's own wall time
  memory: dict[str, int]
  cache_hit: bool  # served by the persistent compilation cache


class _MissCounter:
  """Counts persistent-cache misses of compiles made on one thread."""

  def __init__(self):
    self._counts: dict[int, int] = {}
    from jax._src import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.register_event_listener(self._listen)
    self._monitoring = monitoring

  def _listen(self, event, **kwargs):
    del kwargs
    if event == '/jax/compilation_cache/cache_misses':
      ident = threading.get_ident()
      self._counts[ident] = self._counts.get(ident, 0) + 1

  def take(self) -> int:
    return self._counts.pop(threading.get_ident(), 0)

  def close(self):
    self._monitoring.unregister_event_listener(self._listen)


class Compiler:
  """Ahead-of-time compiles, keyed by kind and shape, in the background.

  A train step is two programs (see `steps.make_update_step`): the gradient
  step, one executable per (batch size, image size), and the update step,
  one for the whole run. Their learning-rate numbers and dropout rate are
  traced arguments, so executables depend on shapes only. The eval step is
  one executable at the eval size, used for the raw and the EMA weights.
  `prefetch` compiles on a background thread (XLA compiles outside the GIL)
  while the state is initialised or a stage trains; `get` returns the
  executable, waiting if it is not ready.
  """

  def __init__(self, *, gradient, update, evaluate, target, batch_sharding,
               repl, num_classes: int, cache_enabled: bool):
    self._jitted = {'gradient': gradient, 'update': update,
                    'eval': evaluate}
    self._target = target
    self._batch_sharding = batch_sharding
    self._repl = repl
    self._num_classes = num_classes
    self._cache_enabled = cache_enabled
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._misses = _MissCounter()

  def _batch(self, batch_size: int, image_size: int, with_mask: bool):
    spec = lambda *shape: jax.ShapeDtypeStruct(
        shape, jnp.float32, sharding=self._batch_sharding)
    batch = {'image': spec(batch_size, image_size, image_size, 3),
             'label': spec(batch_size, self._num_classes)}
    if with_mask:
      batch['mask'] = spec(batch_size)
    return batch

  def _lower(self, key):
    kind, shape = key[0], key[1:]
    jitted, target = self._jitted[kind], self._target
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self._repl)
    hparams = {k: scalar for k in HPARAM_KEYS}
    if kind == 'gradient':
      return jitted.lower(target, self._batch(*shape, False), hparams)
    if kind == 'update':
      return jitted.lower(target, target.params, target.batch_stats, hparams)
    return jitted.lower(target.params, target.batch_stats,
                        self._batch(*shape, True))

  def _compile(self, key) -> Compiled:
    self._misses.take()
    start = time.time()
    executable = xla_options.compile_lowered(self._lower(key))
    seconds = time.time() - start
    hit = self._cache_enabled and self._misses.take() == 0
    return Compiled(executable, seconds, memory_estimate(executable), hit)

  def prefetch(self, kind: str, *shape: int) -> None:
    key = (kind,) + shape
    if key not in self._futures:
      self._futures[key] = self._pool.submit(self._compile, key)

  def wait_all(self) -> float:
    """Waits for every compile asked for so far; returns seconds waited."""
    start = time.time()
    for future in list(self._futures.values()):
      future.result()
    return time.time() - start

  def get(self, kind: str, *shape: int) -> tuple[Compiled, float]:
    """(compiled program, seconds this call waited for it)."""
    start = time.time()
    self.prefetch(kind, *shape)
    compiled = self._futures[(kind,) + shape].result()
    return compiled, time.time() - start

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)
    self._misses.close()


def memory_estimate(compiled) -> dict[str, int]:
  """Per-device sizes from XLA's memory analysis ({} if unavailable)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if analysis is None:
    return {}
  out = {}
  for name in ('argument_size_in_bytes', 'output_size_in_bytes',
               'temp_size_in_bytes', 'alias_size_in_bytes',
               'generated_code_size_in_bytes'):
    value = getattr(analysis, name, None)
    if value is not None:
      out[name] = int(value)
  return out


def _combined_memory(gradient: dict[str, int], update: dict[str, int]
                     ) -> dict[str, int]:
  """Peak-relevant sizes of the two programs of a step, run one after the other.

  Arguments (state, batch) live through both; temporaries are not shared, so
  the larger of the two counts; outputs of the gradient program (gradients
  and statistics) are the update's arguments.
  """
  if not gradient or not update:
    return gradient or update
  out = dict(gradient)
  out['temp_size_in_bytes'] = max(gradient.get('temp_size_in_bytes', 0),
                                  update.get('temp_size_in_bytes', 0))
  out['output_size_in_bytes'] = (gradient.get('output_size_in_bytes', 0) +
                                 update.get('output_size_in_bytes', 0))
  out['alias_size_in_bytes'] = update.get('alias_size_in_bytes', 0)
  return out


def _format_memory(memory: dict[str, int]) -> str:
  if not memory:
    return 'unavailable'
  total = (memory.get('argument_size_in_bytes', 0) +
           memory.get('output_size_in_bytes', 0) +
           memory.get('temp_size_in_bytes', 0) -
           memory.get('alias_size_in_bytes', 0))
  return (f'{total / 2**20:,.1f} MiB per device (temporaries '
          f'{memory.get("temp_size_in_bytes", 0) / 2**20:,.1f} MiB)')


def _eta_seconds(planner, settings, step: int, total_steps: int,
                 step_time: float) -> float:
  """Time left, scaling later stages' steps by their pixels per batch.

  A step's cost grows about with batch * size**2, so a stage at 300 px costs
  5.5x one at 128 px; planners that cannot tell their later stages get the
  current speed for all remaining steps.
  """
  stages = getattr(planner, 'stages', None)
  if not stages:
    return (total_steps - step) * step_time
  cost = lambda s: s.batch_size * s.image_size**2
  left = (settings.end_step - step) * step_time
  for later in stages:
    if later.index > settings.index:
      left += later.num_steps * step_time * cost(later) / cost(settings)
  return left


def compile_beside_training(backend: str) -> bool:
  """Whether later stages may compile on a background thread while a stage
  trains (else they compile before its first step).

  Not on a GPU. On an H100 the S train steps ran 4-10x slower while a stage
  compiled beside them (benchmarks/README.md), so the overlap saved about
  nothing over compiling in the foreground. The likely cause is that XLA's
  convolution autotuner times its candidates on the device that is
  training; timings taken that way can also pick slow kernels, which the
  autotune cache would then keep. TPU compiles run on the host alone; on
  CPU the overlap is kept: there it saved 4.5-7 s of ~54 in a 4-stage run of
  the digits model (benchmarks/RESULTS.md), the steps beside a compile
  running ~1.3x slower.
  """
  return backend not in xla_options.GPU_BACKENDS


def _upcoming_shapes(planner, after_index: int) -> list[tuple[int, int]]:
  """(batch, size) of the planner's later stages, if it can tell them."""
  stages = getattr(planner, 'stages', None) or ()
  return [(s.batch_size, s.image_size) for s in stages
          if s.index > after_index]


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Context:
  """What every stage needs; built once by train_and_evaluate."""

  config: Any
  graphdef: Any
  shardings: Any
  repl: Any
  batch_sharding: Any
  num_classes: int
  num_train: int
  total_steps: int
  normalization: str
  compiler: Compiler
  reporter: reporting.Reporter
  ckpt: checkpointing.Checkpointer
  evaluate: Callable[[Any, int], dict]
  meta_for: Callable[..., dict]
  preemption: _PreemptionWatch
  planner: Any


def train_and_evaluate(config, workdir: str, *,
                       planner: progressive.StagePlanner | None = None
                       ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains (or resumes) the config's experiment in `workdir`.

  Args:
    config: an experiment config (see `recipes.base_config` for every key).
    workdir: checkpoints, metrics, summary.json and curves.png go here. A
      workdir holding a checkpoint is resumed exactly.
    planner: asked for each stage; None uses the config's linear plan.

  Returns:
    (final train state, summary dict). The summary is also written to
    `workdir/summary.json`: the final eval metrics (`eval`: top1, top5, loss
    and ema_*), per-stage wall time, compile time and images/sec (`stages`),
    the mean train step time (`mean_step_time_s`, for NAS rewards), the
    parameter count and `status` ('completed' or 'preempted').

  Raises:
    ConfigError: an invalid config value (the message names the key).
    NonFiniteLossError: the loss became NaN/Inf; the last good checkpoint is
      kept.
  """
  run_start = time.time()
  workdir = os.fspath(workdir)
  if '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)

  # ---- Setup -------------------------------------------------------------
  config_checks.validate(config, num_devices=jax.device_count(),
                         reference=recipes.base_config())
  cache_dir = compilation_cache_dir(config.compilation_cache_dir, workdir,
                                    _cache_the_user_set())
  enable_compilation_cache(cache_dir)
  log.info('persistent compilation cache: %s', cache_dir or 'off')
  mesh = mesh_lib.mesh_from_config(config.mesh)
  data_axis = mesh_lib.data_axis_size(mesh)
  batch_sharding = mesh_lib.data_sharding(mesh)
  repl = mesh_lib.replicated(mesh)
  info = _dataset_info(config)
  architecture = config_checks.resolve_architecture(config.model.arch)
  num_classes = config.model.num_classes or info.num_classes
  num_train = info.num_train_examples
  eval_size = config.eval.image_size or architecture.eval_size
  normalization = config.data.normalization or architecture.normalization
  bn_groups = bn_group_count(config.model.bn_replicas_per_group, data_axis)
  log.info('mesh %s over %d %s devices; BN moments over %s',
               dict(mesh.shape), jax.device_count(), jax.default_backend(),
               f'{bn_groups} groups' if bn_groups > 1 else 'the global batch')
  if jax.default_backend() == 'cpu':
    log.info('host memory: %s', host_memory.status())
  compute_dtype = resolve_dtype(config.model.dtype)
  if config.model.conv_impl == 'onednn':
    try:
      onednn.require()
    except onednn.OneDnnUnavailable as e:
      raise ConfigError(f"config.model.conv_impl='onednn': {e}") from None
  log.info('convolutions: %s',
           layers.describe_conv_impl(config.model.conv_impl, compute_dtype))

  # ---- Plan ----------------------------------------------------------------
  prog = config.progressive.to_dict()
  prog['max_image_size'] = prog['max_image_size'] or architecture.train_size
  try:
    plan = progressive.plan_from_config(
        prog, epochs=config.train.epochs, num_train_examples=num_train,
        batch_size=config.train.batch_size, batch_multiple=data_axis,
        total_steps=config.train.total_steps or None)
  except ValueError as e:
    raise ConfigError(f'config.progressive / config.train: {e}') from None
  if planner is None:
    planner = progressive.LinearStagePlanner(plan)
  config_checks.check_eval_size(eval_size, [s.image_size for s in plan])
  total_steps = planner.total_steps

  # ---- State ---------------------------------------------------------------
  spec = state_lib.ModelSpec(
      architecture=architecture, num_classes=num_classes,
      drop_path_rate=config.model.drop_path_rate,
      bn_momentum=config.model.bn_momentum,
      bn_epsilon=config.model.bn_epsilon,
      dtype=compute_dtype,
      conv_impl=config.model.conv_impl)
  graphdef = spec.graphdef()
  use_ema = config.ema.decay > 0
  make_optimizer = functools.partial(optimizer_lib.build_from_config,
                                     config.optimizer)
  # The optimizer's state layout does not depend on the learning rate.
  init_fn = state_lib.make_init_fn(spec, make_optimizer(0.0),
                                   seed=config.seed, use_ema=use_ema)
  abstract = jax.eval_shape(init_fn)
  shardings = mesh_lib.state_shardings(
      abstract, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  target = state_lib.abstract_with_shardings(abstract, shardings)

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
      asynchronous=config.checkpoint.asynchronous)
  history: list[progressive.StageResult] = []
  stage_reports: list[dict[str, Any]] = []  # history plus timings, memory
  resume = None  # (settings, batches consumed, wall seconds so far)
  latest = ckpt.latest_step()
  if latest is not None:
    meta = ckpt.restore_meta(latest)
    history = [progressive.StageResult.from_dict(h) for h in meta['history']]
    stage_reports = meta.get('reports') or [h.to_dict() for h in history]
    if meta.get('stage'):
      resume = (progressive.StageSettings.from_dict(meta['stage']),
                int(meta['stage_batches']),
                float(meta.get('stage_elapsed_s', 0.0)))

  # The first stage's programs and the eval step compile in the
  # background from abstract shapes while the state is initialised or
  # restored.
  gradient_step = steps_lib.make_gradient_step(
      graphdef, label_smoothing=config.train.label_smoothing,
      loss=config.train.loss,
      normalize_labels=config.train.normalize_labels or info.multi_label,
      drop_path_rate=config.model.drop_path_rate, bn_groups=bn_groups)
  update_step = steps_lib.make_update_step(
      make_optimizer,
      lr_fn=schedules.learning_rate_fn(config.schedule,
                                       total_epochs=plan[-1].end_epoch),
      weight_decay=config.optimizer.weight_decay,
      ema_decay=config.ema.decay, ema_ramp=config.ema.ramp)
  compiler = Compiler(
      gradient=jax.jit(
          gradient_step, in_shardings=(shardings, batch_sharding, repl),
          out_shardings=(shardings.params, shardings.batch_stats, repl)),
      update=jax.jit(
          update_step, in_shardings=(shardings, shardings.params,
                                     shardings.batch_stats, repl),
          out_shardings=(shardings, repl), donate_argnums=(0,)),
      evaluate=jax.jit(
          steps_lib.make_eval_step(graphdef),
          in_shardings=(shardings.params, shardings.batch_stats,
                        batch_sharding),
          out_shardings=repl),
      target=target, batch_sharding=batch_sharding, repl=repl,
      num_classes=num_classes,
      cache_enabled=bool(cache_dir))
  first = resume[0] if resume else planner.next_stage(history)
  if first is not None:
    compiler.prefetch('gradient', first.batch_size, first.image_size)
    compiler.prefetch('update')
  # Needed at the first stage's end: next in the compile queue.
  compiler.prefetch('eval', config.eval.batch_size, eval_size)

  load_report = None
  try:
    if latest is not None:
      state, _ = ckpt.restore(latest, target)
      log.info('resumed from %s step %d (%s)', ckpt.directory, latest,
               f'{resume[0].describe()}, batch {resume[1]}' if resume
               else 'between stages')
    else:
      state = state_lib.init_sharded(init_fn, shardings)
      if config.init_from.path:
        state, load_report = _init_from_pretrained(
            state, config.init_from.path, config.init_from.prefer_ema,
            shardings)
  except BaseException:
    compiler.close()
    ckpt.close()
    raise
  num_params = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
  log.info('%s: %s parameters, %d classes, %d steps in %d stages',
           architecture.name, f'{num_params:,}', num_classes, total_steps,
           planner.num_stages)

  reporter = reporting.Reporter(workdir, total_steps=total_steps,
                                progress_bar=config.progress_bar,
                                start_step=latest or 0)
  if latest is None:
    reporter.hparams(_flatten_config(config))

  # ---- Evaluation ------------------------------------------------------------
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  eval_data = data.make_eval_iterator(
      config.data.dataset, data_dir=config.data.data_dir,
      split=config.data.eval_split, global_batch_size=config.eval.batch_size,
      image_size=eval_size, normalization=normalization,
      sharding=batch_sharding)
  eval_results: dict[int, dict[str, float]] = {}

  def evaluate(state, step: int) -> dict[str, float]:
    if step in eval_results:
      return eval_results[step]
    start = time.time()
    compiled, _ = compiler.get('eval', config.eval.batch_size, eval_size)
    eval_step = compiled.executable
    weights = {'': (state.params, state.batch_stats)}
    if use_ema:
      weights['ema_'] = (state.ema_params, state.ema_batch_stats)
    totals = {prefix: None for prefix in weights}
    for batch in eval_data:
      for prefix, (params, batch_stats) in weights.items():
        sums = eval_step(params, batch_stats, batch)
        totals[prefix] = sums if totals[prefix] is None else jax.tree.map(
            jnp.add, totals[prefix], sums)
    result = {}
    for prefix, total in totals.items():
      result.update({prefix + k: v for k, v in
                     steps_lib.summarize_eval(jax.device_get(total)).items()})
    result['eval_time_s'] = time.time() - start
    reporter.scalars(step, 'eval', result)
    ema = (f', EMA top-1 {100 * result["ema_top1"]:.2f}%'
           if 'ema_top1' in result else '')
    reporter.text(f'eval @ step {step} ({eval_size}px, '
                  f'{eval_data.num_examples} images): top-1 '
                  f'{100 * result["top1"]:.2f}%, top-5 '
                  f'{100 * result["top5"]:.2f}%, loss {result["loss"]:.4f}'
                  f'{ema} [{result["eval_time_s"]:.1f}s]')
    eval_results[step] = result
    return result

  def meta_for(step, settings=None, batches=0, elapsed=0.0):
    return {'step': int(step),
            'stage': settings.to_dict() if settings else None,
            'stage_batches': int(batches), 'stage_elapsed_s': float(elapsed),
            'history': [h.to_dict() for h in history],
            'reports': stage_reports}

  # ---- Stages ----------------------------------------------------------------
  status = 'completed'
  try:
    with _PreemptionWatch() as preemption:
      ctx = _Context(
          config=config, graphdef=graphdef, shardings=shardings, repl=repl,
          batch_sharding=batch_sharding, num_classes=num_classes,
          num_train=num_train, total_steps=total_steps,
          normalization=normalization, compiler=compiler, reporter=reporter,
          ckpt=ckpt, evaluate=evaluate, meta_for=meta_for,
          preemption=preemption, planner=planner)
      settings = first
      while settings is not None:
        if resume is None:
          progressive.check_next_stage(settings, history, total_steps)
          config_checks.check_stage(settings, data_axis)
        batches, elapsed = (resume[1], resume[2]) if resume else (0, 0.0)
        resume = None
        state, outcome = _run_stage(ctx, settings, state, batches, elapsed)
        if outcome['preempted']:
          status = 'preempted'
          break
        eval_metrics = {}
        last = settings.end_step >= total_steps
        if config.eval.at_stage_end or last:
          eval_metrics = evaluate(state, settings.end_step)
        result = progressive.StageResult(
            settings=settings, train_metrics=outcome['train_metrics'],
            eval_metrics=eval_metrics, wall_time_s=outcome['wall_time_s'],
            compile_time_s=outcome['compile_time_s'],
            images_per_sec=outcome['images_per_sec'])
        history.append(result)
        stage_reports.append(dict(
            result.to_dict(), step_time_s=outcome['step_time_s'],
            memory=outcome['memory'],
            compile_cache_hit=outcome['compile_cache_hit'],
            compile_wait_s=outcome['compile_wait_s'],
            update_compile_time_s=outcome['update_compile_time_s']))
        ckpt.save(settings.end_step, state, meta_for(settings.end_step))
        settings = planner.next_stage(history)
    ckpt.wait()
  except BaseException:
    reporter.close()
    raise
  finally:
    ckpt.close()
    compiler.close()

  # ---- Outputs ---------------------------------------------------------------
  final_step = int(jax.device_get(state.step))
  final_eval = evaluate(state, final_step) if status == 'completed' else {}
  summary = _summary(config, status=status, final_step=final_step,
                     total_steps=total_steps, final_eval=final_eval,
                     eval_size=eval_size, stage_reports=stage_reports,
                     num_params=num_params, num_classes=num_classes,
                     architecture=architecture, run_start=run_start,
                     load_report=load_report,
                     conv_impl=layers.resolve_conv_impl(
                         config.model.conv_impl, compute_dtype))
  if status == 'completed' and config.export_model:
    summary['model_dir'] = _export_model(
        state, workdir, architecture=architecture, num_classes=num_classes,
        normalization=normalization, config=config)
  if jax.process_index() == 0:
    reporting.write_summary(workdir, summary)
    try:
      reporting.plot_curves(
          workdir, [(r['settings']['start_step'], r['settings']['image_size'])
                    for r in stage_reports], title=config.experiment)
    except Exception as e:  # pylint: disable=broad-except
      log.warning('could not write the plot: %s', e)
  reporter.close()
  return state, summary


def _summary(config, *, status, final_step, total_steps, final_eval,
             eval_size, stage_reports, num_params, num_classes, architecture,
             run_start, load_report, conv_impl) -> dict[str, Any]:
  steps_of = lambda r: r['settings']['end_step'] - r['settings']['start_step']
  timed = [(r['step_time_s'], steps_of(r)) for r in stage_reports
           if r.get('step_time_s')]
  mean_step_time = (sum(t * n for t, n in timed) / sum(n for _, n in timed)
                    if timed else None)
  images = sum(steps_of(r) * r['settings']['batch_size']
               for r in stage_reports)
  wall = sum(r['wall_time_s'] for r in stage_reports)
  summary = {
      'experiment': config.experiment,
      'status': status,
      'final_step': final_step,
      'total_steps': total_steps,
      'eval': final_eval,
      'eval_image_size': eval_size,
      'stages': stage_reports,
      'mean_step_time_s': mean_step_time,
      'images_per_sec': images / wall if wall else None,
      # Gradient programs per stage, plus the update program once.
      'compile_time_s': (sum(r['compile_time_s'] for r in stage_reports) +
                         max([r.get('update_compile_time_s', 0.0)
                              for r in stage_reports] or [0.0])),
      'num_params': num_params,
      'num_classes': num_classes,
      'architecture': architecture.to_dict(),
      'dataset': config.data.dataset,
      'wall_time_s': time.time() - run_start,
      'devices': jax.device_count(),
      'backend': jax.default_backend(),
      'conv_impl': conv_impl,
  }
  if load_report is not None:
    summary['init_from'] = {
        'path': load_report.source, 'used_ema': load_report.used_ema,
        'loaded': len(load_report.loaded),
        'reinitialised': load_report.reinitialised}
  return summary


def to_host(tree):
  """numpy copy of a state subtree, also when it is sharded over hosts."""
  if all(x.is_fully_addressable or x.is_fully_replicated
         for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _export_model(state, workdir, *, architecture, num_classes, normalization,
                  config) -> str | None:
  """Writes workdir/model (EMA weights when there are) for inference."""
  from effnetv2_jax.models import weights  # pylint: disable=g-import-not-at-top
  use_ema = state.ema_params is not None
  params, batch_stats = to_host(
      (state.ema_params, state.ema_batch_stats) if use_ema
      else (state.params, state.batch_stats))
  if jax.process_index() != 0:
    return None
  if '://' in workdir:
    log.info('not exporting a model directory to %s (local paths only); '
                 'the checkpoint holds the weights', workdir)
    return None
  directory = os.path.join(workdir, 'model')
  weights.save_variables(
      directory, architecture=architecture, num_classes=num_classes,
      params=params, batch_stats=batch_stats,
      source=(f'effnetv2_jax training: {config.experiment}, step '
              f'{int(jax.device_get(state.step))}, '
              f'{"EMA" if use_ema else "raw"} weights'),
      normalization=normalization, bn_epsilon=config.model.bn_epsilon,
      overwrite=True)
  return directory


def _init_from_pretrained(state, path, prefer_ema, shardings):
  host_params, host_stats = to_host((state.params, state.batch_stats))
  params, batch_stats, report = checkpointing.load_pretrained(
      path, host_params, host_stats, prefer_ema=prefer_ema)
  print(report.describe(), flush=True)
  # Each device_put from host memory makes new buffers: the EMA copy must
  # not alias the weights, since the train step donates both.
  replace = dict(params=jax.device_put(params, shardings.params),
                 batch_stats=jax.device_put(batch_stats,
                                            shardings.batch_stats))
  if state.ema_params is not None:
    copy = lambda tree: jax.tree.map(np.array, tree)  # CPU may share memory
    replace.update(
        ema_params=jax.device_put(copy(params), shardings.ema_params),
        ema_batch_stats=jax.device_put(copy(batch_stats),
                                       shardings.ema_batch_stats))
  return state.replace(**replace), report


@dataclasses.dataclass
class _Pending:
  """Step metrics not yet read by the host (reading them syncs)."""

  since: float
  entries: list[tuple[int, dict]] = dataclasses.field(default_factory=list)
  images: int = 0


def _run_stage(ctx: _Context, settings: progressive.StageSettings, state,
               stage_batches: int, stage_elapsed: float):
  """Trains `settings` from batch `stage_batches` of the stage to its end."""
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  config, reporter, ckpt = ctx.config, ctx.reporter, ctx.ckpt
  reporter.text(settings.describe())
  stage_start = time.time()

  # Input pipeline for this stage's size and regularisation.
  train_data = data.make_train_iterator(
      config.data.dataset, data_dir=config.data.data_dir,
      global_batch_size=settings.batch_size, image_size=settings.image_size,
      seed=_stage_seed(config.seed, settings.index),
      augment=config.data.augment, randaug_layers=config.data.randaug_layers,
      randaug_magnitude=settings.randaug_magnitude,
      mixup_alpha=settings.mixup_alpha, cutmix_alpha=settings.cutmix_alpha,
      normalization=ctx.normalization, sharding=ctx.batch_sharding,
      start_batch=stage_batches)

  # The programs for this shape, compiled before the stage runs (perhaps
  # already, in the background); then start on the next stages' shapes.
  compiled, waited = ctx.compiler.get('gradient', settings.batch_size,
                                      settings.image_size)
  update, update_waited = ctx.compiler.get('update')
  waited += update_waited
  memory = _combined_memory(compiled.memory, update.memory)
  reporter.text(
      f'stage {settings.index + 1} step for batch {settings.batch_size} at '
      f'{settings.image_size}px: compiled in {compiled.seconds:.1f}s'
      f'{" from the persistent cache" if compiled.cache_hit else ""} '
      f'(waited {waited:.1f}s); memory {_format_memory(memory)}')
  reporter.scalars(settings.start_step, 'compile',
                   {'seconds': compiled.seconds, 'waited_s': waited,
                    'update_seconds': update.seconds,
                    **{k: float(v) for k, v in memory.items()}})
  if config.compile_ahead:
    for shape in _upcoming_shapes(ctx.planner, settings.index):
      ctx.compiler.prefetch('gradient', *shape)
    if not compile_beside_training(jax.default_backend()):
      ahead = ctx.compiler.wait_all()
      if ahead >= 0.1:
        reporter.text(f'later stages\' steps and the eval step compiled before '
                      f'this stage trains ({ahead:.1f}s), not beside it: on '
                      f'this backend the autotuner shares the device')

  hparams = jax.device_put(
      {k: np.float32(v) for k, v in dict(
          schedules.stage_hparams(
              config.schedule, batch_size=settings.batch_size,
              start_step=settings.start_step,
              start_epoch=settings.start_epoch,
              num_train_examples=ctx.num_train),
          dropout_rate=settings.dropout_rate).items()}, ctx.repl)

  step = first_step = settings.start_step + stage_batches
  pending = _Pending(since=time.time())
  train_seconds = 0.0  # stepping only: no compile, eval or checkpoint waits
  resumed_at = time.time()
  last_metrics: dict[str, float] = {}
  preempted = False
  log_every = config.log_every_steps
  ckpt_every = config.checkpoint.every_steps
  eval_every = config.eval.every_steps

  def read_pending() -> dict[str, float]:
    """Host-reads the pending metrics; stops on a non-finite loss."""
    if not pending.entries:
      return {}
    fetched = jax.device_get([m for _, m in pending.entries])
    for (at, _), metrics in zip(pending.entries, fetched):
      if not np.isfinite(metrics['loss']):
        ckpt.wait()
        good = ckpt.latest_step()
        kept = (f'the last good checkpoint is step {good} in {ckpt.directory}'
                if good is not None else 'no checkpoint had been written')
        raise NonFiniteLossError(
            f'loss is {metrics["loss"]} at step {at + 1} (stage '
            f'{settings.index + 1}/{settings.num_stages}, image size '
            f'{settings.image_size}, learning rate '
            f'{metrics["learning_rate"]:.4g}); training stopped and {kept}')
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    elapsed = time.time() - pending.since
    means['images_per_sec'] = pending.images / max(elapsed, 1e-9)
    means['step_time_s'] = elapsed / len(fetched)
    pending.entries.clear()
    pending.images = 0
    pending.since = time.time()
    return means

  while step < settings.end_step:
    batch = next(train_data)
    grads, batch_stats, metrics = compiled.executable(state, batch, hparams)
    state, update_metrics = update.executable(state, grads, batch_stats,
                                              hparams)
    pending.entries.append((step, dict(metrics, **update_metrics)))
    pending.images += settings.batch_size
    step += 1
    stage_batches += 1

    stage_end = step == settings.end_step
    stop = ctx.preemption.should_stop(step)
    want_log = step % log_every == 0 or stage_end
    want_ckpt = bool(ckpt_every and step % ckpt_every == 0) and not stage_end
    if want_log or want_ckpt or stop:
      means = read_pending()
      if means:
        last_metrics = means
      if want_log and means:
        reporter.scalars(step, 'train', means)
        reporter.text(reporting.progress_line(
            stage=settings.index + 1, num_stages=settings.num_stages,
            step=step, total_steps=ctx.total_steps,
            images_per_sec=means['images_per_sec'],
            eta_s=_eta_seconds(ctx.planner, settings, step, ctx.total_steps,
                               means['step_time_s']),
            loss=means['loss'], learning_rate=means['learning_rate']))
        reporter.advance(step, f'stage {settings.index + 1}/'
                         f'{settings.num_stages}')
    if want_ckpt or stop:
      train_seconds += time.time() - resumed_at
      elapsed = stage_elapsed + time.time() - stage_start
      ckpt.save(step, state,
                ctx.meta_for(step, settings, stage_batches, elapsed))
      if stop:
        ckpt.wait()
        reporter.text(f'SIGTERM: wrote a checkpoint at step {step} (stage '
                      f'{settings.index + 1}, batch {stage_batches}); '
                      'stopping')
        preempted = True
        break
      resumed_at = time.time()
    if eval_every and step % eval_every == 0 and not stage_end:
      train_seconds += time.time() - resumed_at
      ctx.evaluate(state, step)
      resumed_at = time.time()
  if not preempted:
    jax.block_until_ready(state)
    train_seconds += time.time() - resumed_at
  wall = stage_elapsed + time.time() - stage_start
  images = (step - settings.start_step) * settings.batch_size
  return state, {
      'preempted': preempted,
      'train_metrics': last_metrics,
      'wall_time_s': wall,
      'compile_time_s': compiled.seconds,
      'update_compile_time_s': update.seconds,
      'compile_wait_s': waited,
      'compile_cache_hit': compiled.cache_hit,
      'images_per_sec': images / max(wall, 1e-9),
      'step_time_s': train_seconds / max(1, step - first_step),
      'memory': memory,
  }
