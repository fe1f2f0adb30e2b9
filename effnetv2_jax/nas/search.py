"""The search: what to run next, and what a finished trial means.

`Search` is the driver's state, rebuilt from the ledger every time the
driver starts: which candidates completed (their rewards replayed into the
algorithm), which were proposed or running when the last driver died
(requeued, or adopted when their result file was written), which reference
timings exist. Backends (`local`, `ray_backend`) only run what `next_job`
hands them and give each outcome to `finish`; neither ever sees PyGlove or
the trainer.

Jobs are of two kinds: a `candidate` (an architecture the algorithm
proposed: train briefly, score on the holdout, time) and a `reference` (the
backbone, timed only, at the start and again after every
`search.reference_every` candidates, so that S has a denominator measured
on the same hardware during the same search, and its spread shows how far
apart two timings of one network fall). Both are timed the same way, in a
fresh process on the trial's own devices (`trial`, `timing`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any, Mapping, Sequence

from effnetv2_jax.nas import ledger as ledger_lib
from effnetv2_jax.nas import reward as reward_lib
from effnetv2_jax.nas import settings

log = logging.getLogger(__name__)

LEDGER_FILE = 'trials.jsonl'
TRIALS_DIR = 'trials'
CACHE_DIR = 'compilation_cache'
LOG_TAIL_LINES = 30
MAX_REFERENCE_FAILURES = 3


class ReferenceFailedError(RuntimeError):
  """The backbone's timing job failed too often for S to be measured."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One process to run: a candidate or a reference timing."""

  trial_id: int
  kind: str  # 'candidate' | 'reference'
  numbers: tuple[int, ...] | None
  architecture: dict
  description: str


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a trial process ended, as a backend saw it."""

  status: str  # 'completed' | 'failed'
  metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reason: str = ''
  log_tail: str = ''
  exit_code: int | None = None
  wall_time_s: float = 0.0


def median_rule(stage_accuracies: Sequence[float],
                finished: Sequence[Sequence[float]],
                min_completed: int) -> str | None:
  """Why to stop a trial after its latest stage, or None to let it run.

  It stops when its latest stage-end top-1 is below the median of what at
  least `min_completed` completed trials had after the same stage.
  """
  if not stage_accuracies:
    return None
  stage = len(stage_accuracies)
  peers = [f[stage - 1] for f in finished
           if len(f) >= stage and f[stage - 1] is not None]
  if len(peers) < min_completed:
    return None
  median = statistics.median(peers)
  if stage_accuracies[-1] < median:
    return (f'early stopped after stage {stage}: holdout top-1 '
            f'{stage_accuracies[-1]:.4f} < median {median:.4f} of '
            f'{len(peers)} completed trials')
  return None


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


class Search:
  """The driver's state over one workdir, rebuilt from its ledger."""

  def __init__(self, config, workdir: str):
    try:
      from effnetv2_jax.nas import algorithms, space  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'the search needs PyGlove ({e}): pip install -e '
                        '".[nas]"') from None
    settings.validate(config)
    os.makedirs(workdir, exist_ok=True)
    settings.check_unchanged(workdir, config)
    self.config = config
    self.workdir = workdir
    self.space = space.SearchSpace(space.backbone(config.search.backbone))
    name = config.search.algorithm
    # algorithm_options holds every algorithm's settings; each takes its own.
    options = {k: v for k, v in config.search.algorithm_options.items()
               if k in algorithms.DEFAULT_OPTIONS[name]}
    self.algorithm = algorithms.make_algorithm(
        name, self.space, seed=config.search.seed, options=options)
    self.ledger = ledger_lib.Ledger(os.path.join(workdir, LEDGER_FILE))
    self.started_at = time.time()
    self._records: dict[int, dict] = {}
    self._requeued: list[Job] = []
    self._in_flight: dict[int, Job] = {}
    self._pending: list[int] = []  # completed candidates awaiting a reference
    self._replay()

  # ------------------------------------------------------------- restart --

  def _replay(self) -> None:
    records = ledger_lib.trials(self.ledger.events())
    self._records = {int(k): v for k, v in records.items()}
    history, adopted = [], []
    for trial_id, record in self._records.items():
      if record['status'] not in ledger_lib.FINISHED:
        job = self._job_of(record)
        result = ledger_lib.read_json(
            os.path.join(self.trial_dir(trial_id), 'result.json'))
        if result is not None:  # finished, but the driver died first
          adopted.append((job, outcome_from_result(result)))
        else:
          self._requeued.append(job)
        continue
      if record['kind'] == 'candidate':
        if record['status'] == 'completed' and record.get('reward') is None:
          self._pending.append(trial_id)
        else:
          history.append(self._feedback_args(record))
    if history:
      self.algorithm.recover(history)
    for job, outcome in adopted:
      self.finish(job, outcome)
    self._score_pending()
    if self._records:
      log.info('resuming: %d trials in the ledger, %d requeued',
               len(self._records), len(self._requeued))

  def _job_of(self, record: Mapping[str, Any]) -> Job:
    numbers = record.get('numbers')
    return Job(int(record['trial_id']), record['kind'],
               tuple(numbers) if numbers is not None else None,
               record['architecture'], record.get('description', ''))

  @staticmethod
  def _feedback_args(record):
    reward = record.get('reward') if record['status'] == 'completed' else None
    objectives = record.get('objectives')
    return (list(record['numbers']), reward,
            tuple(objectives) if objectives else None)

  # --------------------------------------------------------------- jobs --

  def trial_dir(self, trial_id: int) -> str:
    return os.path.join(self.workdir, TRIALS_DIR, f'{trial_id:06d}')

  @property
  def cache_dir(self) -> str:
    return os.path.join(self.workdir, CACHE_DIR)

  def _count(self, kind: str, statuses=None) -> int:
    return sum(1 for r in self._records.values() if r['kind'] == kind and
               (statuses is None or r['status'] in statuses))

  def _reference_due(self) -> bool:
    failed = self._count('reference', ('failed',))
    if failed >= MAX_REFERENCE_FAILURES:
      raise ReferenceFailedError(
          f'the reference network ({self.space.backbone.name}) failed '
          f'{failed} times; its log tails are in {self.ledger.path}')
    candidates = self._count('candidate')
    wanted = 1 + candidates // self.config.search.reference_every
    return (self._count('reference') - failed < wanted and
            self._count('candidate', ledger_lib.FINISHED) <
            self.config.search.num_trials)

  def next_job(self) -> Job | None:
    """The next job to launch (recorded as proposed), or None for now."""
    if self._requeued:
      job = self._requeued.pop(0)
    elif self._reference_due():
      job = self._propose_reference()
    elif self._count('candidate') < self.config.search.num_trials:
      job = self._propose_candidate()
    else:
      return None
    self._write_job(job)
    self._in_flight[job.trial_id] = job
    return job

  def _new_id(self) -> int:
    return max(self._records, default=-1) + 1

  def _propose_reference(self) -> Job:
    backbone = self.space.backbone
    job = Job(self._new_id(), 'reference', None, backbone.to_dict(),
              f'reference ({backbone.name})')
    self._record(job.trial_id, status='proposed', kind='reference',
                 architecture=job.architecture, description=job.description)
    return job

  def _propose_candidate(self) -> Job:
    numbers = tuple(int(n) for n in self.algorithm.propose())
    arch = self.space.decode(numbers)
    job = Job(self._new_id(), 'candidate', numbers, arch.to_dict(),
              self.space.describe(numbers))
    self._record(job.trial_id, status='proposed', kind='candidate',
                 numbers=list(numbers), architecture=job.architecture,
                 description=job.description,
                 algorithm=self.config.search.algorithm)
    return job

  def _write_job(self, job: Job) -> None:
    trial_config = self.config.trial
    timing = dict(self.config.search.timing)
    timing['batch_size'] = timing['batch_size'] or trial_config.train.batch_size
    timing['image_size'] = final_image_size(trial_config, job.architecture)
    directory = self.trial_dir(job.trial_id)
    os.makedirs(directory, exist_ok=True)
    for stale in ('result.json', 'trained.json'):  # a killed attempt's
      path = os.path.join(directory, stale)
      if os.path.exists(path):
        os.remove(path)
    ledger_lib.write_json_atomic(os.path.join(directory, 'job.json'), dict(
        trial_id=job.trial_id, kind=job.kind, architecture=job.architecture,
        config=json.loads(trial_config.to_json()), cache_dir=self.cache_dir,
        seed=trial_config.seed, timing=timing))

  def started(self, job: Job, **where) -> None:
    """Records that a backend launched `job` (where: devices, pid, host)."""
    self._record(job.trial_id, status='running', kind=job.kind, **where)

  # ------------------------------------------------------------ results --

  def finish(self, job: Job, outcome: Outcome) -> None:
    """Records a finished job and feeds a candidate to the algorithm."""
    self._in_flight.pop(job.trial_id, None)
    fields = dict(kind=job.kind, wall_time_s=round(outcome.wall_time_s, 3))
    if outcome.status != 'completed':
      self._record(job.trial_id, status='failed', reason=outcome.reason,
                   log_tail=outcome.log_tail, exit_code=outcome.exit_code,
                   **fields)
      if job.kind == 'candidate':
        self.algorithm.feedback(list(job.numbers), None, None)
      return
    self._record(job.trial_id, status='completed',
                 metrics=dict(outcome.metrics), **fields)
    if job.kind == 'candidate':
      self._pending.append(job.trial_id)
    self._score_pending()

  def references(self) -> dict[str, reward_lib.Reference]:
    return reward_lib.references(
        r['metrics'] for r in self._records.values()
        if r['kind'] == 'reference' and r['status'] == 'completed')

  def _score_pending(self) -> None:
    refs = self.references()
    s = self.config.search
    waiting = []
    for trial_id in self._pending:
      record = self._records[trial_id]
      score = reward_lib.score(record['metrics'], refs, w=s.w, v=s.v)
      if score is None:
        waiting.append(trial_id)
        continue
      self._record(trial_id, status='completed', kind='candidate',
                   reward=score.reward, S=score.step_time_ratio,
                   P=score.params_ratio, objectives=list(score.objectives),
                   w=s.w, v=s.v)
      self.algorithm.feedback(list(record['numbers']), score.reward,
                              score.objectives)
    self._pending = waiting

  def _record(self, trial_id: int, **event) -> None:
    record = self.ledger.append(dict(event, trial_id=trial_id))
    self._records.setdefault(trial_id, {}).update(record)

  # ------------------------------------------------------------ queries --

  @property
  def done(self) -> bool:
    finished = self._count('candidate', ledger_lib.FINISHED)
    return (finished >= self.config.search.num_trials and not self._in_flight
            and not self._requeued)

  @property
  def in_flight(self) -> int:
    return len(self._in_flight)

  def records(self) -> dict[int, dict]:
    return {k: dict(v) for k, v in self._records.items()}

  def completed_stage_accuracies(self) -> list[list[float]]:
    return [r['metrics'].get('stage_accuracies') or []
            for r in self._records.values()
            if r['kind'] == 'candidate' and r['status'] == 'completed']

  def progress_line(self) -> str:
    """Trials done, failed, in flight, best reward, ETA."""
    candidates = [r for r in self._records.values()
                  if r['kind'] == 'candidate']
    done = [r for r in candidates if r['status'] in ledger_lib.FINISHED]
    failed = sum(1 for r in done if r['status'] == 'failed')
    rewarded = [r for r in done if r.get('reward') is not None]
    best = max(rewarded, key=lambda r: r['reward'], default=None)
    total = self.config.search.num_trials
    walls = [r.get('wall_time_s', 0.0) for r in done]
    left = max(0, total - len(done))
    eta = (statistics.mean(walls) * left /
           max(1, min(self.config.search.max_in_flight, left))
           if walls and left else 0.0)
    from effnetv2_jax.training import reporting  # pylint: disable=g-import-not-at-top
    return (f'[nas] {len(done)}/{total} done ({failed} failed), '
            f'{self.in_flight} in flight, best reward '
            + (f'{best["reward"]:.4f} (trial {best["trial_id"]}, '
               f'top-1 {best["metrics"]["accuracy"]:.4f})' if best else '-')
            + f', elapsed {reporting.format_duration(time.time() - self.started_at)}'
            + (f', ETA {reporting.format_duration(eta)}' if eta else ''))


def final_image_size(trial_config, architecture: Mapping[str, Any]) -> int:
  """The image size a trial's last stage trains at: the step-time
  measurement's size."""
  size = trial_config.progressive.max_image_size
  return int(size or architecture['train_size'])


def outcome_from_result(result: Mapping[str, Any], *, exit_code=None,
                        log_text: str = '') -> Outcome:
  """The Outcome a trial's result.json describes."""
  status = result.get('status')
  return Outcome(
      status='completed' if status == 'completed' else 'failed',
      metrics=result.get('metrics') or {},
      reason=result.get('reason', '') if status != 'completed' else '',
      log_tail=log_text if status != 'completed' else '',
      exit_code=exit_code, wall_time_s=float(result.get('wall_time_s', 0.0)))
