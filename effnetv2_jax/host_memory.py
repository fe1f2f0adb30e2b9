"""Host memory for XLA:CPU: a caching malloc, else huge pages.

XLA:CPU runs a program on a worker thread and gives it one temporary buffer
per execution: 0.7 GB for B0's train step at 224 px (batch 8), 1.8 GB for S.
glibc serves an allocation that large from a fresh `mmap` and unmaps it when
the step ends, so every step the kernel maps, zeroes and unmaps every page
again: 178,000 faults of 4 KiB for that B0 step, and 0.8-1.2 s of system CPU
time per S 224 px step.

Two remedies, the first found wins:
1. **tcmalloc** (`libtcmalloc_minimal.so.4` or `libtcmalloc.so.4`; Debian and
   Ubuntu: `apt install libtcmalloc-minimal4`) keeps freed memory for the
   next step: ~0 faults and no zeroing, so S 224 px train steps run 1.4x
   faster than with huge pages alone (system CPU time per step tens of
   milliseconds instead of about a second; benchmarks/README.md, "tcmalloc").
2. **glibc huge pages**: the tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35)
   asks for 2 MiB pages, about 500 faults per B0 step, but the kernel still
   zeroes every page each step. Still 1.1-1.8x the train images/s of glibc's
   defaults (benchmarks/README.md, "Host memory in huge pages").

Both act only when a process starts (the dynamic loader reads `LD_PRELOAD`,
glibc its tunables), so the command-line entry points (`effnetv2_jax.main`,
the benchmarks) re-execute themselves once with them set.
`EFFNETV2_HOST_MEMORY` picks: `auto` (default: tcmalloc if found, else huge
pages), `tcmalloc`, `hugepages` or `off`. An allocator the user already
preloads is left alone. In a process that is already running (a notebook, a
test session), start Python with `LD_PRELOAD=<path to tcmalloc>` instead.

Rejected (measurements in benchmarks/README.md): glibc's `M_MMAP_MAX=0` keeps
the buffer only if the step runs on the main thread (JAX's synchronous CPU
dispatch), which made inference up to 1.8x slower; one malloc arena for all
threads (`glibc.malloc.arena_max=1`, with `mmap_max=0`) removed the faults
but cost more user time than it saved (B0 224 px train steps 1.5x slower);
jemalloc 5.3 with its defaults returns buffers this large to the kernel at
once, so it faults as often as glibc.

This module imports nothing beyond the standard library: it runs before JAX.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Iterable, Mapping

MODE_VARIABLE = 'EFFNETV2_HOST_MEMORY'
MODES = ('auto', 'tcmalloc', 'hugepages', 'off')
TUNABLE = 'glibc.malloc.hugetlb'
TCMALLOC_NAMES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
# Where distributions put shared libraries; LD_PRELOAD wants a path.
LIBRARY_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu',
                '/usr/lib64', '/usr/lib', '/usr/local/lib',
                '/lib/x86_64-linux-gnu', '/lib/aarch64-linux-gnu', '/lib64')
# malloc replacements a user may preload already; theirs wins.
_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')
# tcmalloc prints a line for every allocation above 1 GiB by default; S's
# step buffer is 1.8 GB.
_TCMALLOC_REPORT = 'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)
_GUARD = '_EFFNETV2_REEXECUTED'
# The values the restart replaced, as JSON, for `original_environment`.
_BEFORE = '_EFFNETV2_HOST_MEMORY_BEFORE'

log = logging.getLogger(__name__)


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library, or None if it is not glibc."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != 'glibc':
    return None
  try:
    major, minor = version.split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def kernel_thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'),
  or None where there is no such setting (not Linux)."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  for word in text.split():
    if word.startswith('[') and word.endswith(']'):
      return word[1:-1]
  return None


def find_tcmalloc(dirs: Iterable[str] = LIBRARY_DIRS) -> str | None:
  """Path of the first tcmalloc library in `dirs`, or None."""
  for name in TCMALLOC_NAMES:
    for directory in dirs:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def requested_mode(environ: Mapping[str, str]) -> str:
  """`EFFNETV2_HOST_MEMORY`, checked; a typo fails here, loudly, rather than
  silently measuring something else."""
  mode = environ.get(MODE_VARIABLE, 'auto').strip().lower() or 'auto'
  if mode not in MODES:
    raise ValueError(f'{MODE_VARIABLE}={environ[MODE_VARIABLE]!r}: expected '
                     f'one of {", ".join(MODES)}')
  return mode


def host_memory_environment(environ: Mapping[str, str], *,
                            tcmalloc: str | None,
                            glibc: tuple[int, int] | None,
                            thp_mode: str | None) -> dict[str, str] | None:
  """`environ` with tcmalloc preloaded or glibc's huge-page tunable added, or
  None when nothing would change.

  Nothing changes when: the mode is `off`; `LD_PRELOAD` already names a
  malloc replacement; or no remedy applies (no tcmalloc for `tcmalloc`; not
  glibc >= 2.35 with transparent huge pages, or `GLIBC_TUNABLES` already
  naming the tunable, for `hugepages`). `tcmalloc` asked for but not found
  falls back to huge pages, with a warning.
  """
  mode = requested_mode(environ)
  if mode == 'off':
    return None
  preload = environ.get('LD_PRELOAD', '')
  if any(name in preload for name in _ALLOCATORS):
    return None
  if mode in ('auto', 'tcmalloc'):
    if tcmalloc:
      env = dict(environ)
      env['LD_PRELOAD'] = ':'.join(filter(None, [tcmalloc, preload]))
      env.setdefault(_TCMALLOC_REPORT, str(1 << 40))
      return env
    if mode == 'tcmalloc':
      log.warning('%s=tcmalloc, but none of %s is in %s; trying huge pages',
                  MODE_VARIABLE, ', '.join(TCMALLOC_NAMES),
                  ', '.join(LIBRARY_DIRS))
  if glibc is None or glibc < _MIN_GLIBC:
    return None
  if thp_mode not in ('always', 'madvise'):
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  names = [item.split('=')[0] for item in current.split(':') if item]
  if TUNABLE in names:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, [current, f'{TUNABLE}=1']))
  return env


def loaded_allocator(maps: str | None = None) -> str | None:
  """The malloc replacement mapped into this process ('tcmalloc', ...), read
  from /proc/self/maps (or `maps`), or None."""
  if maps is None:
    try:
      with open('/proc/self/maps') as f:
        maps = f.read()
    except OSError:
      return None
  for name in _ALLOCATORS:
    if f'lib{name}' in maps:
      return name
  return None


def status(environ: Mapping[str, str] | None = None,
           maps: str | None = None) -> str:
  """One line for logs and benchmark headers: how this process allocates."""
  environ = os.environ if environ is None else environ
  allocator = loaded_allocator(maps)
  if allocator:
    return f'{allocator} (preloaded)'
  tunables = environ.get('GLIBC_TUNABLES', '')
  if f'{TUNABLE}=1' in tunables.split(':'):
    return f'glibc huge pages ({TUNABLE}=1, kernel THP {kernel_thp_mode()})'
  hint = (f'for faster XLA:CPU train steps start Python with LD_PRELOAD='
          f'<{TCMALLOC_NAMES[0]}>')
  glibc = glibc_version()
  if glibc is None or glibc < _MIN_GLIBC:
    return f'default allocator ({hint})'
  return f'glibc default, 4 KiB pages ({hint} or GLIBC_TUNABLES={TUNABLE}=1)'


def original_environment(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` as it was before `reexec_for_host_memory` changed it, with
  `EFFNETV2_HOST_MEMORY=off` so that a child started with it stays that way
  (the benchmarks run the reference implementations so, on request)."""
  env = dict(environ)
  before = json.loads(env.pop(_BEFORE, '{}'))
  env.pop(_GUARD, None)
  for key, value in before.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  env[MODE_VARIABLE] = 'off'
  return env


def reexec_for_host_memory() -> None:
  """Re-executes this command with tcmalloc or huge pages, when one applies.

  Call it first thing in a command-line entry point, before JAX or
  TensorFlow start: it does not return when it re-executes (same PID, same
  arguments, same standard streams). Returns where nothing applies. An
  unknown `EFFNETV2_HOST_MEMORY` ends the command with a one-line error.
  """
  # The guard stops a loop should the loader or glibc drop the variables.
  argv = getattr(sys, 'orig_argv', None)
  if not argv or os.environ.get(_GUARD):
    return
  try:
    env = host_memory_environment(
        os.environ, tcmalloc=find_tcmalloc(), glibc=glibc_version(),
        thp_mode=kernel_thp_mode())
  except ValueError as e:  # a user's typo: say so, without a traceback
    sys.exit(f'error: {e}')
  if env is None:
    return
  env[_BEFORE] = json.dumps({key: os.environ.get(key) for key in env
                             if env[key] != os.environ.get(key)})
  env[_GUARD] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
  except OSError as e:  # e.g. a sandbox that forbids exec: run as we are
    log.warning('could not re-execute for faster host memory (%s); '
                'continuing with the default allocator', e)
