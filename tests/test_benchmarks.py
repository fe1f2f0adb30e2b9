"""The benchmark scripts run (--quick) and print well-formed rows.

Timings are never asserted: only that every script finishes, that its JSON
rows carry the documented fields with sane types, and the arithmetic behind
the tables (MACs, schedules, summaries).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness, macs, progressive, throughput
from benchmarks import compile as compile_bench

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {'variant', 'image_size', 'batch', 'mode', 'impl', 'dtype',
            'device', 'img_s_median'}


@pytest.fixture(scope='module')
def script_env(tmp_path_factory):
  env = dict(os.environ)
  # One compilation cache for the three scripts: they compile the same small
  # train step, so later scripts reuse it and the module stays fast.
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jaxcache'))
  env.pop('XLA_FLAGS', None)  # conftest's 8 fake devices are for other tests
  env.pop('CUDA_VISIBLE_DEVICES', None)
  env['PYTHONPATH'] = str(ROOT)
  return env


def _run(script, args, env):
  proc = subprocess.run(
      [sys.executable, '-m', f'benchmarks.{script}', '--quick', '--json',
       '--no-results', *args], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith('{')]
  assert rows, proc.stdout[-2000:]
  # The human-readable report goes to stderr under --json.
  assert '| ' in proc.stderr and 'jax: ' in proc.stderr
  return rows, proc.stderr


def test_throughput_quick_rows(script_env):
  rows, _ = _run('throughput', [], script_env)
  assert {(r['mode'], r['impl']) for r in rows} == {
      ('train', 'ours'), ('infer', 'ours'), ('train', 'timm'),
      ('infer', 'timm')}
  for r in rows:
    assert ROW_KEYS <= set(r)
    assert (r['variant'], r['image_size'], r['batch']) == ('micro', 32, 2)
    if r['impl'] == 'ours':
      assert r['img_s_min'] <= r['img_s_median'] <= r['img_s_max']
      assert r['img_s_median'] > 0 and r['ours_vs_this'] == 1.0
      # Compiled ahead of time: compile and first run apart, summing up.
      assert r['compile_s'] > 0 and r['first_run_s'] > 0
      assert r['first_step_s'] == pytest.approx(r['compile_s']
                                                + r['first_run_s'])
    else:  # no timm model of our micro test network
      assert r['img_s_median'] is None and 'ours only' in r['note']


def test_throughput_quick_references(script_env):
  # The references as their users run them, without our host allocator.
  rows, report = _run('throughput', ['--variant', 'b0', '--impls', 'timm',
                                     'keras', '--reference-memory', 'stock'],
                      script_env)
  assert 'reference_host_memory: stock' in report
  for r in rows:
    assert not r['host_memory'].startswith(('tcmalloc', 'glibc huge')), r
  by_key = {(r['mode'], r['impl']): r for r in rows}
  assert set(by_key) == {('train', 'timm'), ('infer', 'timm'),
                         ('train', 'keras'), ('infer', 'keras')}
  assert by_key[('train', 'keras')]['note'] == 'inference only'
  for key in (('train', 'timm'), ('infer', 'timm'), ('infer', 'keras')):
    assert by_key[key]['img_s_median'] > 0, by_key[key]
    assert 'ours_vs_this' not in by_key[key]  # ours was not run


def test_compile_quick_rows(script_env):
  rows, _ = _run('compile', [], script_env)
  # The trainer's order: the first stage's gradient program, then the
  # update program.
  assert [(r['scenario'], r.get('stage'), r['program']) for r in rows] == [
      (scenario, stage, program)
      for scenario in ('cold', 'cached', 'exported')
      for stage, program in ((1, 'gradient'), (None, 'update'))]
  for r in rows:
    assert r['mode'] == 'train' and r['variant'] == 'micro'
    assert r['image_size'] == (32 if r['program'] == 'gradient' else None)
    assert r['total_s'] >= r['compile_s'] > 0
    assert r['peak_gib'] > 0
  gradient = [r for r in rows if r['program'] == 'gradient']
  update = [r for r in rows if r['program'] == 'update']
  # A step holds the whole state, which the gradient program's arguments
  # leave out in part (the optimizer slots and the weight average).
  assert all(g['step_gib'] > max(g['peak_gib'], u['peak_gib'])
             for g, u in zip(gradient, update))
  # Memory depends on the programs, not on how they were obtained.
  assert gradient[0]['peak_gib'] == pytest.approx(gradient[1]['peak_gib'])
  for g in gradient[1:]:
    assert g['step_gib'] == pytest.approx(gradient[0]['step_gib'], rel=0.05)


def test_progressive_quick_rows(script_env):
  rows, _ = _run('progressive', [], script_env)
  speedup = rows[-1]
  assert speedup['run'] == 'speedup'
  assert speedup['predicted'] > 1 and speedup['measured'] > 0
  stages = [r for r in rows if r['run'] == 'progressive' and r['stage'] != 'all']
  assert len(stages) == 2 and stages[0]['image_size'] < stages[1]['image_size']
  assert sum(s['steps'] for s in stages) == 8
  assert all(s['first_step_s'] > 0 and s['steps_s'] > 0 for s in stages)
  assert all(r['data'] == 'synthetic' for r in rows)


def test_progressive_steady_time_counts_first_steps_at_the_later_rate():
  run = {'total_s': 100.0, 'ahead_compile_s': 0.0, 'stages': [
      {'steps': 5, 'first_step_s': 20.0, 'steps_s': 4.0},   # 1 s per step
      {'steps': 1, 'first_step_s': 3.0, 'steps_s': 0.0}]}   # no later rate
  assert progressive.steady_seconds(run) == pytest.approx(5 * 1.0 + 3.0)


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize('variant,size,official', [
    ('s', 300, 5.31), ('s', 384, 8.38), ('m', 480, 24.61), ('b0', 224, 0.719),
    ('b3', 300, 3.016)])
def test_macs_match_official_counts(variant, size, official):
  assert macs.forward_macs(variant, size) / 1e9 == pytest.approx(official,
                                                                 rel=3e-3)
  assert macs.train_flops(variant, size) == 6 * macs.forward_macs(variant,
                                                                  size)


def test_official_stage_sizes_and_progressive_schedule():
  assert compile_bench.stage_sizes(300, 4) == [171, 214, 257, 300]
  assert compile_bench.stage_sizes(384, 4) == [192, 256, 320, 384]
  plan = progressive.schedule(300, 4, 10, 128)
  assert [s for s, _ in plan] == [171, 214, 257, 300]
  assert sum(n for _, n in plan) == 10


def test_timed_train_step_is_the_trainers_update():
  """One benchmark step moves what the trainer's step moves: the step
  counter, the parameters, the optimizer slots and the weight average."""
  import jax
  import numpy as np
  from benchmarks import workloads
  task = workloads.train_task(workloads.architecture_for('micro'),
                              dtype='float32', num_classes=10)
  step = workloads.train_step(
      workloads.compile_program(task, 'gradient', 2, 32),
      workloads.compile_program(task, 'update'))
  before = jax.device_get(task.init_sharded())
  # One epoch into the warmup: a learning rate above 0.
  hparams = task.hparams(batch_size=2, start_step=0, start_epoch=1.0,
                         dropout_rate=0.1)
  after, (metrics, _) = step(jax.device_put(before, task.shardings),
                             workloads.synthetic_batch(task, 2, 32), hparams)
  after = jax.device_get(after)
  assert int(after.step) == 1 and np.isfinite(float(metrics['loss']))
  for part in ('params', 'opt_state', 'ema_params', 'ema_batch_stats'):
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(getattr(before, part)),
        jax.tree.leaves(getattr(after, part)))]
    assert any(changed), part


def test_benchmark_modules_import_no_tensorflow_or_ml_collections():
  # ml_collections comes with the trainer's config, when ours is built;
  # tensorflow, tfds and clu never.
  code = ('import sys; from benchmarks import compile, harness, macs, '
          'profile_step, progressive, throughput, workloads; '
          'heavy = ("tensorflow", "tensorflow_datasets", "clu"); '
          'workloads.architecture_for("digits"); '
          'bad = [m for m in heavy + ("ml_collections",) if m in '
          'sys.modules]; '
          'workloads.train_task(workloads.architecture_for("tiny"), '
          'dtype="float32"); '
          'bad += [m for m in heavy if m in sys.modules]; print(bad); '
          'sys.exit(bool(bad))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_summary_and_table():
  s = harness.summarize([0.5, 0.25, 1.0], batch=8)
  assert s['img_s_median'] == 16 and s['img_s_min'] == 8
  assert s['img_s_max'] == 32 and s['samples'] == 3
  table = harness.markdown_table([{'a': 1.23456, 'b': None}],
                                 [('a', 'A'), ('b', 'B')])
  assert table.splitlines() == ['| A | B |', '|---|---|', '| 1.23 | - |']


def test_throughput_rejects_stock_references_in_one_process(capsys):
  with pytest.raises(SystemExit):
    throughput.parse_args(['--same-process', '--reference-memory', 'stock'])
  assert 'drop --same-process' in capsys.readouterr().err


def test_throughput_rounds_alternate_and_pair_their_ratios():
  calls = []

  def fake_measure(args, impl, *rest):
    calls.append(impl)
    # Round 1 finds the machine twice as slow for both: a paired ratio
    # stays 1.25, a ratio of pooled medians would not.
    slow = 2.0 if len(calls) > 2 else 1.0
    if impl == 'keras':
      return {'skip': 'not installed'}
    seconds = {'ours': 0.8, 'timm': 1.0}[impl] * slow
    return {'samples': [seconds, seconds * 1.1], 'first_step_s': len(calls)}

  args = throughput.parse_args(['--impls', 'ours', 'timm', 'keras',
                                '--rounds', '2'])
  rounds = [throughput.measure_round(args, fake_measure, r, 's', 128, 8,
                                     'infer', 'float32', 2) for r in range(2)]
  assert calls == ['ours', 'timm', 'keras', 'keras', 'timm', 'ours']
  pooled = throughput.pool_rounds(rounds)
  assert len(pooled['ours']['samples']) == 4
  assert pooled['ours']['first_step_s'] == 1  # round 1's
  assert pooled['keras'] == {'skip': 'not installed'}
  paired = throughput.paired_ratios(rounds, 'timm', batch=8)
  assert paired['ours_vs_this'] == pytest.approx(1.25)
  assert paired['ratio_min'] == pytest.approx(1.25) == paired['ratio_max']
  assert paired['rounds'] == 2
  assert throughput.paired_ratios(rounds, 'keras', batch=8) == {}
  with pytest.raises(SystemExit):
    throughput.parse_args(['--rounds', '0'])


_FAKE_WORKER = '''
import sys, time
print('noise before the result')
mode = sys.argv[1]
if mode == 'sleep':
  time.sleep(30)
print('MARK {"stage": 1}')
print('MARK {"stage": 2}', flush=True)
sys.exit(3 if mode == 'crash' else 0)
'''


@pytest.mark.parametrize('mode,expected', [
    ('ok', None), ('crash', 'failed (exit 3)'), ('sleep', '1 s limit')])
def test_run_worker_returns_marked_lines_or_fails_in_one_line(
    tmp_path, mode, expected):
  (tmp_path / 'fake_bench_worker.py').write_text(_FAKE_WORKER)
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  timeout = 1 if mode == 'sleep' else 60

  def run():
    return harness.run_worker('fake_bench_worker', [mode], mark='MARK ',
                              what='fake worker', timeout=timeout, env=env)

  if expected is None:
    payloads, wall = run()
    assert payloads == [{'stage': 1}, {'stage': 2}] and wall > 0
  else:
    with pytest.raises(harness.WorkerFailed) as failure:
      run()
    assert expected in str(failure.value) and '\n' not in str(failure.value)
