"""`train_and_evaluate`: one progressive training run over a device mesh.

What a run does, in order (each step lives in its own module):
  1. validate the config; find the mesh, the dataset and the network;
  2. take the stage plan from a planner (`progressive`; the config's linear
     plan unless the caller gives one);
  3. build the `TrainTask` (`task`): state layout, shardings, step functions;
  4. switch on the persistent compilation cache and start compiling the
     first stage's programs ahead of time (`compilation`);
  5. restore the latest checkpoint, or initialise the state born sharded
     (from pretrained weights when asked) (`checkpointing`);
  6. train stage after stage, evaluating and checkpointing (`loop`,
     `evaluation`);
  7. evaluate on the eval split, export the model, write summary.json and
     curves.png (`checkpointing`, `reporting`).
`RunOptions` switches off what a library caller (a NAS trial, a notebook)
does not want written. Every process-wide setting the run changes is put
back, and everything it opened is closed, however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from effnetv2_jax import host_memory
from effnetv2_jax import kernels
from effnetv2_jax.kernels import onednn
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import compilation
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import evaluation
from effnetv2_jax.training import feedback
from effnetv2_jax.training import loop
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import progressive
from effnetv2_jax.training import recipes
from effnetv2_jax.training import reporting
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import task as task_lib

log = logging.getLogger(__name__)

ConfigError = config_checks.ConfigError
NonFiniteLossError = loop.NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """What a run writes besides its result (library callers switch these off).

  Attributes:
    checkpoints: orbax checkpoints in workdir/checkpoints (and resuming from
      them); off, a run always starts fresh.
    tensorboard: TensorBoard event files (metrics.jsonl is always written).
    plots: curves.png.
    export: workdir/model, the EMA weights for inference (also needs
      config.export_model).
  """

  checkpoints: bool = True
  tensorboard: bool = True
  plots: bool = True
  export: bool = True


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What the config and the machine decide before anything is built."""

  mesh: Any
  info: Any  # data.DatasetInfo
  model: state_lib.ModelSpec
  eval_size: int
  normalization: str
  stage_eval_split: str  # the holdout when there is one
  final_eval_split: str
  # Examples per epoch for the stage plan and the learning-rate schedule:
  # config.train.epoch_examples, else the train split's size.
  epoch_examples: int


def train_and_evaluate(config, workdir: str, *,
                       planner: progressive.StagePlanner | None = None,
                       options: RunOptions = RunOptions(),
                       terms: Sequence[task_lib.LossTerm] = (),
                       extras: Sequence[task_lib.ExtraNetwork] = ()
                       ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains (or resumes) the config's experiment in `workdir`.

  Args:
    config: an experiment config (see `recipes.base_config` for every key).
    workdir: checkpoints, metrics, summary.json and curves.png go here. A
      workdir holding a checkpoint is resumed exactly.
    planner: asked for each stage and for the run's length; None uses the
      config's linear plan.
    options: what to write besides the result.
    terms, extras: further loss terms and networks trained beside the model
      (see `task`).

  Returns:
    (final train state, summary dict). The summary is also written to
    `workdir/summary.json`: the final eval metrics (`eval`: top1, top5, loss
    and ema_*), each stage's record (`stages`), the mean train step time
    (`mean_step_time_s`), the parameter count and `status` ('completed' or
    'preempted').

  Raises:
    ConfigError: an invalid config value (the message names the key).
    NonFiniteLossError: the loss became NaN/Inf; the last good checkpoint is
      kept.
  """
  run_start = time.time()
  workdir = os.fspath(workdir)
  if '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)
  config_checks.validate(config, num_devices=jax.device_count(),
                         reference=recipes.base_config())
  setup = _setup(config)
  planner = planner or _planner(config, setup)
  planned = planner.expected_stages([])
  config_checks.check_eval_size(setup.eval_size,
                                [s.image_size for s in planned])
  config_checks.check_train_size(setup.info.num_train_examples, planned,
                                 config.data.holdout)
  cache_dir = compilation.compilation_cache_dir(
      config.compilation_cache_dir, workdir,
      jax.config.jax_compilation_cache_dir)
  log.info('persistent compilation cache: %s', cache_dir or 'off')

  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(compilation.persistent_cache(cache_dir))
    distill_terms, distill_extras, distill_report = _distillation(
        config, setup, planner, planned)
    terms, extras = (*terms, *distill_terms), (*extras, *distill_extras)
    task = task_lib.task_from_config(
        config, mesh=setup.mesh, model=setup.model,
        num_train_examples=setup.epoch_examples,
        total_epochs=planner.total_epochs,
        multi_label=setup.info.multi_label, terms=terms, extras=extras)
    ckpt = _checkpointer(workdir, config, options)
    cleanup.callback(ckpt.close)
    resume = _resume_point(ckpt, setup.model, planner)
    compiler = compilation.Compiler(task, cache_enabled=bool(cache_dir))
    cleanup.callback(compiler.close)
    _compile_first_programs(compiler, planner, resume, config, setup)
    state, load_report = _initial_state(task, ckpt, resume, config)
    _log_run(setup, task, planner)
    reporter = reporting.Reporter(
        workdir, total_steps=planner.total_steps,
        progress_bar=config.progress_bar,
        start_step=resume.step if resume else 0,
        tensorboard=options.tensorboard)
    cleanup.callback(reporter.close)
    if resume is None:
      reporter.hparams(_flatten_config(config))
    evaluator = _evaluator(config, setup, compiler, reporter, task)
    cleanup.callback(evaluator.close)
    run = loop.Run(
        task=task, planner=planner, compiler=compiler, reporter=reporter,
        ckpt=ckpt, evaluate=evaluator,
        preemption=cleanup.enter_context(loop.PreemptionWatch()),
        train_iterator=_train_iterators(config, setup),
        every={'log': config.log_every_steps,
               'checkpoint': config.checkpoint.every_steps,
               'eval': config.eval.every_steps},
        stage_eval_split=setup.stage_eval_split,
        eval_at_stage_end=config.eval.at_stage_end,
        probe_split=_probe_split(config),
        compile_ahead=config.compile_ahead,
        model_description=setup.model.to_dict(),
        history=list(resume.history) if resume else [])
    state, status = loop.run_stages(run, state, resume)

    final_step = int(jax.device_get(state.step))
    final_eval = (evaluator(state, final_step, setup.final_eval_split)
                  if status == 'completed' else {})
    summary = reporting.build_summary(
        experiment=config.experiment, status=status, final_step=final_step,
        total_steps=planner.total_steps, final_eval=final_eval,
        eval_image_size=setup.eval_size, history=run.history,
        controller=planner.summary(),
        **({'distillation': distill_report} if distill_report else {}),
        **_run_facts(config, setup, task, run_start, load_report))
    if status == 'completed' and config.export_model and options.export:
      summary['model_dir'] = checkpointing.export_model(
          state, workdir, model=setup.model,
          normalization=setup.normalization, experiment=config.experiment,
          bn_epsilon=config.model.bn_epsilon, eval_size=setup.eval_size)
    _write_outputs(workdir, summary, run.history, config, options)
  return state, summary


# ----------------------------------------------------------------------------
# The steps of a run.


def resolve_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}[name]


def _setup(config) -> _Setup:
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.mesh_from_config(config.mesh)
  holdout = config.data.holdout
  try:
    info = data.dataset_info(config.data.dataset,
                             data_dir=config.data.data_dir, holdout=holdout)
  except (ValueError, KeyError, data.DatasetNotPreparedError) as e:
    raise ConfigError(f'config.data.dataset={config.data.dataset!r}: {e}'
                      ) from None
  dtype = resolve_dtype(config.model.dtype)
  _check_convolutions(config, dtype)
  model = task_lib.model_spec_from_config(
      config, num_classes=config.model.num_classes or info.num_classes,
      dtype=dtype)
  final_split = config.data.eval_split or info.eval_split
  return _Setup(
      mesh=mesh, info=info, model=model,
      eval_size=config.eval.image_size or model.eval_size,
      normalization=config.data.normalization or model.normalization,
      stage_eval_split=(data.HOLDOUT_SPLIT if holdout else final_split),
      final_eval_split=final_split,
      epoch_examples=config.train.epoch_examples or info.num_train_examples)


def _check_convolutions(config, dtype) -> None:
  if config.model.conv_impl == 'onednn':
    try:
      onednn.require()
    except onednn.OneDnnUnavailable as e:
      raise ConfigError(f"config.model.conv_impl='onednn': {e}") from None
  log.info('convolutions: %s',
           kernels.describe_conv_impl(config.model.conv_impl, dtype))


def _planner(config, setup: _Setup) -> progressive.StagePlanner:
  """config.progressive.controller's planner: the linear plan, or the
  feedback controller over the linear plan's stages."""
  linear = _linear_planner(config, setup)
  if config.progressive.controller == 'linear':
    return linear
  p = config.progressive
  try:
    return feedback.FeedbackStagePlanner(
        linear.stages,
        bounds={name: tuple(p[name]) for name in feedback.MAGNITUDES},
        rule=feedback.FeedbackRule(**p.feedback.to_dict()),
        holdout_split=setup.stage_eval_split,
        probe_split=_probe_split(config))
  except ValueError as e:
    raise ConfigError(f'config.{e}' if str(e).startswith('progressive.')
                      else f'config.progressive: {e}') from None


def _probe_split(config) -> str | None:
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  return data.TRAIN_PROBE_SPLIT if config.data.holdout else None


def _linear_planner(config, setup: _Setup) -> progressive.LinearStagePlanner:
  prog = config.progressive.to_dict()
  prog['max_image_size'] = prog['max_image_size'] or setup.model.train_size
  try:
    plan = progressive.plan_from_config(
        prog, epochs=config.train.epochs,
        num_train_examples=setup.epoch_examples,
        batch_size=config.train.batch_size,
        batch_multiple=mesh_lib.data_axis_size(setup.mesh),
        total_steps=config.train.total_steps or None)
  except ValueError as e:
    raise ConfigError(f'config.progressive / config.train: {e}') from None
  return progressive.LinearStagePlanner(plan)


def _distillation(config, setup: _Setup, planner, planned):
  """config.distill's loss term, second extractors and the report of what
  was chosen and why (none when off); 'auto' extractors are measured and
  chosen here, the table printed (and kept in summary.json)."""
  if config.distill.mode == 'off':
    return (), (), ''
  from effnetv2_jax.distill import setup as distill_setup  # pylint: disable=g-import-not-at-top
  d = config.distill
  if d.mode == 'stacked' and d.extractor == 'auto' and d.budget.min_accuracy:
    raise ConfigError(
        f'config.distill.budget.min_accuracy={d.budget.min_accuracy!r} is '
        'measured by short trials: run `python -m effnetv2_jax.distill '
        '--config=<this config> --workdir=<dir>` and train with the '
        'config.distill.extractor it prints')
  last = planned[-1]
  choose = distill_setup.measured_chooser(
      config, **_distillation_context(setup, planner, last))
  try:
    terms, extras, report = distill_setup.terms_and_extras(
        config, setup.model, image_size=last.image_size, choose=choose)
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith('config.') else
                      f'config.distill: {e}') from None
  print(f'self-distillation ({config.distill.mode}):\n{report}', flush=True)
  return terms, extras, report


def _distillation_context(setup: _Setup, planner, last_stage) -> dict:
  """What measuring a second extractor needs to know of the run."""
  return dict(mesh=setup.mesh, model_spec=setup.model,
              num_train_examples=setup.epoch_examples,
              total_epochs=planner.total_epochs,
              batch_size=last_stage.batch_size,
              image_size=last_stage.image_size)


def distillation_candidate_costs(config) -> list[dict]:
  """Each second-extractor candidate for config.distill's one tap with its
  extra training memory and MACs per image, measured as a run of `config`
  would (compiles, does not train); for `python -m effnetv2_jax.distill`.

  Raises:
    ConfigError: an invalid config value, or several taps.
  """
  from effnetv2_jax.distill import setup as distill_setup  # pylint: disable=g-import-not-at-top
  config_checks.validate(config, num_devices=jax.device_count(),
                         reference=recipes.base_config())
  setup = _setup(config)
  planner = _linear_planner(config, setup)
  last = planner.expected_stages([])[-1]
  try:
    return distill_setup.candidate_costs(
        config, **_distillation_context(setup, planner, last))
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith('config.') else
                      f'config.distill: {e}') from None


def _checkpointer(workdir: str, config, options: RunOptions):
  if not options.checkpoints:
    return checkpointing.NoCheckpoints()
  return checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
      asynchronous=config.checkpoint.asynchronous)


def _resume_point(ckpt, model: state_lib.ModelSpec, planner
                  ) -> checkpointing.ResumePoint | None:
  latest = ckpt.latest_step()
  if latest is None:
    return None
  resume = checkpointing.ResumePoint.from_meta(ckpt.restore_meta(latest))
  checkpointing.check_same_model(resume, model.to_dict(), ckpt.directory)
  planner.load_state_dict(resume.planner)
  return resume


def _compile_first_programs(compiler, planner, resume, config,
                            setup: _Setup) -> None:
  """The first stage's programs and the eval step start compiling from
  abstract shapes while the state is initialised or restored."""
  if resume and resume.stage:
    first = resume.stage
  else:
    upcoming = planner.expected_stages(resume.history if resume else [])
    first = upcoming[0] if upcoming else None
  if first is not None:
    compiler.prefetch('gradient', first.batch_size, first.image_size)
    compiler.prefetch('update')
  # Needed at the first stage's end: next in the compile queue.
  compiler.prefetch('eval', config.eval.batch_size, setup.eval_size)


def _initial_state(task, ckpt, resume, config):
  """(state, pretrained-load report or None): restored, or born sharded."""
  if resume is not None:
    state, _ = ckpt.restore(resume.step, task.target)
    log.info('resumed from %s step %d (%s)', ckpt.directory, resume.step,
             f'{resume.stage.describe()}, batch {resume.stage_batches}'
             if resume.stage else 'between stages')
    return state, None
  state = task.init_sharded()
  report = None
  if config.init_from.path:
    state, report = checkpointing.init_from_pretrained(
        state, config.init_from.path,
        prefer_ema=config.init_from.prefer_ema, shardings=task.shardings)
    print(report.describe(), flush=True)
  if config.distill.get('init_from'):
    try:
      state, loaded = checkpointing.init_extras_from(
          state, config.distill.init_from,
          prefer_ema=config.init_from.prefer_ema, shardings=task.shardings)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
    print(loaded, flush=True)
  return state, report


def _log_run(setup: _Setup, task, planner) -> None:
  log.info('mesh %s over %d %s devices; BN moments over %s',
           dict(setup.mesh.shape), jax.device_count(), jax.default_backend(),
           f'{task.bn_groups} groups' if task.bn_groups > 1
           else 'the global batch')
  if jax.default_backend() == 'cpu':
    log.info('host memory: %s', host_memory.status())
  log.info('%s: %s parameters, %d classes, %d steps in %d stages',
           setup.model.name, f'{task.num_params():,}',
           setup.model.num_classes, planner.total_steps, planner.num_stages)


def _evaluator(config, setup: _Setup, compiler, reporter, task
               ) -> evaluation.Evaluator:
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top

  def make_iterator(split: str, image_size: int):
    return data.make_eval_iterator(
        config.data.dataset, data_dir=config.data.data_dir, split=split,
        holdout=config.data.holdout,
        global_batch_size=config.eval.batch_size, image_size=image_size,
        normalization=setup.normalization, sharding=task.batch_sharding)

  return evaluation.Evaluator(
      compiler=compiler, make_iterator=make_iterator,
      batch_size=config.eval.batch_size, image_size=setup.eval_size,
      reporter=reporter, use_ema=task.use_ema,
      default_split=setup.final_eval_split)


def _train_iterators(config, setup: _Setup):
  """settings, start batch -> the stage's input pipeline."""
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  sharding = mesh_lib.data_sharding(setup.mesh)

  def make(settings: progressive.StageSettings, start_batch: int):
    return data.make_train_iterator(
        config.data.dataset, data_dir=config.data.data_dir,
        holdout=config.data.holdout,
        global_batch_size=settings.batch_size,
        image_size=settings.image_size,
        seed=progressive.stage_seed(config.seed, settings.index),
        augment=config.data.augment,
        randaug_layers=config.data.randaug_layers,
        randaug_magnitude=settings.randaug_magnitude,
        mixup_alpha=settings.mixup_alpha, cutmix_alpha=settings.cutmix_alpha,
        normalization=setup.normalization, sharding=sharding,
        start_batch=start_batch,
        input_processes=config.data.input_processes,
        augment_semantics=config.data.augment_semantics)

  return make


def _run_facts(config, setup: _Setup, task, run_start: float, load_report
               ) -> dict[str, Any]:
  facts = dict(
      num_params=task.num_params(), num_classes=setup.model.num_classes,
      architecture=setup.model.to_dict(), dataset=config.data.dataset,
      holdout_examples=setup.info.num_holdout_examples,
      wall_time_s=time.time() - run_start, devices=jax.device_count(),
      backend=jax.default_backend(),
      conv_impl=kernels.resolve_conv_impl(config.model.conv_impl,
                                          setup.model.options['dtype']))
  if load_report is not None:
    facts['init_from'] = {
        'path': load_report.source, 'used_ema': load_report.used_ema,
        'loaded': len(load_report.loaded),
        'reinitialised': load_report.reinitialised}
  return facts


def _write_outputs(workdir: str, summary, history, config,
                   options: RunOptions) -> None:
  if jax.process_index() != 0:
    return
  reporting.write_summary(workdir, summary)
  if not options.plots:
    return
  try:
    reporting.plot_curves(workdir, history, title=config.experiment)
  except Exception as e:  # pylint: disable=broad-except
    log.warning('could not write the plot: %s', e)


def _flatten_config(config) -> dict[str, Any]:
  out = {}
  for key in config_checks.flat_keys(config):
    value = config
    for part in key.split('.'):
      value = value[part]
    out[key] = value if isinstance(value, (int, float, str, bool)) else str(
        value)
  return out
