"""Host memory in transparent huge pages: XLA:CPU train steps 1.1-1.8x faster.

XLA:CPU runs a program on a worker thread and gives it one temporary buffer
per execution: 0.7 GB for B0's train step at 224 px (batch 8), 1.8 GB for S.
glibc serves an allocation that large from a fresh `mmap` and unmaps it when
the step ends, so every step faults in every page again: 178,000 faults of
4 KiB for that B0 step. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >=
2.35) asks the kernel for 2 MiB pages instead: about 500 faults.

Train steps on 2 cores, batch 8, img/s without -> with (two rounds of
`EFFNETV2_HUGEPAGES=0|1 python -m benchmarks.throughput --mode train --impls
ours`; benchmarks/README.md, change 7): S 128 px 6.9-9.3 -> 12.1, 224 px
3.7-3.9 -> 4.2-4.5; B0 128 px 24-29 -> 35-38, 224 px 10.2-10.8 -> 12.8-13.4.
Inference at these sizes hardly faults. timm's B0 224 px train step does not
change (PyTorch's tensors come from glibc's heap, kept between steps: ~0
faults per step).

glibc reads tunables only when a process starts, so the command-line entry
points (`effnetv2_jax.main`, the benchmarks) re-execute themselves once with
the tunable set. `EFFNETV2_HUGEPAGES=0` turns that off. In a process that is
already running (a notebook, a test session), start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to get the same.

Two other routes were measured and rejected: glibc's `M_MMAP_MAX=0` keeps the
buffer only if the step runs on the main thread (JAX's synchronous CPU
dispatch), which made inference up to 1.8x slower; one malloc arena for all
threads (`MALLOC_ARENA_MAX=1`) made train steps over 2x slower.

This module imports nothing beyond the standard library: it runs before JAX.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'EFFNETV2_HUGEPAGES'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)

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


def hugepage_environment(environ: Mapping[str, str],
                         glibc: tuple[int, int] | None,
                         thp_mode: str | None) -> dict[str, str] | None:
  """`environ` with the huge-page tunable added, or None when nothing would
  change: opted out, not glibc >= 2.35, huge pages off in the kernel, or
  `GLIBC_TUNABLES` already names the tunable (the user's value wins)."""
  if environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return None
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


def status(environ: Mapping[str, str] | None = None) -> str:
  """One line for logs and benchmark headers: are huge pages in use?"""
  environ = os.environ if environ is None else environ
  tunables = environ.get('GLIBC_TUNABLES', '')
  if f'{TUNABLE}=1' in tunables.split(':'):
    return f'glibc huge pages ({TUNABLE}=1, kernel THP {kernel_thp_mode()})'
  glibc = glibc_version()
  if glibc is None or glibc < _MIN_GLIBC:
    return 'default allocator (no glibc >= 2.35: no huge-page tunable)'
  return (f'glibc default, 4 KiB pages (start Python with GLIBC_TUNABLES='
          f'{TUNABLE}=1 for faster XLA:CPU train steps)')


def reexec_with_hugepages() -> None:
  """Re-executes this command with the tunable set, when it would apply.

  Call it first thing in a command-line entry point, before JAX or
  TensorFlow start: it does not return when it re-executes (same PID, same
  arguments, same standard streams). Returns where it does not apply.
  """
  # The guard stops a loop should glibc drop the variable on the way.
  argv = getattr(sys, 'orig_argv', None)
  if not argv or os.environ.get('_EFFNETV2_REEXECUTED'):
    return
  env = hugepage_environment(os.environ, glibc_version(), kernel_thp_mode())
  if env is None:
    return
  env['_EFFNETV2_REEXECUTED'] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
  except OSError as e:  # e.g. a sandbox that forbids exec: run as we are
    log.warning('could not re-execute with %s=1 (%s); host memory stays in '
                '4 KiB pages', TUNABLE, e)
