"""Interrupting a training run in this process once it has checkpointed."""

import os
import signal
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
