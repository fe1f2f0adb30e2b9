"""Train-step and inference images/s: ours against timm and keras, side by side.

For each (variant, image size, mode) every implementation runs the same batch,
image size, compute dtype and thread count, after warm-up (compiles and
autotuning excluded), each in a fresh process of its own so that it has the
cores to itself with its framework's default threading, and the table gives median images/s, the spread over
the timed samples, and ours / theirs (with `--rounds N`, the median of N
ratios each measured within one round). It also gives model FLOP
utilisation: FLOPs from the architecture (benchmarks/macs.py; 6 x MACs per
trained image, 2 x per inferred one) over a matmul's measured FLOP/s in the
compute dtype (bf16 on a GPU, f32 on a CPU, where it shows how close both
frameworks run to what the cores can do).

  python -m benchmarks.throughput                      # S and B0, 128/224/300
  python -m benchmarks.throughput --variant s --size 300 --batch 128 --mode train
  python -m benchmarks.throughput --quick --json       # seconds; rows as JSON

Implementations (--impls): ours (the trainer's step: its `TrainTask`'s
gradient and update programs, and its eval program for inference;
conv_impl='auto'; benchmarks/workloads.py), ours-xla and ours-shifted (ours
with conv_impl='xla' or 'shifted': on CPU, the forms without the oneDNN
convolutions), timm (tf_efficientnetv2_*, eager, channels_last, with timm's
EMA in the train step), timm-compile (the same under torch.compile),
timm-native (timm's PyTorch-padding efficientnetv2_*, where it exists) and
keras (keras.applications, inference only). References that are not
installed are listed as unavailable, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a file: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from effnetv2_jax import host_memory  # noqa: E402

DEFAULT_IMPLS = ('ours', 'timm', 'timm-compile', 'keras')
OURS = {'ours': 'auto', 'ours-xla': 'xla', 'ours-shifted': 'shifted'}
ALL_IMPLS = (*OURS, 'timm', 'timm-compile', 'timm-native', 'keras')


def parse_args(argv=None):
  parser = harness.base_parser(__doc__.splitlines()[0])
  parser.add_argument('--impls', nargs='+', choices=ALL_IMPLS, default=None,
                      help=f'implementations (default {" ".join(DEFAULT_IMPLS)})')
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed steps first (the first one compiles)')
  parser.add_argument('--same-process', action='store_true',
                      help='time every implementation in this process '
                           '(default: each in a fresh process of its own)')
  parser.add_argument('--reference-memory', choices=('same', 'stock'),
                      default='same',
                      help='host allocator of the reference implementations: '
                           'same = the tcmalloc / huge pages ours restarts '
                           'with (default); stock = the environment as it '
                           'was before that restart, as their users run them')
  parser.add_argument('--child-cell', nargs=7, default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--rounds', type=int, default=1,
                      help='measure each row this many times, the '
                           'implementations in alternating order, and give '
                           "ours / this as the median of the rounds' ratios "
                           'with their range: on a noisy machine a ratio '
                           'paired within a round is steadier than one of '
                           'two separate medians')
  parser.add_argument('--steps-per-sample', type=int, default=None,
                      help='steps per timed sample (default 1 on CPU, 10 on '
                           'GPU, where one host sync per step would show)')
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f'--rounds must be at least 1, got {args.rounds}')
  if args.same_process and args.reference_memory == 'stock':
    parser.error('--reference-memory stock needs a process per '
                 'implementation (drop --same-process)')
  if args.quick:
    # Ours on a two-block model (a full model's train step takes a minute to
    # compile on 2 cores); name a real variant to exercise the references.
    args.variant = args.variant or ['micro']
    args.size = args.size or [32]
    args.batch = args.batch or 2
    args.mode = args.mode or ['infer', 'train']
    args.repeats = args.repeats or 2
    args.warmup = args.warmup or 1
    args.steps_per_sample = args.steps_per_sample or 1
    args.impls = args.impls or ['ours', 'timm']
  args.variant = args.variant or ['s', 'b0']
  args.size = args.size or [128, 224, 300]
  args.mode = args.mode or ['train', 'infer']
  args.impls = args.impls or list(DEFAULT_IMPLS)
  args.warmup = args.warmup or 3
  return args


_NATIVE_TIMM = {'s': 'efficientnetv2_s', 'm': 'efficientnetv2_m',
                'l': 'efficientnetv2_l', 'xl': 'efficientnetv2_xl'}


def _make_runner(impl, variant, size, batch, mode, dtype, threads):
  from benchmarks import workloads
  if impl in OURS:
    return workloads.jax_runner(
        impl, workloads.architecture_for(variant), size=size, batch=batch,
        mode=mode, dtype=dtype, conv_impl=OURS[impl])
  if impl.startswith('timm'):
    return workloads.torch_runner(
        impl, variant, size=size, batch=batch, mode=mode, dtype=dtype,
        threads=threads, compiled=impl == 'timm-compile',
        timm_name=_NATIVE_TIMM.get(variant) if impl == 'timm-native' else None)
  if impl == 'keras':
    return workloads.keras_runner(impl, variant, size=size, batch=batch,
                                  dtype=dtype, threads=threads)
  raise ValueError(impl)


def _skip_reason(impl, variant, mode) -> str | None:
  """Why `impl` cannot run this row here, or None."""
  from benchmarks import workloads
  if variant in workloads.SMALL_MODELS and not impl.startswith('ours'):
    return f'{variant} is ours only'
  if impl.startswith('timm') and not workloads.torch_available():
    return 'torch/timm not installed'
  if impl == 'timm-compile':
    ok, why = workloads.torch_compile_available()
    if not ok:
      return why
  if impl == 'timm-native' and variant not in _NATIVE_TIMM:
    return f'timm has no native {variant}'
  if impl == 'keras':
    if mode != 'infer':
      return 'inference only'
    ok, why = workloads.keras_available()
    if not ok:
      return why
    if not workloads.keras_supports(variant):
      return f'no keras {variant}'
  return None


def _time_one(args, impl, variant, size, batch, mode, dtype, threads) -> dict:
  """Builds, warms up and times one implementation in this process."""
  why = _skip_reason(impl, variant, mode)
  if why:
    return {'skip': why}
  harness.eprint(f'[{variant} {size}px b{batch} {mode}] {impl}: building')
  try:
    runner = _make_runner(impl, variant, size, batch, mode, dtype, threads)
  except Exception as e:  # noqa: BLE001 - reported in the table
    return {'skip': f'failed: {type(e).__name__}: {str(e)[:80]}'}
  harness.eprint(f'[{variant} {size}px b{batch} {mode}] {impl}: timing')
  return harness.time_runner(runner, warmup=args.warmup, repeats=args.repeats,
                             steps_per_sample=args.steps_per_sample)


_CHILD_MARK = 'THROUGHPUT_CELL '


def _time_isolated(args, impl, variant, size, batch, mode, dtype, threads
                   ) -> dict:
  """`_time_one` in a fresh process, so each implementation has the cores
  to itself with its framework's default threading (idle thread pools of
  another framework in the same process cost torch 2-3.5x on this 2-core
  machine: OpenMP workers told to sleep, or spinning against XLA's pool)."""
  argv = ['--child-cell', impl, variant, str(size), str(batch), mode, dtype,
          str(threads), '--warmup', str(args.warmup), '--repeats',
          str(args.repeats), '--steps-per-sample', str(args.steps_per_sample)]
  env = None
  if args.reference_memory == 'stock' and not impl.startswith('ours'):
    env = host_memory.original_environment(os.environ)
  try:
    cells, _ = harness.run_worker('benchmarks.throughput', argv,
                                  mark=_CHILD_MARK, what=f'{impl} worker',
                                  env=env)
  except harness.WorkerFailed as e:
    return {'skip': str(e)}
  return cells[0]


def measure_round(args, measure, index, variant, size, batch, mode, dtype,
                  threads) -> dict:
  """One timing of every implementation for a row; odd rounds run them in
  reverse order, so neither side always follows the other (a machine's
  slow spell or warm caches would otherwise favour one)."""
  impls = args.impls if index % 2 == 0 else list(reversed(args.impls))
  timings = {impl: measure(args, impl, variant, size, batch, mode, dtype,
                           threads) for impl in impls}
  return {impl: timings[impl] for impl in args.impls}


def pool_rounds(rounds: list[dict]) -> dict:
  """Per implementation: every round's samples together, the first round's
  first-step figures, or the first round's reason for not running."""
  pooled = {}
  for impl in rounds[0]:
    timed = [r[impl] for r in rounds if 'samples' in r[impl]]
    if not timed:
      pooled[impl] = rounds[0][impl]
      continue
    pooled[impl] = dict(timed[0])
    pooled[impl]['samples'] = [s for t in timed for s in t['samples']]
  return pooled


def paired_ratios(rounds: list[dict], impl: str, batch: int) -> dict:
  """ours / impl: the median over rounds of the ratio of the two medians
  taken in the same round, with the lowest and highest round's ratio."""
  ratios = []
  for r in rounds:
    ours, this = r.get('ours', {}), r[impl]
    if 'samples' in ours and 'samples' in this:
      ratios.append(harness.summarize(ours['samples'], batch)['img_s_median']
                    / harness.summarize(this['samples'], batch)['img_s_median'])
  if not ratios:
    return {}
  out = {'ours_vs_this': statistics.median(ratios)}
  if len(rounds) > 1:
    out.update(ratio_min=min(ratios), ratio_max=max(ratios),
               rounds=len(ratios))
  return out


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  threads = harness.setup_process(args.threads)
  import jax  # after setup_process: XLA reads threads and flags at start-up
  from benchmarks import macs, workloads

  backend = jax.default_backend()
  on_cpu = backend == 'cpu'
  dtype = workloads.resolve_dtype(args.dtype, backend)
  args.repeats = args.repeats or (7 if on_cpu else 20)
  args.steps_per_sample = args.steps_per_sample or (1 if on_cpu else 10)
  if args.child_cell:
    impl, variant, size, batch, mode, dtype, _ = args.child_cell
    timing = _time_one(args, impl, variant, int(size), int(batch), mode,
                       dtype, threads)
    timing['host_memory'] = host_memory.status()
    print(_CHILD_MARK + json.dumps(timing), flush=True)
    return []
  device = jax.devices()[0].device_kind
  peak = workloads.measure_matmul_peak(dtype)
  measure = _time_one if args.same_process else _time_isolated

  rows = []
  for variant in args.variant:
    architecture = workloads.architecture_for(variant)
    for size in args.size:
      batch = args.batch or (8 if on_cpu else 128)
      for mode in args.mode:
        rounds = [measure_round(args, measure, r, variant, size, batch, mode,
                                dtype, threads) for r in range(args.rounds)]
        timings = pool_rounds(rounds)
        flops = (macs.train_flops(architecture, size) if mode == 'train'
                 else macs.inference_flops(architecture, size))
        for impl in args.impls:
          row = dict(variant=variant, image_size=size, batch=batch, mode=mode,
                     impl=impl, dtype=dtype, device=device)
          t = timings[impl]
          if 'host_memory' in t:  # JSON rows only: how that process allocated
            row['host_memory'] = t['host_memory']
          if 'samples' in t:
            row.update(harness.summarize(t['samples'], batch))
            row['first_step_s'] = t['first_step_s']
            for key in ('compile_s', 'first_run_s'):  # ours: apart
              if key in t:
                row[key] = t[key]
            row.update(paired_ratios(rounds, impl, batch))
            if peak:
              row['mfu'] = flops * row['img_s_median'] / peak
          else:
            row['img_s_median'] = None
            row['note'] = t.get('skip', '')
          rows.append(row)

  env = harness.environment(threads)
  env['compute_dtype'] = dtype
  env['isolation'] = ('all implementations in this process, one after '
                      'another' if args.same_process else
                      'each implementation in its own process, alone')
  if not args.same_process:
    env['reference_host_memory'] = (
        'same as ours' if args.reference_memory == 'same' else
        'stock: the environment before the host-memory restart')
  if peak:
    env[f'{dtype}_matmul_peak_TFLOPs'] = round(peak / 1e12, 3)
  columns = [('variant', 'variant'), ('image_size', 'px'), ('batch', 'batch'),
             ('mode', 'mode'), ('impl', 'impl'), ('dtype', 'dtype'),
             ('img_s_median', 'img/s median'), ('img_s_min', 'min'),
             ('img_s_max', 'max'), ('ours_vs_this', 'ours / this')]
  if args.rounds > 1:
    columns += [('ratio_min', 'lowest round'), ('ratio_max', 'highest round')]
  columns += [('first_step_s', 'first step s'),
              ('compile_s', 'of it compile'), ('first_run_s', 'of it run')]
  if peak:
    columns.append(('mfu', 'MFU'))
  columns.append(('note', 'note'))
  notes = ('img/s: median over timed samples; min/max: slowest and fastest '
           'sample. ours / this > 1 means ours is faster. first step: '
           'compile (or torch.compile) + the first step; ours compiles ahead '
           'of time, so its compile and its first run show apart.')
  if args.rounds > 1:
    notes += (f' {args.rounds} rounds, the implementations in alternating '
              'order: img/s over all rounds\' samples; ours / this is the '
              'median over rounds of the ratio measured within each round, '
              'lowest/highest round its range; first step from round 1.')
  if peak:
    notes += (' MFU: architecture FLOPs (6 x MACs per trained image, 2 x per '
              f'inferred one) x img/s / measured {dtype} matmul peak.')
  harness.report('throughput', env, harness.markdown_table(rows, columns),
                 args, rows, notes)
  return rows


if __name__ == '__main__':
  harness.reexec_for_host_memory()
  main()
