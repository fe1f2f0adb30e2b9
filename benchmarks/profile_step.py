"""Where one train step (or inference) spends its time, per kernel or op.

Builds the trainer's task (benchmarks/workloads.py), splits the compile of
each of its programs (a train step: gradient, then update; inference: the
eval program) into trace / lower / compile, times steady-state steps, then
profiles a few with jax.profiler and sums the device time per kernel (GPU)
or per XLA op (CPU), grouped by name prefix (XLA's fusion kinds,
cuDNN/cuBLAS kernels). This is the tool behind the GPU
investigation in benchmarks/README.md; each flag set is a fresh process, so
compare flags by running it once per set:

  python -m benchmarks.profile_step --variant s --size 300 --batch 128
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m benchmarks.profile_step
  python -m benchmarks.profile_step --mode infer --conv-impl shifted

The table of the top kernels goes to stdout and to --out (a text file).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ''):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402


def parse_args(argv=None):
  parser = harness.base_parser(__doc__.splitlines()[0])
  parser.add_argument('--conv-impl', default='auto',
                      choices=('auto', 'xla', 'shifted', 'onednn'))
  parser.add_argument('--profile-steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=30)
  parser.add_argument('--out', default=None, help='also write the summary here')
  parser.add_argument('--default-xla-options', action='store_true',
                      help="compile with XLA's defaults instead of "
                           'effnetv2_jax.models.xla_options')
  parser.add_argument('--dump-hlo', default=None,
                      help='write the optimised HLO here, to look up the '
                           'ops the summary names')
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache (default: none)')
  args = parser.parse_args(argv)
  if args.quick:
    args.variant = args.variant or ['micro']
    args.size = args.size or [32]
    args.batch = args.batch or 2
    args.profile_steps = 2
    args.repeats = args.repeats or 2
  return args


def _device_events(trace_dir: str):
  """(name, start_us, duration_us) of every device-side event in a trace."""
  path = sorted(glob.glob(trace_dir + '/**/*.trace.json.gz', recursive=True))[-1]
  events = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  gpu = {pid for pid, name in names.items() if 'gpu' in name.lower()}
  if gpu:
    keep = lambda e: e.get('pid') in gpu  # noqa: E731
  else:  # XLA:CPU: the thunks' trace events, named after the HLO ops
    keep = lambda e: re.fullmatch(  # noqa: E731
        r'[a-z][a-z0-9_\-]*(\.\d+)?', e['name']) is not None
  return [(e['name'], e['ts'], e['dur']) for e in events
          if e.get('ph') == 'X' and keep(e)], bool(gpu)


def summarize_trace(trace_dir: str, steps: int, top: int) -> str:
  events, on_gpu = _device_events(trace_dir)
  total = collections.Counter()
  count = collections.Counter()
  for name, _, dur in events:
    total[name] += dur
    count[name] += 1
  spans = sorted((t, t + d) for _, t, d in events)
  busy, current = 0.0, None
  for start, end in spans:
    if current is None or start > current[1]:
      if current:
        busy += current[1] - current[0]
      current = [start, end]
    else:
      current[1] = max(current[1], end)
  if current:
    busy += current[1] - current[0]
  prefix = collections.Counter()
  for name, dur in total.items():
    key = re.sub(r'[_.]?\d+$', '', name.split('(')[0].split('<')[0][:40])
    prefix[key] += dur
  what = 'kernels' if on_gpu else 'ops'
  lines = [f'{what}/step {len(events) / steps:.0f}, device busy/step '
           f'{busy / steps / 1e3:.2f} ms, summed {sum(total.values()) / steps / 1e3:.2f} ms',
           '', f'by name prefix (ms/step):']
  lines += [f'{v / steps / 1e3:9.3f}  {k}' for k, v in prefix.most_common(top)]
  lines += ['', f'top {what} (ms/step, calls/step):']
  lines += [f'{v / steps / 1e3:9.3f}  {count[k] // steps:5d}x  {k[:120]}'
            for k, v in total.most_common(top)]
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  harness.setup_process(args.threads)
  import jax
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
  from benchmarks import macs, workloads
  from effnetv2_jax.models import xla_options
  backend = jax.default_backend()
  dtype = workloads.resolve_dtype(args.dtype, backend)
  variant = (args.variant or ['s'])[0]
  size = (args.size or [300])[0]
  batch = args.batch or (8 if backend == 'cpu' else 128)
  mode = (args.mode or ['train'])[0]
  architecture = workloads.architecture_for(variant)

  start = time.perf_counter()
  task = workloads.train_task(architecture, dtype=dtype,
                              conv_impl=args.conv_impl)
  state = task.init_sharded()
  t_build = time.perf_counter() - start
  # The trainer's programs: gradient then update for a train step, the
  # eval program for inference.
  programs = ([('gradient', (batch, size)), ('update', ())]
              if mode == 'train' else [('eval', (batch, size))])
  compiled, phases = {}, []
  for kind, shape in programs:
    t0 = time.perf_counter()
    traced = task.jitted(kind).trace(*task.abstract_args(kind, *shape))
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled[kind] = (lowered.compile() if args.default_xla_options
                      else xla_options.compile_lowered(lowered))
    t3 = time.perf_counter()
    phases.append(f'{kind}: trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, '
                  f'compile {t3 - t2:.1f} s')
  if args.dump_hlo:
    Path(args.dump_hlo).write_text('\n\n'.join(
        f'// {kind} program\n{c.as_text()}' for kind, c in compiled.items()))
  data = workloads.synthetic_batch(task, batch, size,
                                   with_mask=mode != 'train')
  if mode == 'train':
    hparams = workloads.stage_hparams(
        task, batch, dropout_rate=architecture.dropout_rate)
    train = workloads.train_step(compiled['gradient'], compiled['update'])
    holder = [state]

    def step():
      holder[0], metrics = train(holder[0], data, hparams)
      return metrics
  else:
    params, stats = state.params, state.batch_stats

    def step():
      return compiled['eval'](params, stats, data)
  del state

  for _ in range(3):
    jax.block_until_ready(step())
  per_sample = 1 if backend == 'cpu' else 10
  times = []
  for _ in range(args.repeats or 5):
    s = time.perf_counter()
    for _ in range(per_sample):
      out = step()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - s) / per_sample)
  median = statistics.median(times)
  flops = (macs.train_flops(architecture, size) if mode == 'train'
           else macs.inference_flops(architecture, size))
  peak = workloads.measure_matmul_peak(dtype)
  head = (f'{variant} {mode} {size}px batch {batch} {dtype} on '
          f'{jax.devices()[0].device_kind}, conv_impl {args.conv_impl}, '
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, compiler options "
          f"{'XLA defaults' if args.default_xla_options else xla_options.compiler_options()}\n"
          f'build and init {t_build:.1f} s; {"; ".join(phases)}\n'
          f'step {1e3 * median:.2f} ms (min {1e3 * min(times):.2f}, max '
          f'{1e3 * max(times):.2f}), {batch / median:,.0f} img/s')
  if peak:
    head += (f', MFU {100 * flops * batch / median / peak:.1f}% of '
             f'{peak / 1e12:.3g} TFLOP/s {dtype} matmul')
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.profile_steps):
      out = step()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    summary = summarize_trace(trace_dir, args.profile_steps, args.top)
  text = head + '\n\n' + summary
  print(text, flush=True)
  if args.out:
    Path(args.out).write_text(text + '\n')


if __name__ == '__main__':
  harness.reexec_for_host_memory()
  main()
