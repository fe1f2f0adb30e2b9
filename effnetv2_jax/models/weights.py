"""Model weight directories: what converters and exports write, what loads.

A model directory holds

  model.json  {"format": "effnetv2_jax.model", "format_version": 1,
               "architecture": {...}, "num_classes": N,
               "normalization": "inception" | "imagenet" | "ft",
               "bn_epsilon": 0.001, "source": "...", "created": "...",
               "effnetv2_jax_version": "...", "extra": {...}}
  state/      an orbax (StandardCheckpointer) checkpoint of
              {'params': ..., 'batch_stats': ...}, the pure nested dicts of
              `nnx.to_pure_dict` of the nnx.State (float32).

Any registered model family (`models.families`: EfficientNetV2, ViT,
MLP-Mixer, ...) is stored this way. "architecture" is the family's
description dict: `Architecture.to_dict()` for EfficientNetV2, without a
'family' key, since a dict without one is read as EfficientNetV2 (so the
directories written before other families existed load unchanged); for
other families `family.to_dict(description)`, which names its 'family'.
"bn_epsilon" is only written for a model with BatchNorm statistics; token
models have none, and their 'batch_stats' is stored as an empty dict.

`normalization` names the input scaling the weights expect (see
`effnetv2_jax.predict`). A directory is written under a temporary name and
renamed into place when complete, so an interrupted save never leaves a
half-written model behind, and an existing one is only replaced when asked.
The `state/` layout is also what `training.checkpointing.read_pretrained`
reads, so the trainer fine-tunes from a converted model directly.

Loading never runs the random initialiser: the module graph is built with
`nnx.eval_shape` and the stored arrays are merged into it. Every stored array
is checked against the architecture first; a mismatch is a one-line
`WeightsError` naming the variable and both shapes.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnetv2_jax.models import families
from effnetv2_jax.models.efficientnetv2 import EfficientNetV2

FORMAT = 'effnetv2_jax.model'
FORMAT_VERSION = 1
META_FILE = 'model.json'
STATE_DIR = 'state'
NORMALIZATIONS = ('inception', 'imagenet', 'ft')


class WeightsError(ValueError):
  """A model directory is missing, malformed or does not fit its model."""


def is_model_dir(directory: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(directory, META_FILE))


# ----------------------------------------------------------------------------
# Building a model around given arrays.


def abstract_model(architecture: Any, num_classes: int,
                   **model_kwargs) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves: its graph, no arrays.

  Args:
    architecture: any family's description (`families.resolve`): a variant
      name ('s', 'vit-digits'), a description dict with or without its
      'family', or a description object.
    num_classes: classifier width.
    **model_kwargs: the family's `build` options (dtype, conv_impl, ...).
  """
  family, description = families.resolve(architecture)
  return nnx.eval_shape(lambda: family.build(
      description, num_classes, rngs=0, **model_kwargs))


def description_dict(architecture: Any) -> dict:
  """What model.json stores for a description (see the module docstring)."""
  family, description = families.resolve(architecture)
  if family.name == families.DEFAULT_FAMILY:
    return description.to_dict()
  return family.to_dict(description)


def _split(model: nnx.Module):
  graphdef, params, batch_stats, rest = nnx.split(
      model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise WeightsError(
        'the model holds variables other than Param and BatchStat '
        f'({sorted(rest.flat_state())[0]}); the weight format cannot store '
        'them')
  return graphdef, params, batch_stats, rest


def _flat(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flat(value, name + '/'))
    else:
      out[name] = value
  return out


def _shape_of(leaf) -> tuple[int, ...]:
  # orbax ArrayMetadata and ShapeDtypeStruct have `.shape` but no __array__.
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _shape_text(shape) -> str:
  return '(' + ', '.join(str(int(d)) for d in shape) + ')'


def check_variables(expected: Mapping, found: Mapping, *, what: str) -> None:
  """Raises WeightsError on the first missing, extra or misshapen array.

  Both arguments are nested dicts ({'params': ..., 'batch_stats': ...}) whose
  leaves have `.shape`; keys are compared as strings, so a tree restored with
  string keys matches one with int list indices.
  """
  want = {k: _shape_of(v) for k, v in _flat(expected).items()}
  have = {k: _shape_of(v) for k, v in _flat(found).items()}
  for name, shape in want.items():
    if name not in have:
      raise WeightsError(f'{what}: variable {name!r} is missing (expected '
                         f'shape {_shape_text(shape)})')
    if have[name] != shape:
      raise WeightsError(
          f'{what}: variable {name!r} has shape {_shape_text(have[name])}, '
          f'expected {_shape_text(shape)}')
  for name, shape in have.items():
    if name not in want:
      raise WeightsError(f'{what}: unexpected variable {name!r} with shape '
                         f'{_shape_text(shape)}')


def model_from_variables(architecture: Any, num_classes: int,
                         params: Mapping, batch_stats: Mapping, *,
                         what: str = 'variables',
                         **model_kwargs) -> nnx.Module:
  """An eval-ready model holding the given arrays (no random init).

  Args:
    architecture: any family's description (variant name, description
      object or its dict, see `abstract_model`).
    num_classes: classifier width.
    params, batch_stats: pure nested dicts as `nnx.to_pure_dict(state)`
      gives them (list indices may be ints or digit strings); batch_stats
      is empty for models without BatchNorm.
    what: names the arrays' origin in error messages.
    **model_kwargs: the family's `build` options (dtype, conv_impl,
      bn_epsilon, ...).
  """
  abstract = abstract_model(architecture, num_classes, **model_kwargs)
  graphdef, params_state, stats_state, rest = _split(abstract)
  expected = {'params': nnx.to_pure_dict(params_state),
              'batch_stats': nnx.to_pure_dict(stats_state)}
  found = {'params': params, 'batch_stats': batch_stats}
  check_variables(expected, found, what=what)
  nnx.replace_by_pure_dict(params_state, _like(expected['params'], params))
  nnx.replace_by_pure_dict(stats_state,
                           _like(expected['batch_stats'], batch_stats))
  return nnx.merge(graphdef, params_state, stats_state, rest)


def _like(template: Mapping, tree: Mapping) -> dict:
  """`tree` re-keyed like `template` (int list indices), as float32 jax."""
  out = {}
  for key, value in template.items():
    source = tree[key] if key in tree else tree[str(key)]
    if isinstance(value, Mapping):
      out[key] = _like(value, source)
    else:
      out[key] = jnp.asarray(np.asarray(source), dtype=value.dtype)
  return out


# ----------------------------------------------------------------------------
# Saving.


def save_model(directory: str | os.PathLike, model: nnx.Module, *,
               source: str | None = None, normalization: str | None = None,
               extra: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> str:
  """Writes `model`'s weights and description to `directory`.

  Args:
    directory: the model directory to create.
    model: a model of any family, with `.architecture` (its description)
      and `.num_classes`; BatchNorm statistics, if any, are saved too.
    source: free text recorded in model.json (e.g. 'timm:file.pth').
    normalization: input scaling the weights expect; defaults to the
      description's ('inception' for S/M/L/XL, 'imagenet' for B0-B3).
    extra: JSON-able data stored under "extra" (e.g. accuracy).
    overwrite: replace an existing non-empty directory.

  Returns:
    The absolute path written.
  """
  _, params, batch_stats, _ = _split(model)
  # Only EfficientNetV2 has BatchNorm (and so an epsilon) among the families.
  bn_epsilon = (float(model.stem.bn.epsilon)
                if isinstance(model, EfficientNetV2) else 1e-3)
  return save_variables(
      directory, architecture=model.architecture,
      num_classes=model.num_classes, params=nnx.to_pure_dict(params),
      batch_stats=nnx.to_pure_dict(batch_stats), source=source,
      normalization=normalization, bn_epsilon=bn_epsilon,
      extra=extra, overwrite=overwrite)


def save_variables(directory: str | os.PathLike, *, architecture: Any,
                   num_classes: int, params: Mapping, batch_stats: Mapping,
                   source: str | None = None,
                   normalization: str | None = None, bn_epsilon: float = 1e-3,
                   extra: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str:
  """Like `save_model`, from pure dicts (e.g. a trainer's EMA copy).

  `architecture` is any family's description (see `abstract_model`);
  `bn_epsilon` is recorded only when `batch_stats` is not empty.
  """
  family, description = families.resolve(architecture)
  normalization = normalization or family.normalization(description)
  if normalization not in NORMALIZATIONS:
    raise WeightsError(f'normalization must be one of {NORMALIZATIONS}, got '
                       f'{normalization!r}')
  final = os.path.abspath(os.fspath(directory))
  if os.path.exists(final):
    if not os.path.isdir(final):
      raise WeightsError(f'{final} exists and is not a directory')
    if os.listdir(final) and not overwrite:
      raise WeightsError(f'{final} exists and is not empty (pass overwrite '
                         'to replace it)')
  meta = {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'architecture': description_dict(description),
      'num_classes': int(num_classes),
      'normalization': normalization,
  }
  if jax.tree.leaves(batch_stats):  # a model without BatchNorm has no epsilon
    meta['bn_epsilon'] = float(bn_epsilon)
  meta.update({
      'source': source or '',
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'effnetv2_jax_version': _package_version(),
      'extra': dict(extra or {}),
  })
  json.dumps(meta)  # fail before writing anything if `extra` is not JSON-able
  tree = {'params': jax.tree.map(_host_float32, dict(params)),
          'batch_stats': jax.tree.map(_host_float32, dict(batch_stats))}
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(
      parent, f'.{os.path.basename(final)}.partial-{uuid.uuid4().hex[:8]}')
  try:
    os.makedirs(staging)
    checkpointer = _this_process_checkpointer()
    checkpointer.save(os.path.join(staging, STATE_DIR), tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(staging, META_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
      f.write('\n')
    _move_into_place(staging, final)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return final


def _this_process_checkpointer():
  """An orbax checkpointer that waits for no other process: a model
  directory is written (after a multi-host run, by process 0 alone) and read
  by one process at a time, while orbax's default synchronises every
  process of the job and would wait forever for the others."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}))


def _host_float32(x):
  return np.asarray(jax.device_get(x), dtype=np.float32)


def _move_into_place(staging: str, final: str) -> None:
  if not os.path.exists(final):
    os.rename(staging, final)
    return
  if not os.listdir(final):
    os.rmdir(final)
    os.rename(staging, final)
    return
  # Keep the old directory until the new one is in place.
  retired = f'{final}.old-{uuid.uuid4().hex[:8]}'
  os.rename(final, retired)
  os.rename(staging, final)
  shutil.rmtree(retired, ignore_errors=True)


def _package_version() -> str:
  from effnetv2_jax import __version__
  return __version__


# ----------------------------------------------------------------------------
# Loading.


def read_meta(directory: str | os.PathLike) -> dict:
  """The validated model.json of a model directory."""
  directory = os.fspath(directory)
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise WeightsError(f'{directory}: no such model directory')
  if not os.path.isfile(path):
    raise WeightsError(f'{directory}: not an effnetv2_jax model directory '
                       f'(no {META_FILE})')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f'{path}: unreadable ({_first_line(e)})') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise WeightsError(f'{path}: not an effnetv2_jax model description '
                       f'(format tag {FORMAT!r} missing)')
  version = meta.get('format_version')
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise WeightsError(
        f'{path}: format_version {version!r} is not supported by this '
        f'effnetv2_jax (it reads up to {FORMAT_VERSION}); upgrade it')
  for key in ('architecture', 'num_classes', 'normalization'):
    if key not in meta:
      raise WeightsError(f'{path}: field {key!r} is missing')
  if not isinstance(meta['architecture'], Mapping):
    # A name or a path here would make loading depend on this package's
    # variant tables or on another file, not on the directory alone.
    raise WeightsError(f'{path}: architecture must be a description dict, '
                       f'got {type(meta["architecture"]).__name__}')
  try:
    _, meta['architecture_obj'] = families.resolve(meta['architecture'])
  except (TypeError, ValueError, KeyError) as e:
    raise WeightsError(f'{path}: bad architecture ({_first_line(e)})') from None
  if meta['normalization'] not in NORMALIZATIONS:
    raise WeightsError(f'{path}: unknown normalization '
                       f'{meta["normalization"]!r}')
  return meta


def _restore(directory: str, meta: dict, abstract: nnx.Module
             ) -> tuple[dict, dict]:
  state_dir = os.path.abspath(os.path.join(directory, STATE_DIR))
  if not os.path.isdir(state_dir):
    raise WeightsError(f'{directory}: the {STATE_DIR}/ checkpoint is missing')
  _, params_state, stats_state, _ = _split(abstract)
  target = {'params': nnx.to_pure_dict(params_state),
            'batch_stats': nnx.to_pure_dict(stats_state)}
  checkpointer = _this_process_checkpointer()
  try:
    stored = checkpointer.metadata(state_dir).item_metadata.tree
  except Exception as e:  # orbax raises many types for a damaged directory
    raise WeightsError(f'{state_dir}: unreadable checkpoint '
                       f'({_first_line(e)})') from None
  check_variables(target, stored, what=directory)
  try:
    restored = checkpointer.restore(state_dir, target)
  except Exception as e:
    raise WeightsError(f'{state_dir}: cannot restore ({_first_line(e)})'
                       ) from None
  finally:
    checkpointer.close()
  return restored['params'], restored['batch_stats']


def load_variables(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
  """(meta, params, batch_stats) of a model directory, as numpy pure dicts.

  `meta` is model.json plus 'architecture_obj' (the parsed description of
  its family: an `Architecture`, a `ViTArchitecture`, ...); batch_stats is
  empty for models without BatchNorm.
  """
  directory = os.fspath(directory)
  meta = read_meta(directory)
  abstract = abstract_model(meta['architecture_obj'], meta['num_classes'])
  params, batch_stats = _restore(directory, meta, abstract)
  return meta, params, batch_stats


def load_model(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
               conv_impl: str = 'auto', **model_kwargs) -> nnx.Module:
  """The model stored in `directory`, ready for eval (or fine-tuning).

  Args:
    directory: a model directory written by `save_model` or the converters.
    dtype: compute dtype (parameters stay float32).
    conv_impl: 'auto', 'xla', 'shifted' or 'onednn'
      (`kernels.resolve_conv_impl`; token models ignore it).
    **model_kwargs: other options of the family's `build` (dropout_rate,
      drop_path_rate, bn_momentum) for fine-tuning.
  """
  directory = os.fspath(directory)
  meta = read_meta(directory)
  # Token families drop the BatchNorm options in `build`.
  model_kwargs.setdefault('bn_epsilon', meta.get('bn_epsilon', 1e-3))
  abstract = abstract_model(meta['architecture_obj'], meta['num_classes'],
                            dtype=dtype, conv_impl=conv_impl,
                            **model_kwargs)
  params, batch_stats = _restore(directory, meta, abstract)
  graphdef, params_state, stats_state, rest = _split(abstract)
  nnx.replace_by_pure_dict(params_state,
                           _like(nnx.to_pure_dict(params_state), params))
  nnx.replace_by_pure_dict(stats_state,
                           _like(nnx.to_pure_dict(stats_state), batch_stats))
  return nnx.merge(graphdef, params_state, stats_state, rest)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')
