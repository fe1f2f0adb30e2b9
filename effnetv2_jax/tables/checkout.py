"""What the tables read from the source checkout beside the package.

The experiment configs they tabulate live in `configs/` and the trainer's
timed step in `benchmarks/workloads.py`, neither of which is part of the
installed package: the tables run from a clone (`pip install -e .`).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _require(path: Path) -> Path:
  if not path.exists():
    raise FileNotFoundError(
        f'{path} not found: these tables read the configs/ and benchmarks/ '
        'of a source checkout (git clone, then pip install -e .)')
  return path


@functools.cache
def _config_module(file_name: str):
  path = _require(ROOT / 'configs' / file_name)
  spec = importlib.util.spec_from_file_location(
      f'effnetv2_configs_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(file_name: str, arg: str):
  """configs/<file_name>'s get_config(arg): what `--config=configs/
  <file_name>:<arg>` gives the trainer."""
  return _config_module(file_name).get_config(arg)


def benchmarks():
  """(harness, workloads) of benchmarks/: the timing and the trainer's step
  that the benchmark scripts use."""
  _require(ROOT / 'benchmarks' / 'workloads.py')
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  # After the path: benchmarks/ is the checkout's, not an installed package.
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from benchmarks import workloads  # pylint: disable=g-import-not-at-top
  return harness, workloads
