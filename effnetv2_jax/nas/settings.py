"""The search's config: `config.search` with its defaults, validation, and
the check that a restarted search still runs the config it started with.

A NAS config (configs/nas.py) has two blocks: `search` (what this module
defines) and `trial` (an ordinary trainer config, `recipes.base_config()`'s
keys, that every trial trains with its own network in `model.arch`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import reward as reward_lib

CONFIG_FILE = 'search_config.json'
# Keys a restarted search may change: they decide how long and how wide the
# search runs, not what a trial computes.
RESTART_MUTABLE = ('search.num_trials', 'search.max_in_flight',
                   'search.time_limit_s')


class SearchConfigError(ValueError):
  """A search config value that cannot work, or a changed one on restart;
  the message names the key."""


def default_search_config():
  """`config.search` with every key it accepts and its default."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  s = ml_collections.ConfigDict()
  s.backbone = 'tiny'  # nas.space.backbone names
  s.algorithm = 'evolution'  # random | evolution | reinforce | nsga2
  # Every algorithm's settings; each takes its own (algorithms.py).
  s.algorithm_options = ml_collections.ConfigDict(dict(
      population_size=20, tournament_size=5,
      mutation_prob=ml_collections.config_dict.placeholder(float),
      learning_rate=0.05, baseline_decay=0.95, entropy=0.0,
      failed_reward=0.0, optimizer='adam'))
  s.num_trials = 16
  s.max_in_flight = 2
  s.devices_per_trial = 0  # 0: the host's devices split evenly among slots
  s.platform = 'auto'  # auto | cpu | gpu | tpu
  s.time_limit_s = 1800.0  # a trial running longer is killed and failed
  s.seed = 0
  s.w = reward_lib.W  # reward exponents (paper §3.3)
  s.v = reward_lib.V
  s.reference_every = 8  # re-time the backbone after every 8 candidates
  s.timing = ml_collections.ConfigDict(dict(
      batch_size=0,  # 0: config.trial.train.batch_size
      warmup_steps=3, steps=10))
  # Median rule: after a stage, a trial below the median holdout top-1 that
  # the completed trials had after the same stage is stopped (and failed).
  s.early_stopping = ml_collections.ConfigDict(dict(
      enabled=False, min_completed=4))
  s.trial_module = 'effnetv2_jax.nas.trial'  # what a trial process runs
  return s


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for a nested dict (a network description stays one
  value)."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and not name.endswith('model.arch'):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise SearchConfigError(f'config.{key}={value!r}: {why}')


def validate(config) -> None:
  """One-line SearchConfigError for the first bad search value."""
  from effnetv2_jax.nas import algorithms, space  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import config_checks, recipes  # pylint: disable=g-import-not-at-top
  for block, reference in (('search', default_search_config()),
                           ('trial', recipes.base_config())):
    _require(block in config, block, None, 'missing: a NAS config has '
             '`search` and `trial` blocks (see configs/nas.py)')
    try:
      config_checks.check_known_keys(config[block], reference)
    except config_checks.ConfigError as e:
      raise SearchConfigError(f'config.{block}: {e}') from None
  s = config.search
  try:
    space.backbone(s.backbone)
  except ValueError as e:
    raise SearchConfigError(f'config.search.backbone={s.backbone!r}: {e}'
                            ) from None
  _require(s.algorithm in algorithms.ALGORITHMS, 'search.algorithm',
           s.algorithm, f'must be one of {algorithms.ALGORITHMS}')
  _require(s.num_trials >= 1, 'search.num_trials', s.num_trials, 'must be >= 1')
  _require(s.max_in_flight >= 1, 'search.max_in_flight', s.max_in_flight,
           'must be >= 1')
  _require(s.devices_per_trial >= 0, 'search.devices_per_trial',
           s.devices_per_trial, 'must be >= 0 (0: split evenly)')
  _require(s.platform in ('auto', 'cpu', 'gpu', 'tpu'), 'search.platform',
           s.platform, "must be one of 'auto', 'cpu', 'gpu', 'tpu'")
  _require(s.time_limit_s > 0, 'search.time_limit_s', s.time_limit_s,
           'must be > 0 seconds')
  _require(s.reference_every >= 1, 'search.reference_every',
           s.reference_every, 'must be >= 1')
  _require(s.timing.steps >= 1, 'search.timing.steps', s.timing.steps,
           'must be >= 1')
  _require(s.timing.warmup_steps >= 0, 'search.timing.warmup_steps',
           s.timing.warmup_steps, 'must be >= 0')
  _require(s.timing.batch_size >= 0, 'search.timing.batch_size',
           s.timing.batch_size, 'must be >= 0 (0: the trial batch size)')
  _require(s.early_stopping.min_completed >= 1,
           'search.early_stopping.min_completed',
           s.early_stopping.min_completed, 'must be >= 1')
  _require(config.trial.data.holdout > 0, 'trial.data.holdout',
           config.trial.data.holdout,
           'must be > 0: trials are scored on a holdout carved from train, '
           'never on the test split')


def check_unchanged(workdir: str, config) -> None:
  """Stores the config on a search's first start; on a restart, refuses a
  change to any key outside RESTART_MUTABLE, naming it."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = flatten(json.loads(config.to_json()))
  stored = ledger_lib.read_json(path)
  if stored is None:
    ledger_lib.write_json_atomic(path, current)
    return
  for key in sorted(set(stored) | set(current)):
    if key in RESTART_MUTABLE or stored.get(key) == current.get(key):
      continue
    raise SearchConfigError(
        f'config.{key} changed since this search started in {workdir} '
        f'({stored.get(key, "<unset>")!r} -> {current.get(key, "<unset>")!r});'
        ' restore it, or start a new search in another --workdir')
  ledger_lib.write_json_atomic(path, current)
