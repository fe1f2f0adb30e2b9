"""Getting a task's programs compiled: the persistent cache and AOT compiles.

  * `compilation_cache_dir` decides which persistent XLA cache a run uses;
    `persistent_cache` switches it on for the run and puts every process-wide
    setting back afterwards.
  * `Compiler` compiles a `TrainTask`'s programs ahead of time, keyed by kind
    and shape, on a background thread, and reports each compile's time,
    memory estimate and whether the persistent cache served it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np

from effnetv2_jax.models import xla_options
from effnetv2_jax.training.config_checks import ConfigError

COMPILATION_CACHE_SUBDIR = 'compilation_cache'

# The process-wide settings a run with a persistent cache changes.
_CACHE_SETTINGS = ('jax_compilation_cache_dir',
                   'jax_persistent_cache_min_compile_time_secs',
                   'jax_persistent_cache_min_entry_size_bytes')


def compilation_cache_dir(configured: str | None, workdir: str,
                          active: str | None = None) -> str | None:
  """The persistent compilation cache a run uses.

  Unset (None): the cache this process already has (`active`, e.g. set
  through `jax.config` in a notebook), else `workdir/compilation_cache` for
  a local workdir, so that a restarted or resumed run loads its stages'
  programs instead of compiling them again. A remote workdir gets none by
  default: JAX's cache then needs a filesystem library there, so name one
  explicitly. '' turns the cache off.
  """
  if configured is not None:
    return configured or None
  if active:
    return active
  if '://' in workdir:
    return None
  return os.path.join(workdir, COMPILATION_CACHE_SUBDIR)


def _reset_cache() -> None:
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.reset_cache()


@contextlib.contextmanager
def persistent_cache(directory: str | None) -> Iterator[None]:
  """Runs the block with `directory` as JAX's persistent cache (None: no
  cache), then restores the process's own settings."""
  saved = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  if directory and '://' not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a mistyped or read-only path: name the key
      raise ConfigError(
          f'config.compilation_cache_dir={directory!r}: cannot create it '
          f'({e.strerror}); name a writable directory, or \'\' for no '
          'cache') from None
  jax.config.update('jax_compilation_cache_dir', directory or None)
  if directory:
    # Small models compile in about a second on CPU; cache every program.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  _reset_cache()  # JAX reads the directory once per process otherwise
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    _reset_cache()


def compile_beside_training(backend: str) -> bool:
  """Whether later stages may compile on a background thread while a stage
  trains (else they compile before its first step).

  Not on a GPU: there the train steps ran several times slower while a
  stage compiled beside them (benchmarks/README.md), likely because XLA's
  convolution autotuner times its candidates on the device that is
  training, which can also make it pick slow kernels. TPU compiles run on
  the host alone, and on CPU the overlap still saves time.
  """
  return backend not in xla_options.GPU_BACKENDS


@dataclasses.dataclass
class Compiled:
  executable: Any
  seconds: float  # the compile's own wall time
  memory: dict[str, int]
  cache_hit: bool  # served by the persistent compilation cache


_CACHE_MISS_EVENT = '/jax/compilation_cache/cache_misses'


class _MissCounter:
  """Counts persistent-cache misses of compiles made on one thread."""

  def __init__(self):
    self._counts: dict[int, int] = {}
    jax.monitoring.register_event_listener(self._listen)

  def _listen(self, event, **kwargs):
    del kwargs
    if event == _CACHE_MISS_EVENT:
      ident = threading.get_ident()
      self._counts[ident] = self._counts.get(ident, 0) + 1

  def take(self) -> int:
    return self._counts.pop(threading.get_ident(), 0)

  def close(self):
    jax.monitoring.unregister_event_listener(self._listen)


class Compiler:
  """Ahead-of-time compiles of a task's programs, in the background.

  Keys are a program kind and its shape (`TrainTask.abstract_args`): the
  gradient step per (batch size, image size), the update step once, the
  eval step per (batch size, eval size). `prefetch` compiles on a background
  thread (XLA compiles outside the GIL) while the state is initialised or a
  stage trains; `get` returns the program, waiting if it is not ready.
  """

  def __init__(self, task, *, cache_enabled: bool):
    self._task = task
    self._cache_enabled = cache_enabled
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='effnetv2-compile')
    self._misses = _MissCounter()

  def _compile(self, key) -> Compiled:
    self._misses.take()
    start = time.time()
    executable = xla_options.compile_lowered(self._task.lower(*key))
    seconds = time.time() - start
    hit = self._cache_enabled and self._misses.take() == 0
    return Compiled(executable, seconds, memory_estimate(executable), hit)

  def prefetch(self, kind: str, *shape: int) -> None:
    key = (kind,) + shape
    if key not in self._futures:
      self._futures[key] = self._pool.submit(self._compile, key)

  def wait_all(self) -> float:
    """Waits for every compile asked for so far; returns seconds waited."""
    start = time.time()
    for future in list(self._futures.values()):
      future.result()
    return time.time() - start

  def get(self, kind: str, *shape: int) -> tuple[Compiled, float]:
    """(compiled program, seconds this call waited for it)."""
    start = time.time()
    self.prefetch(kind, *shape)
    compiled = self._futures[(kind,) + shape].result()
    return compiled, time.time() - start

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)
    self._misses.close()


def memory_estimate(compiled) -> dict[str, int]:
  """Per-device sizes from XLA's memory analysis ({} if unavailable)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if analysis is None:
    return {}
  out = {}
  for name in ('argument_size_in_bytes', 'output_size_in_bytes',
               'temp_size_in_bytes', 'alias_size_in_bytes',
               'generated_code_size_in_bytes'):
    value = getattr(analysis, name, None)
    if value is not None:
      out[name] = int(value)
  return out


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def step_memory(gradient: dict[str, int], update: dict[str, int], *,
                state_bytes: int, batch_bytes: int) -> dict[str, int]:
  """Peak-relevant sizes of a train step's two programs, run one after the
  other, per device.

  The whole state and the batch live through both (XLA's own argument sizes
  leave out what a program does not read: the gradient program never sees
  the optimizer slots or the EMA copy). The gradient program's outputs
  (gradients, statistics) are the update's arguments; the temporaries of
  the two are not live at once, and the update writes the new state over
  the donated one.
  """
  if not gradient or not update:
    return gradient or update
  update_peak = (update.get('output_size_in_bytes', 0) -
                 update.get('alias_size_in_bytes', 0) +
                 update.get('temp_size_in_bytes', 0))
  return {
      'argument_size_in_bytes': state_bytes + batch_bytes,
      'output_size_in_bytes': gradient.get('output_size_in_bytes', 0),
      'temp_size_in_bytes': max(gradient.get('temp_size_in_bytes', 0),
                                update_peak),
      'alias_size_in_bytes': 0,
  }


def format_memory(memory: dict[str, int]) -> str:
  if not memory:
    return 'unavailable'
  total = (memory.get('argument_size_in_bytes', 0) +
           memory.get('output_size_in_bytes', 0) +
           memory.get('temp_size_in_bytes', 0) -
           memory.get('alias_size_in_bytes', 0))
  return (f'{total / 2**20:,.1f} MiB per device (temporaries '
          f'{memory.get("temp_size_in_bytes", 0) / 2**20:,.1f} MiB)')
