"""Train-step compile time per progressive stage, cold and cached, and memory.

For each variant and each progressive stage's image size, the train step
(benchmarks/workloads.py) is traced, lowered and compiled ahead of time, and
the compiled program's memory estimate is read. Every scenario runs in a fresh
process, so nothing compiled earlier in the parent is reused by accident:

  cold      empty persistent cache: trace + lower + XLA compile (on a GPU,
            convolution and GEMM autotuning included), stages in order in
            one process, as a trainer would meet them
  autotune  empty compilation cache, but the per-fusion autotune results of
            the cold run kept (what a restart after a model edit sees; GPU)
  cached    the persistent compilation cache of the cold run: trace + lower
            + cache read, what a restarted or resumed job pays per stage
  exported  the step serialized with jax.export once per stage (by an untimed
            process that also fills the cache), then in a fresh process:
            deserialize + lower + cache read; no Python tracing at all

  python -m benchmarks.compile                          # S, M, L at batch 128
  python -m benchmarks.compile --variant s --batch 128 --stages 4
  python -m benchmarks.compile --variant tiny digits    # CPU: small configs

Variants: the official names, and `tiny` / `digits` (the models of
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


def _export_paths(cache_dir: str, size: int) -> Path:
  return Path(cache_dir) / f'train_step_{size}.jax_export'


def _worker(args) -> None:
  import jax
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if args.export == 'load':
    return _load_exported(args)
  from benchmarks import workloads
  backend = jax.default_backend()
  dtype = workloads.resolve_dtype(args.dtype, backend)
  architecture = architecture_for(args.variant[0])
  start = time.perf_counter()
  model = workloads.JaxModel(architecture, dtype=dtype)
  state = jax.eval_shape(model.init_train_state)
  build_s = time.perf_counter() - start
  step = model.jit_train_step()
  if args.export == 'save':
    return _save_exported(args, model, state)
  for size in args.size:
    images = jax.ShapeDtypeStruct((args.batch, size, size, 3), 'float32')
    labels = jax.ShapeDtypeStruct((args.batch,), 'int32')
    rng = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    traced = step.trace(state, images, labels, rng)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    from effnetv2_jax.models import xla_options
    compiled = xla_options.compile_lowered(lowered)
    t3 = time.perf_counter()
    row = dict(image_size=size, trace_s=t1 - t0, lower_s=t2 - t1,
               compile_s=t3 - t2, total_s=t3 - t0, build_s=build_s)
    build_s = 0.0
    row.update(_memory(compiled))
    print('ROW ' + json.dumps(row), flush=True)
    _progress(row)


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  row = dict(argument_gib=mem.argument_size_in_bytes / 2**30,
             output_gib=mem.output_size_in_bytes / 2**30,
             temp_gib=mem.temp_size_in_bytes / 2**30,
             alias_gib=mem.alias_size_in_bytes / 2**30,
             code_mib=mem.generated_code_size_in_bytes / 2**20)
  row['peak_gib'] = (row['argument_gib'] + row['output_gib'] + row['temp_gib']
                     - row['alias_gib'])
  return row


def _save_exported(args, model, state) -> None:
  """Serializes the train step per stage and compiles it once (filling the
  persistent cache), as a trainer would at its first start."""
  import jax
  leaves, treedef = jax.tree.flatten(state)
  step = model.train_step_fn()

  def flat_step(leaves, images, labels, key_data):
    # Flat arrays in and out: the exported calling convention cannot carry
    # optax's state classes or typed PRNG keys.
    new_state, loss = step(jax.tree.unflatten(treedef, leaves), images,
                           labels, jax.random.wrap_key_data(key_data))
    return jax.tree.leaves(new_state), loss

  from effnetv2_jax.models import onednn
  for size in args.size:
    exported = jax.export.export(jax.jit(flat_step, donate_argnums=(0,)),
                                 disabled_checks=onednn.export_exemptions())(
        leaves, jax.ShapeDtypeStruct((args.batch, size, size, 3), 'float32'),
        jax.ShapeDtypeStruct((args.batch,), 'int32'),
        jax.ShapeDtypeStruct((2,), 'uint32'))
    _export_paths(args.cache_dir, size).write_bytes(exported.serialize())
    _compile_exported(exported)
    print('ROW ' + json.dumps(dict(image_size=size)), flush=True)


def _compile_exported(exported):
  import jax
  call_args, call_kwargs = jax.tree.unflatten(exported.in_tree,
                                              exported.in_avals)
  lowered = jax.jit(exported.call, donate_argnums=(0,)).lower(*call_args,
                                                               **call_kwargs)
  from effnetv2_jax.models import xla_options
  return lowered, xla_options.compile_lowered(lowered)


def _load_exported(args) -> None:
  import jax
  if jax.default_backend() == 'cpu':
    # The step's oneDNN custom calls need their handlers registered; this is
    # a process's start-up cost (a few ms from the kernel cache), not the
    # stage's, so it stays out of the timings.
    from effnetv2_jax.models import onednn
    onednn.status()
  for size in args.size:
    t0 = time.perf_counter()
    exported = jax.export.deserialize(
        bytearray(_export_paths(args.cache_dir, size).read_bytes()))
    t1 = time.perf_counter()
    call_args, call_kwargs = jax.tree.unflatten(exported.in_tree,
                                                exported.in_avals)
    lowered = jax.jit(exported.call, donate_argnums=(0,)).lower(
        *call_args, **call_kwargs)
    t2 = time.perf_counter()
    from effnetv2_jax.models import xla_options
    compiled = xla_options.compile_lowered(lowered)
    t3 = time.perf_counter()
    row = dict(image_size=size, trace_s=t1 - t0, lower_s=t2 - t1,
               compile_s=t3 - t2, total_s=t3 - t0)
    row.update(_memory(compiled))
    print('ROW ' + json.dumps(row), flush=True)
    _progress(row)


def _progress(row: dict) -> None:
  """One stderr line per stage as it is done, so that a run cut short by a
  time limit still shows the stages it finished."""
  sys.stderr.write(
      f'  {row["image_size"]}px: trace {row["trace_s"]:.2f} s, lower '
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
  if len(rows) != len(sizes):
    raise harness.WorkerFailed(f'{what} reported {len(rows)} of '
                               f'{len(sizes)} stages')
  return rows, wall


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
        for stage, r in enumerate(stage_rows, 1):
          rows.append(dict(variant=variant, scenario=scenario, stage=stage,
                           batch=args.batch, dtype=dtype, device=device,
                           mode='train', process_wall_s=wall, **r))

  env = harness.environment(threads)
  env['compute_dtype'] = dtype
  columns = [('variant', 'variant'), ('scenario', 'scenario'),
             ('stage', 'stage'), ('image_size', 'px'), ('batch', 'batch'),
             ('trace_s', 'trace s'), ('lower_s', 'lower s'),
             ('compile_s', 'compile s'), ('total_s', 'total s'),
             ('peak_gib', 'memory GiB'), ('temp_gib', 'temp GiB'),
             ('note', 'note')]
  notes = ('total = trace + lower + compile of the train step '
           '(jit(...).trace/.lower/.compile), each scenario in a fresh '
           'process (for "exported" the trace column is jax.export '
           'deserialization); memory = arguments + outputs + temporaries - '
           'donated aliases, from compiled.memory_analysis().')
  harness.report('compile', env, harness.markdown_table(rows, columns), args,
                 rows, notes)
  return rows


if __name__ == '__main__':
  harness.reexec_for_host_memory()
  main()
