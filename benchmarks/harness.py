"""What every benchmark script shares: flags, threads, timing, tables, RESULTS.md.

Nothing heavy is imported at module level: a script parses its flags and pins
its threads (`setup_process`) before jax, torch or tensorflow start, because
XLA and the torch/TF thread pools size themselves once, at start-up.

Timing rules, for every script: each implementation is built and warmed up
(compiles and autotuning happen there), then timed for `repeats` samples,
each implementation alone (throughput.py gives each its own process). A sample
runs `steps_per_sample` steps and waits for the last to finish. Measure on an
idle machine: the environment block records the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().with_name('RESULTS.md')


def base_parser(description: str) -> argparse.ArgumentParser:
  """Flags shared by the scripts; each script adds its own."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--variant', nargs='+', default=None,
                      help='model variants (s, m, l, xl, b0-b3)')
  parser.add_argument('--size', nargs='+', type=int, default=None,
                      help='image sizes in pixels')
  parser.add_argument('--batch', type=int, default=None, help='batch size')
  parser.add_argument('--mode', nargs='+', choices=('train', 'infer'),
                      default=None, help='train step, inference, or both')
  parser.add_argument('--dtype', choices=('auto', 'float32', 'bfloat16'),
                      default='auto',
                      help='compute dtype; auto = bfloat16 on GPU/TPU, '
                           'float32 on CPU')
  parser.add_argument('--threads', type=int, default=None,
                      help='CPU threads for XLA, torch and TF alike '
                           '(default: every core this process may use)')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed samples per implementation')
  parser.add_argument('--quick', action='store_true',
                      help='smallest settings, to check the script runs '
                           '(numbers meaningless; RESULTS.md untouched)')
  parser.add_argument('--json', action='store_true',
                      help='print the result rows as JSON lines at the end')
  parser.add_argument('--results', default=None,
                      help=f'markdown log to append to (default '
                           f'{RESULTS_PATH.relative_to(REPO_ROOT)}; '
                           f'--quick writes none unless given)')
  parser.add_argument('--no-results', action='store_true',
                      help='append nothing to a results file')
  return parser


def results_path(args) -> Path | None:
  if args.no_results:
    return None
  if args.results:
    return Path(args.results)
  return None if args.quick else RESULTS_PATH


def reexec_for_host_memory() -> None:
  """For a script's `__main__` block only (never a library call: it replaces
  the process): restart once with tcmalloc or huge pages, as
  `effnetv2_jax.main` does, so the scripts time what the trainer runs. Every
  implementation, timm and Keras included, then runs in that environment;
  `EFFNETV2_HOST_MEMORY=off` measures without."""
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  from effnetv2_jax import host_memory
  host_memory.reexec_for_host_memory()


def setup_process(threads: int | None) -> int:
  """Pins this process to `threads` cores, before any framework starts.

  XLA:CPU sizes its pool from the cores the process may run on, and torch
  and TF are told the same number, so every implementation gets the same
  threads. Returns the thread count.
  """
  cores = sorted(os.sched_getaffinity(0))
  if threads:
    if threads > len(cores):
      raise SystemExit(f'--threads {threads}: only {len(cores)} cores usable')
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  n = len(cores)
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'TF_NUM_INTRAOP_THREADS'):
    os.environ.setdefault(var, str(n))
  # OMP_WAIT_POLICY is left alone: PASSIVE OpenMP workers cost timm 2-3.5x
  # on 2 cores, so frameworks are timed in separate processes instead
  # (throughput.py) and each keeps the threading its users get.
  # Two frameworks share one GPU: JAX must not grab 75% of it up front.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  # The model's programs get the GPU options per compilation, as in the
  # trainer; as XLA_FLAGS they also cover the scripts' other programs (the
  # matmul peak). XLA:CPU ignores them; a flag already named there wins.
  # (XLA reads XLA_FLAGS when its backend starts, not at import.)
  from effnetv2_jax.models import xla_options
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{name}={str(value).lower()}'
           for name, value in xla_options.GPU_OPTIONS.items()
           if f'--{name}' not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags] + extra).strip()
  return n


# --------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Runner:
  """One implementation ready to time: `step()` runs one step, unsynced;
  `sync()` waits for the device; `close()` frees its memory."""

  name: str
  step: Callable[[], object]
  sync: Callable[[object], None]
  close: Callable[[], None] = lambda: None
  # Seconds of an ahead-of-time compile done while building (ours), so that
  # the first step's own cost (program load and library set-up) shows apart.
  compile_s: float | None = None


def _sample(runner: Runner, steps: int) -> float:
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = runner.step()
  runner.sync(out)
  return time.perf_counter() - start


def warm_up(runner: Runner, steps: int) -> float:
  """Runs `steps` steps; returns the seconds of the first (compile + run)."""
  first = _sample(runner, 1)
  for _ in range(steps - 1):
    _sample(runner, 1)
  return first


def time_runner(runner: Runner, *, warmup: int, repeats: int,
                steps_per_sample: int) -> dict:
  """Seconds per step: {'samples': [...], 'first_step_s': x}, where x is
  compile + first step; with 'compile_s' and 'first_run_s' apart when the
  runner compiled ahead of time. Then closes the runner."""
  first = warm_up(runner, warmup)
  samples = [_sample(runner, steps_per_sample) / steps_per_sample
             for _ in range(repeats)]
  runner.close()
  gc.collect()
  if runner.compile_s is None:
    return {'first_step_s': first, 'samples': samples}
  return {'first_step_s': runner.compile_s + first,
          'compile_s': runner.compile_s, 'first_run_s': first,
          'samples': samples}


def summarize(seconds: Sequence[float], batch: int) -> dict:
  """Median images/s and its spread (min and max over the samples)."""
  med = statistics.median(seconds)
  return {
      'img_s_median': batch / med,
      'img_s_min': batch / max(seconds),
      'img_s_max': batch / min(seconds),
      'step_ms_median': 1e3 * med,
      'samples': len(seconds),
  }


# --------------------------------------------------------------------------
# Environment.


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_state() -> str:
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--',
                            'effnetv2_jax', 'benchmarks'],
                           cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return (head or 'no commit') + (' + local changes' if dirty else '')


def environment(threads: int) -> dict:
  """Versions, devices, threads and load: printed above every table."""
  from effnetv2_jax import host_memory
  env = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'python': platform.python_version(),
      'cpu': f'{_cpu_model()}, {os.cpu_count()} cores, {threads} used',
      'load_avg_1min': round(os.getloadavg()[0], 2),
      'code': _git_state(),
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'host_memory': host_memory.status(),
  }
  for dist in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'timm', 'keras',
               'tensorflow', 'tensorflow-cpu'):
    v = _version(dist)
    if v:
      env[dist] = v
  if 'jax' in sys.modules:
    import jax
    devs = jax.devices()
    env['jax_devices'] = f'{len(devs)} x {devs[0].device_kind}'
    from effnetv2_jax import kernels
    env['ours_conv_impl_auto'] = kernels.describe_conv_impl('auto')
  if 'torch' in sys.modules:
    import torch
    env['torch_threads'] = torch.get_num_threads()
    if torch.cuda.is_available():
      env['torch_device'] = torch.cuda.get_device_name(0)
  return env


def format_environment(env: dict) -> str:
  return '\n'.join(f'- {k}: {v}' for k, v in env.items())


# --------------------------------------------------------------------------
# Tables and the results log.


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]
                   ) -> str:
  """`columns` holds (key, header) pairs; floats are printed to 3 figures."""
  def fmt(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.3g}' if abs(v) < 1000 else f'{v:,.0f}'
    return str(v)
  lines = ['| ' + ' | '.join(h for _, h in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(fmt(row.get(k)) for k, _ in columns)
                 + ' |')
  return '\n'.join(lines)


def command_line() -> str:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None:
    return ' '.join(['python', '-m', spec.name] + sys.argv[1:])
  script = Path(sys.argv[0])
  try:
    script = script.resolve().relative_to(REPO_ROOT)
  except ValueError:
    pass
  return ' '.join(['python', str(script)] + sys.argv[1:])


def report(title: str, env: dict, table: str, args, rows: list[dict],
           notes: str = '') -> None:
  """Prints the environment and table; appends both, dated, to RESULTS.md."""
  text = (f'## {title} ({env["date"]})\n\n`{command_line()}`\n\n'
          f'{format_environment(env)}\n\n{table}\n')
  if notes:
    text += f'\n{notes}\n'
  # With --json, stdout carries only the JSON rows.
  out = sys.stderr if args.json else sys.stdout
  print('\n' + text, file=out, flush=True)
  path = results_path(args)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, 'a') as f:
      if new:
        f.write('# Benchmark results\n\nAppended by the scripts in '
                'benchmarks/, newest last. Each entry names the command and '
                'the machine.\n\n')
      f.write(text + '\n')
    print(f'appended to {path}', file=out, flush=True)
  if args.json:
    for row in rows:
      print(json.dumps(row, sort_keys=True), flush=True)


def eprint(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


class WorkerFailed(RuntimeError):
  """A worker process ran past its time limit, exited non-zero, or printed no
  result. The message is one line; the worker's own stderr, already on the
  terminal, says why."""


def run_worker(module: str, argv: Sequence[str], *, mark: str, what: str,
               timeout: float | None = None, env: dict | None = None
               ) -> tuple[list, float]:
  """Runs `python -m module argv` from the repository root and returns the
  JSON payloads of its stdout lines that start with `mark`, and its wall time.

  Scripts measure in a fresh process so that each measurement starts with
  empty compile caches and thread pools of its own. The worker's stderr
  passes straight through, so a run cut short still shows the progress lines
  it printed; stdout is kept for the results.
  """
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, '-m', module, *argv],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    raise WorkerFailed(f'{what} ran past its {timeout:g} s limit; what it '
                       'finished is printed above') from None
  wall = time.perf_counter() - start
  payloads = [json.loads(line[len(mark):]) for line in proc.stdout.splitlines()
              if line.startswith(mark)]
  if proc.returncode != 0 or not payloads:
    raise WorkerFailed(f'{what} failed (exit {proc.returncode}); its output '
                       'is above')
  return payloads, wall
