r"""Choosing the second extractor under an accuracy floor, by short trials.

    python -m effnetv2_jax.distill --config=configs/distill.py:digits \
        --config.distill.budget.min_accuracy=0.9 --workdir=DIR

A run with `distill.extractor='auto'` chooses from memory and MAC budgets on
its own; a floor on accuracy needs training, so this program does it first:

1. costs: a child process measures each candidate of the run's one tap as
   the run would (the compiled gradient program's extra memory, the MACs
   per image; nothing trains) -> DIR/costs.json;
2. trials: each candidate within the memory and MAC budgets trains for
   `distill.budget.trial_epochs` with that extractor, as a trial of the NAS
   trial runner (its own process, the holdout as its eval split)
   -> DIR/trials/<name>/result.json; its accuracy is the holdout top-1 of
   the network trained that way, the one that ships;
3. the choice: `extractors.determine` under all three budgets (the most
   MACs within them); the table, the reason and the command that trains
   with it are printed and written to DIR/determination.json.

Restarted on the same DIR it reuses the costs and every finished trial; a
config that differs from the one in DIR/config.json is refused. The driver
never starts JAX itself: its children own the accelerators one at a time.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping, TextIO

CONFIG_FILE = 'config.json'
COSTS_FILE = 'costs.json'
RESULT_FILE = 'determination.json'
TRIALS_DIR = 'trials'
TRIAL_MODULE = 'effnetv2_jax.nas.trial'


class DetermineError(ValueError):
  """The config or the workdir cannot be used; one line."""


def check_config(config) -> None:
  """What an accuracy-floor determination needs of the run's config."""
  d = config.distill
  if d.mode != 'stacked':
    raise DetermineError(
        f"config.distill.mode={d.mode!r}: only 'stacked' runs have a second "
        'extractor to choose')
  if d.extractor != 'auto':
    raise DetermineError(
        f'config.distill.extractor={d.extractor!r} is already chosen; set '
        "it to 'auto' to choose under the budgets")
  if d.budget.min_accuracy and not config.data.holdout:
    raise DetermineError(
        'config.distill.budget.min_accuracy needs config.data.holdout: the '
        'trials are scored on a holdout carved from train, never on test')


def config_values(config) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def trial_values(values: Mapping[str, Any], extractor: str) -> dict:
  """The run's config for one accuracy trial: the extractor by name, no
  budgets, `budget.trial_epochs` of training."""
  values = copy.deepcopy(dict(values))
  distill = values['distill']
  distill['extractor'] = extractor
  values['train']['epochs'] = float(distill['budget']['trial_epochs'])
  values['train']['total_steps'] = 0  # the trial's length is its epochs
  distill['budget'].update(max_memory_mb=0.0, max_mmacs=0.0,
                           min_accuracy=0.0)
  return values


def train_command(config_arg: str | None, extractor: str) -> str:
  where = f'--config={config_arg}' if config_arg else '--config=<config>'
  return (f'python -m effnetv2_jax.main {where} '
          f'--config.distill.extractor={extractor} --workdir=<run dir>')


class Determination:
  """One determination in its directory; see the module docstring."""

  def __init__(self, config, workdir: str, *, out: TextIO = sys.stdout,
               trial_module: str = TRIAL_MODULE):
    check_config(config)
    self.workdir = os.path.abspath(workdir)
    self.values = config_values(config)
    self.budget = config.distill.budget
    self.out = out
    self.trial_module = trial_module
    os.makedirs(self.workdir, exist_ok=True)
    self._keep_config()

  def _path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def _keep_config(self) -> None:
    from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
    stored = ledger.read_json(self._path(CONFIG_FILE))
    if stored is None:
      ledger.write_json_atomic(self._path(CONFIG_FILE), self.values)
    elif stored != self.values:
      changed = sorted(_changed_keys(stored, self.values))
      raise DetermineError(
          f'{self.workdir} holds a determination of another config '
          f'({", ".join(changed[:3])} differ); use a new --workdir')

  def costs(self) -> list[dict]:
    """Every candidate's costs, measured once by a child process."""
    from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
    rows = ledger.read_json(self._path(COSTS_FILE))
    if rows is not None:
      return rows
    print('measuring the candidates (compiled memory, MACs) ...',
          file=self.out, flush=True)
    log_path = self._path('costs_log.txt')
    with open(log_path, 'w', encoding='utf-8') as log:
      code = subprocess.call(
          [sys.executable, '-m', __name__, 'costs', self.workdir],
          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    rows = ledger.read_json(self._path(COSTS_FILE))
    if code or rows is None:
      raise DetermineError(f'measuring the candidates failed (exit status '
                           f'{code}): {_last_line(log_path)}')
    return rows

  def within_ceilings(self, row: Mapping[str, Any]) -> bool:
    memory, macs = self.budget.max_memory_mb, self.budget.max_mmacs
    return ((not memory or row['memory_bytes'] <= memory * 2**20)
            and (not macs or row['macs'] <= macs * 1e6))

  def accuracy(self, name: str, index: int, total: int) -> float | None:
    """The holdout top-1 of a short trial with extractor `name` (None when
    the trial failed); a finished trial is read, not rerun."""
    from effnetv2_jax.nas import ledger, local  # pylint: disable=g-import-not-at-top
    trial_dir = self._path(TRIALS_DIR, name)
    result = ledger.read_json(os.path.join(trial_dir, 'result.json'))
    if result is None:
      os.makedirs(trial_dir, exist_ok=True)
      ledger.write_json_atomic(os.path.join(trial_dir, 'job.json'), dict(
          kind='candidate', trial_id=index,
          config=trial_values(self.values, name),
          architecture=self.values['model']['arch'],
          cache_dir=self._path('cache'), seed=self.values['seed'],
          timing=None))
      print(f'trial {index}/{total} {name}: training '
            f'{self.budget.trial_epochs:g} epochs ...', file=self.out,
            flush=True)
      start = time.time()
      code = local.launch(self.trial_module, trial_dir, {}).wait()
      result = ledger.read_json(os.path.join(trial_dir, 'result.json')) or {}
      result.setdefault('status', f'failed (exit status {code})')
      result['driver_wall_time_s'] = time.time() - start
      ledger.write_json_atomic(os.path.join(trial_dir, 'result.json'), result)
    accuracy = (result.get('metrics') or {}).get('accuracy')
    if result.get('status') != 'completed' or accuracy is None:
      print(f'trial {index}/{total} {name}: {result.get("status")} '
            f'({result.get("reason") or _last_line(trial_dir + "/log.txt")})',
            file=self.out, flush=True)
      return None
    print(f'trial {index}/{total} {name}: holdout top-1 {accuracy:.4f}',
          file=self.out, flush=True)
    return float(accuracy)

  def run(self, config_arg: str | None = None) -> dict:
    """Measures, trials and chooses; returns what determination.json holds.

    Raises:
      DetermineError: the costs could not be measured, or no candidate is
        within the budgets.
    """
    from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
    from effnetv2_jax.distill import setup  # pylint: disable=g-import-not-at-top
    from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
    rows = {row['name']: row for row in self.costs()}
    specs = [s for s in setup.candidates_for(
        _family(self.values), tuple(next(iter(rows.values()))['shape']),
        self.values['distill']['kind']) if s.name in rows]
    trialled = [s.name for s in specs if self.within_ceilings(rows[s.name])]
    floor = self.budget.min_accuracy

    def measure(spec):
      row = rows[spec.name]
      accuracy = None
      if floor and spec.name in trialled:
        accuracy = self.accuracy(spec.name, trialled.index(spec.name) + 1,
                                 len(trialled))
      return dict(memory_bytes=row['memory_bytes'], macs=row['macs'],
                  accuracy=accuracy)

    try:
      choice = extractors.determine(
          specs, measure=measure,
          **setup.budget_limits(self.budget, with_accuracy=True))
    except ValueError as e:
      raise DetermineError(str(e)) from None
    tap = next(iter(rows.values()))['tap']
    outcome = dict(chosen=choice.spec.name, tap=tap, reason=choice.reason,
                   table=choice.table, rows=list(choice.rows),
                   command=train_command(config_arg, choice.spec.name))
    ledger.write_json_atomic(self._path(RESULT_FILE), outcome)
    print(f'tap {tap}:\n{choice.table}\n{choice.reason}\n'
          f'train with it: {outcome["command"]}', file=self.out, flush=True)
    return outcome


def _family(values: Mapping[str, Any]) -> str:
  from effnetv2_jax.models import families  # pylint: disable=g-import-not-at-top
  return families.family_of(values['model']['arch']).name


def _changed_keys(a: Mapping, b: Mapping, prefix: str = '') -> set[str]:
  keys = set()
  for key in set(a) | set(b):
    left, right = a.get(key), b.get(key)
    if isinstance(left, Mapping) and isinstance(right, Mapping):
      keys |= _changed_keys(left, right, f'{prefix}{key}.')
    elif left != right:
      keys.add(f'config.{prefix}{key}')
  return keys


def _last_line(path: str) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return 'no log'
  return lines[-1] if lines else 'empty log'


def _costs_main(workdir: str) -> int:
  """The child: measures the candidates of DIR/config.json's run."""
  from effnetv2_jax.nas import ledger, trial  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import trainer  # pylint: disable=g-import-not-at-top
  values = ledger.read_json(os.path.join(workdir, CONFIG_FILE))
  config = trial.config_from_dict(values, values['model']['arch'])
  try:
    rows = trainer.distillation_candidate_costs(config)
  except trainer.ConfigError as e:
    print(f'error: {e}', flush=True)
    return 2
  ledger.write_json_atomic(os.path.join(workdir, COSTS_FILE), rows)
  return 0


if __name__ == '__main__':
  if len(sys.argv) != 3 or sys.argv[1] != 'costs':
    print(f'usage: python -m {__spec__.name} costs DIR (run by '
          'python -m effnetv2_jax.distill)', file=sys.stderr)
    sys.exit(2)
  from effnetv2_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_for_host_memory()
  sys.exit(_costs_main(sys.argv[2]))
