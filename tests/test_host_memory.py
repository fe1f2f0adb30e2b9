"""effnetv2_jax.host_memory: when the entry points restart with huge pages,
and that the restarted process really gets them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from effnetv2_jax import host_memory

ROOT = Path(__file__).resolve().parent.parent
GLIBC = (2, 36)


def test_adds_the_tunable():
  env = host_memory.hugepage_environment({'PATH': '/bin'}, GLIBC, 'madvise')
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_keeps_other_tunables():
  env = host_memory.hugepage_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, GLIBC, 'always')
  assert env['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('environ,glibc,thp', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, 'madvise'),
    ({'EFFNETV2_HUGEPAGES': '0'}, GLIBC, 'madvise'),
    ({'EFFNETV2_HUGEPAGES': 'off'}, GLIBC, 'madvise'),
    ({}, (2, 34), 'madvise'),    # the tunable is new in glibc 2.35
    ({}, None, 'madvise'),       # musl, macOS
    ({}, GLIBC, 'never'),
    ({}, GLIBC, None),           # no THP setting (not Linux)
])
def test_leaves_the_process_alone(environ, glibc, thp):
  assert host_memory.hugepage_environment(environ, glibc, thp) is None


def test_status_names_the_setting():
  on = host_memory.status({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})
  off = host_memory.status({})
  assert 'huge pages' in on and 'hugetlb=1' in on
  assert '4 KiB' in off and 'GLIBC_TUNABLES' in off


_PROBE = textwrap.dedent('''
    import ctypes, os, resource, threading
    from effnetv2_jax import host_memory
    host_memory.reexec_with_hugepages()
    # A 64 MiB buffer malloc'd and written on a worker thread, as XLA:CPU
    # does with a step's temporaries; count the page faults it costs.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    def touch():
      before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                    - before)
      libc.free(p)
    t = threading.Thread(target=touch)
    t.start()
    t.join()
    print(os.environ.get('GLIBC_TUNABLES', ''), faults[0])
''')


def _probe(**env):
  out = subprocess.run(
      [sys.executable, '-c', _PROBE], cwd=ROOT, check=True, text=True,
      stdout=subprocess.PIPE, env={**os.environ, **env}).stdout.split()
  tunables = out[0] if len(out) == 2 else ''
  return tunables, int(out[-1])


def test_restart_gives_huge_pages():
  environ = {k: v for k, v in os.environ.items()
             if k not in ('GLIBC_TUNABLES', '_EFFNETV2_REEXECUTED')}
  if host_memory.hugepage_environment(
      environ, host_memory.glibc_version(),
      host_memory.kernel_thp_mode()) is None:
    pytest.skip('no glibc >= 2.35 with transparent huge pages here')
  small_pages = (64 << 20) // os.sysconf('SC_PAGE_SIZE')
  off, off_faults = _probe(EFFNETV2_HUGEPAGES='0', GLIBC_TUNABLES='')
  on, on_faults = _probe(EFFNETV2_HUGEPAGES='1', GLIBC_TUNABLES='')
  assert 'glibc.malloc.hugetlb=1' not in off
  assert 'glibc.malloc.hugetlb=1' in on
  assert off_faults > small_pages // 2      # one fault per 4 KiB page
  # 2 MiB pages: 32 faults where the kernel has huge pages free; leave room
  # for some 4 KiB fall-backs on a fragmented machine.
  assert on_faults < off_faults // 4, (on_faults, off_faults)
