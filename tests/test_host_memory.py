"""effnetv2_jax.host_memory: when the entry points restart with tcmalloc or
huge pages, and that the restarted process really stops faulting."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from effnetv2_jax import host_memory

ROOT = Path(__file__).resolve().parent.parent
GLIBC = (2, 36)
TC = '/opt/lib/libtcmalloc_minimal.so.4'


def _env(environ, tcmalloc=None, glibc=GLIBC, thp='madvise'):
  return host_memory.host_memory_environment(
      environ, tcmalloc=tcmalloc, glibc=glibc, thp_mode=thp)


# ------------------------------------------------------------ huge pages


def test_adds_the_tunable_without_tcmalloc():
  assert _env({'PATH': '/bin'}) == {
      'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_keeps_other_tunables():
  env = _env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, thp='always')
  assert env['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('environ,glibc,thp', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, 'madvise'),
    ({'EFFNETV2_HOST_MEMORY': 'off'}, GLIBC, 'madvise'),
    ({}, (2, 34), 'madvise'),    # the tunable is new in glibc 2.35
    ({}, None, 'madvise'),       # musl, macOS
    ({}, GLIBC, 'never'),
    ({}, GLIBC, None),           # no THP setting (not Linux)
])
def test_leaves_the_process_alone(environ, glibc, thp):
  assert _env(environ, glibc=glibc, thp=thp) is None


# ------------------------------------------------------------ tcmalloc


def test_prefers_tcmalloc_and_quiets_its_large_allocation_report():
  env = _env({'PATH': '/bin'}, tcmalloc=TC)
  assert env['LD_PRELOAD'] == TC
  assert int(env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD']) >= 1 << 40
  assert 'GLIBC_TUNABLES' not in env


def test_tcmalloc_joins_other_preloads_and_keeps_user_settings():
  env = _env({'LD_PRELOAD': '/x/libfoo.so',
              'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': '5'}, tcmalloc=TC)
  assert env['LD_PRELOAD'] == f'{TC}:/x/libfoo.so'
  assert env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == '5'


@pytest.mark.parametrize('preload', [
    '/usr/lib/libjemalloc.so.2', '/usr/lib/libtcmalloc.so.4',
    '/x/libmimalloc.so'])
def test_a_preloaded_allocator_wins(preload):
  assert _env({'LD_PRELOAD': preload}, tcmalloc=TC) is None


def test_mode_hugepages_skips_tcmalloc():
  env = _env({'EFFNETV2_HOST_MEMORY': 'hugepages'}, tcmalloc=TC)
  assert 'LD_PRELOAD' not in env
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


def test_mode_tcmalloc_without_tcmalloc_warns_and_uses_huge_pages(caplog):
  with caplog.at_level(logging.WARNING):
    env = _env({'EFFNETV2_HOST_MEMORY': 'tcmalloc'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert 'libtcmalloc_minimal.so.4' in caplog.text


@pytest.mark.parametrize('value', ['tcmaloc', 'yes', '1'])
def test_unknown_mode_is_an_error(value):
  with pytest.raises(ValueError, match='EFFNETV2_HOST_MEMORY.*auto'):
    _env({'EFFNETV2_HOST_MEMORY': value}, tcmalloc=TC)


def test_entry_point_reports_an_unknown_mode_without_a_traceback():
  env = {k: v for k, v in os.environ.items() if k != '_EFFNETV2_REEXECUTED'}
  env['EFFNETV2_HOST_MEMORY'] = 'tcmaloc'
  proc = subprocess.run(
      [sys.executable, '-c', 'from effnetv2_jax import host_memory; '
       'host_memory.reexec_for_host_memory(); print("ran on")'],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 1 and 'ran on' not in proc.stdout
  assert "EFFNETV2_HOST_MEMORY='tcmaloc'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_find_tcmalloc_takes_the_minimal_library_first(tmp_path):
  first, second = tmp_path / 'a', tmp_path / 'b'
  first.mkdir()
  second.mkdir()
  assert host_memory.find_tcmalloc([str(first), str(second)]) is None
  (first / 'libtcmalloc.so.4').write_bytes(b'')
  (second / 'libtcmalloc_minimal.so.4').write_bytes(b'')
  assert host_memory.find_tcmalloc([str(first), str(second)]) == str(
      second / 'libtcmalloc_minimal.so.4')


def test_status_names_what_is_in_use():
  maps = '7f00-7f01 r-xp 0 08:01 1 /usr/lib/libtcmalloc_minimal.so.4.5.10\n'
  assert host_memory.status({}, maps=maps) == 'tcmalloc (preloaded)'
  huge = host_memory.status({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
                            maps='')
  assert 'huge pages' in huge and 'hugetlb=1' in huge
  plain = host_memory.status({}, maps='')
  assert 'LD_PRELOAD' in plain


def test_original_environment_undoes_the_restart(monkeypatch):
  before = {'PATH': '/bin', 'LD_PRELOAD': '/x/libfoo.so'}
  for key in list(os.environ):
    monkeypatch.delenv(key)
  for key, value in before.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(host_memory, 'find_tcmalloc', lambda: TC)
  monkeypatch.setattr(sys, 'orig_argv', ['python', '-c', 'pass'])
  started = {}
  monkeypatch.setattr(os, 'execve',
                      lambda exe, argv, env: started.update(env))
  host_memory.reexec_for_host_memory()
  assert started['LD_PRELOAD'] == f'{TC}:/x/libfoo.so'
  assert host_memory.original_environment(started) == {
      **before, 'EFFNETV2_HOST_MEMORY': 'off'}


# ------------------------------------------------------------ restart, real


_PROBE = textwrap.dedent('''
    import ctypes, os, resource, threading
    from effnetv2_jax import host_memory
    host_memory.reexec_for_host_memory()
    # A 64 MiB buffer malloc'd, written and freed on a worker thread, twice,
    # as XLA:CPU does with a step's temporaries; count the page faults of
    # the second step.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    def step():
      before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                    - before)
      libc.free(p)
    def two_steps():
      step()
      step()
    t = threading.Thread(target=two_steps)
    t.start()
    t.join()
    print(host_memory.status().split()[0], faults[-1])
''')


def _probe(mode):
  environ = {k: v for k, v in os.environ.items()
             if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', '_EFFNETV2_REEXECUTED')}
  environ['EFFNETV2_HOST_MEMORY'] = mode
  out = subprocess.run(
      [sys.executable, '-c', _PROBE], cwd=ROOT, check=True, text=True,
      stdout=subprocess.PIPE, env=environ).stdout.split()
  return out[0], int(out[1])


def test_restart_stops_the_per_step_faults():
  small_pages = (64 << 20) // os.sysconf('SC_PAGE_SIZE')
  off, off_faults = _probe('off')
  assert off != 'tcmalloc'
  assert off_faults > small_pages // 2      # one fault per 4 KiB page
  checked = 0
  if host_memory.find_tcmalloc():
    name, faults = _probe('tcmalloc')
    assert name == 'tcmalloc'
    assert faults < small_pages // 20, faults   # the buffer is reused
    checked += 1
  if _env({}, glibc=host_memory.glibc_version(),
          thp=host_memory.kernel_thp_mode()) is not None:
    name, faults = _probe('hugepages')
    assert name == 'glibc'
    # 2 MiB pages: 32 faults where the kernel has huge pages free; leave
    # room for some 4 KiB fall-backs on a fragmented machine.
    assert faults < off_faults // 4, (faults, off_faults)
    checked += 1
  if not checked:
    pytest.skip('neither tcmalloc nor glibc >= 2.35 with huge pages here')
