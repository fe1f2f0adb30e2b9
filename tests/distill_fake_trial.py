"""A stand-in for `effnetv2_jax.nas.trial` in the self-distillation
determination's tests: no JAX, instant.

    PYTHONPATH=tests python -m distill_fake_trial TRIAL_DIR

Environment: FAKE_DISTILL_ACCURACY is a JSON object extractor name ->
holdout top-1 (a name missing from it crashes, exit status 3). Each call
appends the extractor's name to FAKE_DISTILL_CALLS, so tests count trials.
"""

from __future__ import annotations

import json
import os
import sys

from effnetv2_jax.nas import ledger


def main(trial_dir: str) -> int:
  job = ledger.read_json(os.path.join(trial_dir, 'job.json'))
  name = job['config']['distill']['extractor']
  with open(os.environ['FAKE_DISTILL_CALLS'], 'a', encoding='utf-8') as f:
    f.write(name + '\n')
  accuracy = json.loads(os.environ['FAKE_DISTILL_ACCURACY']).get(name)
  if accuracy is None:
    print(f'fake crash for {name}', flush=True)
    return 3
  ledger.write_json_atomic(os.path.join(trial_dir, 'result.json'), dict(
      status='completed', metrics=dict(accuracy=accuracy),
      trial_id=job['trial_id'], epochs=job['config']['train']['epochs']))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
