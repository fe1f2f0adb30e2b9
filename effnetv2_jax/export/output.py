"""Where an export is written: checked before any work, replaced whole.

Each format writes under a temporary name beside `--output` and the result
is renamed into place when complete, so a failed or interrupted export never
leaves a half-written file where a server would pick it up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from effnetv2_jax.export.serving import ExportError

SAVED_MODEL_FILE = 'saved_model.pb'


def check_output(path: str | os.PathLike, *, directory: bool) -> str:
  """The absolute output path, if an export may be written there.

  Args:
    path: `--output`.
    directory: the format writes a directory (SavedModel), not a file.

  Raises:
    ExportError: the parent folder is missing or not writable, or the path
      holds something the export must not replace (a directory where a
      file goes, or a non-empty directory that is not a SavedModel).
  """
  final = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(final)
  if not os.path.isdir(parent):
    raise ExportError(f'--output {path}: folder {parent} does not exist')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ExportError(f'--output {path}: folder {parent} is not writable')
  if directory:
    if os.path.exists(final) and not os.path.isdir(final):
      raise ExportError(f'--output {path}: exists and is not a directory (a '
                        'SavedModel is a directory)')
    if (os.path.isdir(final) and os.listdir(final) and not os.path.isfile(
        os.path.join(final, SAVED_MODEL_FILE))):
      raise ExportError(f'--output {path}: a non-empty directory that is not '
                        'a SavedModel; not replacing it')
  elif os.path.isdir(final):
    raise ExportError(f'--output {path}: is a directory; name a file')
  return final


@contextlib.contextmanager
def staged(final: str) -> Iterator[str]:
  """Yields a temporary path beside `final`; renames it to `final` when the
  block succeeds, removes it when it fails."""
  parent, name = os.path.split(final)
  staging = os.path.join(parent, f'.{name}.partial-{uuid.uuid4().hex[:8]}')
  try:
    yield staging
    _replace(staging, final)
  finally:
    _remove(staging)


def _replace(staging: str, final: str) -> None:
  if not os.path.isdir(staging):
    os.replace(staging, final)
    return
  if not os.path.exists(final):
    os.rename(staging, final)
    return
  # Keep the old SavedModel until the new one is in place.
  retired = f'{final}.old-{uuid.uuid4().hex[:8]}'
  os.rename(final, retired)
  os.rename(staging, final)
  _remove(retired)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def size_bytes(path: str) -> int:
  """A file's size, or the total of a directory's files."""
  if not os.path.isdir(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)
