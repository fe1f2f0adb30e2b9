"""Checkpoints: orbax CheckpointManager for resume, and pretrained loading.

A checkpoint step directory holds two items:
  state: the whole `TrainState` (sharded arrays written by every host),
  meta:  JSON with the stage being trained, how many batches of it were
         consumed (the data iterator resumes there exactly), the finished
         stages' results and the step.
orbax writes into a temporary directory and renames it on commit, so a job
killed mid-save leaves the previous checkpoint intact and the partial one is
ignored (and cleaned up) on restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from effnetv2_jax.training import progressive

log = logging.getLogger(__name__)

_ITEMS = ('state', 'meta')


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our two items."""

  def __init__(self, directory: str, *, keep: int = 3,
               asynchronous: bool = True):
    self.directory = os.path.abspath(directory) if '://' not in directory \
        else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS,
                                          options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any]) -> None:
    """Starts an (asynchronous) save; returns once the arrays are copied."""
    self._manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(meta))), force=True)

  def restore_meta(self, step: int) -> dict:
    """Only the JSON item (stage, data position, history): cheap."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, target) -> tuple[Any, dict]:
    """Restores into `target` (ShapeDtypeStructs with shardings)."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# ----------------------------------------------------------------------------
# Fine-tuning from a pretrained or converted checkpoint.


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did, leaf by leaf ('/'-joined paths)."""

  source: str
  used_ema: bool
  loaded: list[str]
  reinitialised: list[str]  # in the model, but missing or a different shape
  unused: list[str]  # in the checkpoint, not in the model

  def describe(self) -> str:
    lines = [f'loaded {len(self.loaded)} arrays from {self.source} '
             f'({"EMA" if self.used_ema else "raw"} weights)']
    if self.reinitialised:
      lines.append(f'kept the fresh initialisation of {len(self.reinitialised)}: '
                   + ', '.join(self.reinitialised))
    if self.unused:
      lines.append(f'ignored {len(self.unused)} checkpoint arrays: '
                   + ', '.join(self.unused[:20])
                   + (' ...' if len(self.unused) > 20 else ''))
    return '\n'.join(lines)


def _key_name(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree) -> dict[str, Any]:
  """{'blocks/0/dw_conv/kernel': array, ...}; int and str keys alike."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(p) for p in path]
    if names and names[-1] == 'value':  # nnx.Variable leaves
      names = names[:-1]
    flat['/'.join(names)] = leaf
  return flat


def _subtree(raw: Mapping[str, Any], *names: str):
  for name in names:
    if isinstance(raw, Mapping) and name in raw and raw[name] is not None:
      return raw[name]
  return None


def read_pretrained(path: str, prefer_ema: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                               bool]:
  """Reads (params, batch_stats) flat dicts from a checkpoint path.

  Accepts a model directory (`effnetv2_jax.models.weights`: converted or
  exported weights), a training workdir (its latest checkpoint), a
  `checkpoints/` directory, one step directory, an orbax PyTree directory
  whose top level
  has `params` / `batch_stats` (and optionally `ema_params` /
  `ema_batch_stats`), or an `.npz` file with '/'-joined keys prefixed by
  `params/` and `batch_stats/` (and optionally `ema_`).
  """
  from effnetv2_jax.models import weights  # pylint: disable=g-import-not-at-top
  if weights.is_model_dir(path):  # a converted or exported model directory
    _, params, batch_stats = weights.load_variables(path)
    to_numpy = lambda t: {k: np.asarray(v) for k, v in flatten(t).items()}
    return to_numpy(params), to_numpy(batch_stats), False
  return _variables_of(_read_raw(path), path, prefer_ema)


def _read_raw(path: str) -> Mapping[str, Any]:
  """A checkpoint's whole tree (a training state's fields at the top)."""
  if path.endswith('.npz'):
    with np.load(path) as data:
      raw: dict[str, Any] = {}
      for key in data.files:
        group, _, rest = key.partition('/')
        raw.setdefault(group, {})[rest] = data[key]
    return raw
  directory = path
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  steps = [d for d in os.listdir(directory) if d.isdigit()] \
      if os.path.isdir(directory) else []
  if steps:
    directory = os.path.join(directory, max(steps, key=int))
  if os.path.isdir(os.path.join(directory, 'state')):
    directory = os.path.join(directory, 'state')
  raw = ocp.StandardCheckpointer().restore(os.path.abspath(directory))
  if not isinstance(raw, Mapping):  # a dataclass-shaped tree
    raw = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
  return raw


def _variables_of(raw, path: str, prefer_ema: bool, what: str = 'init_from.path'):
  """(params, batch_stats, used_ema) flat numpy dicts of a tree with
  params / batch_stats (and maybe ema_*) at its top."""
  used_ema = False
  params = batch_stats = None
  if prefer_ema:
    params = _subtree(raw, 'ema_params')
    batch_stats = _subtree(raw, 'ema_batch_stats')
    used_ema = params is not None
  if params is None:
    params = _subtree(raw, 'params')
    batch_stats = _subtree(raw, 'batch_stats')
  if params is None:
    raise ValueError(
        f'{what}={path!r}: no params (or ema_params) found; top-level '
        f'keys are {sorted(raw) if isinstance(raw, Mapping) else type(raw)}')
  to_numpy = lambda t: {k: np.asarray(v) for k, v in flatten(t).items()}
  return to_numpy(params), to_numpy(batch_stats or {}), used_ema


def merge_pretrained(target, source: Mapping[str, np.ndarray]
                     ) -> tuple[Any, list[str], list[str], list[str]]:
  """Replaces target leaves by same-path, same-shape source arrays.

  Returns (merged tree, loaded, reinitialised, unused). A leaf whose shape
  differs (the classifier when num_classes changes) keeps its target value.
  """
  loaded, reinit = [], []
  used = set()
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out = []
  for path, leaf in paths_leaves:
    names = [_key_name(p) for p in path]
    key = '/'.join(names)
    value = source.get(key)
    if value is not None and tuple(value.shape) == tuple(leaf.shape):
      out.append(np.asarray(value, dtype=leaf.dtype))
      loaded.append(key)
      used.add(key)
    else:
      out.append(leaf)
      reinit.append(key)
      if value is not None:
        used.add(key)
  unused = sorted(set(source) - used)
  return jax.tree_util.tree_unflatten(treedef, out), loaded, reinit, unused


def load_pretrained(path: str, params, batch_stats, *, prefer_ema: bool = True
                    ) -> tuple[Any, Any, LoadReport]:
  """Fills `params` / `batch_stats` (host trees) from a checkpoint at `path`."""
  src_params, src_stats, used_ema = read_pretrained(path, prefer_ema)
  new_params, loaded_p, reinit_p, unused_p = merge_pretrained(params,
                                                              src_params)
  new_stats, loaded_s, reinit_s, unused_s = merge_pretrained(batch_stats,
                                                             src_stats)
  report = LoadReport(
      source=path, used_ema=used_ema,
      loaded=loaded_p + ['batch_stats/' + k for k in loaded_s],
      reinitialised=reinit_p + ['batch_stats/' + k for k in reinit_s],
      unused=unused_p + ['batch_stats/' + k for k in unused_s])
  log.info('%s', report.describe())
  return new_params, new_stats, report


# ----------------------------------------------------------------------------
# What a training checkpoint's JSON item holds, and the run's checkpointer.


@dataclasses.dataclass
class ResumePoint:
  """Where a checkpoint left the run.

  `stage` is the stage being trained when the checkpoint was written
  mid-stage (None between stages); `stage_batches` how many of its batches
  were consumed (the input pipeline restarts there), `stage_elapsed_s` its
  wall time so far and `stage_sums` its train-metric sums so far (so the
  stage's means cover every step). `planner` is the planner's own state.
  """

  step: int
  history: list
  model: dict | None = None
  stage: Any = None
  stage_batches: int = 0
  stage_elapsed_s: float = 0.0
  stage_sums: dict = dataclasses.field(default_factory=dict)
  planner: dict = dataclasses.field(default_factory=dict)

  def to_meta(self) -> dict:
    return {'step': int(self.step),
            'history': [h.to_dict() for h in self.history],
            'model': self.model,
            'stage': self.stage.to_dict() if self.stage else None,
            'stage_batches': int(self.stage_batches),
            'stage_elapsed_s': float(self.stage_elapsed_s),
            'stage_sums': dict(self.stage_sums),
            'planner': dict(self.planner)}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> 'ResumePoint':
    stage = meta.get('stage')
    return cls(
        step=int(meta['step']),
        history=[progressive.StageResult.from_dict(h)
                 for h in meta.get('history', [])],
        model=meta.get('model'),
        stage=progressive.StageSettings.from_dict(stage) if stage else None,
        stage_batches=int(meta.get('stage_batches', 0)),
        stage_elapsed_s=float(meta.get('stage_elapsed_s', 0.0)),
        stage_sums=dict(meta.get('stage_sums') or {}),
        planner=dict(meta.get('planner') or {}))


def check_same_model(resume: ResumePoint, model: Mapping[str, Any],
                     directory: str) -> None:
  """A workdir's checkpoint of another network is a one-line error."""
  if resume.model is not None and dict(resume.model) != dict(model):
    from effnetv2_jax.training.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(
        f'config.model.arch: the checkpoints in {directory} are of another '
        f'network ({resume.model.get("name", resume.model)!s}, this config '
        f'builds {model.get("name", model)!s}); use a new --workdir or the '
        'same model settings')


class NoCheckpoints:
  """The checkpointer of a run with checkpoints switched off."""

  directory = None

  def latest_step(self) -> None:
    return None

  def save(self, step, state, meta) -> None:
    del step, state, meta

  def wait(self) -> None:
    pass

  def close(self) -> None:
    pass


def to_host(tree):
  """numpy copy of a state subtree, also when it is sharded over hosts."""
  if all(x.is_fully_addressable or x.is_fully_replicated
         for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def init_from_pretrained(state, path: str, *, prefer_ema: bool, shardings):
  """The state with the model's weights (and EMA copy) from `path`."""
  host_params, host_stats = to_host((state.params, state.batch_stats))
  params, batch_stats, report = load_pretrained(
      path, host_params, host_stats, prefer_ema=prefer_ema)
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


def init_extras_from(state, path: str, *, prefer_ema: bool, shardings
                     ) -> tuple[Any, str]:
  """The state with every extra network's variables (e.g. a pretrained
  second extractor) from the training checkpoint at `path`, which must
  hold extras of the same names and shapes; their optimizer slots stay
  fresh. Returns (state, a one-line report).

  Raises:
    ValueError: one line: unreadable, no such extra, or a shape mismatch.
  """
  what = 'distill.init_from'
  try:
    raw = _read_raw(path)
  except Exception as e:  # orbax raises many types for a damaged directory
    lines = str(e).strip().splitlines()
    raise ValueError(f'{what}={path!r}: unreadable checkpoint '
                     f'({type(e).__name__}: {lines[0] if lines else ""})'
                     ) from None
  stored = raw.get('extras') if isinstance(raw, Mapping) else None
  replace, used_ema = {}, []
  for name, extra in state.extras.items():
    if not isinstance(stored, Mapping) or name not in stored:
      raise ValueError(
          f'{what}={path!r} holds no extra network {name!r} (it has '
          f'{", ".join(sorted(stored)) if stored else "none"}): not a '
          'checkpoint of a self-distillation run like this one')
    params, stats, ema = _variables_of(stored[name], path, prefer_ema, what)
    host_params, host_stats = to_host((extra.params, extra.batch_stats))
    new = {}
    for key, target, source in (('params', host_params, params),
                                ('batch_stats', host_stats, stats)):
      merged, _, missing, unused = merge_pretrained(target, source)
      if missing or unused:
        bad = (missing or unused)[0]
        want = dict(flatten(target)).get(bad)
        raise ValueError(
            f'{what}={path!r}: extra {name!r} does not fit: {key}/{bad} is '
            f'{tuple(np.shape(source[bad])) if bad in source else "missing"}'
            f' there, {tuple(np.shape(want)) if want is not None else "absent"}'
            ' here (a different extractor; choose the same one by name)')
      new[key] = merged
    extra_shardings = shardings.extras[name]
    fields = dict(
        params=jax.device_put(new['params'], extra_shardings.params),
        batch_stats=jax.device_put(new['batch_stats'],
                                   extra_shardings.batch_stats))
    if extra.ema_params is not None:
      copy = lambda tree: jax.tree.map(np.array, tree)  # not aliased
      fields.update(
          ema_params=jax.device_put(copy(new['params']),
                                    extra_shardings.ema_params),
          ema_batch_stats=jax.device_put(copy(new['batch_stats']),
                                         extra_shardings.ema_batch_stats))
    replace[name] = extra.replace(**fields)
    used_ema.append(ema)
  report = (f'second extractors {", ".join(sorted(replace))} from {path} '
            f'({"EMA" if all(used_ema) else "raw"} weights)')
  return state.replace(extras=dict(state.extras, **replace)), report


def export_model(state, workdir: str, *, model, normalization: str,
                 experiment: str, bn_epsilon: float,
                 eval_size: int | None = None) -> str | None:
  """Writes workdir/model (EMA weights when there are) for inference.

  `model` is the run's `state.ModelSpec`, of any registered family
  (`models.weights` stores each family's description); `bn_epsilon` is
  recorded only for a network with BatchNorm statistics.
  """
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
      directory, architecture=model.description,
      num_classes=model.num_classes, params=params, batch_stats=batch_stats,
      source=(f'effnetv2_jax training: {experiment}, step '
              f'{int(jax.device_get(state.step))}, '
              f'{"EMA" if use_ema else "raw"} weights'),
      normalization=normalization, bn_epsilon=bn_epsilon,
      # predict's default size: the run's eval size, not the variant's.
      extra={'eval_size': int(eval_size)} if eval_size else None,
      overwrite=True)
  return directory
