"""The digits quickstart learns: a shortened run here, the full one on request.

The full quickstart (configs/digits.py: 4 stages, 30 epochs) takes minutes
on a 2-core CPU, most of it compiling one program per stage, which is more
than this suite can spend. The default test trains the same network with the
same recipe for 8 epochs in one stage at the final 32 px: one compile
instead of four (progressive stages are covered by test_train_loop.py). Set
EFFNETV2_FULL_QUICKSTART=1 to run the full configuration and check its 97%
bar.

Threshold of the shortened run: it measured 97.8% test top-1 (98.1% with
the EMA weights) on this machine. The bar is 95% on the better of the two:
3 points below, for the spread that other CPUs and XLA versions bring
(different float rounding gives a different trajectory), while anything
broken fails it: chance is 10%, and a trainer that mixes up labels, never
updates BN statistics, evaluates the wrong weights or mis-schedules the
learning rate stays far below it.
"""

import os

import pytest

from effnetv2_jax.training import trainer
from config_files import load_config

SHORT_THRESHOLD = 0.95
FULL_THRESHOLD = 0.97

def _digits_config():
  return load_config('digits')

def test_shortened_quickstart_reaches_95_percent(tmp_path):
  config = _digits_config()
  config.train.epochs = 8.0
  config.progressive.num_stages = 1  # trains at the last stage's values
  config.eval.at_stage_end = False
  config.checkpoint.every_steps = 0
  config.export_model = False
  config.progress_bar = 'off'
  _, summary = trainer.train_and_evaluate(config, str(tmp_path))
  top1 = max(summary['eval']['top1'], summary['eval']['ema_top1'])
  print(f"shortened quickstart: top-1 {summary['eval']['top1']:.4f}, EMA "
        f"{summary['eval']['ema_top1']:.4f}, {summary['wall_time_s']:.0f}s")
  assert [s['settings']['image_size'] for s in summary['stages']] == [32]
  assert top1 >= SHORT_THRESHOLD, summary['eval']

@pytest.mark.skipif(os.environ.get('EFFNETV2_FULL_QUICKSTART') != '1',
                    reason='set EFFNETV2_FULL_QUICKSTART=1 (3-5 minutes)')
def test_full_quickstart_reaches_97_percent(tmp_path):
  config = _digits_config()
  config.progress_bar = 'off'
  _, summary = trainer.train_and_evaluate(config, str(tmp_path))
  print(f"quickstart: top-1 {summary['eval']['top1']:.4f}, EMA "
        f"{summary['eval']['ema_top1']:.4f}, {summary['wall_time_s']:.0f}s")
  assert len(summary['stages']) == 4
  assert summary['eval']['ema_top1'] >= FULL_THRESHOLD, summary['eval']
