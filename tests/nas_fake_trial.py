"""A stand-in for `effnetv2_jax.nas.trial` in the driver's tests: no JAX,
instant, and told how to misbehave.

    PYTHONPATH=tests python -m nas_fake_trial TRIAL_DIR

(`config.search.trial_module='nas_fake_trial'`).

Environment: FAKE_TRIAL_BEHAVIOUR is a JSON object trial_id -> 'crash',
'hang' or 'diverge' (default: complete); FAKE_TRIAL_SLEEP_S delays every
trial; FAKE_TRIAL_STAGE_SLEEP_S writes each stage-end eval to
run/metrics.jsonl that long apart (for the early-stopping rule). The metrics
are a deterministic function of the architecture, so rewards are known.
"""

from __future__ import annotations

import json
import os
import sys
import time

from effnetv2_jax.nas import ledger
from effnetv2_jax.nas import trial


def fake_metrics(job: dict) -> dict:
  stages = job['architecture']['stages']
  # More layers and wider expansions: better and slower, like real networks.
  size = sum(int(s.split('_')[0][1:]) * int(s.split('_')[3][1:])
             for s in stages)
  accuracy = min(0.99, 0.3 + 0.02 * size)
  return dict(accuracy=accuracy, ema_accuracy=accuracy,
              stage_accuracies=[accuracy * 0.8, accuracy],
              step_time_s=0.01 * (1 + 0.05 * size), params=1000 + 100 * size,
              hardware='fake-cpu', programs=[])


def main(trial_dir: str) -> int:
  trial.die_with_driver()
  job = ledger.read_json(os.path.join(trial_dir, 'job.json'))
  behaviour = json.loads(os.environ.get('FAKE_TRIAL_BEHAVIOUR', '{}')).get(
      str(job['trial_id']), 'ok')
  print(f'fake trial {job["trial_id"]} ({job["kind"]}): {behaviour}',
        flush=True)
  time.sleep(float(os.environ.get('FAKE_TRIAL_SLEEP_S', '0')))
  if behaviour == 'crash':
    print('RuntimeError: simulated crash in the trial', flush=True)
    return 1
  if behaviour == 'hang':
    time.sleep(3600)
  metrics = fake_metrics(job)
  stage_sleep = float(os.environ.get('FAKE_TRIAL_STAGE_SLEEP_S', '0'))
  if job['kind'] == 'candidate' and stage_sleep:
    run_dir = os.path.join(trial_dir, 'run')
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a',
              encoding='utf-8') as f:
      for step, top1 in enumerate(metrics['stage_accuracies']):
        f.write(json.dumps({'kind': 'eval', 'step': step, 'top1': top1})
                + '\n')
        f.flush()
        time.sleep(stage_sleep)
  if behaviour == 'diverge':
    result = dict(status='failed', reason='diverged: loss is nan at step 3')
  else:
    result = dict(status='completed', metrics=metrics, wall_time_s=0.1)
  result['trial_id'] = job['trial_id']
  ledger.write_json_atomic(os.path.join(trial_dir, 'result.json'), result)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
