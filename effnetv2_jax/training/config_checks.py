"""Config validation: fail at start, with the key in the message.

A typo in a launch command should cost seconds on one host, not an hour of
TPU time at the first eval. `validate` checks everything that can be checked
without building the model or the data pipeline; the trainer calls
`check_stage` for each stage a planner returns and `check_eval_size` once the
train sizes are known.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

from effnetv2_jax.data import semantics
from effnetv2_jax.data import sources
from effnetv2_jax.kernels import CONV_IMPLS
from effnetv2_jax.models import families
from effnetv2_jax.training import progressive, schedules

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
OPTIMIZERS = ('rmsprop_tf1', 'momentum', 'adamw')
LOSSES = ('softmax', 'sigmoid', 'sigmoid_sum')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def flat_keys(config: Mapping[str, Any], prefix: str = '') -> Iterable[str]:
  for key in config.keys():
    value = config[key]
    name = f'{prefix}{key}'
    # model.arch may be an Architecture dict: a value, not a config block.
    if hasattr(value, 'keys') and name != 'model.arch':
      yield from flat_keys(value, name + '.')
    else:
      yield name


def check_known_keys(config, reference) -> None:
  """Every key of `config` must exist in `reference` (catches typos)."""
  import difflib  # pylint: disable=g-import-not-at-top
  known = sorted(set(flat_keys(reference)))
  unknown = sorted(set(flat_keys(config)) - set(known))
  if unknown:
    described = []
    for key in unknown:
      close = difflib.get_close_matches(key, known, n=1)
      described.append(f'{key} (did you mean {close[0]}?)' if close else key)
    raise ConfigError(f'unknown config key(s): {", ".join(described)}; not '
                      'in the base config')


def _require(condition: bool, key: str, value: Any, why: str) -> None:
  if not condition:
    raise ConfigError(f'config.{key}={value!r}: {why}')


def _pair(config, key: str, low: float, high: float,
          upper_open: bool = False) -> None:
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(len(tuple(value)) == 2, key, value,
           'must be a (first stage, last stage) pair')
  for v in value:
    ok = low <= v < high if upper_open else low <= v <= high
    bracket = ')' if upper_open else ']'
    _require(ok and not math.isnan(v), key, value,
             f'values must be in [{low}, {high}{bracket}')


def resolve_architecture(arch_value):
  """The network description config.model.arch names (for EfficientNetV2
  an `Architecture`; a dict may name another registered family; a path to a
  JSON file holds such a dict), or a ConfigError naming the key."""
  try:
    _, description = families.resolve(arch_value)
    return description
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f'config.model.arch={arch_value!r}: {e}') from None


DISTILL_MODES = ('off', 'stacked', 'label_heads')
DISTILL_KINDS = ('auto', 'mbconv', 'fused_mbconv', 'transformer', 'mixer')


CONTROLLERS = ('linear', 'feedback')


def _check_controller(config) -> None:
  p = config.progressive
  _require(p.controller in CONTROLLERS, 'progressive.controller',
           p.controller, f'must be one of {CONTROLLERS}')
  if p.controller != 'feedback':
    return
  _require(bool(config.data.holdout), 'data.holdout', config.data.holdout,
           "progressive.controller='feedback' decides on a holdout carved "
           'from train; set it (e.g. 0.1)')
  _require(config.eval.at_stage_end, 'eval.at_stage_end',
           config.eval.at_stage_end, "progressive.controller='feedback' "
           'needs the stage-end evals')
  _require(p.batch_size_rule == 'constant', 'progressive.batch_size_rule',
           p.batch_size_rule, "progressive.controller='feedback' keeps the "
           "linear plan's stage lengths in steps; use 'constant'")


def _check_distill(d) -> None:
  _require(d.mode in DISTILL_MODES, 'distill.mode', d.mode,
           f'must be one of {DISTILL_MODES}')
  _require(d.kind in DISTILL_KINDS, 'distill.kind', d.kind,
           f'must be one of {DISTILL_KINDS}')
  _require(d.distance in ('l2', 'cosine'), 'distill.distance', d.distance,
           "must be 'l2' or 'cosine'")
  _require(d.second in ('joint', 'frozen'), 'distill.second', d.second,
           "must be 'joint' or 'frozen'")
  _require(len(tuple(d.taps)) >= 1, 'distill.taps', d.taps,
           "name at least one feature (or 'auto')")
  for key in ('weight', 'head_weight', 'budget.max_memory_mb',
              'budget.max_mmacs'):
    value = d
    for part in key.split('.'):
      value = value[part]
    _require(value >= 0, f'distill.{key}', value, 'must be >= 0')
  if d.get('init_from'):
    _require(d.mode == 'stacked', 'distill.init_from', d.init_from,
             "only a 'stacked' run has second extractors to load")
    _require('://' in d.init_from or os.path.exists(d.init_from),
             'distill.init_from', d.init_from, 'no such file or directory')
  _require(0 <= d.budget.min_accuracy <= 1, 'distill.budget.min_accuracy',
           d.budget.min_accuracy, 'must be a top-1 fraction in [0, 1]')
  _require(d.budget.trial_epochs > 0, 'distill.budget.trial_epochs',
           d.budget.trial_epochs, 'must be > 0')


def validate(config, *, num_devices: int, data_axis_size: int | None = None,
             reference=None) -> None:
  """Raises ConfigError for the first invalid value found.

  Args:
    config: the experiment config.
    num_devices: devices the mesh will use (all visible ones).
    data_axis_size: devices on the 'data' axis (defaults to the mesh
      config's resolution against `num_devices`).
    reference: config whose keys are the known keys (typo check); None
      skips that check.
  """
  if reference is not None:
    check_known_keys(config, reference)
  resolve_architecture(config.model.arch)

  m = config.model
  _require(m.num_classes >= 0, 'model.num_classes', m.num_classes,
           'must be >= 0 (0 takes it from the dataset)')
  _require(0 <= m.drop_path_rate < 1, 'model.drop_path_rate',
           m.drop_path_rate, 'must be in [0, 1)')
  _require(m.dtype in DTYPES, 'model.dtype', m.dtype, f'must be one of {DTYPES}')
  _require(m.conv_impl in CONV_IMPLS, 'model.conv_impl', m.conv_impl,
           f'must be one of {CONV_IMPLS}')
  _require(m.conv_impl != 'onednn' or m.dtype in ('float32', 'auto'),
           'model.conv_impl', m.conv_impl,
           f"computes in float32; model.dtype is {m.dtype}")
  _require(0 < m.bn_momentum < 1, 'model.bn_momentum', m.bn_momentum,
           'must be in (0, 1)')

  mesh = config.mesh
  _require(mesh.model >= 1 and num_devices % mesh.model == 0, 'mesh.model',
           mesh.model, f'must divide the {num_devices} devices')
  if data_axis_size is None:
    data_axis_size = (num_devices // mesh.model if mesh.data == -1
                      else mesh.data)
  _require(data_axis_size * mesh.model == num_devices, 'mesh.data', mesh.data,
           f'data * model must equal the {num_devices} devices (-1: all)')
  _require(mesh.fsdp_min_size >= 0, 'mesh.fsdp_min_size', mesh.fsdp_min_size,
           'must be >= 0 (0 disables FSDP sharding)')

  groups = m.bn_replicas_per_group
  per_group = min(8, data_axis_size) if groups == -1 else groups
  _require(groups >= -1 and (groups == 0 or data_axis_size % per_group == 0),
           'model.bn_replicas_per_group', groups,
           f'must be 0 (global batch), -1 (official: groups of min(8, '
           f'replicas)) or divide the {data_axis_size} devices on the data '
           'axis')

  t = config.train
  _require(t.batch_size > 0 and t.batch_size % data_axis_size == 0,
           'train.batch_size', t.batch_size,
           f'must be a positive multiple of the {data_axis_size} devices on '
           "the 'data' mesh axis")
  _require(t.epochs > 0 or t.total_steps > 0, 'train.epochs', t.epochs,
           'must be > 0 (or set train.total_steps)')
  _require(t.total_steps >= 0, 'train.total_steps', t.total_steps,
           'must be >= 0')
  _require(0 <= t.label_smoothing < 1, 'train.label_smoothing',
           t.label_smoothing, 'must be in [0, 1)')
  _require(t.loss in LOSSES, 'train.loss', t.loss, f'must be one of {LOSSES}')
  _require(t.epoch_examples >= 0, 'train.epoch_examples', t.epoch_examples,
           "must be >= 0 (0: the train split's size)")

  o = config.optimizer
  _require(o.name in OPTIMIZERS, 'optimizer.name', o.name,
           f'must be one of {OPTIMIZERS}')
  _require(o.weight_decay >= 0, 'optimizer.weight_decay', o.weight_decay,
           'must be >= 0')
  _require(o.epsilon >= 0, 'optimizer.epsilon', o.epsilon,
           "must be >= 0 (0: the update rule's own)")

  s = config.schedule
  _require(s.lr_per_256 > 0, 'schedule.lr_per_256', s.lr_per_256,
           'must be > 0')
  _require(s.kind in schedules.KINDS, 'schedule.kind', s.kind,
           f'must be one of {schedules.KINDS}')
  _require(s.warmup_epochs >= 0, 'schedule.warmup_epochs', s.warmup_epochs,
           'must be >= 0')
  _require(s.decay_epochs > 0, 'schedule.decay_epochs', s.decay_epochs,
           'must be > 0')
  _require(s.min_lr_per_256 >= 0, 'schedule.min_lr_per_256',
           s.min_lr_per_256, 'must be >= 0')

  _require(0 <= config.ema.decay < 1, 'ema.decay', config.ema.decay,
           'must be in [0, 1) (0 disables the EMA)')

  p = config.progressive
  _require(p.num_stages >= 1, 'progressive.num_stages', p.num_stages,
           'must be >= 1')
  _require(p.size_rule in progressive.SIZE_RULES, 'progressive.size_rule',
           p.size_rule, f'must be one of {progressive.SIZE_RULES}')
  _require(p.batch_size_rule in progressive.BATCH_RULES,
           'progressive.batch_size_rule', p.batch_size_rule,
           f'must be one of {progressive.BATCH_RULES}')
  _require(p.min_image_size >= 8, 'progressive.min_image_size',
           p.min_image_size, 'must be >= 8')
  _require(p.max_image_size == 0 or p.max_image_size >= p.min_image_size,
           'progressive.max_image_size', p.max_image_size,
           f'must be >= progressive.min_image_size ({p.min_image_size}), or 0 '
           'for the architecture train size')
  _pair(config, 'progressive.randaug_magnitude', 0.0, 30.0)
  _pair(config, 'progressive.mixup_alpha', 0.0, 100.0)
  _pair(config, 'progressive.cutmix_alpha', 0.0, 100.0)
  _pair(config, 'progressive.dropout_rate', 0.0, 1.0, upper_open=True)
  _check_controller(config)
  _require(config.data.input_processes >= 0, 'data.input_processes',
           config.data.input_processes,
           "must be >= 0 (0: the job's process count)")

  _check_distill(config.distill)

  _require(config.data.augment_semantics in semantics.SEMANTICS,
           'data.augment_semantics', config.data.augment_semantics,
           f'must be one of {semantics.SEMANTICS}')

  holdout_problem = sources.holdout_problem(config.data.holdout)
  _require(holdout_problem is None, 'data.holdout', config.data.holdout,
           holdout_problem)

  e = config.eval
  _require(e.batch_size > 0 and e.batch_size % data_axis_size == 0,
           'eval.batch_size', e.batch_size,
           f'must be a positive multiple of the {data_axis_size} devices on '
           "the 'data' mesh axis")
  _require(e.every_steps >= 0, 'eval.every_steps', e.every_steps,
           'must be >= 0 (0: only at stage ends)')
  _require(e.image_size >= 0, 'eval.image_size', e.image_size,
           'must be >= 0 (0: the architecture eval size)')

  _require(config.checkpoint.every_steps >= 0, 'checkpoint.every_steps',
           config.checkpoint.every_steps, 'must be >= 0 (0: stage ends only)')
  _require(config.checkpoint.keep >= 1, 'checkpoint.keep',
           config.checkpoint.keep, 'must be >= 1')
  _require(config.log_every_steps >= 1, 'log_every_steps',
           config.log_every_steps, 'must be >= 1')
  _require(config.progress_bar in ('auto', 'on', 'off'), 'progress_bar',
           config.progress_bar, "must be 'auto', 'on' or 'off'")
  path = config.init_from.path
  _require(bool(path) or not config.init_from.get('required', False),
           'init_from.path', path,
           'this experiment fine-tunes pretrained weights: set '
           '--config.init_from.path to a checkpoint (a training workdir, an '
           'orbax directory or an .npz)')
  if path and '://' not in path:
    _require(os.path.exists(path), 'init_from.path', path,
             'does not exist')


def check_eval_size(eval_size: int, train_sizes: Iterable[int]) -> None:
  largest = max(train_sizes)
  _require(eval_size >= largest, 'eval.image_size', eval_size,
           f'is smaller than the largest train image size {largest}; '
           'EfficientNetV2 evaluates at or above its train size')


def check_stage(stage: progressive.StageSettings, data_axis_size: int) -> None:
  if stage.batch_size % data_axis_size:
    raise ConfigError(
        f'stage {stage.index + 1} batch size {stage.batch_size} is not a '
        f'multiple of the {data_axis_size} devices on the data axis '
        '(config.train.batch_size / progressive.batch_size_rule)')


def check_train_size(num_train_examples: int, stages, holdout) -> None:
  """Every planned stage's batch fits in what the holdout leaves of train."""
  largest = max((s.batch_size for s in stages), default=0)
  if holdout and num_train_examples < largest:
    raise ConfigError(
        f'config.data.holdout={holdout!r} leaves {num_train_examples} train '
        f'examples, fewer than one batch of {largest} '
        '(config.train.batch_size); hold out less')
