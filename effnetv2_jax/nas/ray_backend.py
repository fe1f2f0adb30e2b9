r"""Runs a search's trials as Ray Tune trials, on one host or a cluster.

    python -m effnetv2_jax.nas --config=configs/nas.py:digits --workdir=DIR \
        --backend=ray [--ray_address=HOST:PORT]

The trials are the local backend's: the same `Search` decides what runs
(`next_job`) and what a result means (`finish`), and each trial is the same
process (`python -m <search.trial_module> TRIAL_DIR`), started by the Tune
trial on whichever node Ray placed it. The pieces:

  * `_JobSearcher`, a Tune `Searcher` in the driver, asks `next_job()` for
    each trial Tune wants, and says FINISHED once the search is done;
  * `run_trial`, the function trainable on the worker node, starts the trial
    process with `local.launch`, enforces `search.time_limit_s` with
    `local.stop` and reports `local.outcome_of` as its result;
  * `_LedgerCallback`, in the driver, records where each trial started
    (`Search.started`) and gives each outcome to `Search.finish`, so the
    JSONL ledger in the workdir stays the only state.

Each trial asks Ray for its devices: `search.devices_per_trial` GPUs, TPU
chips or CPUs (0: the cluster's devices of that kind split evenly among
`search.max_in_flight` trials, at most one node's worth), so Ray never
places two trials on the same accelerator. Ray gives GPUs and TPU chips to
the process through CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS; Ray does not
pin CPU cores, so a CPU trial takes a disjoint core group of its node
itself (a lock file per group), as the local backend's slots do.

A trial dies with the Ray worker that started it (the trial asks the kernel
for that), and the worker dies with the driver. Restarting after a driver
failure therefore goes through the ledger, not `Tuner.restore`: a new
driver on the same workdir rebuilds `Search` (which requeues the trials that
did not finish) and starts a fresh Tuner. A trial interrupted by Ctrl-C is
not recorded as finished, so it is requeued the same way.

Trial files (job.json, log.txt, result.json) are written on the node that
ran the trial, under the same workdir path; the driver needs none of them
(the outcome comes back through Tune), so the workdir need not be on a
shared filesystem; every node needs this package installed (the Ray
workers import it) and the dataset. Tune's own records go to
WORKDIR/ray_results; a local instance keeps its logs in WORKDIR/ray_tmp
when that path is short enough for Ray's sockets (and $RAY_TMPDIR is
unset), else in Ray's default temp dir ($RAY_TMPDIR, $TMPDIR or /tmp).

Not supported here: the median early-stopping rule
(`search.early_stopping`) is local-only, since it reads a running trial's
metrics file, which may be on another node; a search with it on runs every
trial to the end on Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping, Sequence, TextIO

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import local
from effnetv2_jax.nas import search as search_lib
from effnetv2_jax.nas import trial as trial_lib

INSTALL_HINT = '--backend=ray needs Ray: pip install -e ".[nas]"'
RESULTS_DIR = 'ray_results'
RAY_TMP_DIR = 'ray_tmp'
STARTED_KEY = 'nas_started'
OUTCOME_KEY = 'nas_outcome'
# Unix socket paths are at most 107 bytes; Ray puts its sockets at
# <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX_LEN = len('/session_2000-01-01_00-00-00_000000_4194304'
                         '/sockets/plasma_store')
# The local instance only carries control messages and results.
_LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2
_RESOURCE_NAMES = {'cpu': 'CPU', 'gpu': 'GPU', 'tpu': 'TPU'}
_UNIT_NAMES = {'cpu': 'CPUs', 'gpu': 'GPUs', 'tpu': 'TPU chips'}


def _import_ray():
  try:
    import ray  # pylint: disable=g-import-not-at-top
    from ray import tune  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return ray


# ---------------------------------------------------------- resources --

def cluster_platform(nodes: Sequence[Mapping[str, float]]) -> str:
  """'gpu' if any node has GPUs, else 'tpu' if any has TPU chips, else
  'cpu' (for `search.platform='auto'`)."""
  for platform in ('gpu', 'tpu'):
    if any(n.get(_RESOURCE_NAMES[platform], 0) >= 1 for n in nodes):
      return platform
  return 'cpu'


def trial_resources(platform: str, per_trial: int, slots: int,
                    nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """The Ray resources one trial asks for.

  Args:
    platform: 'cpu', 'gpu' or 'tpu'.
    per_trial: `search.devices_per_trial`; 0 splits the cluster's devices of
      that kind evenly among `slots` trials, at most one node's worth each.
    slots: `search.max_in_flight`.
    nodes: each live node's Ray resources ({'CPU': 8.0, 'GPU': 2.0, ...}).

  Returns:
    A `tune.with_resources` dict: {'CPU': n} for a CPU trial, one CPU and
    the accelerators otherwise.

  Raises:
    local.DeviceError: no node can hold one trial.
  """
  if platform not in _RESOURCE_NAMES:
    raise ValueError(f'unknown platform {platform!r}; choose one of '
                     f'{", ".join(_RESOURCE_NAMES)}')
  name, units = _RESOURCE_NAMES[platform], _UNIT_NAMES[platform]
  per_node = [int(n.get(name, 0)) for n in nodes]
  largest = max(per_node, default=0)
  if largest < 1:
    raise local.DeviceError(
        f'config.search.platform={platform!r}: this Ray cluster has no '
        f'{units} ({len(nodes)} nodes)')
  count = per_trial or max(1, min(largest, sum(per_node) // slots))
  if count > largest:
    raise local.DeviceError(
        f'config.search.devices_per_trial={per_trial}: no node of this Ray '
        f'cluster has {count} {units} (the largest has {largest})')
  if platform == 'cpu':
    return {'CPU': float(count)}
  return {'CPU': 1.0, name: float(count)}


@contextlib.contextmanager
def cpu_group(count: int, lock_dir: str) -> Iterator[list[int] | None]:
  """Holds the lowest free group of `count` of this process's cores.

  Ray counts CPUs but does not pin them: trials on one node take disjoint
  core groups through one lock file per group in `lock_dir` (a directory of
  that node). Yields None when every group is taken (a node shared with
  work outside this search), and the trial then runs unpinned.
  """
  cores = sorted(os.sched_getaffinity(0))
  os.makedirs(lock_dir, exist_ok=True)
  for index in range(len(cores) // count):
    fd = os.open(os.path.join(lock_dir, f'group{index}.lock'),
                 os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      continue
    try:
      yield cores[index * count:(index + 1) * count]
    finally:
      os.close(fd)  # releases the lock
    return
  yield None


# ------------------------------------------------------------ trainable --

def _device_env(config: Mapping[str, Any], cores: list[int] | None
                ) -> dict[str, str]:
  """The trial's device environment, as `local.launch` takes it."""
  if config['platform'] == 'cpu':
    return {trial_lib.CPUS_ENV: ','.join(map(str, cores))} if cores else {}
  # Ray has set the accelerator variables of this worker to its share; the
  # trial process inherits them.
  visible = ('CUDA_VISIBLE_DEVICES' if config['platform'] == 'gpu'
             else 'TPU_VISIBLE_CHIPS')
  return {visible: os.environ[visible]} if visible in os.environ else {}


def _write_job_file(trial_dir: str, job: Mapping[str, Any]) -> None:
  """job.json as the driver wrote it, for a node that does not share the
  driver's filesystem."""
  os.makedirs(trial_dir, exist_ok=True)
  path = os.path.join(trial_dir, trial_lib.JOB_FILE)
  if ledger_lib.read_json(path) != job:
    ledger_lib.write_json_atomic(path, job)
  stale = os.path.join(trial_dir, trial_lib.RESULT_FILE)
  if os.path.exists(stale):
    os.remove(stale)


def _run_process(config: Mapping[str, Any], env: Mapping[str, str]
                 ) -> search_lib.Outcome:
  """Starts the trial process, waits for it (at most the time limit) and
  reads what it left behind."""
  from ray import tune  # pylint: disable=g-import-not-at-top
  trial_dir, limit = config['trial_dir'], config['time_limit_s']
  start = time.time()
  process = local.launch(config['module'], trial_dir, env)
  try:
    tune.report({STARTED_KEY: json.dumps(dict(
        host=socket.gethostname(), pid=process.pid, devices=dict(env)))})
    reason = None
    try:
      process.wait(max(0.0, limit - (time.time() - start)))
    except subprocess.TimeoutExpired:
      reason = (f'time limit: still running after {time.time() - start:.0f} '
                f's (config.search.time_limit_s={limit:g})')
      local.stop(process)
  finally:
    if process.poll() is None:  # an error here: leave no orphan
      local.stop(process, grace_s=5.0)
  return local.outcome_of(trial_dir, process.returncode, time.time() - start,
                          reason=reason)


def run_trial(config: dict) -> dict:
  """The Tune function trainable: one search trial on this worker node.

  Args:
    config: what `_JobSearcher.suggest` named: trial_id, kind, trial_dir,
      module, job (job.json's content), platform, cpus (cores per CPU
      trial), time_limit_s.

  Returns:
    The final Tune result: the `Outcome` as JSON under OUTCOME_KEY.
  """
  import ray  # pylint: disable=g-import-not-at-top
  _write_job_file(config['trial_dir'], config['job'])
  if config['platform'] == 'cpu':
    node = ray.get_runtime_context().get_node_id()
    cores = cpu_group(config['cpus'], os.path.join(
        tempfile.gettempdir(), f'effnetv2_nas_cpus_{node[:16]}'))
  else:
    cores = contextlib.nullcontext(None)
  with cores as group:
    outcome = _run_process(config, _device_env(config, group))
  return {OUTCOME_KEY: json.dumps(dataclasses.asdict(outcome))}


def _trial_name(trial) -> str:
  return f'trial_{trial.config["trial_id"]:06d}'


# ------------------------------------------------------------- driver --

def _searcher_class():
  from ray.tune.search import Searcher  # pylint: disable=g-import-not-at-top

  class _JobSearcher(Searcher):
    """Hands Tune the search's jobs, one Tune trial each."""

    def __init__(self, search: search_lib.Search, jobs: dict,
                 trial_config: Mapping[str, Any]):
      super().__init__()
      self.search = search
      self.jobs = jobs  # Tune trial id -> Job, shared with the callback
      self.trial_config = dict(trial_config)
      self.error: BaseException | None = None

    def suggest(self, trial_id: str) -> dict | str | None:
      if self.error is not None or self.search.done:
        return Searcher.FINISHED
      try:
        job = self.search.next_job()
      except RuntimeError as e:  # the reference network keeps failing
        self.error = e
        return Searcher.FINISHED
      if job is None:  # everything proposed; some still running
        return None
      self.jobs[trial_id] = job
      trial_dir = self.search.trial_dir(job.trial_id)
      return dict(self.trial_config, trial_id=job.trial_id, kind=job.kind,
                  trial_dir=trial_dir, job=ledger_lib.read_json(
                      os.path.join(trial_dir, trial_lib.JOB_FILE)))

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
      pass  # _LedgerCallback records it, with the trial's error if any

    def save(self, checkpoint_path: str) -> None:
      # Tune's experiment checkpoint: the ledger is this searcher's state.
      ledger_lib.write_json_atomic(checkpoint_path,
                                   dict(ledger=self.search.ledger.path))

    def restore(self, checkpoint_path: str) -> None:
      raise NotImplementedError(
          'restart the search on its workdir instead: Search rebuilds its '
          'state from the ledger')

  return _JobSearcher


def _callback_class():
  from ray.tune import Callback  # pylint: disable=g-import-not-at-top

  class _LedgerCallback(Callback):
    """Records each Tune trial's start and outcome in the search."""

    def __init__(self, search: search_lib.Search, jobs: dict, out: TextIO):
      self.search = search
      self.jobs = jobs
      self.out = out

    def on_trial_result(self, iteration, trials, trial, result, **info):
      job = self.jobs.get(trial.trial_id)
      if job is None or STARTED_KEY not in result:
        return
      where = json.loads(result[STARTED_KEY])
      self.search.started(job, ray_trial=trial.trial_id, **where)
      self._print(f'[nas] trial {job.trial_id} started ({job.kind}: '
                  f'{job.description}) on {where["host"]}')

    def on_trial_complete(self, iteration, trials, trial, **info):
      encoded = (trial.last_result or {}).get(OUTCOME_KEY)
      if encoded is None:  # stopped before its end (Ctrl-C): requeued later
        return
      self._finish(trial, search_lib.Outcome(**json.loads(encoded)))

    def on_trial_error(self, iteration, trials, trial, **info):
      # Ray lost the trainable itself (a dead node or worker, an error in
      # run_trial): its traceback is in the trial's error file.
      text = search_lib.log_tail(trial.error_file) if trial.error_file else ''
      lines = text.strip().splitlines()
      self._finish(trial, search_lib.Outcome(
          'failed', reason='Ray trial error' + (f': {lines[-1]}' if lines
                                                else ''), log_tail=text))

    def _finish(self, trial, outcome: search_lib.Outcome) -> None:
      job = self.jobs.pop(trial.trial_id, None)
      if job is None:
        return
      self.search.finish(job, outcome)
      self._print(f'[nas] trial {job.trial_id} {outcome.status}'
                  + (f': {outcome.reason}' if outcome.reason else ''))
      self._print(self.search.progress_line())

    def _print(self, line: str) -> None:
      print(line, file=self.out, flush=True)

  return _LedgerCallback


def local_temp_dir(workdir: str) -> str | None:
  """Ray's temp dir for a local instance: WORKDIR/ray_tmp when its socket
  paths fit, else None (Ray's default: $RAY_TMPDIR, $TMPDIR or /tmp, then
  ray/)."""
  if 'RAY_TMPDIR' in os.environ:  # Ray's own setting wins
    return None
  path = os.path.join(os.path.abspath(workdir), RAY_TMP_DIR)
  return path if len(path) + _SOCKET_SUFFIX_LEN <= _SOCKET_PATH_MAX else None


class RayBackend:
  """Runs the search's jobs as Ray Tune trials until the search is done.

  The constructor connects to Ray (`address`, e.g. 'HOST:PORT' of a
  `ray start --head` cluster, or a new local instance when None) and works
  out each trial's resources, so a cluster that cannot hold a trial is a
  one-line DeviceError before anything runs; `run()` disconnects (and stops
  a local instance) when it returns.
  """

  def __init__(self, search: search_lib.Search, *, address: str | None = None,
               out: TextIO = sys.stdout):
    self.ray = _import_ray()
    self.search = search
    self.out = out
    # ray.init sets variables in this process's environment (RAY_AUTH_MODE,
    # PYTHONBREAKPOINT, ...); the driver gets its own back when Ray stops.
    self._environ = dict(os.environ)
    self._connect(address)
    try:
      s = search.config.search
      nodes = [n['Resources'] for n in self.ray.nodes() if n.get('Alive')]
      self.platform = (cluster_platform(nodes) if s.platform == 'auto'
                       else s.platform)
      self.resources = trial_resources(self.platform, s.devices_per_trial,
                                       s.max_in_flight, nodes)
    except BaseException:
      self._disconnect()
      raise
    if s.early_stopping.enabled:
      print('[nas] search.early_stopping is local-only: on Ray every trial '
            'runs to its end', file=out, flush=True)

  def _connect(self, address: str | None) -> None:
    if address:
      self.ray.init(address=address, log_to_driver=False,
                    logging_level=logging.WARNING)
      return
    # A private instance that phones nowhere and leaves nothing outside
    # the workdir but what Ray cannot be told to put elsewhere
    # (~/.ray/auth_token, its token for this instance).
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    self.ray.init(
        address='local', _temp_dir=local_temp_dir(self.search.workdir),
        num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
        object_store_memory=_LOCAL_OBJECT_STORE_BYTES, log_to_driver=False,
        logging_level=logging.WARNING)

  def run(self) -> None:
    """Runs trials until the search is done (or Ctrl-C), then disconnects
    from Ray."""
    try:
      if not self.search.done:
        self._fit()
    finally:
      self._disconnect()

  def _disconnect(self) -> None:
    self.ray.shutdown()
    for key in set(os.environ) - set(self._environ):
      del os.environ[key]
    os.environ.update(self._environ)

  def _fit(self) -> None:
    from ray import tune  # pylint: disable=g-import-not-at-top
    # Tune's newer console output prints its experiment banner whatever the
    # verbosity; the driver's own lines report the search.
    os.environ.setdefault('RAY_AIR_NEW_OUTPUT', '0')
    s = self.search.config.search
    name = time.strftime('search_%Y%m%d_%H%M%S')
    storage = os.path.abspath(os.path.join(self.search.workdir, RESULTS_DIR))
    jobs: dict[str, search_lib.Job] = {}
    searcher = _searcher_class()(self.search, jobs, dict(
        module=s.trial_module, platform=self.platform,
        cpus=int(self.resources.get('CPU', 1)), time_limit_s=s.time_limit_s))
    tuner = tune.Tuner(
        tune.with_resources(run_trial, self.resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1,
            max_concurrent_trials=s.max_in_flight,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            # One Tune experiment per driver start: Tune's state is not
            # restored (the ledger is), its records are kept.
            name=name, storage_path=storage,
            callbacks=[_callback_class()(self.search, jobs, self.out)],
            verbose=0))
    print(f'[nas] Ray Tune trials: {self.resources} each, at most '
          f'{s.max_in_flight} at once; Tune\'s records in '
          f'{os.path.join(storage, name)}', file=self.out, flush=True)
    tuner.fit()
    if searcher.error is not None:
      raise searcher.error
