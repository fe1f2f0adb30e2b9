"""Multi-process training run for real: 2 JAX processes x 4 CPU devices
(`python -m effnetv2_jax.main --distributed --coordinator_address ...`,
collectives over gloo) against 1 process x 8 devices fed the same global
batches (`config.data.input_processes=2`), and a 2-process run that loses a
process mid-run and resumes."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from effnetv2_jax.models import weights
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import trainer
from config_files import REPO, load_config
from interruptions import committed_steps

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason='the reference needs 8 (fake) devices')

# One stage: every run compiles one train program (the 2-stage plan is the
# single-process tests' business).
OVERRIDES = {'train.total_steps': 12, 'progressive.num_stages': 1,
             'checkpoint.every_steps': 2, 'checkpoint.keep': 20,
             'data.input_processes': 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, log_dir, overrides):
  """Both processes of a 2-process job on this machine."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  jobs = []
  for process in range(2):
    command = [
        sys.executable, '-m', 'effnetv2_jax.main',
        f'--config={os.path.join(REPO, "configs", "tiny.py")}',
        f'--workdir={workdir}', '--distributed',
        f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={process}'] + [
            f'--config.{k}={v}' for k, v in overrides.items()]
    log = open(os.path.join(log_dir, f'process{process}.log'), 'a')
    jobs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT), log))
  return jobs


def _wait(jobs, timeout=240):
  codes = []
  for job, log in jobs:
    try:
      codes.append(job.wait(timeout=timeout))
    finally:
      job.kill()
      log.close()
  return codes


def _tail(log_dir):
  return '\n'.join(
      open(os.path.join(log_dir, f'process{p}.log')).read()[-2000:]
      for p in range(2))


def _model_params(model_dir):
  _, params, batch_stats = weights.load_variables(model_dir)
  return checkpointing.flatten({'params': params, 'batch_stats': batch_stats})


def _assert_close(reference, other, atol):
  assert reference.keys() == other.keys()
  worst = max(float(np.max(np.abs(reference[k] - other[k])))
              for k in reference)
  assert worst <= atol, worst
  return worst


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def test_two_processes_train_what_one_process_trains_and_resume(tmp_path):
  # The 2-process runs share one compilation cache: the first compiles.
  overrides = dict(OVERRIDES, compilation_cache_dir=str(tmp_path / 'cache'))
  # The reference: one process, 8 devices, the 2-process input order.
  _, reference = trainer.train_and_evaluate(
      load_config('tiny', None, **overrides), str(tmp_path / 'reference'))
  reference_params = _model_params(str(tmp_path / 'reference' / 'model'))

  workdir = str(tmp_path / 'two')
  codes = _wait(_start(workdir, str(tmp_path), overrides))
  assert codes == [0, 0], _tail(str(tmp_path))
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  # The same input slices assembled into the same global batches: the
  # stage means of the loss agree, and so do the parameters, to float32
  # rounding (the all-reduce sums in another order over gloo).
  for ours, theirs in zip(summary['stages'], reference['stages']):
    assert ours['train_metrics']['loss'] == pytest.approx(
        theirs['train_metrics']['loss'], rel=1e-5)
  worst = _assert_close(reference_params,
                        _model_params(os.path.join(workdir, 'model')), 1e-5)
  print(f'2x4 vs 1x8: max |parameter difference| {worst:.3g}')
  assert summary['eval']['top1'] == reference['eval']['top1']
  # Process 0 alone writes metrics: one record per log interval.
  assert len(_records(workdir, 'train')) == len(
      _records(str(tmp_path / 'reference'), 'train'))
  assert len(committed_steps(workdir)) >= 6

  # Kill one process mid-run (the other then fails on its next collective
  # and is stopped), restart both: the run resumes and ends where the
  # uninterrupted one did.
  killed, killed_logs = str(tmp_path / 'killed'), tmp_path / 'killed_logs'
  killed_logs.mkdir()
  jobs = _start(killed, str(killed_logs), overrides)
  deadline = time.time() + 240
  while time.time() < deadline and jobs[1][0].poll() is None:
    steps = committed_steps(killed)
    if steps and steps[-1] >= 6:
      jobs[1][0].kill()
      break
    time.sleep(0.05)
  jobs[0][0].kill()
  _wait(jobs, timeout=60)
  assert 6 <= committed_steps(killed)[-1] < 12
  codes = _wait(_start(killed, str(killed_logs), overrides))
  assert codes == [0, 0], _tail(str(killed_logs))
  _assert_close(_model_params(os.path.join(workdir, 'model')),
                _model_params(os.path.join(killed, 'model')), 0.0)


@pytest.mark.parametrize('flags, message', [
    (['--num_processes=2'], 'also needs --coordinator_address and '
     '--process_id'),
    (['--coordinator_address=localhost:1', '--num_processes=2',
      '--process_id=2'], '--process_id=2 is not in [0, --num_processes=2)'),
])
def test_distributed_flags_are_checked_in_one_line(tmp_path, flags, message):
  result = subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.main', '--distributed',
       f'--workdir={tmp_path}', *flags], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 2
  assert message in result.stderr
  assert len([line for line in result.stderr.splitlines()
              if line.startswith('error:')]) == 1
