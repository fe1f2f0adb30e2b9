r"""One search trial, run as its own process by the driver.

    python -m effnetv2_jax.nas.trial TRIAL_DIR

reads TRIAL_DIR/job.json (written by the driver: the NAS search, or the
self-distillation's accuracy trials, whose jobs have no timing), then
  * a candidate trains with `train_and_evaluate` for the search's short
    budget (the job's trainer config; no checkpoints, TensorBoard, plots or
    export) and is evaluated on the holdout split carved from train, never
    the test split; its metrics go to TRIAL_DIR/trained.json and the process
    replaces itself (exec, same pid) by the timing phase,
    `python -m effnetv2_jax.nas.trial TRIAL_DIR time`;
  * a reference (the backbone, re-timed during the search) starts at the
    timing phase.
Every step time is thus measured in a process that has done nothing else:
timed in the process that had just trained, the digits backbone stepped 18%
slower than in a fresh one (README, "Architecture search"), which would have
biased every candidate against the reference.
The outcome goes to TRIAL_DIR/result.json, written atomically; the run's own
files (metrics.jsonl with the stage-end evals the driver's early-stopping
rule reads, summary.json) to TRIAL_DIR/run. A trial whose loss diverges
writes a failed result. The driver reads anything else (a crash, a hang, a
kill) from the exit status and log.txt.

The driver's pid is in EFFNETV2_NAS_DRIVER_PID: the trial dies with it.
The driver pins the process to its devices through the environment: a CPU
core list in EFFNETV2_NAS_CPUS (applied here, before JAX starts), or the
accelerator runtime's own variables (CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

CPUS_ENV = 'EFFNETV2_NAS_CPUS'
DRIVER_PID_ENV = 'EFFNETV2_NAS_DRIVER_PID'
JOB_FILE = 'job.json'
RESULT_FILE = 'result.json'
TRAINED_FILE = 'trained.json'  # the training phase's metrics
RUN_DIR = 'run'
EXIT_STOPPED = 143  # stopped by the driver (SIGTERM): early stopping


def pin_cpus() -> None:
  cpus = os.environ.get(CPUS_ENV)
  if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})


def die_with_driver() -> None:
  """Asks Linux to kill this process when the driver that started it dies,
  so a restarted driver's requeued trial never races an orphan."""
  driver = os.environ.get(DRIVER_PID_ENV)
  if not driver or not sys.platform.startswith('linux'):
    return
  import ctypes  # pylint: disable=g-import-not-at-top
  pr_set_pdeathsig = 1
  ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
  if os.getppid() != int(driver):  # it died before we asked
    os._exit(EXIT_STOPPED)


def config_from_dict(values, architecture):
  """A trainer config from its JSON form (`ConfigDict.to_json()` read back)
  and the network's description."""
  from effnetv2_jax.nas import settings  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import recipes  # pylint: disable=g-import-not-at-top
  # Leaf by leaf into the base config, so that its typed fields (model.arch
  # takes any description; pairs are tuples) stay what the trainer expects.
  config = recipes.base_config()
  for key, value in settings.flatten(values).items():
    if key != 'model.arch':
      config.update_from_flattened_dict(
          {key: tuple(value) if isinstance(value, list) else value})
  config.model.arch = architecture
  return config


def trainer_config(job):
  """The trainer config the job describes, with the candidate's network, the
  holdout as the final eval split and the search's shared cache."""
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  config = config_from_dict(job['config'], job['architecture'])
  config.data.eval_split = data.HOLDOUT_SPLIT
  config.compilation_cache_dir = job['cache_dir']
  config.seed = job['seed']
  config.progress_bar = 'off'
  return config


def train(config, run_dir: str) -> tuple[dict, dict]:
  """(summary, trained metrics for the result) of the short training."""
  from effnetv2_jax.training import trainer  # pylint: disable=g-import-not-at-top
  options = trainer.RunOptions(checkpoints=False, tensorboard=False,
                               plots=False, export=False)
  _, summary = trainer.train_and_evaluate(config, run_dir, options=options)
  stages = summary['stages']
  metrics = dict(
      accuracy=summary['eval'].get('top1'),
      ema_accuracy=summary['eval'].get('ema_top1'),
      stage_accuracies=[s['eval_metrics'].get('top1') for s in stages],
      params=summary['num_params'],
      train_compile_time_s=sum(s['compile_time_s'] for s in stages) + max(
          [s['update_compile_time_s'] for s in stages] or [0.0]),
      programs=[dict(kind='gradient', seconds=s['compile_time_s'],
                     cache_hit=bool(s['compile_cache_hit'])) for s in stages],
      train_step_time_s=summary['mean_step_time_s'],
      train_wall_time_s=summary['wall_time_s'])
  return summary, metrics


def time_step(config, timing: dict) -> dict:
  """The step time measurement (`timing.time_train_step`) for the config's
  network, on freshly initialised weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.nas import timing as timing_lib  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import compilation, mesh as mesh_lib, task as task_lib, trainer  # pylint: disable=g-import-not-at-top
  info = data.dataset_info(config.data.dataset, data_dir=config.data.data_dir,
                           holdout=config.data.holdout)
  model = task_lib.model_spec_from_config(
      config, num_classes=config.model.num_classes or info.num_classes,
      dtype=trainer.resolve_dtype(config.model.dtype))
  mesh = mesh_lib.mesh_from_config(config.mesh)
  task = task_lib.task_from_config(
      config, mesh=mesh, model=model,
      num_train_examples=info.num_train_examples,
      # The training run's own period: the same update program, so the
      # timing loads it from the cache instead of compiling it again.
      total_epochs=config.train.epochs or 1.0)
  with compilation.persistent_cache(config.compilation_cache_dir):
    measured = timing_lib.time_train_step(
        task, task.init_sharded(), batch_size=timing['batch_size'],
        image_size=timing['image_size'],
        warmup_steps=timing['warmup_steps'], steps=timing['steps'],
        dropout_rate=float(config.progressive.dropout_rate[-1]),
        cache_enabled=True)
  return dict(measured.to_dict(), params=task.num_params(),
              hardware=timing_lib.hardware_signature(),
              devices=jax.device_count())


def train_phase(job: dict, trial_dir: str) -> dict | None:
  """Trains a candidate and writes TRIAL_DIR/trained.json; returns the final
  result instead when the training failed or was stopped."""
  from effnetv2_jax.training import trainer  # pylint: disable=g-import-not-at-top
  start = time.time()
  config = trainer_config(job)
  try:
    summary, metrics = train(config, os.path.join(trial_dir, RUN_DIR))
  except trainer.NonFiniteLossError as e:
    return dict(status='failed', reason=f'diverged: {e}',
                wall_time_s=time.time() - start)
  if summary['status'] != 'completed':
    return dict(status='stopped', reason='stopped by the driver',
                metrics=metrics, wall_time_s=time.time() - start)
  from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
  ledger.write_json_atomic(os.path.join(trial_dir, TRAINED_FILE), dict(
      metrics=metrics, wall_time_s=time.time() - start))
  return None


def time_phase(job: dict, trial_dir: str) -> dict:
  """Times the step (in a process that has done nothing else) and returns
  the trial's result, with the training's metrics for a candidate."""
  from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
  start = time.time()
  trained = {'metrics': {}, 'wall_time_s': 0.0}
  if job['kind'] == 'candidate':
    trained = ledger.read_json(os.path.join(trial_dir, TRAINED_FILE))
    if trained is None:
      return dict(status='failed', reason=f'no {TRAINED_FILE}: the training '
                  'phase did not finish')
  metrics = dict(trained['metrics'])
  timed = time_step(trainer_config(job), job['timing'])
  metrics.update(
      step_time_s=timed['step_time_s'], hardware=timed['hardware'],
      params=timed['params'], timing=timed,
      programs=metrics.get('programs', []) + timed['programs'],
      timing_wall_time_s=time.time() - start)
  return dict(status='completed', metrics=metrics,
              wall_time_s=trained['wall_time_s'] + time.time() - start)


def _time_in_a_fresh_process(trial_dir: str) -> None:
  """Replaces this process by the timing phase (same pid, so the driver
  still waits on it; all memory and devices released)."""
  sys.stdout.flush()
  sys.stderr.flush()
  module = __spec__.name if __spec__ else 'effnetv2_jax.nas.trial'
  os.execv(sys.executable, [sys.executable, '-m', module, trial_dir, 'time'])


def main(argv) -> int:
  if len(argv) not in (2, 3) or argv[2:] not in ([], ['time']):
    print('usage: python -m effnetv2_jax.nas.trial TRIAL_DIR [time]',
          file=sys.stderr)
    return 2
  die_with_driver()
  pin_cpus()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from effnetv2_jax.nas import ledger  # pylint: disable=g-import-not-at-top
  trial_dir = argv[1]
  job = ledger.read_json(os.path.join(trial_dir, JOB_FILE))
  if job is None:
    print(f'error: no readable {JOB_FILE} in {trial_dir}', file=sys.stderr)
    return 2
  if job['kind'] == 'candidate' and argv[2:] != ['time']:
    result = train_phase(job, trial_dir)
    if result is None and job.get('timing') is None:  # accuracy only
      trained = ledger.read_json(os.path.join(trial_dir, TRAINED_FILE))
      result = dict(status='completed', metrics=trained['metrics'],
                    wall_time_s=trained['wall_time_s'])
    elif result is None:
      _time_in_a_fresh_process(trial_dir)
  else:
    result = time_phase(job, trial_dir)
  result['trial_id'] = job['trial_id']
  ledger.write_json_atomic(os.path.join(trial_dir, RESULT_FILE), result)
  print(f'trial {job["trial_id"]}: {result["status"]}', flush=True)
  return EXIT_STOPPED if result['status'] == 'stopped' else 0


if __name__ == '__main__':
  # Before JAX starts: the same allocator set-up as the trainer's command.
  from effnetv2_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_for_host_memory()
  sys.exit(main(sys.argv))
