"""Choosing the second extractor under an accuracy floor
(`python -m effnetv2_jax.distill`): which candidates are trialled, what is
chosen, restarts, mistakes, and one real short trial through the NAS trial
runner."""

import io
import json
import os
import pytest

from effnetv2_jax.distill import determine
from effnetv2_jax.distill import setup as distill_setup
from effnetv2_jax.nas import ledger
from effnetv2_jax.training import trainer
from config_files import load_config

TESTS = os.path.dirname(os.path.abspath(__file__))
TAP_SHAPE = (1, 3, 3, 16)  # the tiny network's last stage at 24 pixels


def _config(**overrides):
  settings = {'distill.mode': 'stacked', 'distill.extractor': 'auto',
              'data.holdout': 100, 'distill.budget.min_accuracy': 0.5,
              'distill.budget.max_mmacs': 0.0,
              'distill.budget.trial_epochs': 0.1}
  settings.update(overrides)
  return load_config('tiny', None, **settings)


def _costs(workdir):
  """Made-up costs for the tiny tap's store, MACs growing with the index,
  so the driver needs no compiling."""
  specs = distill_setup.candidates_for('efficientnetv2', TAP_SHAPE)
  rows = [dict(name=spec.name, tap='stage2', shape=list(TAP_SHAPE),
               memory_bytes=1000 * (i + 1), macs=10_000 * (i + 1))
          for i, spec in enumerate(specs)]
  os.makedirs(workdir, exist_ok=True)
  ledger.write_json_atomic(os.path.join(workdir, determine.COSTS_FILE), rows)
  return [row['name'] for row in rows]


@pytest.fixture
def fake_trials(tmp_path, monkeypatch):
  calls = tmp_path / 'calls.txt'
  calls.write_text('')
  monkeypatch.setenv('PYTHONPATH', TESTS + os.pathsep +
                     os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('FAKE_DISTILL_CALLS', str(calls))

  def set_accuracies(accuracies):
    monkeypatch.setenv('FAKE_DISTILL_ACCURACY', json.dumps(accuracies))
    return lambda: calls.read_text().split()
  return set_accuracies


def _run(config, workdir, trial_module='distill_fake_trial'):
  out = io.StringIO()
  outcome = determine.Determination(
      config, str(workdir), out=out, trial_module=trial_module
      ).run('configs/tiny.py')
  return outcome, out.getvalue()


def test_the_floor_trials_only_what_the_ceilings_admit(tmp_path, fake_trials):
  names = _costs(tmp_path / 'det')
  # The MAC ceiling admits the first four; of those, two clear the floor.
  accuracies = {names[0]: 0.70, names[1]: 0.60, names[2]: 0.55,
                names[3]: 0.40, names[4]: 0.99, names[5]: 0.99}
  calls = fake_trials(accuracies)
  config = _config(**{'distill.budget.max_mmacs': 0.04})
  outcome, printed = _run(config, tmp_path / 'det')
  assert calls() == names[:4]  # nothing beyond the ceiling trains
  assert outcome['chosen'] == names[2]  # the most MACs at >= 0.5
  assert f'--config.distill.extractor={names[2]}' in outcome['command']
  rows = {row['name']: row for row in outcome['rows']}
  assert rows[names[3]]['fits']['min_accuracy'] is False
  assert rows[names[4]]['accuracy'] is None
  assert f'trial 3/4 {names[2]}: holdout top-1 0.5500' in printed
  stored = ledger.read_json(str(tmp_path / 'det' / determine.RESULT_FILE))
  assert stored['chosen'] == names[2]
  # The trials' config: the extractor by name, no budgets, short.
  job = ledger.read_json(str(tmp_path / 'det' / 'trials' / names[0] /
                             'job.json'))
  assert job['config']['distill']['extractor'] == names[0]
  assert job['config']['train']['epochs'] == 0.1
  assert job['config']['distill']['budget']['min_accuracy'] == 0.0
  assert job['timing'] is None


def test_a_restart_reuses_finished_trials_and_refuses_another_config(
    tmp_path, fake_trials):
  names = _costs(tmp_path / 'det')
  calls = fake_trials({names[0]: 0.9})  # the others crash
  config = _config(**{'distill.budget.max_mmacs': 0.02})
  outcome, printed = _run(config, tmp_path / 'det')
  assert outcome['chosen'] == names[0]
  assert f'trial 2/2 {names[1]}: failed (exit status 3)' in printed
  assert calls() == names[:2]
  _run(config, tmp_path / 'det')
  assert calls() == names[:2]  # nothing trained again
  changed = _config(**{'distill.budget.max_mmacs': 0.03})
  with pytest.raises(determine.DetermineError,
                     match=r'another config \(config.distill.budget.max_mmacs'
                     r' differ\); use a new --workdir'):
    _run(changed, tmp_path / 'det')


def test_nothing_above_the_floor_is_one_line(tmp_path, fake_trials):
  names = _costs(tmp_path / 'det')
  fake_trials({name: 0.1 for name in names})
  with pytest.raises(determine.DetermineError,
                     match=r'min_accuracy=0.5, admits 0 of 6 candidates '
                     rf"\(closest: '{names[0]}' with accuracy=0.1\)"):
    _run(_config(), tmp_path / 'det')


def test_configs_it_refuses():
  with pytest.raises(determine.DetermineError, match="only 'stacked'"):
    determine.check_config(_config(**{'distill.mode': 'label_heads'}))
  with pytest.raises(determine.DetermineError, match='already chosen'):
    determine.check_config(_config(**{'distill.extractor': 'mbconv-d1-e4'}))
  with pytest.raises(determine.DetermineError, match='needs config.data.hold'):
    determine.check_config(_config(**{'data.holdout': 0}))


def test_the_trainer_sends_a_floor_to_the_determination(tmp_path):
  with pytest.raises(trainer.ConfigError,
                     match='python -m effnetv2_jax.distill'):
    trainer.train_and_evaluate(_config(), str(tmp_path / 'run'))


def test_a_real_short_trial_through_the_nas_trial_runner(tmp_path):
  names = _costs(tmp_path / 'det')
  config = _config(**{'distill.budget.max_mmacs': 0.01,
                      'distill.budget.min_accuracy': 0.01,
                      'distill.budget.trial_epochs': 0.05})
  outcome, printed = _run(config, tmp_path / 'det',
                          trial_module=determine.TRIAL_MODULE)
  assert outcome['chosen'] == names[0]
  result = ledger.read_json(str(tmp_path / 'det' / 'trials' / names[0] /
                                'result.json'))
  assert result['status'] == 'completed', printed
  summary = ledger.read_json(str(tmp_path / 'det' / 'trials' / names[0] /
                                 'run' / 'summary.json'))
  assert summary['eval']['top1'] == result['metrics']['accuracy']
  assert summary['holdout_examples'] == 100
  assert 0.0 <= outcome['rows'][0]['accuracy'] <= 1.0
