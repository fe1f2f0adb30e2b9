"""The search driver: reward, ledger, trial processes, restarts, report.

Most tests run the real driver with a stand-in trial (tests/nas_fake_trial.py:
no JAX, instant, told to crash or hang); `test_tiny_search_end_to_end`
trains real candidates (configs/nas.py:tiny).
"""

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import local
from effnetv2_jax.nas import report
from effnetv2_jax.nas import reward as reward_lib
from effnetv2_jax.nas import search as search_lib
from effnetv2_jax.nas import settings
from config_files import REPO, load_config

TESTS = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ reward --

def test_reward_is_the_papers_product():
  assert reward_lib.reward(0.8, 1.0, 1.0) == pytest.approx(0.8)
  # Doubling the step time costs 1 - 2^-0.07 = 4.7%, the parameters 3.4%.
  assert reward_lib.reward(0.8, 2.0, 1.0) == pytest.approx(0.8 * 2**-0.07)
  assert reward_lib.reward(0.8, 1.0, 2.0) == pytest.approx(0.8 * 2**-0.05)
  assert reward_lib.reward(0.8, 2.0, 2.0, w=0.0, v=0.0) == pytest.approx(0.8)
  with pytest.raises(ValueError, match='positive'):
    reward_lib.reward(0.8, 0.0, 1.0)


def test_score_normalises_by_the_reference_median_on_the_same_hardware():
  refs = reward_lib.references([
      dict(hardware='h1', step_time_s=t, params=1000)
      for t in (0.010, 0.012, 0.011)])
  assert refs['h1'].step_time_s == pytest.approx(0.011)
  assert refs['h1'].spread == pytest.approx(0.002 / 0.011)
  metrics = dict(accuracy=0.9, step_time_s=0.022, params=4000, hardware='h1')
  score = reward_lib.score(metrics, refs)
  assert score.step_time_ratio == pytest.approx(2.0)
  assert score.params_ratio == pytest.approx(4.0)
  assert score.reward == pytest.approx(0.9 * 2**-0.07 * 4**-0.05)
  assert score.objectives == pytest.approx((0.9, -2.0, -4.0))
  # Re-scoring with other exponents needs only the raw record.
  assert reward_lib.score(metrics, refs, w=-0.5, v=0.0).reward == (
      pytest.approx(0.9 * 2**-0.5))
  # No reference timed on that hardware yet: no score.
  assert reward_lib.score(dict(metrics, hardware='h2'), refs) is None


def test_pareto_front():
  points = [(0.9, -2.0), (0.8, -1.0), (0.7, -1.5), (0.95, -3.0)]
  assert sorted(reward_lib.pareto_front(points)) == [0, 1, 3]


def test_median_rule():
  finished = [[0.5, 0.8], [0.6, 0.9], [0.7, 0.95]]
  assert search_lib.median_rule([0.55], finished, min_completed=3) == (
      search_lib.median_rule([0.55], finished, 3))
  assert 'early stopped after stage 1' in search_lib.median_rule(
      [0.55], finished, 3)
  assert search_lib.median_rule([0.65], finished, 3) is None
  assert search_lib.median_rule([0.1], finished, 4) is None  # too few peers
  assert search_lib.median_rule([], finished, 1) is None


# ------------------------------------------------------------------ ledger --

def test_ledger_round_trip_and_torn_line(tmp_path):
  ledger = ledger_lib.Ledger(str(tmp_path / 'trials.jsonl'))
  ledger.append(dict(trial_id=0, status='proposed', kind='candidate'))
  with open(ledger.path, 'a') as f:
    f.write('{"trial_id": 1, "sta')  # a writer killed mid-line
  ledger.append(dict(trial_id=0, status='running'))
  events = ledger.events()
  assert [(e['trial_id'], e['status']) for e in events] == [
      (0, 'proposed'), (0, 'running')]
  merged = ledger_lib.trials(events)
  assert merged[0]['status'] == 'running'
  assert merged[0]['kind'] == 'candidate'
  with pytest.raises(ValueError, match='status'):
    ledger.append(dict(trial_id=2, status='done'))
  with pytest.raises(ValueError, match='trial_id'):
    ledger.append(dict(status='proposed'))


def _append_many(path, writer, count):
  ledger = ledger_lib.Ledger(path)
  for i in range(count):
    ledger.append(dict(trial_id=writer * 10_000 + i, status='completed',
                       metrics={'pad': 'x' * (i % 7) * 500}))


def test_ledger_under_concurrent_writers(tmp_path):
  path = str(tmp_path / 'trials.jsonl')
  context = multiprocessing.get_context('spawn')
  writers = [context.Process(target=_append_many, args=(path, w, 150))
             for w in range(4)]
  for p in writers:
    p.start()
  for p in writers:
    p.join(60)
    assert p.exitcode == 0
  with open(path) as f:
    lines = f.readlines()
  assert len(lines) == 600
  ids = [json.loads(line)['trial_id'] for line in lines]  # every line whole
  assert sorted(ids) == sorted(w * 10_000 + i for w in range(4)
                               for i in range(150))


def test_atomic_result_file(tmp_path):
  path = str(tmp_path / 'result.json')
  ledger_lib.write_json_atomic(path, {'a': 1})
  ledger_lib.write_json_atomic(path, {'a': 2})
  assert ledger_lib.read_json(path) == {'a': 2}
  assert os.listdir(tmp_path) == ['result.json']
  (tmp_path / 'bad.json').write_text('{"a":')
  assert ledger_lib.read_json(str(tmp_path / 'bad.json')) is None


# ----------------------------------------------------------------- devices --

def test_device_groups_are_disjoint():
  envs = local.device_groups('cpu', 2, 0, cpus=[0, 1, 2, 3], gpus=0,
                             tpu_chips=0)
  assert envs == [{'EFFNETV2_NAS_CPUS': '0,1'}, {'EFFNETV2_NAS_CPUS': '2,3'}]
  envs = local.device_groups('gpu', 4, 2, cpus=[0], gpus=8, tpu_chips=0)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == [
      '0,1', '2,3', '4,5', '6,7']
  envs = local.device_groups('tpu', 4, 1, cpus=[0], gpus=0, tpu_chips=4)
  assert [e['TPU_VISIBLE_CHIPS'] for e in envs] == ['0', '1', '2', '3']
  assert len({e['TPU_PROCESS_PORT'] for e in envs}) == 4
  assert local.device_groups('tpu', 1, 0, cpus=[0], gpus=0,
                             tpu_chips=4) == [{}]
  with pytest.raises(local.DeviceError, match='max_in_flight=3'):
    local.device_groups('cpu', 3, 0, cpus=[0, 1], gpus=0, tpu_chips=0)


def test_tpu_chips_from_accel_or_vfio_devices(tmp_path):
  older, newer = tmp_path / 'v4', tmp_path / 'v5e'
  older.mkdir()
  for name in ('accel1', 'accel0', 'null'):
    (older / name).touch()
  assert local._tpu_chips(str(older)) == ['accel0', 'accel1']
  (newer / 'vfio').mkdir(parents=True)
  for name in ('vfio', '10', '2', '0'):
    (newer / 'vfio' / name).touch()
  assert local._tpu_chips(str(newer)) == ['0', '2', '10']
  assert local._tpu_chips(str(tmp_path)) == []


# ------------------------------------------------------------------ config --

def _fake_config(**overrides):
  settings = {'search.trial_module': 'nas_fake_trial',
              'search.platform': 'cpu', 'search.max_in_flight': 2,
              'search.num_trials': 4, 'search.time_limit_s': 60.0}
  settings.update(overrides)
  return load_config('nas', 'tiny', **settings)


@pytest.fixture
def fake_trials(monkeypatch):
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([TESTS, REPO]))
  monkeypatch.delenv('FAKE_TRIAL_BEHAVIOUR', raising=False)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  return monkeypatch


@pytest.mark.parametrize('key, value, message', [
    ('search.algorithm', 'ppo', "config.search.algorithm='ppo'"),
    ('search.num_trials', 0, 'config.search.num_trials=0'),
    ('trial.data.holdout', 0.0, 'never on the test split'),
    ('search.backbone', 'efficientnet-z9', 'config.search.backbone'),
])
def test_bad_search_config_is_one_line(tmp_path, key, value, message):
  with pytest.raises(settings.SearchConfigError) as e:
    search_lib.Search(_fake_config(**{key: value}), str(tmp_path))
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_changed_config_on_restart_is_refused(tmp_path):
  search_lib.Search(_fake_config(), str(tmp_path))
  with pytest.raises(settings.SearchConfigError,
                     match=r'config\.search\.algorithm changed'):
    search_lib.Search(_fake_config(**{'search.algorithm': 'random'}),
                      str(tmp_path))
  with pytest.raises(settings.SearchConfigError,
                     match=r'config\.trial\.train\.epochs changed'):
    search_lib.Search(_fake_config(**{'trial.train.epochs': 3.0}),
                      str(tmp_path))
  # How long and how wide a search runs may change.
  search_lib.Search(_fake_config(**{'search.num_trials': 9,
                                    'search.max_in_flight': 1}),
                    str(tmp_path))


# ------------------------------------------------------------ the driver --

def _run_search(workdir, config, out=None):
  state = search_lib.Search(config, str(workdir))
  backend = local.LocalBackend(state, poll_s=0.05, out=out or sys.stdout)
  backend.run()
  return state


def _events(workdir):
  return ledger_lib.Ledger(
      os.path.join(workdir, search_lib.LEDGER_FILE)).events()


def test_search_records_every_trial_and_its_reward(tmp_path, fake_trials):
  state = _run_search(tmp_path, _fake_config())
  assert state.done
  records = state.records()
  candidates = [r for r in records.values() if r['kind'] == 'candidate']
  assert len(candidates) == 4
  assert all(r['status'] == 'completed' for r in records.values())
  events = _events(tmp_path)
  assert all(e['status'] in ledger_lib.STATUSES for e in events)
  for r in candidates:
    statuses = [e['status'] for e in events if e['trial_id'] == r['trial_id']]
    assert statuses[:3] == ['proposed', 'running', 'completed']
    assert r['architecture']['stages']
    assert os.path.exists(os.path.join(state.trial_dir(r['trial_id']),
                                       'result.json'))
  # The reward is A * S^w * P^v of the raw metrics against the reference.
  ref = next(r for r in records.values() if r['kind'] == 'reference')
  for r in candidates:
    m = r['metrics']
    s = m['step_time_s'] / ref['metrics']['step_time_s']
    p = m['params'] / ref['metrics']['params']
    assert r['S'] == pytest.approx(s)
    assert r['reward'] == pytest.approx(m['accuracy'] * s**-0.07 * p**-0.05)


def test_crashing_hanging_and_diverging_trials_fail_and_the_search_goes_on(
    tmp_path, fake_trials):
  # Trial 0 is the reference; 1, 2, 3 are the first candidates.
  fake_trials.setenv('FAKE_TRIAL_BEHAVIOUR', json.dumps(
      {'1': 'crash', '2': 'hang', '3': 'diverge'}))
  config = _fake_config(**{'search.time_limit_s': 3.0})
  state = _run_search(tmp_path, config)
  records = state.records()
  assert records[1]['status'] == 'failed'
  assert records[1]['reason'] == 'exit status 1'
  assert 'simulated crash' in records[1]['log_tail']
  assert records[2]['status'] == 'failed'
  assert records[2]['reason'].startswith('time limit')
  assert records[3]['status'] == 'failed'
  assert records[3]['reason'].startswith('diverged')
  candidates = [r for r in records.values() if r['kind'] == 'candidate']
  assert len(candidates) == 4
  assert candidates[-1]['status'] == 'completed'
  assert candidates[-1]['reward'] > 0
  # The hung trial's process is gone.
  pid = next(e['pid'] for e in _events(tmp_path)
             if e['trial_id'] == 2 and e['status'] == 'running')
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_resume_after_sigkill_at_a_random_point(tmp_path, fake_trials):
  fake_trials.setenv('FAKE_TRIAL_SLEEP_S', '0.4')
  overrides = ['--config.search.trial_module=nas_fake_trial',
               '--config.search.platform=cpu',
               '--config.search.num_trials=6',
               '--config.search.reference_every=3',
               '--config.search.algorithm=reinforce']
  command = [sys.executable, '-m', 'effnetv2_jax.nas',
             '--config=' + os.path.join(REPO, 'configs', 'nas.py') + ':tiny',
             f'--workdir={tmp_path}'] + overrides
  env = dict(os.environ, EFFNETV2_NAS_CPUS='0')
  driver = subprocess.Popen(command, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # Kill it once some trial has completed and before the search ends.
  delay = random.Random().uniform(0.0, 1.0)
  deadline = time.time() + 60
  while time.time() < deadline and driver.poll() is None:
    done = [e for e in _events(tmp_path) if e['status'] == 'completed']
    if len(done) >= 2:
      time.sleep(delay)
      break
    time.sleep(0.05)
  driver.send_signal(signal.SIGKILL)
  driver.wait()
  killed_at = _events(tmp_path)
  finished_before = {e['trial_id'] for e in killed_at
                     if e['status'] in ('completed', 'failed')}
  assert finished_before
  time.sleep(0.5)  # the orphaned trials die with the driver

  restarted = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
  assert restarted.returncode == 0, restarted.stdout + restarted.stderr
  events = _events(tmp_path)
  records = ledger_lib.trials(events)
  candidates = {k: r for k, r in records.items() if r['kind'] == 'candidate'}
  assert len(candidates) == 6  # none duplicated, none lost
  assert all(r['status'] == 'completed' for r in candidates.values())
  for trial_id in finished_before:  # not rerun
    launches = [e for e in events[len(killed_at):]
                if e['trial_id'] == trial_id and e['status'] == 'running']
    assert not launches
  # Every unfinished trial was requeued and ran to completion once more.
  log_runs = {k: open(os.path.join(tmp_path, 'trials', f'{k:06d}',
                                   'log.txt')).read().count('fake trial')
              for k in records}
  for trial_id, runs in log_runs.items():
    running = sum(1 for e in events if e['trial_id'] == trial_id and
                  e['status'] == 'running')
    assert runs == running


def test_report_and_export(tmp_path, fake_trials, capsys):
  _run_search(tmp_path, _fake_config())
  config, records = report.load(str(tmp_path))
  rows = report.ranked(records, -0.07, -0.05)
  assert [r.score.reward for r in rows] == sorted(
      (r.score.reward for r in rows), reverse=True)
  # Exponents 0: the ranking is by accuracy alone.
  by_accuracy = report.ranked(records, 0.0, 0.0)
  assert [r.accuracy for r in by_accuracy] == sorted(
      (r.accuracy for r in by_accuracy), reverse=True)
  out = subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.nas', 'report',
       f'--workdir={tmp_path}', '--w', '0', '--v', '0', '--top_k', '2'],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert 'reward A * S^0 * P^0' in out
  assert len([line for line in out.splitlines()
              if line.strip()[:1].isdigit() and 'F' in line or 'M' in line
              ]) >= 2
  assert os.path.getsize(tmp_path / 'pareto.png') > 10_000
  arch_path = tmp_path / 'best.json'
  subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.nas', 'export',
       f'--workdir={tmp_path}', '--rank', '1', '--output', str(arch_path)],
      cwd=REPO, check=True, capture_output=True)
  exported = json.loads(arch_path.read_text())
  assert exported['stages'] == rows[0].architecture['stages']
  bad = subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.nas', 'export',
       f'--workdir={tmp_path}', '--rank', '99'], cwd=REPO,
      capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().startswith('error: --rank=99')


def test_report_on_an_empty_directory_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.nas', 'report',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.count('\n') == 1
  assert 'no trials.jsonl' in out.stderr


# ------------------------------------------------------- the real trainer --

def test_tiny_search_end_to_end(tmp_path, monkeypatch):
  """configs/nas.py:tiny as the README runs it: real trials, real timing."""
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # one device per trial
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  config = load_config('nas', 'tiny', **{'search.platform': 'cpu'})
  state = _run_search(tmp_path, config)
  records = state.records()
  candidates = [r for r in records.values() if r['kind'] == 'candidate']
  assert len(candidates) >= 4
  assert all(r['status'] == 'completed' for r in candidates)
  for r in candidates:
    m = r['metrics']
    assert 0.0 <= m['accuracy'] <= 1.0 and r['reward'] > 0
    assert m['timing']['image_size'] == 24
    assert m['timing']['batch_size'] == 64
    assert len(m['timing']['step_times_s']) == 10
    summary = json.load(open(os.path.join(
        state.trial_dir(r['trial_id']), 'run', 'summary.json')))
    # Scored on the holdout carved from train, never on the test split.
    assert summary['holdout_examples'] == 144
    assert all(s['eval_split'] == 'holdout' for s in summary['stages'])
    assert m['accuracy'] == summary['eval']['top1']
    from effnetv2_jax.training import state as state_lib
    assert m['params'] == state_lib.ModelSpec(r['architecture'],
                                              10).num_params()


# ----------------------------------------------------------------- configs --

@pytest.mark.parametrize('setting', ['tiny', 'digits', 'b4_imagenet'])
def test_nas_settings_validate_and_plan(setting, tmp_path):
  from effnetv2_jax.nas import space
  from effnetv2_jax.training import config_checks, progressive, recipes
  config = load_config('nas', setting)
  settings.validate(config)
  trial = config.trial
  backbone = space.backbone(config.search.backbone)
  trial.model.arch = backbone.to_dict()  # what each trial gets instead
  config_checks.validate(trial, num_devices=1,
                         reference=recipes.base_config())
  prog = trial.progressive.to_dict()
  prog['max_image_size'] = prog['max_image_size'] or backbone.train_size
  plan = progressive.plan_from_config(
      prog, epochs=trial.train.epochs, num_train_examples=1_000_000,
      batch_size=trial.train.batch_size, batch_multiple=1)
  assert plan[-1].image_size == search_lib.final_image_size(
      trial, backbone.to_dict())
  config_checks.check_eval_size(trial.eval.image_size or backbone.eval_size,
                                [s.image_size for s in plan])


def test_nas_docstring_commands_parse():
  import shlex
  doc = open(os.path.join(REPO, 'configs', 'nas.py')).read()
  doc = doc.split('"""')[1].replace('\\\n', ' ')
  commands = [shlex.split(line.strip()) for line in doc.splitlines()
              if line.strip().startswith('python -m effnetv2_jax.nas')]
  assert len(commands) >= 3
  for argv in commands:
    spec = next((a.split('=', 1)[1] for a in argv
                 if a.startswith('--config=')), None)
    if spec:
      path, _, arg = spec.partition(':')
      assert path == 'configs/nas.py'
      settings.validate(load_config('nas', arg))


def test_early_stopping_stops_trials_below_the_median(tmp_path, fake_trials):
  fake_trials.setenv('FAKE_TRIAL_STAGE_SLEEP_S', '0.6')
  config = _fake_config(**{
      'search.num_trials': 8, 'search.max_in_flight': 1,
      'search.algorithm': 'random', 'search.early_stopping.enabled': True,
      'search.early_stopping.min_completed': 2})
  state = _run_search(tmp_path, config)
  records = [r for r in state.records().values() if r['kind'] == 'candidate']
  stopped = [r for r in records if 'early stopped' in r.get('reason', '')]
  assert stopped, [r.get('metrics', {}).get('accuracy') for r in records]
  # One trial at a time: each decision is checkable against the trials
  # completed before it started.
  for i, r in enumerate(records):
    earlier = [e['metrics']['stage_accuracies'] for e in records[:i]
               if e['status'] == 'completed']
    from nas_fake_trial import fake_metrics
    first_stage = fake_metrics({'architecture': r['architecture']})[
        'stage_accuracies'][:1]
    expected = search_lib.median_rule(first_stage, earlier, 2)
    assert (r['status'] == 'failed') == (expected is not None), r
    if expected:
      assert r['reason'] == expected


def test_spearman():
  assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
  assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
  # Ties take their mean rank, as in scipy.
  from scipy import stats
  x, y = [1, 2, 2, 3, 5, 7, 7], [2, 1, 4, 3, 6, 6, 0]
  assert report.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
  with pytest.raises(ValueError):
    report.spearman([1], [1])


def test_ranking_benchmark_lists_top_and_bottom_retrainings(
    tmp_path, fake_trials):
  _run_search(tmp_path, _fake_config(**{'search.num_trials': 5}))
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.nas_ranking',
       f'--workdir={tmp_path}', '--top', '2', '--bottom', '2', '--seeds',
       '0', '1', '--print-commands'], cwd=REPO, capture_output=True,
      text=True, check=True).stdout.splitlines()
  assert len(out) == 8  # 4 architectures x 2 seeds
  assert all('effnetv2_jax.main' in line and '--config.model.arch=' in line
             for line in out)
  assert {line.split('--config.seed=')[1].split()[0] for line in out} == {
      '0', '1'}
  ranks = sorted({line.split('ranking/rank')[1][:2] for line in out})
  assert ranks == ['01', '02', '04', '05']


def test_a_reference_that_keeps_failing_ends_the_search_in_one_line(
    tmp_path, fake_trials):
  fake_trials.setenv('FAKE_TRIAL_BEHAVIOUR', json.dumps(
      {str(i): 'crash' for i in range(3)}))
  command = [sys.executable, '-m', 'effnetv2_jax.nas',
             '--config=' + os.path.join(REPO, 'configs', 'nas.py') + ':tiny',
             f'--workdir={tmp_path}', '--config.search.max_in_flight=1',
             '--config.search.trial_module=nas_fake_trial',
             '--config.search.platform=cpu']
  out = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      'error: the reference network (tiny) failed 3 times')
  assert 'Traceback' not in out.stderr
