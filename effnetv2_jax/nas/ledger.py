"""The search's source of truth: an append-only JSONL ledger of trial events.

One JSON object per line, each with `trial_id` and `status` (`proposed`,
`running`, `completed`, `failed`) and whatever the event adds: the
architecture when proposed, the raw metrics and the reward when completed,
the reason and the log tail when failed. Nothing is rewritten, so a driver
killed at any instant leaves at worst one torn last line, which reading
skips. Appends take an exclusive `flock` and go out in one `write` on an
O_APPEND descriptor, then `fsync`: several writers (a driver and a Ray
searcher, two drivers by mistake) interleave whole lines, never bytes.

Per-trial result files are written atomically (`write_json_atomic`): a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

STATUSES = ('proposed', 'running', 'completed', 'failed')
FINISHED = ('completed', 'failed')


def write_json_atomic(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` through a fsynced temporary file and
  a rename."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any | None:
  """The JSON in `path`, or None if it is missing or unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
  fcntl.flock(fd, fcntl.LOCK_EX)
  try:
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)


class Ledger:
  """Appends events to, and reads them back from, one JSONL file."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def append(self, event: Mapping[str, Any]) -> dict:
    """Adds one event (it must name `trial_id` and a known `status`);
    returns it with its `time`."""
    if 'trial_id' not in event:
      raise ValueError(f'a ledger event needs a trial_id: {dict(event)!r}')
    if event.get('status') not in STATUSES:
      raise ValueError(f'ledger status must be one of {STATUSES}, got '
                       f'{event.get("status")!r}')
    record = dict(event, time=round(time.time(), 3))
    line = json.dumps(record, sort_keys=True, allow_nan=False) + '\n'
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      with _locked(fd):
        if _ends_without_newline(self.path):
          # A writer killed mid-line: start ours on a line of its own.
          line = '\n' + line
        os.write(fd, line.encode('utf-8'))
        os.fsync(fd)
    finally:
      os.close(fd)
    return record

  def events(self) -> list[dict]:
    """Every readable event, in order (a torn line is skipped)."""
    try:
      with open(self.path, encoding='utf-8') as f:
        lines = f.readlines()
    except FileNotFoundError:
      return []
    out = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except ValueError:
        log.warning('%s:%d: skipping an unreadable (torn) line', self.path,
                    number)
    return out


def _ends_without_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def trials(events: list[Mapping[str, Any]]) -> dict[Any, dict]:
  """Each trial's record: its events merged in order (later fields win),
  with `status` its latest status, keyed by trial_id in first-seen
  order."""
  out: dict[Any, dict] = {}
  for event in events:
    out.setdefault(event['trial_id'], {}).update(event)
  return out
