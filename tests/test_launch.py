"""launch/tpu.py: the TPU launcher, without gcloud or a network.

Dry runs go through the launcher's main(argv) and are read back with
shlex, as a shell would; the scripts it sends to the workers run here in a
local bash with a stand-in Python; watch's decisions are checked on
hand-made sequences of observations; setup's real path runs against a fake
`gcloud` on PATH.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = REPO / 'launch' / 'tpu.py'
SLICE = ['--name=effnetv2', '--zone=europe-west4-a']


def _load_launcher():
  spec = importlib.util.spec_from_file_location('launch_tpu', LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


tpu = _load_launcher()


def _launch(capsys, *argv):
  """(exit status, stdout's argv lists, stderr) of main(argv)."""
  status = tpu.main(list(argv))
  out, err = capsys.readouterr()
  return status, [shlex.split(line) for line in out.splitlines()], err


def _dry(capsys, command, *argv):
  status, commands, err = _launch(capsys, command, *SLICE, '--dry-run', *argv)
  assert status == 0, err
  return commands


def _remote(argv):
  """The script an ssh command sends, from its --command= argument."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command.removeprefix('--command=')


def _shell_words(script):
  """The script's words as bash splits them, ; & ( ) as words of their own."""
  lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _usage_error(capsys, *argv):
  status, commands, err = _launch(capsys, *argv)
  assert status == tpu.USAGE_EXIT_STATUS
  assert commands == []  # nothing printed (or run) before the check
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


# ---------------------------------------------------------------- create --

def test_create_direct_spot(capsys):
  assert _dry(capsys, 'create', '--accelerator=v3-32', '--spot') == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'effnetv2',
      '--zone=europe-west4-a', '--accelerator-type=v3-32',
      '--version=tpu-ubuntu2204-base', '--spot']]


def test_create_queued_spot_with_project(capsys):
  assert _dry(capsys, 'create', '--accelerator=v4-32', '--spot', '--queued',
              '--project=my-project') == [[
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'effnetv2',
      '--zone=europe-west4-a', '--project=my-project', '--node-id=effnetv2',
      '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base',
      '--spot']]


def test_create_preemptible_direct(capsys):
  (argv,) = _dry(capsys, 'create', '--accelerator=v2-8', '--preemptible')
  assert argv[-1] == '--preemptible' and '--spot' not in argv


# Cloud TPU docs, "TPU software versions" (PyTorch and JAX).
@pytest.mark.parametrize('accelerator, runtime', [
    ('v2-8', 'tpu-ubuntu2204-base'), ('v3-32', 'tpu-ubuntu2204-base'),
    ('v4-64', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-128', 'v2-alpha-tpuv5'), ('v6e-16', 'v2-alpha-tpuv6e')])
def test_create_runtime_defaults_by_generation(capsys, accelerator, runtime):
  (direct,) = _dry(capsys, 'create', f'--accelerator={accelerator}')
  (queued,) = _dry(capsys, 'create', f'--accelerator={accelerator}',
                   '--queued')
  assert f'--version={runtime}' in direct
  assert f'--runtime-version={runtime}' in queued


def test_create_runtime_override(capsys):
  (argv,) = _dry(capsys, 'create', '--accelerator=v3-8',
                 '--runtime=tpu-vm-base')
  assert '--version=tpu-vm-base' in argv


@pytest.mark.parametrize('argv, named', [
    (['--accelerator=v9-8'], '--accelerator'),
    (['--accelerator=v3'], '--accelerator'),
    (['--accelerator=v3-32', '--spot', '--preemptible'], '--preemptible'),
    (['--accelerator=v3-32', '--queued', '--preemptible'], '--queued'),
])
def test_create_mistakes_are_one_line(capsys, argv, named):
  assert named in _usage_error(capsys, 'create', *SLICE, '--dry-run', *argv)


# Hosts per slice: Cloud TPU "TPU configurations" (v2-v5p sizes count
# TensorCores, v5e and v6e sizes count chips).
@pytest.mark.parametrize('accelerator, workers', [
    ('v2-8', 1), ('v3-8', 1), ('v3-32', 4), ('v3-128', 16), ('v4-8', 1),
    ('v4-32', 4), ('v5p-8', 1), ('v5p-64', 8), ('v5litepod-8', 1),
    ('v5litepod-16', 4), ('v6e-8', 1), ('v6e-64', 16)])
def test_worker_count(accelerator, workers):
  assert tpu.worker_count(accelerator) == workers


# ----------------------------------------------------------------- setup --

@pytest.fixture
def checkout(tmp_path):
  """A small git checkout pinning jax 9.8.7, with a run of it as `git`."""
  repo = tmp_path / 'repo'
  repo.mkdir()

  def git(*args):
    return subprocess.run(
        ['git', '-C', str(repo), '-c', 'user.email=t@example.com',
         '-c', 'user.name=t', *args],
        check=True, capture_output=True, text=True).stdout.strip()

  git('init', '-q')
  (repo / 'setup.py').write_text("CORE = ['jax==9.8.7', 'jaxlib==9.8.7']\n")
  (repo / 'train.py').write_text('print("committed")\n')
  git('add', '.')
  git('commit', '-qm', 'first')
  return repo, git


def test_setup_ships_git_archive_of_head(capsys, checkout):
  repo, git = checkout
  (repo / 'untracked.txt').write_text('not shipped, not dirty')
  archive, scp, ssh = _dry(capsys, 'setup', f'--checkout={repo}')
  head = git('rev-parse', 'HEAD')
  assert archive[:4] == ['git', '-C', str(repo), 'archive']
  assert archive[-1] == head
  output = [a for a in archive if a.startswith('--output=')][0]
  local_file = output.removeprefix('--output=')
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5] == local_file and '--worker=all' in scp
  assert '--worker=all' in ssh
  words = _shell_words(_remote(ssh))
  assert 'jax[tpu]==9.8.7' in words
  assert ['rm', '-rf', '~/effnetv2_jax', '~/venv'] == words[
      words.index('rm'):words.index('rm') + 4]  # a fresh venv and tree
  assert ['venv', '-q', '--python', '3.11', '~/venv'] == words[
      words.index('venv'):words.index('venv') + 5]
  assert head in words  # recorded on the workers for the job log


def test_setup_refuses_a_dirty_checkout(capsys, checkout):
  repo, _ = checkout
  (repo / 'train.py').write_text('print("edited")\n')
  line = _usage_error(capsys, 'setup', *SLICE, '--dry-run',
                      f'--checkout={repo}')
  assert 'train.py' in line and '--allow-dirty' in line


def test_setup_allow_dirty_ships_the_changes(capsys, checkout):
  repo, git = checkout
  (repo / 'train.py').write_text('print("edited")\n')
  archive, _, _ = _dry(capsys, 'setup', f'--checkout={repo}',
                       '--allow-dirty')
  commit = archive[-1]
  assert commit != git('rev-parse', 'HEAD')
  assert git('show', f'{commit}:train.py') == 'print("edited")'
  assert git('stash', 'list') == ''  # the stash ref was never touched
  assert (repo / 'train.py').read_text() == 'print("edited")\n'


def test_setup_ref_and_extras(capsys, checkout):
  repo, git = checkout
  (repo / 'setup.py').write_text("CORE = ['jax==9.9.0']\n")
  git('commit', '-qam', 'second')
  first = git('rev-parse', 'HEAD~1')
  archive, _, ssh = _dry(capsys, 'setup', f'--checkout={repo}', '--ref=HEAD~1',
                         '--extras=nas', '--python=3.12')
  assert archive[-1] == first
  words = _shell_words(_remote(ssh))
  assert 'jax[tpu]==9.8.7' in words  # the pin of the commit shipped
  install = words.index('install')
  assert words[words.index('-e', install) + 1] == '.[nas]'
  assert ['--python', '3.12'] == words[words.index('venv') + 2:
                                       words.index('venv') + 4]


def test_setup_pins_our_jax(capsys):
  """The real checkout's HEAD: jax[tpu]== its setup.py's jax pin."""
  source = subprocess.run(['git', '-C', str(REPO), 'show', 'HEAD:setup.py'],
                          check=True, capture_output=True, text=True).stdout
  pins = [node.value for node in ast.walk(ast.parse(source))
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and node.value.startswith('jax==')]
  assert len(pins) == 1
  _, _, ssh = _dry(capsys, 'setup', '--ref=HEAD')
  assert f'jax[tpu]=={pins[0].removeprefix("jax==")}' in _shell_words(
      _remote(ssh))


def test_setup_for_real_sends_only_the_commit(capsys, checkout, tmp_path,
                                              monkeypatch):
  """No --dry-run: the archive holds the committed tree (plus the tracked
  edit, with --allow-dirty), never untracked files; gcloud gets it."""
  repo, _ = checkout
  (repo / '.venv').mkdir()
  (repo / '.venv' / 'big.bin').write_text('venv')
  (repo / 'untracked.txt').write_text('scratch')
  (repo / 'train.py').write_text('print("edited")\n')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'gcloud_calls.jsonl'
  fake = bin_dir / 'gcloud'
  fake.write_text(f'#!{sys.executable}\nimport json, sys\n'
                  f'open({str(calls)!r}, "a").write(json.dumps(sys.argv[1:])'
                  ' + "\\n")\n')
  fake.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  status, _, err = _launch(capsys, 'setup', *SLICE, f'--checkout={repo}',
                           '--allow-dirty')
  assert status == 0, err
  scp, ssh = [json.loads(line) for line in calls.read_text().splitlines()]
  assert scp[:3] == ['compute', 'tpus', 'tpu-vm'] and scp[3] == 'scp'
  assert ssh[3] == 'ssh'
  with tarfile.open(scp[4]) as archive:
    assert sorted(archive.getnames()) == ['setup.py', 'train.py']
    assert archive.extractfile('train.py').read() == b'print("edited")\n'
  assert '+ git -C' in err  # a real run echoes each command


# ------------------------------------------------------------------- run --

TRAIN_FLAGS = ['--config=configs/imagenet.py:s,paper',
               '--workdir=gs://bucket/effnetv2/s_paper',
               '--config.data.data_dir=gs://bucket/tensorflow_datasets',
               '--config.compilation_cache_dir=gs://bucket/jax_cache']


def test_run_v3_32_starts_every_worker(capsys):
  (ssh,) = _dry(capsys, 'run', '--accelerator=v3-32', '--', *TRAIN_FLAGS)
  assert '--worker=all' in ssh
  words = _shell_words(_remote(ssh))
  start = words.index('nohup')
  program = words[start + 1:words.index(';', start)]
  assert program == ['~/venv/bin/python', '-m', 'effnetv2_jax.main',
                     '--distributed', *TRAIN_FLAGS]
  # Every worker runs the same command: JAX finds the process id, count and
  # coordinator on a TPU slice, so none is given.
  for flag in ('--process_id', '--num_processes', '--coordinator_address'):
    assert not any(w.startswith(flag) for w in words)
  log = words.index('>>', words.index(')'))
  assert words[log + 1] == '~/effnetv2_jax_job/job.log'


def test_run_quotes_overrides_for_the_remote_shell(capsys):
  flags = ['--workdir=gs://bucket/run 1',
           '--config.experiment=my run (v2)',
           '--config.model.note=it\'s "quoted" $HOME `x` ; & |',
           '--config.train.epochs', '3']
  (ssh,) = _dry(capsys, 'run', '--', *flags)
  words = _shell_words(_remote(ssh))
  start = words.index('--distributed')
  assert words[start + 1:words.index(';', start)] == flags


def test_run_nas_uses_worker_0_and_a_ray_cluster(capsys):
  flags = ['--config=configs/nas.py:b4_imagenet', '--workdir=gs://b/nas',
           '--config.trial.data.data_dir=gs://b/tfds']
  head, others, driver = _dry(capsys, 'run', '--nas', '--accelerator=v3-32',
                              '--', *flags)
  assert '--worker=0' in head and 'start --head' in _remote(head)
  assert '--worker=1,2,3' in others
  assert '--address=' in _remote(others)
  assert '--worker=0' in driver
  words = _shell_words(_remote(driver))
  start = words.index('nohup')
  assert words[start + 1:words.index(';', start)] == [
      '~/venv/bin/python', '-m', 'effnetv2_jax.nas', *flags,
      '--backend=ray', '--ray_address=auto']


def test_run_nas_on_one_host_is_the_local_backend(capsys):
  (driver,) = _dry(capsys, 'run', '--nas', '--accelerator=v3-8', '--',
                   '--workdir=gs://b/nas')
  words = _shell_words(_remote(driver))
  assert 'effnetv2_jax.nas' in words and '--backend=ray' not in words


@pytest.mark.parametrize('flags, named', [
    (['--config=configs/digits.py'], '--workdir'),
    (['--workdir=/tmp/run'], '--workdir'),
    (['--workdir', 'runs/s'], '--workdir'),
    (['--workdir=gs://b/w', '--config.data.data_dir=/data/tfds'],
     '--config.data.data_dir'),
    (['--workdir=gs://b/w', '--config.compilation_cache_dir=/tmp/cache'],
     '--config.compilation_cache_dir'),
    (['--workdir=gs://b/w', '--config.trial.data.data_dir', 'tfds'],
     '--config.trial.data.data_dir'),
])
def test_run_needs_gs_paths(capsys, flags, named):
  line = _usage_error(capsys, 'run', *SLICE, '--dry-run', '--', *flags)
  assert named in line


def test_run_accepts_gs_paths_and_no_cache(capsys):
  (ssh,) = _dry(capsys, 'run', '--', '--workdir', 'gs://b/w',
                '--config.compilation_cache_dir=')
  assert '--config.compilation_cache_dir=' in _shell_words(_remote(ssh))


def test_flags_after_double_dash_only_for_run(capsys):
  assert 'create' in _usage_error(capsys, 'create', *SLICE, '--dry-run',
                                  '--accelerator=v3-8', '--', '--workdir=x')


# ---------------------------------------------- the remote scripts, run --

@pytest.fixture
def worker_home(tmp_path):
  """A stand-in worker: a home with the source tree, a venv whose python
  records its arguments and sleeps $FAKE_SLEEP seconds, and a curl that
  answers the metadata server's worker number."""
  home = tmp_path / 'home'
  (home / 'effnetv2_jax').mkdir(parents=True)
  (home / 'effnetv2_jax' / '.commit').write_text('abc123\n')
  (home / 'venv' / 'bin').mkdir(parents=True)
  python = home / 'venv' / 'bin' / 'python'
  python.write_text(
      f'#!{sys.executable}\nimport json, os, sys, time\n'
      'json.dump(sys.argv[1:], open(os.path.expanduser("~/argv.json"), "w"))\n'
      'print("training", flush=True)\n'
      'time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))\n')
  python.chmod(0o755)
  (tmp_path / 'bin').mkdir()
  curl = tmp_path / 'bin' / 'curl'
  curl.write_text('#!/bin/sh\necho 0\n')
  curl.chmod(0o755)
  env = {'HOME': str(home), 'PATH': f'{tmp_path / "bin"}:/usr/bin:/bin'}
  return home, env


def _on_worker(script, env, sleep=0):
  return subprocess.run(['bash', '-c', script], env={
      **env, 'FAKE_SLEEP': str(sleep)}, capture_output=True, text=True,
                        timeout=60)


def _wait_for(path, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  return path.read_text().strip()


def test_remote_run_script_in_bash(capsys, worker_home):
  """The run script, run by bash: the trainer gets the flags exactly, its
  status lands on disk; a second start is refused while one runs; stop
  ends it with SIGTERM's status."""
  home, env = worker_home
  flags = ['--workdir=gs://b/run 1', '--config.experiment=my run (v2)',
           '--config.model.note=it\'s "quoted" $HOME `x`']
  (ssh,) = _dry(capsys, 'run', '--', *flags)
  script = _remote(ssh)
  assert _on_worker(script, env).returncode == 0
  assert _wait_for(home / 'effnetv2_jax_job' / 'exit_status') == '0'
  assert json.loads((home / 'argv.json').read_text()) == [
      '-m', 'effnetv2_jax.main', '--distributed', *flags]
  log = (home / 'effnetv2_jax_job' / 'job.log').read_text()
  assert 'commit abc123' in log and 'training' in log
  status = _on_worker(tpu.job_status_script(), env).stdout
  assert tpu.parse_job_status(status, 1) == ('exit 0',)

  assert _on_worker(script, env, sleep=30).returncode == 0
  time.sleep(0.3)
  status = _on_worker(tpu.job_status_script(), env).stdout
  assert tpu.parse_job_status(status, 1) == ('running',)
  second = _on_worker(script, env)
  assert second.returncode == 1 and 'a job is running' in second.stderr
  (stop,) = _dry(capsys, 'stop')
  assert _on_worker(_remote(stop), env).returncode == 0
  status = _on_worker(tpu.job_status_script(), env).stdout
  assert tpu.parse_job_status(status, 1) == (
      f'exit {tpu.PREEMPTED_EXIT_STATUS}',)


# ----------------------------------------------------------------- watch --

def _jobs(*statuses):
  return tpu.Observation('READY', jobs=statuses)


def _replay(observations, max_retries=3):
  """decide() over a sequence, spending retries as watch does."""
  actions, retries = [], 0
  for seen in observations:
    decision = tpu.decide(seen, retries, max_retries)
    actions.append(decision.action)
    retries += decision.action in ('recreate', 'restart')
  return actions


def test_watch_queued_spot_slice_through_a_preemption():
  queued = lambda state, **kw: tpu.Observation(
      kw.get('node', 'NOT_FOUND'), queued=state, jobs=kw.get('jobs'))
  running = ('running',) * 4
  assert _replay([
      queued('WAITING_FOR_RESOURCES'), queued('PROVISIONING'),
      queued('ACTIVE', node='READY', jobs=('none',) * 4),
      queued('ACTIVE', node='READY', jobs=running),
      queued('SUSPENDED'),
      queued('WAITING_FOR_RESOURCES'),
      queued('ACTIVE', node='CREATING'),
      queued('ACTIVE', node='READY', jobs=('none',) * 4),
      queued('ACTIVE', node='READY', jobs=running),
      queued('ACTIVE', node='READY', jobs=('exit 0',) * 4),
  ]) == ['wait', 'wait', 'start', 'wait', 'recreate', 'wait', 'wait',
         'start', 'wait', 'done']


def test_watch_direct_slice_gives_up_after_the_retries():
  lost = tpu.Observation('PREEMPTED')
  assert _replay([
      tpu.Observation('NOT_FOUND'),  # from nothing: create it
      tpu.Observation('CREATING'), _jobs('none', 'none'),
      _jobs('running', 'running'), lost, _jobs('none', 'none'),
      tpu.Observation('TERMINATED'), lost, lost,
  ], max_retries=3) == ['recreate', 'wait', 'start', 'wait', 'recreate',
                        'start', 'recreate', 'give_up', 'give_up']


@pytest.mark.parametrize('seen, action', [
    (_jobs('exit 143', 'exit 143'), 'restart'),  # SIGTERM checkpoint
    (_jobs('exit 143', 'running'), 'wait'),      # a peer still checkpointing
    (_jobs('gone', 'running'), 'restart'),       # a worker's VM restarted
    (_jobs('none', 'running'), 'restart'),
    (_jobs('exit 1', 'exit 143'), 'fail'),       # a real error: no loop
    (_jobs('exit 2', 'running'), 'fail'),
    (_jobs('exit 0', 'running'), 'wait'),
    (_jobs('exit 0', 'exit 0'), 'done'),
    (tpu.Observation('UNREACHABLE'), 'wait'),
    (tpu.Observation('REPAIRING'), 'wait'),
    (tpu.Observation('READY', queued='FAILED'), 'recreate'),
    (tpu.Observation('NOT_FOUND', queued='NOT_FOUND'), 'recreate'),
    (tpu.Observation('NOT_FOUND', queued='ACTIVE'), 'recreate'),
])
def test_watch_decisions(seen, action):
  assert tpu.decide(seen, retries=0, max_retries=3).action == action


def test_watch_restart_spends_a_retry():
  assert tpu.decide(_jobs('exit 143'), 3, 3).action == 'give_up'
  assert tpu.decide(_jobs('none'), 3, 3).action == 'start'


class _Recorder(tpu.Runner):
  """Records each command; fails those listed in `failing`."""

  def __init__(self, failing=()):
    super().__init__(dry_run=False, out=open(os.devnull, 'w'))
    self.ran, self.failing = [], set(failing)

  def run(self, argv):
    self.ran.append(argv[-1] if argv[0] == 'step' else argv[4])
    if self.ran[-1] in self.failing:
      raise tpu.CommandError(f'{self.ran[-1]} failed')


def _watcher(observations, runner, max_retries=3):
  watcher = tpu.Watcher(
      runner, tpu.Slice('effnetv2', 'z'), queued=False,
      create=lambda: [['step', 'create']], setup=lambda: [['step', 'setup']],
      run=lambda: [['step', 'run']], stop=lambda: [['step', 'stop']],
      observed_workers=2, interval_s=60.0, max_retries=max_retries,
      sleep=lambda s: None, out=open(os.devnull, 'w'))
  sequence = iter(observations)
  watcher.observe = lambda: next(sequence)
  return watcher


def test_watch_loop_recovers_from_a_preemption():
  runner = _Recorder(failing={'delete'})  # the node is gone already
  watcher = _watcher([
      _jobs('running', 'running'), tpu.Observation('PREEMPTED'),
      _jobs('none', 'none'), _jobs('exit 143', 'exit 143'),
      _jobs('exit 0', 'exit 0')], runner)
  assert watcher.watch() == 0
  assert runner.ran == ['delete', 'create', 'setup', 'run', 'stop', 'run']


def test_watch_loop_gives_up_on_a_setup_that_keeps_failing():
  runner = _Recorder(failing={'setup'})
  watcher = _watcher([_jobs('none', 'none')] * 5, runner, max_retries=2)
  assert watcher.watch() == tpu.FAILED_EXIT_STATUS
  assert runner.ran == ['setup', 'setup']


def test_watch_dry_run_prints_polls_and_recoveries(capsys):
  status, lines, err = _launch(capsys, 'watch', *SLICE, '--dry-run',
                               '--accelerator=v3-32', '--spot', '--queued',
                               '--ref=HEAD', '--', *TRAIN_FLAGS)
  assert status == 0, err
  verbs = [c[3:5] for c in lines if c[0] == 'gcloud']
  assert verbs == [
      ['queued-resources', 'describe'], ['tpu-vm', 'describe'],
      ['tpu-vm', 'ssh'],                                    # each poll
      ['tpu-vm', 'scp'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh'],  # start
      ['queued-resources', 'delete'], ['queued-resources', 'create'],
      ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]                 # stop, run


# ------------------------------------------------------ logs and teardown --

def test_logs(capsys):
  (tail,) = _dry(capsys, 'logs')
  assert '--worker=0' in tail
  assert _shell_words(_remote(tail)) == [
      'tail', '-n', '200', '-F', '~/effnetv2_jax_job/job.log']
  (tail,) = _dry(capsys, 'logs', '--worker=2')
  assert '--worker=2' in tail
  mkdir, *copies = _dry(capsys, 'logs', '--fetch=logs/run1',
                        '--accelerator=v3-32')
  assert mkdir == ['mkdir', '-p', 'logs/run1']
  assert [(c[5], c[6], c[-1]) for c in copies] == [
      ('effnetv2:effnetv2_jax_job/job.log', f'logs/run1/worker-{w}.log',
       f'--worker={w}') for w in range(4)]


def test_teardown(capsys):
  assert _dry(capsys, 'teardown') == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'effnetv2',
      '--zone=europe-west4-a', '--quiet']]
  assert _dry(capsys, 'teardown', '--queued') == [[
      'gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'effnetv2',
      '--zone=europe-west4-a', '--force', '--quiet']]


def test_runs_with_the_standard_library_alone():
  """-S -I: no site-packages, so no third-party import can succeed."""
  proc = subprocess.run(
      [sys.executable, '-S', '-I', str(LAUNCHER), 'create', *SLICE,
       '--accelerator=v3-32', '--dry-run'], capture_output=True, text=True,
      timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('gcloud compute tpus tpu-vm create effnetv2')
