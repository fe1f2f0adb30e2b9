"""Interrupting a training run (in this process, or a `main` subprocess)
once it has checkpointed."""

import os
import signal
import subprocess
import sys
import threading
import time


def committed_steps(workdir):
  """Checkpoint steps orbax has committed (it writes into a temporary name
  and renames it to the step number)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def when_checkpoint(workdir, after_step, action, is_running, timeout=300):
  """Calls `action()` once a checkpoint at or after `after_step` exists."""
  deadline = time.time() + timeout
  while time.time() < deadline and is_running():
    steps = committed_steps(workdir)
    if steps and steps[-1] >= after_step:
      action()
      return True
    time.sleep(0.02)
  return False


def run_and_signal(train, workdir, after_step, signum=signal.SIGTERM):
  """`train()`, with `signum` sent to this process once `workdir` holds a
  checkpoint at or after `after_step`; -> what `train()` returned."""
  running = threading.Event()
  running.set()
  watcher = threading.Thread(target=when_checkpoint, args=(
      workdir, after_step, lambda: os.kill(os.getpid(), signum),
      running.is_set))
  watcher.start()
  try:
    return train()
  finally:
    running.clear()
    watcher.join()


def main_killed_after_checkpoint(main_args, workdir, after_step, log_path,
                                 cwd):
  """Runs `python -m effnetv2_jax.main *main_args` and SIGKILLs it once
  `workdir` holds a checkpoint at or after `after_step`; -> whether it was
  killed (its output is in `log_path`)."""
  with open(log_path, 'w') as log:
    job = subprocess.Popen(
        [sys.executable, '-m', 'effnetv2_jax.main', *main_args], cwd=cwd,
        stdout=log, stderr=subprocess.STDOUT)
  killed = when_checkpoint(workdir, after_step, job.kill,
                           lambda: job.poll() is None)
  job.wait(timeout=60)
  return killed
