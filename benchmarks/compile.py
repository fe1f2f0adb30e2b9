"""Train-step compile time per progressive stage, cold and cached, and memory.

The trainer's train step is two programs of its `TrainTask`
(benchmarks/workloads.py builds the task as the trainer does): the gradient
program, one per stage's image size, and the update program (optimizer,
EMA), one per run. Each is traced, lowered and compiled ahead of time in the
trainer's order (the first stage's gradient program, the update program,
then the later stages'), and its memory estimate is read; a stage's step
memory is both programs' together, as the trainer's compile line gives it.
Every scenario runs in a fresh process, so nothing compiled earlier in the
parent is reused by accident:

  cold      empty persistent cache: trace + lower + XLA compile (on a GPU,
            convolution and GEMM autotuning included), stages in order in
            one process, as a trainer would meet them
  autotune  empty compilation cache, but the per-fusion autotune results of
            the cold run kept (what a restart after a model edit sees; GPU)
  cached    the persistent compilation cache of the cold run: trace + lower
            + cache read, what a restarted or resumed job pays per stage
  exported  every program serialized with jax.export (by an untimed
            process that also fills the cache), then in a fresh process:
            deserialize + lower + cache read; no Python tracing at all

  python -m benchmarks.compile                          # S, M, L at batch 128
  python -m benchmarks.compile --variant s --batch 128 --stages 4
  python -m benchmarks.compile --variant tiny digits    # CPU: small configs

Variants: the official names, `tiny` / `digits` (the networks of
configs/tiny.py and configs/digits.py) and `micro` (see workloads.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ''):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402

SCENARIOS = ('cold', 'autotune', 'cached', 'exported')


def parse_args(argv=None):
  parser = harness.base_parser(__doc__.splitlines()[0])
  parser.add_argument('--stages', type=int, default=4,
                      help='progressive stages (sizes as the official code)')
  parser.add_argument('--scenarios', nargs='+', choices=SCENARIOS,
                      default=None)
  parser.add_argument('--cache-dir', default=None,
                      help='persistent cache to use (default: a fresh '
                           'temporary one, so "cold" is cold)')
  parser.add_argument('--worker', action='store_true', help=argparse_hidden())
  parser.add_argument('--export', choices=('save', 'load'), default=None,
                      help=argparse_hidden())
  parser.add_argument('--timeout', type=float, default=1800,
                      help='seconds allowed per scenario process')
  args = parser.parse_args(argv)
  if args.quick:
    args.variant = args.variant or ['micro']
    args.stages = 1
    args.batch = args.batch or 2
    args.size = args.size or [32]
    args.scenarios = args.scenarios or ['cold', 'cached', 'exported']
  args.variant = args.variant or ['s', 'm', 'l']
  return args


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


def architecture_for(name: str):
  from benchmarks import workloads
  return workloads.architecture_for(name)


def stage_sizes(train_size: int, stages: int, min_size: int = 128) -> list[int]:
  """The official schedule: int(min + (max - min) * (k + 1) / stages)."""
  if stages == 1:
    return [train_size]
  low = min(min_size, train_size // 2)
  return [int(low + (train_size - low) * (k + 1) / stages)
          for k in range(stages)]


# --------------------------------------------------------------------------
# Worker: one fresh process compiles every stage of one variant.


def _export_path(cache_dir: str, program: str) -> Path:
  return Path(cache_dir) / f'{program}.jax_export'


def _program_name(size: int | None) -> str:
  return 'update' if size is None else f'gradient_{size}'


def _worker(args) -> None:
  import jax
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if args.export == 'load':
    return _load_exported(args)
  from benchmarks import workloads
  from effnetv2_jax.models import xla_options
  dtype = workloads.resolve_dtype(args.dtype, jax.default_backend())
  start = time.perf_counter()
  task = workloads.train_task(architecture_for(args.variant[0]), dtype=dtype)
  build_s = time.perf_counter() - start
  if args.export == 'save':
    return _save_exported(args, task)
  # As the trainer: the first stage's gradient program, then the update
  # program (once per run), then the later stages' gradient programs.
  for size in _program_order(args.size):
    kind, shape = ('update', ()) if size is None else (
        'gradient', (args.batch, size))
    abstract = task.abstract_args(kind, *shape)
    t0 = time.perf_counter()
    traced = task.jitted(kind).trace(*abstract)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = xla_options.compile_lowered(lowered)
    t3 = time.perf_counter()
    row = dict(program=kind, image_size=size, trace_s=t1 - t0,
               lower_s=t2 - t1, compile_s=t3 - t2, total_s=t3 - t0,
               build_s=build_s, **_sizes(kind, abstract))
    build_s = 0.0
    row.update(_memory(compiled))
    print('ROW ' + json.dumps(row), flush=True)
    _progress(row)


def _program_order(sizes) -> list[int | None]:
  """Image sizes of the gradient programs in compile order, with None (the
  update program) after the first."""
  return [sizes[0], None, *sizes[1:]]


def _sizes(kind: str, args) -> dict:
  """Bytes of the state and the batch, from a gradient program's
  (state, batch, hparams) arguments."""
  if kind != 'gradient':
    return {}
  import jax
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                            for x in jax.tree.leaves(tree))
  return dict(state_bytes=nbytes(args[0]), batch_bytes=nbytes(args[1]))


def _memory(compiled) -> dict:
  """The program's memory estimate: the trainer's bytes, and GiB columns."""
  from effnetv2_jax.training import compilation
  memory = compilation.memory_estimate(compiled)
  if not memory:
    return {}
  gib = lambda key: memory.get(key, 0) / 2**30  # noqa: E731
  return dict(memory_bytes=memory, peak_gib=_total_gib(memory),
              temp_gib=gib('temp_size_in_bytes'),
              alias_gib=gib('alias_size_in_bytes'),
              code_mib=memory.get('generated_code_size_in_bytes', 0) / 2**20)


def _total_gib(memory: dict) -> float:
  """Arguments + outputs + temporaries - donated aliases."""
  return (memory.get('argument_size_in_bytes', 0) +
          memory.get('output_size_in_bytes', 0) +
          memory.get('temp_size_in_bytes', 0) -
          memory.get('alias_size_in_bytes', 0)) / 2**30


def step_memory_gib(gradient_row: dict, update_row: dict) -> float | None:
  """A train step's peak, the two programs run one after the other, as the
  trainer reports it (`compilation.step_memory`)."""
  from effnetv2_jax.training import compilation
  gradient = gradient_row.get('memory_bytes')
  update = update_row.get('memory_bytes')
  if not gradient or not update:
    return None
  return _total_gib(compilation.step_memory(
      gradient, update, state_bytes=gradient_row['state_bytes'],
      batch_bytes=gradient_row['batch_bytes']))


def _flat_program(task, kind: str, *shape: int):
  """`task`'s program with its state as a flat list of arrays in and out,
  and its abstract arguments: the exported calling convention carries
  neither the state's dataclasses nor the integer block keys of its dicts."""
  import jax
  args = task.abstract_args(kind, *shape)
  treedefs = [jax.tree.structure(a) for a in args]
  flat_args = [jax.tree.leaves(a) for a in args]
  fn = task.gradient_step if kind == 'gradient' else task.update_step

  def flat(*leaves):
    out = fn(*(jax.tree.unflatten(t, x) for t, x in zip(treedefs, leaves)))
    return jax.tree.leaves(out)

  plain = [[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
           for leaves in flat_args]
  return flat, plain


def _save_exported(args, task) -> None:
  """Serializes every program and compiles it once (filling the persistent
  cache), as a trainer would at its first start."""
  import jax
  from effnetv2_jax.kernels import onednn
  for size in _program_order(args.size):
    kind, shape = ('update', ()) if size is None else (
        'gradient', (args.batch, size))
    flat, plain = _flat_program(task, kind, *shape)
    donate = (0,) if kind == 'update' else ()
    exported = jax.export.export(
        jax.jit(flat, donate_argnums=donate),
        disabled_checks=onednn.export_exemptions())(*plain)
    _export_path(args.cache_dir, _program_name(size)).write_bytes(
        exported.serialize())
    _compile_exported(exported, donate)
    print('ROW ' + json.dumps(dict(program=kind, image_size=size)),
          flush=True)


def _compile_exported(exported, donate):
  import jax
  call_args, call_kwargs = jax.tree.unflatten(exported.in_tree,
                                              exported.in_avals)
  lowered = jax.jit(exported.call, donate_argnums=donate).lower(
      *call_args, **call_kwargs)
  from effnetv2_jax.models import xla_options
  return lowered, xla_options.compile_lowered(lowered)


def _load_exported(args) -> None:
  import jax
  if jax.default_backend() == 'cpu':
    # The programs' oneDNN custom calls need their handlers registered; this
    # is a process's start-up cost (a few ms from the kernel cache), not a
    # stage's, so it stays out of the timings.
    from effnetv2_jax.kernels import onednn
    onednn.status()
  from effnetv2_jax.models import xla_options
  for size in _program_order(args.size):
    kind = 'update' if size is None else 'gradient'
    donate = (0,) if kind == 'update' else ()
    t0 = time.perf_counter()
    exported = jax.export.deserialize(bytearray(
        _export_path(args.cache_dir, _program_name(size)).read_bytes()))
    t1 = time.perf_counter()
    call_args, call_kwargs = jax.tree.unflatten(exported.in_tree,
                                                exported.in_avals)
    lowered = jax.jit(exported.call, donate_argnums=donate).lower(
        *call_args, **call_kwargs)
    t2 = time.perf_counter()
    compiled = xla_options.compile_lowered(lowered)
    t3 = time.perf_counter()
    row = dict(program=kind, image_size=size, trace_s=t1 - t0,
               lower_s=t2 - t1, compile_s=t3 - t2, total_s=t3 - t0,
               **_sizes(kind, call_args))
    row.update(_memory(compiled))
    print('ROW ' + json.dumps(row), flush=True)
    _progress(row)


def _progress(row: dict) -> None:
  """One stderr line per stage as it is done, so that a run cut short by a
  time limit still shows the stages it finished."""
  what = ('update' if row['program'] == 'update' else
          f'gradient {row["image_size"]}px')
  sys.stderr.write(
      f'  {what}: trace {row["trace_s"]:.2f} s, lower '
      f'{row["lower_s"]:.2f} s, compile {row["compile_s"]:.1f} s'
      + (f', memory {row["peak_gib"]:.2f} GiB' if 'peak_gib' in row else '')
      + '\n')
  sys.stderr.flush()


def _run_worker(variant, sizes, args, cache_dir, export=None):
  argv = ['--worker', '--variant', variant, '--size', *map(str, sizes),
          '--batch', str(args.batch), '--dtype', args.dtype,
          '--cache-dir', cache_dir]
  if export:
    argv += ['--export', export]
  if args.threads:
    argv += ['--threads', str(args.threads)]
  what = f'compile worker for {variant}'
  rows, wall = harness.run_worker('benchmarks.compile', argv, mark='ROW ',
                                  what=what, timeout=args.timeout)
  if len(rows) != len(sizes) + 1:
    raise harness.WorkerFailed(f'{what} reported {len(rows)} of '
                               f'{len(sizes) + 1} programs')
  return rows, wall


def program_rows(worker_rows: list[dict], **common) -> list[dict]:
  """A worker's rows as table rows: gradient programs numbered by stage and
  given the step's memory, the update program unnumbered."""
  update = next(r for r in worker_rows if r['program'] == 'update')
  out, stage = [], 0
  for r in worker_rows:
    row = dict(common, mode='train', **r)
    if r['program'] == 'gradient':
      stage += 1
      row['stage'] = stage
      row['step_gib'] = step_memory_gib(r, update)
    out.append(row)
  return out


def _clear_compiled(cache_dir: Path) -> None:
  """Drops compiled executables, keeping XLA's autotune results."""
  for entry in cache_dir.iterdir():
    if entry.is_file():
      entry.unlink()


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  threads = harness.setup_process(args.threads)
  if args.worker:
    return _worker(args)
  import jax
  backend = jax.default_backend()
  from benchmarks import workloads
  dtype = workloads.resolve_dtype(args.dtype, backend)
  device = jax.devices()[0].device_kind
  if args.batch is None:
    args.batch = 128 if backend != 'cpu' else 8
  scenarios = args.scenarios or (
      ['cold', 'autotune', 'cached', 'exported'] if backend == 'gpu'
      else ['cold', 'cached', 'exported'])

  rows = []
  for variant in args.variant:
    architecture = architecture_for(variant)
    sizes = args.size or stage_sizes(architecture.train_size, args.stages)
    with tempfile.TemporaryDirectory(prefix='effnetv2_compile_') as tmp:
      cache = Path(args.cache_dir or tmp) / variant
      cache.mkdir(parents=True, exist_ok=True)
      for scenario in scenarios:
        if scenario == 'autotune':
          _clear_compiled(cache)
        harness.eprint(f'[{variant}] {scenario}: stages {sizes}, '
                       f'batch {args.batch}')
        try:
          if scenario == 'exported':
            _run_worker(variant, sizes, args, str(cache), export='save')
          stage_rows, wall = _run_worker(
              variant, sizes, args, str(cache),
              export='load' if scenario == 'exported' else None)
        except harness.WorkerFailed as e:
          harness.eprint(f'[{variant}] {scenario} failed: {e}')
          rows.append(dict(variant=variant, scenario=scenario,
                           batch=args.batch, dtype=dtype, device=device,
                           note=str(e)[:120]))
          continue
        rows.extend(program_rows(stage_rows, variant=variant,
                                 scenario=scenario, batch=args.batch,
                                 dtype=dtype, device=device,
                                 process_wall_s=wall))

  env = harness.environment(threads)
  env['compute_dtype'] = dtype
  columns = [('variant', 'variant'), ('scenario', 'scenario'),
             ('stage', 'stage'), ('program', 'program'), ('image_size', 'px'),
             ('batch', 'batch'), ('trace_s', 'trace s'),
             ('lower_s', 'lower s'), ('compile_s', 'compile s'),
             ('total_s', 'total s'), ('peak_gib', 'memory GiB'),
             ('step_gib', 'step memory GiB'), ('temp_gib', 'temp GiB'),
             ('note', 'note')]
  notes = ('The trainer\'s two programs of a train step: the gradient '
           'program per stage size, the update program (optimizer, EMA) '
           'once, compiled after the first stage\'s as the trainer does. '
           'total = trace + lower + compile (jit(...).trace/.lower/.compile), '
           'each scenario in a fresh process (for "exported" the trace '
           'column is jax.export deserialization); memory = arguments + '
           'outputs + temporaries - donated aliases of the program, from '
           'compiled.memory_analysis(); step memory = both programs run one '
           'after the other, as the trainer\'s compile line gives it.')
  harness.report('compile', env, harness.markdown_table(rows, columns), args,
                 rows, notes)
  return rows


if __name__ == '__main__':
  harness.reexec_for_host_memory()
  main()
