"""Progressive learning's wall-time speedup, against the one MACs predict.

Trains the same model for the same number of steps twice, each in a fresh
process: once at the largest image size throughout ('fixed'), once in
`--stages` equal stages of growing size ('progressive', the official
schedule). The predicted speedup is fixed MACs / progressive MACs
(benchmarks/macs.py); the measured one is the ratio of wall times, and the
difference is split into compiles, input-pipeline rebuilds, each stage's
first step (a new program's first execution) and steady-state steps, with the
step count from which the run reaches 90% of the prediction. Each stage's
figures are printed to stderr as it ends.

The loop is the trainer's stepping on synthetic data, and says so in its
rows: the trainer's `TrainTask` (benchmarks/workloads.py), its gradient
program per stage size and its update program once, on random images from a
small host-side pipeline (a few batches generated per stage, then cycled,
copied to the device two steps ahead). A pipeline rebuild stops that producer
and starts one for the new size, as a trainer rebuilds its tf.data pipeline
per stage. Augmentation, checkpoints and evals are not modelled.

  python -m benchmarks.progressive                  # tiny on CPU, S on GPU
  python -m benchmarks.progressive --variant s --steps 400 --batch 128
  python -m benchmarks.progressive --precompile background --cache-dir /tmp/c

--precompile: 'none' compiles each stage's step when the stage starts; 'ahead'
compiles every stage before the first step; 'background' compiles stage k+1 in
a thread while stage k trains (the compile overlaps training; time spent
waiting for it at the stage boundary is counted as compile). Default: 'none' on
CPU, 'ahead' on GPU, where a compile beside training slowed the H100 steps 4-10x.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ''):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402


def parse_args(argv=None):
  parser = harness.base_parser(__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=None,
                      help='total train steps of each run')
  parser.add_argument('--stages', type=int, default=4)
  parser.add_argument('--min-size', type=int, default=None,
                      help='first-stage base size (official: 128)')
  parser.add_argument('--precompile', choices=('none', 'ahead', 'background'),
                      default=None)
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache shared by the runs')
  parser.add_argument('--worker', default=None, help=harness_hidden())
  parser.add_argument('--timeout', type=float, default=3600)
  args = parser.parse_args(argv)
  if args.quick:
    args.variant = args.variant or ['micro']
    args.steps = args.steps or 8
    args.stages = min(args.stages, 2)
    args.batch = args.batch or 2
  return args


def harness_hidden():
  import argparse
  return argparse.SUPPRESS


def schedule(max_size: int, stages: int, steps: int, min_size: int
             ) -> list[tuple[int, int]]:
  """[(image size, steps)] per stage; sizes as the official code:
  int(min + (max - min) * (k + 1) / stages), equal step counts."""
  sizes = [int(min_size + (max_size - min_size) * (k + 1) / stages)
           for k in range(stages)]
  bounds = [int(steps * (k + 1) / stages) for k in range(stages)]
  counts = [b - a for a, b in zip([0] + bounds[:-1], bounds)]
  return list(zip(sizes, counts))


def architecture_for(name: str):
  from benchmarks import workloads
  return workloads.architecture_for(name)


# --------------------------------------------------------------------------
# Worker: one training run in this process.


class SyntheticPipeline:
  """Host-side producer of random batches at one size, two batches ahead,
  placed as the task places batches (images, one-hot labels)."""

  def __init__(self, task, batch: int, size: int, pool: int = 4,
               seed: int = 0):
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)
    eye = np.eye(task.model.num_classes, dtype=np.float32)
    self._batches = [
        {'image': (rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                   .astype(np.float32) - 127.5) / 127.5,
         'label': eye[rng.integers(0, task.model.num_classes, batch)]}
        for _ in range(pool)]
    self._queue = queue.Queue(maxsize=2)
    self._stop = threading.Event()
    self._put = lambda item: jax.device_put(item, task.batch_sharding)
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _produce(self):
    i = 0
    while not self._stop.is_set():
      item = self._put(self._batches[i % len(self._batches)])
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      i += 1

  def next(self):
    return self._queue.get()

  def close(self):
    self._stop.set()
    self._thread.join()


def _worker(args) -> None:
  import jax
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  from benchmarks import workloads
  spec = json.loads(args.worker)
  plan = [tuple(p) for p in spec['plan']]
  dtype = workloads.resolve_dtype(args.dtype, jax.default_backend())
  architecture = architecture_for(spec['variant'])
  task = workloads.train_task(architecture, dtype=dtype)
  state = task.init_sharded()
  batch = spec['batch']

  def compile_for(size):
    return workloads.compile_program(task, 'gradient', batch, size)

  # As the trainer: each stage's gradient program, and one update program
  # for the run, compiled right after the first stage's (its time counts
  # as the first stage's compile).
  compiled, threads, stages = {}, {}, []
  update = None
  mode = spec['precompile']
  t_ahead = 0.0
  if mode == 'ahead':
    start = time.perf_counter()
    for size, _ in plan:
      if size not in compiled:
        compiled[size] = compile_for(size)
      if update is None:
        update = workloads.compile_program(task, 'update')
    t_ahead = time.perf_counter() - start

  def background(size):
    def work():
      compiled[size] = compile_for(size)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    threads[size] = thread

  run_start = time.perf_counter()
  done = 0
  for k, (size, count) in enumerate(plan):
    start = time.perf_counter()
    if size in threads:
      threads.pop(size).join()
    if size not in compiled:
      compiled[size] = compile_for(size)
    if update is None:
      update = workloads.compile_program(task, 'update')
    t_compile = time.perf_counter() - start
    if mode == 'background' and k + 1 < len(plan):
      nxt = plan[k + 1][0]
      if nxt not in compiled and nxt not in threads:
        background(nxt)
    hparams = workloads.stage_hparams(
        task, batch, dropout_rate=architecture.dropout_rate, start_step=done)
    start = time.perf_counter()
    pipeline = SyntheticPipeline(task, batch, size, seed=k)
    data = pipeline.next()
    t_rebuild = time.perf_counter() - start
    # The first execution of a new program is timed apart from the rest: on
    # a GPU it loads the program and sets up its library calls (the H100
    # train step's first step took ~20 s more than its compile), which is a
    # per-stage cost like the compile, not a slower step.
    step = workloads.train_step(compiled[size], update)
    start = time.perf_counter()
    state, metrics = step(state, data, hparams)
    jax.block_until_ready(metrics)
    t_first = time.perf_counter() - start
    overlapped = any(t.is_alive() for t in threads.values())
    start = time.perf_counter()
    for i in range(1, count):
      data = pipeline.next()
      state, metrics = step(state, data, hparams)
    jax.block_until_ready(metrics)
    t_steps = time.perf_counter() - start
    pipeline.close()
    done += count
    stage = dict(image_size=size, steps=count, compile_s=t_compile,
                 rebuild_s=t_rebuild, first_step_s=t_first, steps_s=t_steps,
                 step_ms=1e3 * t_steps / max(count - 1, 1),
                 compiling_meanwhile=overlapped)
    stages.append(stage)
    # Progress on stderr as each stage ends, so that a run cut short by a
    # time limit still shows the stages it finished.
    sys.stderr.write(
        f'  stage {k + 1}/{len(plan)} {size}px: compile {t_compile:.1f} s, '
        f'pipeline {t_rebuild:.2f} s, first step {t_first:.2f} s, '
        f'{count - 1} steps {t_steps:.1f} s ({stage["step_ms"]:.1f} ms/step'
        f'{", a compile running meanwhile" if overlapped else ""})\n')
    sys.stderr.flush()
  total = time.perf_counter() - run_start + t_ahead
  print('RESULT ' + json.dumps(dict(stages=stages, ahead_compile_s=t_ahead,
                                    total_s=total)), flush=True)


def _run_worker(spec: dict, args) -> dict:
  argv = ['--worker', json.dumps(spec), '--dtype', args.dtype]
  if args.threads:
    argv += ['--threads', str(args.threads)]
  if args.cache_dir:
    argv += ['--cache-dir', args.cache_dir]
  try:
    results, _ = harness.run_worker('benchmarks.progressive', argv,
                                    mark='RESULT ', what='progressive worker',
                                    timeout=args.timeout)
  except harness.WorkerFailed as e:
    raise SystemExit(str(e)) from None
  return results[-1]


def steady_seconds(run: dict) -> float:
  """Seconds the run would take at its stages' steady step times: each
  stage's first step (program load) is counted at the stage's later rate
  (a one-step stage has no later rate: its first step counts as is)."""
  return sum(s['steps'] * s['steps_s'] / (s['steps'] - 1) if s['steps'] > 1
             else s['first_step_s'] for s in run['stages'])


def _steps_for_90(fixed: dict, prog: dict, predicted: float) -> int | None:
  """Steps from which the measured speedup reaches 90% of `predicted`,
  with this run's per-step times and one-off costs; None if never."""
  def parts(run):
    steady = steady_seconds(run)
    steps = sum(s['steps'] for s in run['stages'])
    return run['total_s'] - steady, steady / steps
  once_f, step_f = parts(fixed)
  once_p, step_p = parts(prog)
  target = 0.9 * predicted
  gain = step_f - target * step_p
  if gain <= 0:
    return None
  return max(0, int((target * once_p - once_f) / gain) + 1)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  threads = harness.setup_process(args.threads)
  if args.worker:
    return _worker(args)
  import jax
  from benchmarks import macs, workloads
  backend = jax.default_backend()
  on_cpu = backend == 'cpu'
  dtype = workloads.resolve_dtype(args.dtype, backend)
  variant = (args.variant or ['tiny' if on_cpu else 's'])[0]
  architecture = architecture_for(variant)
  batch = args.batch or (8 if on_cpu else 128)
  steps = args.steps or (200 if on_cpu else 400)
  max_size = (args.size or [architecture.train_size])[0]
  min_size = args.min_size or min(128, max_size // 2)
  # On a GPU a compile running beside training slowed the H100's S steps
  # 4-10x (likely the convolution autotuner timing candidates on that device),
  # so the default there compiles every stage before the first step, as the
  # trainer does on GPUs.
  precompile = args.precompile or ('none' if on_cpu else 'ahead')
  if steps < args.stages:
    raise SystemExit(f'--steps {steps} is fewer than --stages {args.stages}: '
                     'every stage needs at least one step')
  plan = schedule(max_size, args.stages, steps, min_size)
  fixed_plan = [(max_size, steps)]

  runs = {}
  for name, p in (('fixed', fixed_plan), ('progressive', plan)):
    harness.eprint(f'[{variant}] {name}: {p}, batch {batch}, '
                   f'precompile {precompile}')
    runs[name] = _run_worker(dict(variant=variant, plan=p, batch=batch,
                                  precompile=precompile), args)

  def cost(p):
    return sum(n * macs.forward_macs(architecture, s) for s, n in p)
  predicted = cost(fixed_plan) / cost(plan)
  fixed, prog = runs['fixed'], runs['progressive']

  def total(run, key):
    return sum(s[key] for s in run['stages'])
  measured = fixed['total_s'] / prog['total_s']
  steady = steady_seconds(fixed) / steady_seconds(prog)
  rows = []
  device = jax.devices()[0].device_kind
  for name, run in runs.items():
    for k, s in enumerate(run['stages'], 1):
      rows.append(dict(run=name, stage=k, variant=variant, batch=batch,
                       mode='train', dtype=dtype, device=device,
                       data='synthetic', precompile=precompile, **s))
    rows.append(dict(
        run=name, stage='all', variant=variant, batch=batch, mode='train',
        dtype=dtype, device=device, data='synthetic', precompile=precompile,
        steps=sum(s['steps'] for s in run['stages']),
        compile_s=total(run, 'compile_s') + run['ahead_compile_s'],
        rebuild_s=total(run, 'rebuild_s'),
        first_step_s=total(run, 'first_step_s'),
        steps_s=total(run, 'steps_s'), total_s=run['total_s']))
  summary = dict(
      run='speedup', variant=variant, batch=batch, mode='train', dtype=dtype,
      device=device, data='synthetic', precompile=precompile,
      predicted=predicted, measured=measured, steady_state=steady,
      fraction_of_predicted=measured / predicted,
      steady_fraction_of_predicted=steady / predicted,
      extra_compile_s=rows[-1]['compile_s'] - rows[1]['compile_s'],
      extra_rebuild_s=rows[-1]['rebuild_s'] - rows[1]['rebuild_s'],
      extra_first_step_s=rows[-1]['first_step_s'] - rows[1]['first_step_s'],
      steps_for_90pct=_steps_for_90(fixed, prog, predicted))
  rows.append(summary)

  env = harness.environment(threads)
  env['compute_dtype'] = dtype
  columns = [('run', 'run'), ('stage', 'stage'), ('image_size', 'px'),
             ('steps', 'steps'), ('compile_s', 'compile s'),
             ('rebuild_s', 'pipeline s'), ('first_step_s', 'first step s'),
             ('steps_s', 'later steps s'), ('step_ms', 'ms/step'),
             ('compiling_meanwhile', 'compile beside'),
             ('total_s', 'total s')]
  table = harness.markdown_table(rows[:-1], columns)
  s = summary
  n90 = s['steps_for_90pct']
  notes = (
      f'Speedup of progressive over fixed {max_size}px, {steps} steps, batch '
      f'{batch}, synthetic data: predicted from MACs **{predicted:.3f}x**, '
      f'measured end to end **{measured:.3f}x** '
      f'({100 * s["fraction_of_predicted"]:.0f}% of predicted), steady-state '
      f'steps only {steady:.3f}x ({100 * s["steady_fraction_of_predicted"]:.0f}%'
      f'). Progressive pays {s["extra_compile_s"]:.1f} s more compiling, '
      f'{s["extra_rebuild_s"]:.2f} s more rebuilding pipelines and '
      f'{s["extra_first_step_s"]:.2f} s more in first steps (a new program\'s '
      f'first execution); at these step '
      f'times 90% of the prediction is reached from '
      + (f'{n90} steps.' if n90 is not None else
         'no step count (steady-state steps alone fall short).'))
  harness.report('progressive', env, table, args, rows, notes)
  return rows


if __name__ == '__main__':
  harness.reexec_for_host_memory()
  main()
