"""The feedback controller (config.progressive.controller='feedback'): the
policy on hand-made histories, the planner's stages, the run's records, and
a resume after SIGKILL that replays the decisions exactly."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from effnetv2_jax.training import config_checks
from effnetv2_jax.training import feedback
from effnetv2_jax.training import progressive
from effnetv2_jax.training import trainer
from config_files import REPO, load_config
from interruptions import committed_steps, main_killed_after_checkpoint

RULE = feedback.FeedbackRule(hold_gap=0.02, target_gap=0.05, growth_gain=1.0,
                             max_speedup=3.0)
BOUNDS = {'randaug_magnitude': (5.0, 15.0), 'mixup_alpha': (0.0, 0.2),
          'cutmix_alpha': (0.0, 0.0), 'dropout_rate': (0.1, 0.3)}


def _signals(gap, holdout=0.7):
  return feedback.Signals(train_loss=1.0, train_top1=0.6, holdout_loss=1.2,
                          holdout_top1=holdout, probe_loss=0.9,
                          probe_top1=holdout + gap)


def _plan(num_stages=5):
  return progressive.plan_stages(
      num_stages=num_stages, epochs=10, num_train_examples=1000,
      batch_size=100, min_image_size=128, max_image_size=256,
      randaug_magnitude=BOUNDS['randaug_magnitude'],
      mixup_alpha=BOUNDS['mixup_alpha'], dropout_rate=BOUNDS['dropout_rate'])


def _result(settings, gap, holdout=0.7):
  evals = {'holdout': {'top1': holdout, 'loss': 1.0},
           'train_probe': {'top1': holdout + gap, 'loss': 0.8}}
  return progressive.StageResult(
      settings=settings, train_metrics={'loss': 1.0, 'train_top1': 0.5},
      eval_metrics={}, controller_evals=evals)


def _run_planner(planner, gaps):
  """Stages the planner gives when stage k ends with gaps[k]."""
  history, stages = [], []
  while (stage := planner.next_stage(history)) is not None:
    stages.append(stage)
    history.append(_result(stage, gaps[len(history)]))
  return stages


def test_a_growing_gap_raises_regularisation_faster():
  base = 0.25
  steady = feedback.decide(0.25, [_signals(0.08), _signals(0.08)],
                           base_step=base, rule=RULE)
  growing = feedback.decide(0.25, [_signals(0.04), _signals(0.08)],
                            base_step=base, rule=RULE)
  assert 0 < steady.step < growing.step
  assert steady.speed == pytest.approx(0.08 / 0.05)
  # A larger gap (not growing) also rises faster than a smaller one.
  small = feedback.decide(0.25, [_signals(0.03)], base_step=base, rule=RULE)
  assert small.step < steady.step


def test_underfitting_holds_and_bounds_are_kept():
  held = feedback.decide(0.5, [_signals(0.01)], base_step=0.25, rule=RULE)
  assert held.level == 0.5 and held.step == 0.0
  assert 'held' in held.reason
  negative = feedback.decide(0.5, [_signals(-0.05)], base_step=0.25,
                             rule=RULE)
  assert negative.step == 0.0
  huge = feedback.decide(0.1, [_signals(0.0), _signals(0.9)], base_step=0.25,
                         rule=RULE)
  assert huge.speed == RULE.max_speedup
  assert huge.level == pytest.approx(0.1 + 3 * 0.25)
  capped = feedback.decide(0.9, [_signals(0.3)], base_step=0.25, rule=RULE)
  assert capped.level == 1.0 and 'capped' in capped.reason
  for level in (0.0, 0.37, 1.0):
    for name, value in feedback.magnitudes_at(level, BOUNDS).items():
      low, high = BOUNDS[name]
      assert min(low, high) <= value <= max(low, high)


def test_a_gap_at_the_target_reproduces_the_linear_plan():
  linear = _plan()
  planner = feedback.FeedbackStagePlanner(linear, bounds=BOUNDS, rule=RULE)
  stages = _run_planner(planner, [0.05] * 5)
  assert len(stages) == len(linear)
  for ours, theirs in zip(stages, linear):
    assert ours.image_size == theirs.image_size
    assert (ours.start_step, ours.end_step) == (theirs.start_step,
                                                theirs.end_step)
    for name in feedback.MAGNITUDES:
      assert getattr(ours, name) == pytest.approx(getattr(theirs, name))


def test_sizes_come_from_the_ladder_and_the_last_stage_is_the_largest():
  linear = _plan()
  ladder = sorted({s.image_size for s in linear})
  planner = feedback.FeedbackStagePlanner(linear, bounds=BOUNDS, rule=RULE)
  held = _run_planner(planner, [0.0] * 5)  # never overfits: all held
  assert [s.image_size for s in held] == [ladder[0]] * 4 + [ladder[-1]]
  assert all(s.randaug_magnitude == 5.0 for s in held)
  fast = _run_planner(planner, [0.2] * 5)
  assert all(s.image_size in ladder for s in fast)
  assert [s.image_size for s in fast][-1] == ladder[-1]
  assert fast[1].dropout_rate > linear[1].dropout_rate
  assert len(planner.decisions) == 4
  assert planner.decisions[0]['inputs']['gap'] == pytest.approx(0.2)
  # What it expects ahead (compiles, ETA) is on the ladder too.
  assert all(s.image_size in ladder for s in planner.expected_stages([]))


def test_planner_and_rule_reject_what_they_cannot_do():
  plan = progressive.plan_stages(
      num_stages=3, epochs=10, num_train_examples=1000, batch_size=100,
      min_image_size=128, max_image_size=256,
      batch_size_rule='constant_memory', batch_multiple=8)
  with pytest.raises(ValueError, match="batch_size_rule='constant'"):
    feedback.FeedbackStagePlanner(plan, bounds=BOUNDS)
  with pytest.raises(ValueError, match='target_gap must be > 0'):
    feedback.FeedbackRule(target_gap=0.0)
  planner = feedback.FeedbackStagePlanner(_plan(), bounds=BOUNDS)
  no_probe = dataclasses.replace(_result(_plan()[0], 0.1),
                                 controller_evals={})
  with pytest.raises(ValueError, match='no holdout evaluation'):
    planner.next_stage([no_probe])


@pytest.mark.parametrize('overrides, message', [
    ({'data.holdout': 0}, 'config.data.holdout=0'),
    ({'progressive.batch_size_rule': 'constant_memory'},
     "use 'constant'"),
    ({'progressive.controller': 'pid'}, 'progressive.controller'),
    ({'progressive.feedback.max_speedup': 0.5}, 'max_speedup must be >= 1'),
])
def test_bad_controller_settings_are_one_line_config_errors(
    tmp_path, overrides, message):
  config = load_config('tiny', 'controller=feedback', **overrides)
  with pytest.raises(config_checks.ConfigError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert message in str(error.value) and '\n' not in str(error.value)


def test_linear_stays_the_default_everywhere():
  for name, arg in (('digits', None), ('tiny', None), ('imagenet', 's'),
                    ('imagenet21k', 'l')):
    config = load_config(name, arg)
    assert config.progressive.controller == 'linear'
  fb = load_config('imagenet', 's,paper,controller=feedback')
  assert fb.progressive.controller == 'feedback' and fb.data.holdout > 0


def test_feedback_run_resumes_after_sigkill_with_the_same_decisions(
    tmp_path):
  overrides = {'train.total_steps': 24, 'progressive.num_stages': 3,
               'checkpoint.every_steps': 2, 'checkpoint.keep': 20,
               'compilation_cache_dir': str(tmp_path / 'cache')}
  config = lambda: load_config('tiny', 'controller=feedback', **overrides)
  reference, summary = trainer.train_and_evaluate(config(),
                                                  str(tmp_path / 'reference'))
  decisions = summary['controller']['decisions']
  assert summary['controller']['kind'] == 'feedback'
  assert [d['after_stage'] for d in decisions] == [1, 2]
  for stage in summary['stages']:
    size = stage['settings']['image_size']
    assert set(stage['controller_evals']) == {'holdout', 'train_probe'}
    assert size in summary['controller']['ladder']
  second = summary['stages'][1]['settings']
  assert second['dropout_rate'] == pytest.approx(
      0.1 * decisions[0]['level'])  # tiny's dropout ramp is 0 -> 0.1

  workdir = str(tmp_path / 'killed')
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  killed = main_killed_after_checkpoint(
      [f'--config={os.path.join(REPO, "configs", "tiny.py")}:'
       'controller=feedback', f'--workdir={workdir}'] + flags, workdir, 12,
      tmp_path / 'job.log', REPO)
  assert killed, (tmp_path / 'job.log').read_text()[-3000:]
  assert 12 <= committed_steps(workdir)[-1] < 24
  resumed, resumed_summary = trainer.train_and_evaluate(config(), workdir)
  assert resumed_summary['controller']['decisions'] == decisions
  for name in ('params', 'batch_stats', 'opt_state', 'rng'):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(
            jax.device_get(getattr(reference, name)))[0],
        jax.tree.leaves(jax.device_get(getattr(resumed, name)))):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}{path}')
