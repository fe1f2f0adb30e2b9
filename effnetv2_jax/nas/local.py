"""Runs a search's trials as processes on this host, N at a time.

Each slot owns a disjoint group of devices (CPU cores, GPUs or TPU chips),
so a trial that times its step has those devices to itself. A trial is a
fresh Python interpreter (`python -m <trial module> TRIAL_DIR`, never a fork
of this process) in its own session, with its output in TRIAL_DIR/log.txt.
A trial past `search.time_limit_s` is terminated, then killed, and failed
with its log tail; the median early-stopping rule, when on, terminates a
trial after a stage-end eval below the completed trials' median. If the
driver dies, its trials die with it (the trial asks the kernel for that), so
a restart requeues them instead of racing them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Mapping, Sequence, TextIO

from effnetv2_jax.nas import search as search_lib
from effnetv2_jax.nas import trial as trial_lib

_KILL_GRACE_S = 15.0


class DeviceError(ValueError):
  """The host cannot give every slot its own devices."""


def detect_platform() -> str:
  """'gpu' with NVIDIA GPUs, 'tpu' with TPU chips, else 'cpu' (without
  starting JAX: the driver never does)."""
  if _gpu_count():
    return 'gpu'
  if _tpu_chips():
    return 'tpu'
  return 'cpu'


def _gpu_count() -> int:
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return len([d for d in visible.split(',') if d.strip()])
  if not shutil.which('nvidia-smi'):
    return 0
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                         timeout=30, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(1 for line in out.splitlines() if line.startswith('GPU '))


def _tpu_chips(dev: str = '/dev') -> list[str]:
  """The host's TPU chips: /dev/accel<N> (v2-v4, v5p), or /dev/vfio/<N>
  (v5e, v6e; /dev/vfio/vfio is the container, not a chip)."""
  accel = sorted(d for d in os.listdir(dev) if d.startswith('accel'))
  if accel:
    return accel
  vfio = os.path.join(dev, 'vfio')
  if not os.path.isdir(vfio):
    return []
  return sorted((d for d in os.listdir(vfio) if d.isdigit()), key=int)


def device_groups(platform: str, slots: int, per_trial: int, *,
                  cpus: Sequence[int], gpus: int, tpu_chips: int
                  ) -> list[dict[str, str]]:
  """The environment of each slot: disjoint devices, `per_trial` each (0:
  the host's devices split evenly)."""
  if platform == 'cpu':
    units, name = list(cpus), 'cores'
  elif platform == 'gpu':
    units, name = list(range(gpus)), 'GPUs'
  elif platform == 'tpu':
    units, name = list(range(tpu_chips)), 'TPU chips'
  else:
    raise ValueError(f'unknown platform {platform!r}')
  per = per_trial or len(units) // slots
  if per < 1 or per * slots > len(units):
    raise DeviceError(
        f'config.search.max_in_flight={slots} trials with '
        f'{per_trial or "an even share of the"} {name} each do not fit this '
        f'host\'s {len(units)} {name}; lower max_in_flight or '
        'devices_per_trial')
  groups = [units[i * per:(i + 1) * per] for i in range(slots)]
  return [_device_env(platform, g, i, len(units)) for i, g in
          enumerate(groups)]


def _device_env(platform: str, group: list[int], slot: int,
                total: int) -> dict[str, str]:
  ids = ','.join(str(u) for u in group)
  if platform == 'cpu':
    return {trial_lib.CPUS_ENV: ids}
  if platform == 'gpu':
    return {'CUDA_VISIBLE_DEVICES': ids}
  if len(group) == total:
    return {}
  if len(group) != 1:
    raise DeviceError('TPU trials take one chip each or the whole host; '
                      f'got {len(group)} of {total}')
  # One chip per process (the TPU runtime's single-chip topology).
  return {'TPU_VISIBLE_CHIPS': ids, 'TPU_CHIPS_PER_PROCESS_BOUNDS': '1,1,1',
          'TPU_PROCESS_BOUNDS': '1,1,1', 'CLOUD_TPU_TASK_ID': '0',
          'TPU_PROCESS_PORT': str(8476 + slot),
          'TPU_PROCESS_ADDRESSES': f'localhost:{8476 + slot}'}


def slot_environments(search_config) -> list[dict[str, str]]:
  platform = search_config.platform
  if platform == 'auto':
    platform = detect_platform()
  return device_groups(
      platform, search_config.max_in_flight, search_config.devices_per_trial,
      cpus=sorted(os.sched_getaffinity(0)), gpus=_gpu_count(),
      tpu_chips=len(_tpu_chips()))


def launch(module: str, trial_dir: str, env: Mapping[str, str]
           ) -> subprocess.Popen:
  """Starts a trial process (a new interpreter in a new session)."""
  log = open(os.path.join(trial_dir, 'log.txt'), 'a', encoding='utf-8')
  try:
    return subprocess.Popen(
        [sys.executable, '-m', module, trial_dir], stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, **env, **{trial_lib.DRIVER_PID_ENV: str(os.getpid())}),
        start_new_session=True)
  finally:
    log.close()


def stop(process: subprocess.Popen, grace_s: float = _KILL_GRACE_S) -> None:
  """SIGTERM to the trial's process group, SIGKILL after `grace_s`."""
  for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
    try:
      os.killpg(process.pid, sig)
    except ProcessLookupError:
      return
    try:
      process.wait(wait)
      return
    except subprocess.TimeoutExpired:
      continue


def outcome_of(trial_dir: str, exit_code: int, wall_time_s: float, *,
               reason: str | None = None) -> search_lib.Outcome:
  """What a finished trial process left behind, as an Outcome."""
  from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
  tail = search_lib.log_tail(os.path.join(trial_dir, 'log.txt'))
  result = ledger.read_json(os.path.join(trial_dir, 'result.json'))
  if reason is None and result is not None:
    outcome = search_lib.outcome_from_result(result, exit_code=exit_code,
                                             log_text=tail)
    return dataclasses.replace(outcome, wall_time_s=wall_time_s)
  if reason is None:
    reason = f'exit status {exit_code}' + (
        f' (signal {-exit_code})' if exit_code < 0 else '')
  return search_lib.Outcome('failed', reason=reason, log_tail=tail,
                            exit_code=exit_code, wall_time_s=wall_time_s)


@dataclasses.dataclass
class _Running:
  job: search_lib.Job
  process: subprocess.Popen
  slot: int
  started: float
  stop_reason: str | None = None
  stages_seen: int = 0


def stage_accuracies(trial_dir: str) -> list[float]:
  """Stage-end holdout top-1s a running trial has reported so far."""
  path = os.path.join(trial_dir, 'run', 'metrics.jsonl')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
  except OSError:
    return []
  out = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if record.get('kind') == 'eval' and 'top1' in record:
      out.append(float(record['top1']))
  return out


class LocalBackend:
  """Fills the slots from `search.next_job()` until the search is done."""

  def __init__(self, search: search_lib.Search, *, out: TextIO = sys.stdout,
               poll_s: float = 0.5, progress_every_s: float = 60.0):
    self.search = search
    self.out = out
    self.poll_s = poll_s
    self.progress_every_s = progress_every_s
    self.envs = slot_environments(search.config.search)

  def run(self) -> None:
    running: dict[int, _Running] = {}
    free = list(range(len(self.envs)))
    last_progress = 0.0
    try:
      while not self.search.done:
        self._fill(running, free)
        if not running:
          break
        changed = self._poll(running, free)
        now = time.time()
        if changed or now - last_progress > self.progress_every_s:
          print(self.search.progress_line(), file=self.out, flush=True)
          last_progress = now
        time.sleep(self.poll_s)
    finally:
      for r in running.values():  # Ctrl-C or an error: no orphans
        stop(r.process, grace_s=5.0)

  def _fill(self, running, free) -> None:
    module = self.search.config.search.trial_module
    while free:
      job = self.search.next_job()
      if job is None:
        return
      slot = free.pop(0)
      trial_dir = self.search.trial_dir(job.trial_id)
      process = launch(module, trial_dir, self.envs[slot])
      self.search.started(job, slot=slot, pid=process.pid,
                          devices=self.envs[slot], host=os.uname().nodename)
      running[job.trial_id] = _Running(job, process, slot, time.time())
      print(f'[nas] trial {job.trial_id} started ({job.kind}: '
            f'{job.description}) in slot {slot}', file=self.out, flush=True)

  def _poll(self, running, free) -> bool:
    changed = False
    limit = self.search.config.search.time_limit_s
    for trial_id, r in list(running.items()):
      exit_code = r.process.poll()
      elapsed = time.time() - r.started
      if exit_code is None and elapsed > limit:
        r.stop_reason = (f'time limit: still running after {elapsed:.0f} s '
                         f'(config.search.time_limit_s={limit:g})')
        stop(r.process)
        exit_code = r.process.returncode
      elif exit_code is None:
        self._maybe_stop_early(r)
        continue
      outcome = outcome_of(self.search.trial_dir(trial_id), exit_code,
                           elapsed, reason=r.stop_reason)
      self.search.finish(r.job, outcome)
      print(f'[nas] trial {trial_id} {outcome.status}'
            + (f': {outcome.reason}' if outcome.reason else ''),
            file=self.out, flush=True)
      del running[trial_id]
      free.append(r.slot)
      changed = True
    return changed

  def _maybe_stop_early(self, r: _Running) -> None:
    rule = self.search.config.search.early_stopping
    if not rule.enabled or r.job.kind != 'candidate' or r.stop_reason:
      return
    accuracies = stage_accuracies(self.search.trial_dir(r.job.trial_id))
    last_stage = self.search.config.trial.progressive.num_stages
    if len(accuracies) == r.stages_seen or len(accuracies) >= last_stage:
      return  # nothing new, or finishing anyway
    r.stages_seen = len(accuracies)
    reason = search_lib.median_rule(
        accuracies, self.search.completed_stage_accuracies(),
        rule.min_completed)
    if reason:
      r.stop_reason = reason
      os.killpg(r.process.pid, signal.SIGTERM)  # the trainer stops cleanly
