"""The search's Ray backend: the same trials as Ray Tune trials.

Each test starts its own local Ray instance on CPU and runs the stand-in
trial (tests/nas_fake_trial.py). Ray writes under HOME (~/.ray/auth_token)
and its temp dir, so both point into the test's tmp. Every process this
test's Ray started carries a marker in its environment or holds files in
that temp dir: none may outlive the backend, and any that does is killed
(by pid) when the test ends.
"""

import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

import pytest

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import local
from effnetv2_jax.nas import ray_backend
from effnetv2_jax.nas import search as search_lib
from config_files import REPO, load_config

TESTS = os.path.dirname(os.path.abspath(__file__))
MARKER_ENV = 'EFFNETV2_NAS_RAY_TEST'


def _config(**overrides):
  settings = {'search.trial_module': 'nas_fake_trial',
              'search.num_trials': 2, 'search.max_in_flight': 2,
              'search.platform': 'cpu', 'search.time_limit_s': 60.0}
  settings.update(overrides)
  return load_config('nas', 'tiny', **settings)


def _ours(pid: str, marker: bytes, ray_tmp: str) -> bool:
  """Whether the process carries the marker in its environment or holds a
  file under this test's Ray temp dir (Ray's processes rewrite their title
  over the environment block, so their environ may have lost the marker,
  but each keeps its session's log files open)."""
  with open(f'/proc/{pid}/environ', 'rb') as f:
    if marker in f.read().split(b'\0'):
      return True
  for fd in os.listdir(f'/proc/{pid}/fd'):
    try:
      if os.readlink(f'/proc/{pid}/fd/{fd}').startswith(ray_tmp + '/'):
        return True
    except OSError:
      continue
  return False


def _marked_processes(env) -> dict[int, str]:
  """pid -> command line of each process this test's Ray started (and the
  trials, which inherit the marker)."""
  marker, ray_tmp = env
  needle = f'{MARKER_ENV}={marker}'.encode()
  found = {}
  for name in os.listdir('/proc'):
    if not name.isdigit() or int(name) == os.getpid():
      continue
    try:
      if _ours(name, needle, ray_tmp):
        with open(f'/proc/{name}/cmdline', 'rb') as f:
          found[int(name)] = f.read().replace(b'\0', b' ').decode()[:200]
    except OSError:  # gone, or not ours to read
      continue
  return found


def _wait_for_no_processes(env, timeout_s: float = 20.0,
                           tolerated: tuple[str, ...] = ()) -> dict:
  """This test's processes still there after `timeout_s`, but those whose
  command line starts with one of `tolerated`."""
  deadline = time.time() + timeout_s
  while True:
    left = {pid: command for pid, command in _marked_processes(env).items()
            if not command.startswith(tolerated)}
    if not left or time.time() > deadline:
      return left
    time.sleep(0.25)


@pytest.fixture(scope='module')
def ray_home(tmp_path_factory):
  """HOME for every Ray instance of this module: Ray's driver library
  caches the token it read from ~/.ray/auth_token for the process's
  lifetime, so a second HOME without that file would fail to start Ray."""
  return tmp_path_factory.mktemp('home')


@pytest.fixture
def ray_env(monkeypatch, ray_home):
  """A hermetic environment for a local Ray instance; yields what
  identifies its processes: (marker, Ray's temp dir)."""
  marker = uuid.uuid4().hex
  home = ray_home
  # Ray's Unix sockets live under its temp dir: keep its path short.
  ray_tmp = tempfile.mkdtemp(prefix='nasray', dir='/tmp')
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.setenv('RAY_TMPDIR', ray_tmp)
  monkeypatch.setenv('TMPDIR', ray_tmp)
  monkeypatch.setenv('RAY_USAGE_STATS_ENABLED', '0')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([TESTS, REPO]))
  monkeypatch.setenv(MARKER_ENV, marker)
  monkeypatch.delenv('FAKE_TRIAL_BEHAVIOUR', raising=False)
  monkeypatch.delenv('RAY_ADDRESS', raising=False)
  monkeypatch.delenv('RAY_AUTH_MODE', raising=False)  # Ray's default
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  yield marker, ray_tmp
  for pid in _marked_processes((marker, ray_tmp)):  # only this test's
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  shutil.rmtree(ray_tmp, ignore_errors=True)


def _events(workdir):
  return ledger_lib.Ledger(
      os.path.join(workdir, search_lib.LEDGER_FILE)).events()


def _statuses(events, trial_id):
  return [e['status'] for e in events if e['trial_id'] == trial_id]


def _runs(state, trial_id):
  """How many times the fake trial ran in this trial's directory."""
  with open(os.path.join(state.trial_dir(trial_id), 'log.txt')) as f:
    return f.read().count(f'fake trial {trial_id} ')


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:  # a zombie has exited
    return f.read().rsplit(')', 1)[1].split()[0] != 'Z'


def test_ray_search_runs_every_trial_to_a_reward(tmp_path, ray_env,
                                                 ray_home):
  workdir = tmp_path / 'search'
  state = search_lib.Search(_config(), str(workdir))
  out = io.StringIO()
  import ray  # pylint: disable=g-import-not-at-top,unused-import
  environ = dict(os.environ)  # after `import ray`, which sets RAY_CLIENT_MODE
  ray_backend.RayBackend(state, out=out).run()
  assert _wait_for_no_processes(ray_env) == {}
  assert dict(os.environ) == environ  # ray.init's variables are gone

  assert state.done
  records = ledger_lib.trials(_events(workdir))
  kinds = sorted(r['kind'] for r in records.values())
  assert kinds == ['candidate', 'candidate', 'reference']
  events = _events(workdir)
  assert all(e['status'] in ledger_lib.STATUSES for e in events)
  for trial_id, record in records.items():
    assert record['status'] == 'completed', record
    assert _statuses(events, trial_id)[:3] == [
        'proposed', 'running', 'completed']
    running = next(e for e in events if e['trial_id'] == trial_id and
                   e['status'] == 'running')
    # Started by a Ray worker (not this process) and pinned to a core of
    # its own, as the local backend's slots are.
    assert running['pid'] != os.getpid() and running['ray_trial']
    assert running['devices']['EFFNETV2_NAS_CPUS'].isdigit()
    result = ledger_lib.read_json(
        os.path.join(state.trial_dir(trial_id), 'result.json'))
    assert result['status'] == 'completed'
    assert record['metrics']['params'] == result['metrics']['params']
    assert _runs(state, trial_id) == 1
  reference = next(r for r in records.values() if r['kind'] == 'reference')
  for r in records.values():
    if r['kind'] != 'candidate':
      continue
    m = r['metrics']
    s = m['step_time_s'] / reference['metrics']['step_time_s']
    p = m['params'] / reference['metrics']['params']
    assert r['reward'] == pytest.approx(m['accuracy'] * s**-0.07 * p**-0.05)
  assert 'trial 2 completed' in out.getvalue()
  assert os.path.isdir(workdir / ray_backend.RESULTS_DIR)
  # Ray wrote its token into the test's HOME.
  assert (ray_home / '.ray' / 'auth_token').is_file()


def test_restart_runs_the_dead_drivers_unfinished_trial_only(tmp_path,
                                                             ray_env,
                                                             monkeypatch):
  workdir = str(tmp_path / 'search')
  config = _config(**{'search.time_limit_s': 3.0})
  # The new candidate (trial 2) hangs: the Ray trial enforces the limit.
  monkeypatch.setenv('FAKE_TRIAL_BEHAVIOUR', json.dumps({'2': 'hang'}))
  # A driver that completed the reference, launched candidate 1, and died.
  dead = search_lib.Search(config, workdir)
  reference = dead.next_job()
  assert reference.kind == 'reference'
  process = local.launch('nas_fake_trial', dead.trial_dir(reference.trial_id),
                         {})
  dead.started(reference, pid=process.pid)
  dead.finish(reference, local.outcome_of(
      dead.trial_dir(reference.trial_id), process.wait(30), 0.1))
  unfinished = dead.next_job()
  assert unfinished.kind == 'candidate'
  dead.started(unfinished, pid=999_999)
  before = len(_events(workdir))
  del dead

  state = search_lib.Search(config, workdir)
  assert state.in_flight == 0 and not state.done
  ray_backend.RayBackend(state, out=io.StringIO()).run()
  assert _wait_for_no_processes(ray_env) == {}

  assert state.done
  events = _events(workdir)
  after = events[before:]
  records = ledger_lib.trials(events)
  assert sorted(records) == [0, 1, 2]  # the requeued trial kept its id
  assert not [e for e in after if e['trial_id'] == reference.trial_id]
  assert _runs(state, reference.trial_id) == 1
  assert _statuses(after, unfinished.trial_id)[:2] == ['running', 'completed']
  assert _runs(state, unfinished.trial_id) == 1
  assert records[unfinished.trial_id]['reward'] > 0
  hung = records[2]
  assert hung['status'] == 'failed'
  assert hung['reason'].startswith('time limit: still running after')
  assert 'fake trial 2 (candidate): hang' in hung['log_tail']
  assert not _alive(next(e['pid'] for e in after if e['trial_id'] == 2 and
                         e['status'] == 'running'))


class _StubTrial:
  """The parts of a Tune Trial the ledger callback reads."""

  def __init__(self, trial_id, last_result=None, error_file=None):
    self.trial_id = trial_id
    self.last_result = last_result or {}
    self.error_file = error_file


def test_ray_errors_fail_the_trial_and_interrupted_trials_are_requeued(
    tmp_path):
  workdir = str(tmp_path / 'search')
  state = search_lib.Search(_config(), workdir)
  lost, interrupted = state.next_job(), state.next_job()
  error_file = tmp_path / 'error.txt'
  error_file.write_text('Traceback (most recent call last):\n  ...\n'
                        'ray.exceptions.ActorDiedError: The actor died.\n')
  callback = ray_backend._callback_class()(  # pylint: disable=protected-access
      state, {'a': lost, 'b': interrupted}, io.StringIO())
  callback.on_trial_error(0, [], _StubTrial('a', error_file=str(error_file)))
  # Ctrl-C: Tune ends a running trial that has only reported its start.
  callback.on_trial_complete(0, [], _StubTrial(
      'b', last_result={ray_backend.STARTED_KEY: '{}'}))
  records = state.records()
  assert records[lost.trial_id]['status'] == 'failed'
  assert records[lost.trial_id]['reason'] == (
      'Ray trial error: ray.exceptions.ActorDiedError: The actor died.')
  assert records[interrupted.trial_id]['status'] == 'proposed'
  restarted = search_lib.Search(_config(), workdir)
  assert interrupted.trial_id in [restarted.next_job().trial_id,
                                  restarted.next_job().trial_id]


def test_without_ray_the_backend_says_how_to_install_it(tmp_path,
                                                       monkeypatch):
  state = search_lib.Search(_config(), str(tmp_path))
  monkeypatch.setitem(sys.modules, 'ray', None)  # `import ray` fails
  with pytest.raises(ImportError) as e:
    ray_backend.RayBackend(state)
  assert str(e.value) == '--backend=ray needs Ray: pip install -e ".[nas]"'


@pytest.mark.parametrize('platform, per_trial, slots, nodes, expected', [
    ('cpu', 0, 2, [{'CPU': 2.0}], {'CPU': 1.0}),
    ('cpu', 3, 2, [{'CPU': 4.0}, {'CPU': 4.0}], {'CPU': 3.0}),
    # One trial per host on a 4 x 8-GPU cluster.
    ('gpu', 0, 4, [{'CPU': 96.0, 'GPU': 8.0}] * 4, {'CPU': 1.0, 'GPU': 8.0}),
    ('gpu', 0, 32, [{'CPU': 96.0, 'GPU': 8.0}] * 2, {'CPU': 1.0, 'GPU': 1.0}),
    ('tpu', 1, 4, [{'CPU': 96.0, 'TPU': 4.0}], {'CPU': 1.0, 'TPU': 1.0}),
])
def test_trial_resources(platform, per_trial, slots, nodes, expected):
  assert ray_backend.trial_resources(platform, per_trial, slots,
                                     nodes) == expected


def test_trial_resources_that_no_node_holds_are_one_line():
  with pytest.raises(local.DeviceError) as e:
    ray_backend.trial_resources('gpu', 4, 1, [{'CPU': 8.0, 'GPU': 2.0}])
  assert 'devices_per_trial=4' in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(local.DeviceError, match='no GPUs'):
    ray_backend.trial_resources('gpu', 0, 1, [{'CPU': 8.0}])
  assert ray_backend.cluster_platform([{'CPU': 8.0}, {'GPU': 1.0}]) == 'gpu'
  assert ray_backend.cluster_platform([{'CPU': 8.0}]) == 'cpu'


def test_cpu_groups_are_disjoint(tmp_path, monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  with ray_backend.cpu_group(1, str(tmp_path)) as first:
    with ray_backend.cpu_group(1, str(tmp_path)) as second:
      with ray_backend.cpu_group(1, str(tmp_path)) as third:
        assert (first, second, third) == ([0], [1], None)
  with ray_backend.cpu_group(1, str(tmp_path)) as again:  # released
    assert again == [0]
