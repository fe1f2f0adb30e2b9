#!/usr/bin/env python3
r"""Cloud TPU launcher: from nothing to a running pod job, and back.

    S="--name=effnetv2 --zone=europe-west4-a"
    python launch/tpu.py create $S --accelerator=v3-32 [--spot] [--queued]
    python launch/tpu.py setup $S [--ref=REF] [--allow-dirty] [--extras=nas]
    python launch/tpu.py run $S [--nas --accelerator=v3-32] -- TRAINER_FLAGS
    python launch/tpu.py logs $S [--worker=K] [--fetch=DIR --accelerator=A]
    python launch/tpu.py watch $S --accelerator=v3-32 [create and setup
        options] [--nas] -- TRAINER_FLAGS
    python launch/tpu.py stop $S
    python launch/tpu.py teardown $S [--queued]

Every subcommand takes --project and --dry-run. A dry run prints each command,
one a line, shell-quoted, exactly as the real run executes it (one `Runner`
builds both); it reads the git checkout (which commit, whether it is dirty,
the jax pin in its setup.py) but changes nothing here or in the cloud.

  create    `gcloud compute tpus tpu-vm create`, or with --queued a queued
            resource (`queued-resources create --node-id`) that waits for
            capacity. The runtime defaults to the generation's base image
            (Cloud TPU "TPU software versions": v2/v3/v4 tpu-ubuntu2204-base,
            v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
            v2-alpha-tpuv6e).
  setup     ships `git archive` of a commit (HEAD, or --ref), never the
            working tree: no .venv, caches or untracked files travel. A
            checkout with uncommitted changes is refused unless --allow-dirty,
            which archives `git stash create` (the tracked changes, committed
            nowhere). On every worker: a fresh ~/venv on Python 3.11 (made by
            uv: the TPU images' system Python is 3.10, below the package's
            minimum) with the package (editable, so configs/ resolve) and
            `jax[tpu]==` the pin in that commit's setup.py.
  run       `python -m effnetv2_jax.main --distributed FLAGS` on every worker
            (JAX finds the other hosts itself on a TPU slice), under nohup in
            its own process group, appending to ~/effnetv2_jax_job/job.log on
            each worker. --nas instead runs `python -m effnetv2_jax.nas FLAGS`
            on worker 0 only: the search driver is one process; on a
            multi-host slice it first starts a Ray cluster (head on worker 0,
            the other workers joined) and adds --backend=ray
            --ray_address=auto, so each trial gets a host (setup needs
            --extras=nas). --workdir must be a gs:// path (a recreated slice
            resumes from it), and so must any --config...data_dir and
            --config...compilation_cache_dir given. A worker that already runs
            a job refuses a second one (and setup refuses to replace its
            code).
  logs      `tail -F` of worker 0's log (--worker=K for another);
            --fetch=DIR copies every worker's log to DIR/worker-K.log.
  watch     polls the slice and the job and keeps it going: starts the job
            on a fresh slice, recreates a preempted one (node PREEMPTED or
            TERMINATED or gone, queued resource SUSPENDED or FAILED), re-runs
            setup and run, and restarts a job whose workers stopped after a
            SIGTERM checkpoint (exit status 143). The trainer resumes from the
            gs:// workdir bit for bit; the search from its ledger. At most
            --max-retries recreations and restarts; a line per event; exit 0
            when every worker's job exited 0, 1 on a failure or when the
            retries are spent. With --nas, setup gets the nas extra.
  stop      SIGTERM to the job on every worker (the trainer checkpoints
            and exits 143), then waits for it to end.
  teardown  deletes the TPU VM (with --queued, the queued resource and its
            node).

Standard library only: it runs on a laptop with nothing but gcloud and git.
Mistakes end in one `error:` line, exit status 2; a failed command in
`error: command failed`, exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence, TextIO

USAGE_EXIT_STATUS = 2
FAILED_EXIT_STATUS = 1
PREEMPTED_EXIT_STATUS = 143  # the trainer's exit after a SIGTERM checkpoint

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
# uv makes the venv: it brings its own Python where the image's is too old.
UV_VERSION = '0.13.9'
DEFAULT_PYTHON = '3.11'
RAY_PORT = 6379

# Remote paths: constants without spaces, left unquoted so that ~ expands.
REMOTE_SRC = '~/effnetv2_jax'
REMOTE_VENV = '~/venv'
REMOTE_JOB = '~/effnetv2_jax_job'
REMOTE_LOG = f'{REMOTE_JOB}/job.log'
REMOTE_PID = f'{REMOTE_JOB}/pid'
REMOTE_EXIT = f'{REMOTE_JOB}/exit_status'
REMOTE_ARCHIVE = '/tmp/effnetv2_jax-src.tar.gz'
METADATA = ('curl -s -H Metadata-Flavor:Google http://metadata.google.internal'
            '/computeMetadata/v1/instance/attributes/')

# Cloud TPU "TPU software versions" (JAX and PyTorch rows).
RUNTIMES = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}

# Node states (tpu-vm describe) and queued-resource states (state.state).
NODE_LOST = frozenset({'PREEMPTED', 'TERMINATED', 'NOT_FOUND'})
QUEUED_LOST = frozenset({'SUSPENDING', 'SUSPENDED', 'FAILED', 'NOT_FOUND'})

# Flags of the trainer and the search that must name storage every worker
# (and a recreated slice) sees.
_SHARED_PATH_FLAG = re.compile(
    r'^--(workdir|config\.[\w.]*data_dir|config\.[\w.]*compilation_cache_dir)$')


class UsageError(Exception):
  """A mistake in the arguments: one line, exit status 2."""


class CommandError(Exception):
  """A command that ran and failed."""


# ------------------------------------------------------------- the runner --

class Runner:
  """Runs commands, or in a dry run prints them; both from the same argv.

  Args:
    dry_run: print each command (shell-quoted, one a line) instead of
      running it.
    out: where a dry run prints, and where a real run echoes `+ command`.
  """

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out if out is not None else (
        sys.stdout if dry_run else sys.stderr)

  def _show(self, argv: Sequence[str]) -> None:
    line = shlex.join(argv)
    print(line if self.dry_run else f'+ {line}', file=self.out, flush=True)

  def run(self, argv: Sequence[str]) -> None:
    """Runs argv (no local shell), its output to the terminal."""
    self._show(argv)
    if self.dry_run:
      return
    status = subprocess.run(list(argv), check=False).returncode
    if status:
      raise CommandError(f'command failed (exit {status}): {shlex.join(argv)}')

  def query(self, argv: Sequence[str]) -> str:
    """Runs a read-only argv and returns its stdout ('' in a dry run).

    Only a dry run shows it: watch's polls would drown its event lines.
    """
    if self.dry_run:
      self._show(argv)
      return ''
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
      last = (proc.stderr.strip().splitlines() or [''])[-1]
      raise CommandError(f'command failed (exit {proc.returncode}): '
                         f'{shlex.join(argv)}: {last}')
    return proc.stdout


# ------------------------------------------------------------ the slice --

@dataclasses.dataclass(frozen=True)
class Slice:
  """Where the TPU is: names gcloud's TPU commands share."""
  name: str
  zone: str
  project: str | None = None

  def flags(self) -> list[str]:
    return [f'--zone={self.zone}'] + (
        [f'--project={self.project}'] if self.project else [])

  def tpu_vm(self, verb: str, *rest: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, self.name,
            *self.flags(), *rest]

  def queued(self, verb: str, *rest: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', verb, self.name,
            *self.flags(), *rest]

  def scp(self, source: str, destination: str, worker: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', source, destination,
            *self.flags(), f'--worker={worker}']

  def ssh(self, worker: str, command: str) -> list[str]:
    return self.tpu_vm('ssh', f'--worker={worker}', f'--command={command}')


def parse_accelerator(accelerator: str) -> tuple[str, int]:
  """('v3', 32) from 'v3-32'; a type outside RUNTIMES is a UsageError."""
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator or '')
  if not match or match.group(1) not in RUNTIMES:
    raise UsageError(
        f'--accelerator={accelerator!r}: expected <generation>-<size> with '
        f'generation one of {", ".join(RUNTIMES)} (e.g. v3-32, v5litepod-16)')
  return match.group(1), int(match.group(2))


def worker_count(accelerator: str) -> int:
  """Hosts (TPU VM workers) in a slice of this accelerator type.

  v2/v3/v4/v5p sizes count TensorCores, 8 to a host; v5litepod and v6e
  sizes count chips: up to 8 on one host, 4 to a host beyond.
  """
  generation, size = parse_accelerator(accelerator)
  if generation in ('v5litepod', 'v6e'):
    return 1 if size <= 8 else size // 4
  return max(1, size // 8)


def create_commands(tpu: Slice, accelerator: str, runtime: str | None,
                    spot: bool, preemptible: bool,
                    queued: bool) -> list[list[str]]:
  """The gcloud command that creates the slice (directly or queued)."""
  generation, _ = parse_accelerator(accelerator)
  runtime = runtime or RUNTIMES[generation]
  if spot and preemptible:
    raise UsageError('--spot and --preemptible exclude each other; choose one')
  if queued and preemptible:
    raise UsageError('--preemptible is not available with --queued (queued '
                     'resources take --spot)')
  provisioning = ['--spot'] if spot else (
      ['--preemptible'] if preemptible else [])
  if queued:
    return [tpu.queued('create', f'--node-id={tpu.name}',
                       f'--accelerator-type={accelerator}',
                       f'--runtime-version={runtime}', *provisioning)]
  return [tpu.tpu_vm('create', f'--accelerator-type={accelerator}',
                     f'--version={runtime}', *provisioning)]


def teardown_commands(tpu: Slice, queued: bool) -> list[list[str]]:
  """Deletes the node; --queued deletes the queued resource and its node."""
  if queued:
    return [tpu.queued('delete', '--force', '--quiet')]
  return [tpu.tpu_vm('delete', '--quiet')]


# ----------------------------------------------------------------- setup --

def _git(checkout: pathlib.Path, *args: str) -> str:
  """A read-only git query on the checkout (run in dry runs too)."""
  proc = subprocess.run(['git', '-C', str(checkout), *args],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    message = (proc.stderr.strip().splitlines() or ['failed'])[-1]
    raise UsageError(f'git {" ".join(args)} in {checkout}: {message}')
  return proc.stdout


def source_commit(checkout: pathlib.Path, ref: str | None,
                  allow_dirty: bool) -> str:
  """The commit whose tree is shipped.

  --ref names it; else HEAD, refused when tracked files have uncommitted
  changes unless allow_dirty, which ships `git stash create`'s commit (HEAD
  plus those changes; refs, index and working tree untouched). Untracked
  files never travel, so they do not make the checkout dirty.
  """
  if ref:
    return _git(checkout, 'rev-parse', '--verify', f'{ref}^{{commit}}').strip()
  changed = _git(checkout, 'status', '--porcelain', '--untracked-files=no')
  if changed.strip():
    if not allow_dirty:
      files = [line[3:] for line in changed.splitlines()]
      shown = ', '.join(files[:3]) + (', ...' if len(files) > 3 else '')
      raise UsageError(
          f'the checkout has uncommitted changes ({len(files)} files: '
          f'{shown}); commit them, or pass --allow-dirty to ship them')
    return _git(checkout, 'stash', 'create').strip()
  return _git(checkout, 'rev-parse', '--verify', 'HEAD^{commit}').strip()


def pinned_jax(checkout: pathlib.Path, commit: str) -> str:
  """The jax version that commit's setup.py pins ('jax==X')."""
  text = _git(checkout, 'show', f'{commit}:setup.py')
  match = re.search(r"""['"]jax==([^'";\s]+)['"]""", text)
  if not match:
    raise UsageError(f"setup.py at {commit[:12]} pins no jax version "
                     "(expected 'jax==X.Y.Z' in its requirements)")
  return match.group(1)


def _refuse_if_running() -> str:
  # The exit status is the job's last write: once there, the job is over
  # even if its process group has not quite gone.
  return (f'if [ ! -s {REMOTE_EXIT} ] && [ -f {REMOTE_PID} ] && '
          f'kill -0 -- -"$(cat {REMOTE_PID})" '
          '2>/dev/null; then echo "a job is running on this worker (process '
          f'group $(cat {REMOTE_PID})); stop it first" >&2; exit 1; fi')


def setup_commands(tpu: Slice, checkout: pathlib.Path, commit: str,
                   jax_version: str, python: str,
                   extras: Sequence[str]) -> list[list[str]]:
  """Archive the commit here, copy it to every worker, install it there."""
  archive = os.path.join(tempfile.gettempdir(),
                         f'effnetv2_jax-{commit[:12]}.tar.gz')
  package = f'".[{",".join(extras)}]"' if extras else '.'
  install = '; '.join([
      'set -e',
      _refuse_if_running(),
      f'rm -rf {REMOTE_SRC} {REMOTE_VENV}',
      f'mkdir -p {REMOTE_SRC}',
      f'tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_SRC}',
      f'echo {commit} > {REMOTE_SRC}/.commit',
      f'python3 -m pip install --user -q uv=={UV_VERSION}',
      f'cd {REMOTE_SRC}',
      f'~/.local/bin/uv venv -q --python {shlex.quote(python)} {REMOTE_VENV}',
      # Double quotes: no glob on the brackets, nothing else to expand.
      f'~/.local/bin/uv pip install -q --python {REMOTE_VENV}/bin/python '
      f'-e {package} "jax[tpu]=={jax_version}"',
  ])
  return [
      ['git', '-C', str(checkout), 'archive', '--format=tar.gz',
       f'--output={archive}', commit],
      tpu.scp(archive, f'{tpu.name}:{REMOTE_ARCHIVE}', 'all'),
      tpu.ssh('all', install),
  ]


# ------------------------------------------------------------------- run --

def check_shared_paths(flags: Sequence[str]) -> None:
  """--workdir is required; it and the data and cache directories given must
  be gs:// paths. A UsageError names the flag otherwise."""
  values = {}
  for i, flag in enumerate(flags):
    name, has_value, value = flag.partition('=')
    if not _SHARED_PATH_FLAG.match(name):
      continue
    if not has_value:
      value = flags[i + 1] if i + 1 < len(flags) else ''
    values[name] = value
  if '--workdir' not in values:
    raise UsageError('run needs --workdir=gs://BUCKET/PATH after --: the '
                     'workers write one workdir, and a recreated slice '
                     'resumes from it')
  for name, value in values.items():
    if name.endswith('compilation_cache_dir') and value == '':
      continue  # '' turns the cache off
    if not value.startswith('gs://'):
      raise UsageError(f'{name}={value!r} must be a gs:// path: every worker, '
                       'and a recreated slice, must see the same files')


def _background(program: str) -> str:
  """A remote script that starts `program` in the background, in a process
  group of its own (set -m), appending to the job log and recording the
  group's id and the program's exit status.

  The subshell ignores SIGHUP (the ssh session ending) and outlives a
  SIGTERM (`trap true`: the program, which gets the default disposition
  back, checkpoints and exits 143), so that status is recorded either way.
  """
  return '; '.join([
      'set -e',
      f'mkdir -p {REMOTE_JOB}',
      _refuse_if_running(),
      f'rm -f {REMOTE_EXIT}',
      f'cd {REMOTE_SRC}',
      f'echo "== $(date -u +%FT%TZ) start, commit $(cat .commit)" >> '
      f'{REMOTE_LOG}',
      'set -m',
      f'(set +e; trap "" HUP; trap true TERM; nohup {program}; '
      f'echo $? > {REMOTE_EXIT}) >> {REMOTE_LOG} 2>&1 < /dev/null & '
      f'echo $! > {REMOTE_PID}',
  ])


def run_commands(tpu: Slice, flags: Sequence[str], nas: bool,
                 workers: int | None) -> list[list[str]]:
  """Starts the trainer on every worker, or the search on worker 0."""
  check_shared_paths(flags)
  python = f'{REMOTE_VENV}/bin/python'
  quoted = ' '.join(shlex.quote(f) for f in flags)
  if not nas:
    program = f'{python} -m effnetv2_jax.main --distributed {quoted}'.rstrip()
    return [tpu.ssh('all', _background(program))]
  if workers is None:
    raise UsageError('run --nas needs --accelerator (a multi-host slice gets '
                     'a Ray cluster, one node per worker)')
  commands = []
  extra = ''
  if workers > 1:
    ray = f'{REMOTE_VENV}/bin/ray'
    head = (f'$({METADATA}worker-network-endpoints | cut -d, -f1 '
            '| cut -d: -f3)')
    commands += [
        # The guard first: a running search's trials must keep their Ray.
        tpu.ssh('0', f'set -e; {_refuse_if_running()}; '
                f'{ray} stop --force || true; {ray} start --head '
                f'--port={RAY_PORT} --disable-usage-stats'),
        tpu.ssh(','.join(str(w) for w in range(1, workers)),
                f'{ray} stop --force || true; {ray} start '
                f'--address={head}:{RAY_PORT} --disable-usage-stats'),
    ]
    if not any(f.startswith('--backend') for f in flags):
      extra = ' --backend=ray --ray_address=auto'
  program = f'{python} -m effnetv2_jax.nas {quoted}'.rstrip() + extra
  commands.append(tpu.ssh('0', _background(program)))
  return commands


def stop_commands(tpu: Slice) -> list[list[str]]:
  """SIGTERM to each worker's job group, then up to 10 minutes for the
  checkpoint, then SIGKILL."""
  script = (f'if [ -f {REMOTE_PID} ]; then p=$(cat {REMOTE_PID}); '
            'kill -TERM -- -$p 2>/dev/null || true; '
            'for i in $(seq 600); do kill -0 -- -$p 2>/dev/null || break; '
            'sleep 1; done; kill -KILL -- -$p 2>/dev/null || true; fi')
  return [tpu.ssh('all', script)]


# ------------------------------------------------------------------ logs --

def logs_commands(tpu: Slice, worker: int, fetch: str | None,
                  workers: int | None) -> list[list[str]]:
  """Streams one worker's log, or copies every worker's to fetch/."""
  if fetch is None:
    return [tpu.ssh(str(worker), f'tail -n 200 -F {REMOTE_LOG}')]
  if workers is None:
    raise UsageError('logs --fetch needs --accelerator (one copy per worker)')
  # scp's remote paths are relative to the home directory.
  relative = REMOTE_LOG.removeprefix('~/')
  return [['mkdir', '-p', fetch]] + [
      tpu.scp(f'{tpu.name}:{relative}',
              os.path.join(fetch, f'worker-{w}.log'), str(w))
      for w in range(workers)]


# ----------------------------------------------------------------- watch --

@dataclasses.dataclass(frozen=True)
class Observation:
  """What one poll saw.

  Attributes:
    node: the TPU VM's state (READY, CREATING, PREEMPTED, ...; NOT_FOUND when
      describe finds none; UNKNOWN when describe failed otherwise).
    queued: the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE,
      SUSPENDED, ...), None without --queued.
    jobs: per observed worker: 'running', 'exit N', 'gone' (started, ended
      without an exit status: the VM restarted) or 'none' (never started);
      None when the node was not READY.
  """
  node: str
  queued: str | None = None
  jobs: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
  action: str  # wait, start, restart, recreate, done, fail, give_up
  reason: str


def decide(seen: Observation, retries: int, max_retries: int) -> Decision:
  """The next action from one observation: a pure function.

  recreate and restart spend a retry; once max_retries are spent either is
  give_up instead.
  """
  def spend(action: str, reason: str) -> Decision:
    if retries >= max_retries:
      return Decision('give_up', f'{reason}; {max_retries} retries spent')
    return Decision(action, reason)

  if seen.queued is not None and seen.queued != 'ACTIVE':
    if seen.queued in QUEUED_LOST:
      return spend('recreate', f'queued resource {seen.queued}')
    return Decision('wait', f'queued resource {seen.queued}')
  if seen.node in NODE_LOST:
    return spend('recreate', f'node {seen.node}')
  if seen.node != 'READY' or seen.jobs is None:
    return Decision('wait', f'node {seen.node}')
  jobs = seen.jobs
  summary = ', '.join(f'worker {i}: {s}' for i, s in enumerate(jobs))
  exits = [s for s in jobs if s.startswith('exit ')]
  bad = [s for s in exits
         if s not in ('exit 0', f'exit {PREEMPTED_EXIT_STATUS}')]
  if bad:
    return Decision('fail', f'job failed ({summary})')
  if all(s == 'none' for s in jobs):
    return Decision('start', 'no job on a ready slice')
  if all(s == 'exit 0' for s in jobs):
    return Decision('done', 'every worker exited 0')
  if 'running' in jobs and not {'gone', 'none'} & set(jobs):
    # Peers still checkpointing after a SIGTERM, or finishing: let them end.
    return Decision('wait', f'job running ({summary})')
  return spend('restart', f'job stopped ({summary})')


_JOB_STATUS = re.compile(r'^job-status worker=(\d+) (.+)$')


def job_status_script() -> str:
  """Prints `job-status worker=K STATUS` on the worker it runs on."""
  return (f'n=$({METADATA}agent-worker-number); '
          f'if [ -s {REMOTE_EXIT} ]; then s="exit $(cat {REMOTE_EXIT})"; '
          f'elif [ -f {REMOTE_PID} ] && kill -0 -- -"$(cat {REMOTE_PID})" '
          '2>/dev/null; then s=running; '
          f'elif [ -f {REMOTE_PID} ]; then s=gone; else s=none; fi; '
          'echo "job-status worker=$n $s"')


def parse_job_status(output: str, workers: int) -> tuple[str, ...]:
  """Each worker's status from the script's lines; a silent worker is
  'gone'."""
  found = {}
  for line in output.splitlines():
    match = _JOB_STATUS.match(line.strip())
    if match:
      found[int(match.group(1))] = match.group(2).strip()
  return tuple(found.get(w, 'gone') for w in range(workers))


class Watcher:
  """Polls a slice and its job and acts on `decide`'s answers.

  Args:
    runner: runs the commands.
    tpu: the slice.
    queued: whether the slice is a queued resource.
    create, setup, run, stop: build the commands of each step (setup's
      commit is fixed when watch starts: a recreated slice gets the same
      code, whatever the checkout does meanwhile).
    observed_workers: the workers whose job is observed (1 for --nas).
    interval_s, max_retries: the poll period and the retry budget.
    sleep, out: injectable for tests.
  """

  def __init__(self, runner: Runner, tpu: Slice, queued: bool,
               create: Callable[[], list[list[str]]],
               setup: Callable[[], list[list[str]]],
               run: Callable[[], list[list[str]]],
               stop: Callable[[], list[list[str]]],
               observed_workers: int, interval_s: float, max_retries: int,
               sleep: Callable[[float], None] = time.sleep,
               out: TextIO | None = None):
    self.runner, self.tpu, self.queued = runner, tpu, queued
    self.steps = {'create': create, 'setup': setup, 'run': run, 'stop': stop}
    self.observed_workers = observed_workers
    self.interval_s, self.max_retries = interval_s, max_retries
    self.sleep = sleep
    self.out = out if out is not None else sys.stdout

  def _state(self, argv: list[str]) -> str:
    try:
      return self.runner.query(argv).strip() or 'UNKNOWN'
    except CommandError as e:
      return 'NOT_FOUND' if re.search(r'NOT_FOUND|not found', str(e),
                                      re.IGNORECASE) else 'UNKNOWN'

  def observe(self) -> Observation:
    queued = None
    if self.queued:
      queued = self._state(self.tpu.queued(
          'describe', '--format=value(state.state)'))
      if queued != 'ACTIVE':
        return Observation(node='NOT_FOUND', queued=queued)
    node = self._state(self.tpu.tpu_vm('describe', '--format=value(state)'))
    if node != 'READY':
      return Observation(node=node, queued=queued)
    workers = 'all' if self.observed_workers > 1 else '0'
    try:
      output = self.runner.query(self.tpu.ssh(workers, job_status_script()))
    except CommandError:
      return Observation(node='UNREACHABLE', queued=queued)
    return Observation(node=node, queued=queued,
                       jobs=parse_job_status(output, self.observed_workers))

  def _steps(self, action: str) -> list[tuple[list[str], bool]]:
    """(argv, whether it may fail) for each command of an action."""
    if action == 'recreate':  # the slice may be gone already
      return ([(argv, True) for argv in
               teardown_commands(self.tpu, self.queued)]
              + [(argv, False) for argv in self.steps['create']()])
    if action == 'start':
      return [(argv, False) for argv in
              self.steps['setup']() + self.steps['run']()]
    if action == 'restart':
      return [(argv, False) for argv in
              self.steps['stop']() + self.steps['run']()]
    return []

  def _say(self, text: str) -> None:
    stamp = time.strftime('%Y-%m-%dT%H:%M:%S')
    print(f'watch {stamp} {text}', file=self.out, flush=True)

  def _act(self, action: str) -> None:
    for argv, may_fail in self._steps(action):
      try:
        self.runner.run(argv)
      except CommandError as e:
        if not may_fail:
          raise
        self._say(f'({e})')

  def watch(self) -> int:
    """Polls until the job is done (0), failed or out of retries (1).

    recreate and restart spend a retry; a start whose commands fail spends
    one too (a broken setup must not loop for ever).
    """
    retries = 0
    while True:
      decision = decide(self.observe(), retries, self.max_retries)
      spends = decision.action in ('recreate', 'restart')
      budget = f' (retry {retries + 1}/{self.max_retries})' if spends else ''
      self._say(f'{decision.reason} -> {decision.action}{budget}')
      if decision.action == 'done':
        return 0
      if decision.action in ('fail', 'give_up'):
        return FAILED_EXIT_STATUS
      retries += spends
      try:
        self._act(decision.action)
      except CommandError as e:
        self._say(f'{decision.action} failed: {e}')
        if not spends:
          retries += 1
          if retries >= self.max_retries:
            self._say(f'{self.max_retries} retries spent -> give_up')
            return FAILED_EXIT_STATUS
      self.sleep(self.interval_s)

  def print_plan(self) -> None:
    """A dry run: one poll's commands, then what each action runs."""
    print('# each poll', file=self.runner.out)
    if self.queued:
      self.runner.query(self.tpu.queued('describe',
                                        '--format=value(state.state)'))
    self.runner.query(self.tpu.tpu_vm('describe', '--format=value(state)'))
    self.runner.query(self.tpu.ssh(
        'all' if self.observed_workers > 1 else '0', job_status_script()))
    for action, when in (('start', 'a ready slice without a job'),
                         ('recreate', 'a preempted slice (then start)'),
                         ('restart', 'a job stopped by SIGTERM (exit 143)')):
      print(f'# on {when}: {action}', file=self.runner.out)
      for argv, _ in self._steps(action):
        self.runner.run(argv)


# ------------------------------------------------------------ arguments --

def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM (node) name; '
                      'with --queued also the queued resource id')
  common.add_argument('--zone', required=True, help='e.g. europe-west4-a')
  common.add_argument('--project', help="default: gcloud's configured one")
  common.add_argument('--dry-run', action='store_true',
                      help='print the commands, run nothing')

  slice_args = argparse.ArgumentParser(add_help=False)
  slice_args.add_argument('--accelerator', required=True,
                          help='e.g. v3-32, v4-64, v5litepod-16, v6e-16')
  slice_args.add_argument('--runtime', help='TPU software version; default: '
                          "the generation's base image")
  slice_args.add_argument('--spot', action='store_true')
  slice_args.add_argument('--preemptible', action='store_true')
  slice_args.add_argument('--queued', action='store_true',
                          help='create through a queued resource')

  source = argparse.ArgumentParser(add_help=False)
  source.add_argument('--ref', help='commit to ship (default HEAD)')
  source.add_argument('--allow-dirty', action='store_true',
                      help='ship uncommitted tracked changes too')
  source.add_argument('--checkout', type=pathlib.Path, default=CHECKOUT,
                      help=argparse.SUPPRESS)
  source.add_argument('--python', default=DEFAULT_PYTHON,
                      help='Python version of the workers\' venv')
  source.add_argument('--extras', default='',
                      help="package extras, comma-separated (e.g. 'nas')")

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument('--nas', action='store_true',
                   help='run the architecture search on worker 0')

  parser = argparse.ArgumentParser(
      prog='tpu.py', description=__doc__.split('\n\n')[0],
      epilog='Trainer flags go after --, e.g. `tpu.py run ... -- '
      '--config=configs/imagenet.py:s --workdir=gs://b/s`.')
  commands = parser.add_subparsers(dest='command', required=True)
  commands.add_parser('create', parents=[common, slice_args])
  commands.add_parser('setup', parents=[common, source])
  run = commands.add_parser('run', parents=[common, job])
  run.add_argument('--accelerator', help='needed with --nas')
  logs = commands.add_parser('logs', parents=[common])
  logs.add_argument('--worker', type=int, default=0)
  logs.add_argument('--fetch', metavar='DIR')
  logs.add_argument('--accelerator', help='needed with --fetch')
  watch = commands.add_parser('watch',
                              parents=[common, slice_args, source, job])
  watch.add_argument('--interval', type=float, default=60.0,
                     help='seconds between polls')
  watch.add_argument('--max-retries', type=int, default=10)
  commands.add_parser('stop', parents=[common])
  teardown = commands.add_parser('teardown', parents=[common])
  teardown.add_argument('--queued', action='store_true')
  return parser


def _split_program_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def _extras(text: str, nas: bool) -> list[str]:
  extras = [e for e in text.split(',') if e]
  for extra in extras:
    if not re.fullmatch(r'[A-Za-z0-9_-]+', extra):
      raise UsageError(f'--extras: {extra!r} is not an extra\'s name (e.g. '
                       'nas, convert)')
  return extras + ['nas'] if nas and 'nas' not in extras else extras


def _setup_builder(args, tpu: Slice, extras: Sequence[str]):
  """setup's commands as a function of nothing: the commit and its jax pin
  are read once, now."""
  if not re.fullmatch(r'3\.\d+(\.\d+)?', args.python):
    raise UsageError(f'--python={args.python!r}: expected a version such as '
                     f'{DEFAULT_PYTHON}')
  commit = source_commit(args.checkout, args.ref, args.allow_dirty)
  jax_version = pinned_jax(args.checkout, commit)
  return lambda: setup_commands(tpu, args.checkout, commit, jax_version,
                                args.python, extras)


def _commands_of(args, flags: list[str], tpu: Slice) -> list[list[str]]:
  """The commands of every subcommand but watch, in order."""
  if args.command == 'create':
    return create_commands(tpu, args.accelerator, args.runtime, args.spot,
                           args.preemptible, args.queued)
  if args.command == 'setup':
    return _setup_builder(args, tpu, _extras(args.extras, False))()
  if args.command == 'run':
    workers = worker_count(args.accelerator) if args.accelerator else None
    return run_commands(tpu, flags, args.nas, workers)
  if args.command == 'logs':
    workers = worker_count(args.accelerator) if args.accelerator else None
    return logs_commands(tpu, args.worker, args.fetch, workers)
  if args.command == 'stop':
    return stop_commands(tpu)
  return teardown_commands(tpu, args.queued)


def _watcher(args, flags: list[str], tpu: Slice, runner: Runner) -> Watcher:
  workers = worker_count(args.accelerator)
  create = create_commands(tpu, args.accelerator, args.runtime, args.spot,
                           args.preemptible, args.queued)
  run = run_commands(tpu, flags, args.nas, workers)  # checks the flags now
  setup = _setup_builder(args, tpu, _extras(args.extras, args.nas))
  return Watcher(runner, tpu, args.queued, create=lambda: create, setup=setup,
                 run=lambda: run, stop=lambda: stop_commands(tpu),
                 observed_workers=1 if args.nas else workers,
                 interval_s=args.interval, max_retries=args.max_retries)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status."""
  ours, flags = _split_program_flags(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(ours)
  try:
    if flags and args.command not in ('run', 'watch'):
      raise UsageError(f'{args.command} takes no flags after --')
    tpu = Slice(args.name, args.zone, args.project)
    runner = Runner(args.dry_run)
    if args.command == 'watch':
      watcher = _watcher(args, flags, tpu, runner)
      if args.dry_run:
        watcher.print_plan()
        return 0
      return watcher.watch()
    for command in _commands_of(args, flags, tpu):
      runner.run(command)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return USAGE_EXIT_STATUS
  except CommandError as e:
    print(f'error: {e}', file=sys.stderr)
    return FAILED_EXIT_STATUS
  except KeyboardInterrupt:  # leaving `logs` or `watch`
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
