"""The training loop end to end: outputs, exact resume, failures, fine-tuning.

Runs use configs/tiny.py (a 4k-parameter network, a few steps) on 8 fake CPU
devices, and share one persistent compilation cache, so after the first run
the stage steps load from it (which the resume test also checks).
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from effnetv2_jax.models import small
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import compilation
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import loop
from effnetv2_jax.training import progressive
from effnetv2_jax.training import trainer
from config_files import load_config
from interruptions import committed_steps, run_and_signal, when_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _tiny_config(arg=None, **overrides):
  return load_config('tiny', arg, **overrides)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


# ----------------------------------------------------------- config checks --


@pytest.mark.parametrize('overrides, key', [
    ({'model.arch': 's9'}, 'config.model.arch'),
    ({'data.dataset': 'mnist_typo'}, 'config.data.dataset'),
    ({'train.batch_size': 12}, 'config.train.batch_size'),
    ({'eval.image_size': 20}, 'config.eval.image_size'),
    ({'progressive.dropout_rate': (0.1, 1.2)}, 'config.progressive.dropout_rate'),
    ({'init_from.required': True}, 'config.init_from.path'),
    ({'mesh.model': 3}, 'config.mesh.model'),
    ({'model.bn_replicas_per_group': 3}, 'config.model.bn_replicas_per_group'),
    ({'schedule.kind': 'linear'}, 'config.schedule.kind'),
    ({'compilation_cache_dir': '/proc/no_such_dir'},
     'config.compilation_cache_dir'),
    ({'data.holdout': 1430}, 'config.data.holdout'),  # 7 left, batch 16
])
def test_invalid_config_fails_at_start_naming_the_key(tmp_path, overrides,
                                                      key):
  config = _tiny_config(**overrides)
  with pytest.raises(config_checks.ConfigError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert key in str(error.value)
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unknown_config_key_is_named(tmp_path):
  config = _tiny_config()
  config.train.batchsize = 64  # a typo for batch_size
  with pytest.raises(config_checks.ConfigError, match='train.batchsize'):
    trainer.train_and_evaluate(config, str(tmp_path))


# ---------------------------------------------------------------- end to end --


class _RecordingPlanner(progressive.StagePlanner):
  """The linear plan, but stage 2's dropout is set from stage 1's outputs.

  Stands in for the adaptive controller: it must see the finished stages'
  train and eval metrics.
  """

  def __init__(self, plan):
    self._linear = progressive.LinearStagePlanner(plan)
    self.total_steps = self._linear.total_steps
    self.total_epochs = self._linear.total_epochs
    self.num_stages = self._linear.num_stages
    self.seen = []

  def expected_stages(self, history):
    return self._linear.expected_stages(history)

  def next_stage(self, history):
    self.seen.append([dict(h.train_metrics) for h in history])
    stage = self._linear.next_stage(history)
    if stage is not None and history:
      loss = history[-1].train_metrics['loss']
      stage = progressive.StageSettings(
          **dict(stage.to_dict(), dropout_rate=min(0.5, loss / 10)))
    return stage


class _NoMockFs:
  """Stands in for tfds' MockFs inside `mock_data`'s `as_dataset`.

  MockFs redirects every file access of the *process* while it is active;
  the input pipeline calls `as_dataset` on a background thread, so our
  checkpoint and compilation-cache writes on other threads would land in
  its temporary directory. Without it, `as_dataset` only needs the mocked
  data directory to exist, which the test creates.
  """

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_file(self, *args, **kwargs):
    del args, kwargs


@contextlib.contextmanager
def _mock_tfds(data_dir, names, num_examples):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  for name in names:
    version = str(tfds.builder_cls(name).VERSION)
    os.makedirs(os.path.join(data_dir, name, version), exist_ok=True)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir), \
      mock.patch.object(mocking.test_utils, 'MockFs', _NoMockFs):
    yield


def test_end_to_end_under_tfds_mock_data(tmp_path, cache_dir):
  config = _tiny_config('cifar10', compilation_cache_dir=cache_dir)
  plan = progressive.plan_stages(
      num_stages=2, epochs=0, total_steps=8, num_train_examples=20,
      batch_size=16, min_image_size=16, max_image_size=24,
      randaug_magnitude=(0, 0), dropout_rate=(0.0, 0.1))
  planner = _RecordingPlanner(plan)
  with _mock_tfds(str(tmp_path / 'tfds'), ['cifar10'], num_examples=20):
    state, summary = trainer.train_and_evaluate(config, str(tmp_path / 'run'),
                                                planner=planner)
  assert summary['status'] == 'completed'
  assert summary['final_step'] == int(state.step) == 8
  for key in ('top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss'):
    assert np.isfinite(summary['eval'][key])
  assert 0 <= summary['eval']['top1'] <= summary['eval']['top5'] <= 1
  assert [s['settings']['image_size'] for s in summary['stages']] == [16, 24]
  for stage in summary['stages']:
    assert stage['wall_time_s'] > 0 and stage['images_per_sec'] > 0
    assert stage['compile_time_s'] > 0
    assert np.isfinite(stage['train_metrics']['loss'])
  assert summary['mean_step_time_s'] > 0
  # The planner saw stage 1's metrics and its choice was used.
  assert planner.seen[1][0]['loss'] > 0
  assert summary['stages'][1]['settings']['dropout_rate'] == pytest.approx(
      min(0.5, summary['stages'][0]['train_metrics']['loss'] / 10))

  run = tmp_path / 'run'
  written = json.loads((run / 'summary.json').read_text())
  assert written['eval'] == pytest.approx(summary['eval'])
  assert (run / 'curves.png').stat().st_size > 1000
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(run))
  records = [json.loads(line) for line in
             (run / 'metrics.jsonl').read_text().splitlines()]
  assert {'train', 'eval', 'compile'} <= {r['kind'] for r in records}
  ckpt = checkpointing.Checkpointer(str(run / 'checkpoints'))
  assert ckpt.latest_step() == 8
  ckpt.close()
  # The EMA weights, exported as a model directory for inference.
  from effnetv2_jax.models import weights  # pylint: disable=g-import-not-at-top
  assert summary['model_dir'] == str(run / 'model')
  meta = weights.read_meta(summary['model_dir'])
  assert meta['num_classes'] == 10 and 'EMA' in meta['source']


# ------------------------------------------------------------ exact resume --

RESUME_OVERRIDES = {'train.total_steps': 40, 'log_every_steps': 1,
                    'checkpoint.every_steps': 2, 'checkpoint.keep': 20}


def _resume_config(cache_dir):
  return _tiny_config(compilation_cache_dir=cache_dir, **RESUME_OVERRIDES)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted 40-step tiny run: (state, summary, workdir)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state, summary = trainer.train_and_evaluate(_resume_config(cache_dir),
                                              workdir)
  return state, summary, workdir


def test_resume_after_sigterm_and_sigkill_is_bitwise_identical(
    tmp_path, cache_dir, reference):
  ref_state, ref_summary, _ = reference
  assert ref_summary['final_step'] == 40
  workdir = str(tmp_path / 'interrupted')

  # 1. A preemption notice (SIGTERM) mid stage 1, in this process: the loop
  #    writes a checkpoint and returns.
  _, summary = run_and_signal(
      lambda: trainer.train_and_evaluate(_resume_config(cache_dir), workdir),
      workdir, 6, signal.SIGTERM)
  assert summary['status'] == 'preempted'
  assert 6 <= summary['final_step'] < 20
  assert committed_steps(workdir)[-1] == summary['final_step']

  # 2. The command-line job, killed hard (SIGKILL) mid stage 2, wherever it
  #    is (possibly mid-save).
  command = [sys.executable, '-m', 'effnetv2_jax.main', f'--config={TINY}',
             f'--workdir={workdir}',
             f'--config.compilation_cache_dir={cache_dir}'] + [
                 f'--config.{k}={v}' for k, v in RESUME_OVERRIDES.items()]
  with open(tmp_path / 'job.log', 'w') as log:  # a pipe could fill and block
    job = subprocess.Popen(command, cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT)
  killed = when_checkpoint(workdir, 26, job.kill,
                            lambda: job.poll() is None)
  job.wait(timeout=60)
  assert killed, (f'the job ended (rc {job.returncode}) before the kill:\n'
                  + (tmp_path / 'job.log').read_text()[-3000:])
  assert job.returncode == -signal.SIGKILL
  assert 26 <= committed_steps(workdir)[-1] < 40

  # 3. Resume to the end: the same weights, bit for bit.
  resumed, summary = trainer.train_and_evaluate(_resume_config(cache_dir),
                                                workdir)
  assert summary['final_step'] == 40
  for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats',
               'opt_state', 'rng'):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(
            jax.device_get(getattr(ref_state, name)))[0],
        jax.tree.leaves(jax.device_get(getattr(resumed, name)))):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}{path}')
  for key in ('top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss'):
    assert summary['eval'][key] == ref_summary['eval'][key], key
  # The resumed run loaded its stage's step from the persistent cache.
  assert summary['stages'][-1]['compile_cache_hit']


def test_ctrl_c_writes_a_checkpoint_and_stops_and_a_second_interrupts(
    tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  _, summary = run_and_signal(
      lambda: trainer.train_and_evaluate(_resume_config(cache_dir), workdir),
      workdir, 2, signal.SIGINT)
  assert summary['status'] == 'preempted'
  assert committed_steps(workdir)[-1] == summary['final_step'] < 40
  watch = loop.PreemptionWatch()
  with watch:
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.requested == 'SIGINT' and watch.should_stop(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is not watch._handle  # pylint: disable=protected-access


def test_a_workdir_of_another_network_is_refused_naming_the_key(reference):
  _, _, workdir = reference
  wider = dataclasses.replace(small.TINY, head_channels=48)
  with pytest.raises(config_checks.ConfigError,
                     match=r'^config.model.arch: .* another network') as error:
    trainer.train_and_evaluate(
        _tiny_config(**{'model.arch': wider.to_dict()}), workdir)
  assert '\n' not in str(error.value)


# ---------------------------------------------------------------- NaN guard --


def test_nan_loss_stops_with_step_and_stage_and_keeps_good_checkpoint(
    tmp_path, cache_dir, monkeypatch):
  from effnetv2_jax import data  # pylint: disable=g-import-not-at-top
  real = data.make_train_iterator

  def poisoned(*args, **kwargs):
    iterator = real(*args, **kwargs)
    if kwargs['image_size'] != 24:  # only stage 2
      return iterator

    def batches():
      for index, batch in enumerate(iterator, start=kwargs['start_batch']):
        if index == 2:  # global step 4 + 2 + 1 = 7
          batch = dict(batch, image=batch['image'] * np.nan)
        yield batch
    return batches()

  monkeypatch.setattr(data, 'make_train_iterator', poisoned)
  config = _tiny_config(compilation_cache_dir=cache_dir)
  with pytest.raises(trainer.NonFiniteLossError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'at step 7' in message and 'stage 2/2' in message
  assert 'last good checkpoint is step 6' in message
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.latest_step() == 6
  ckpt.close()
  raw = checkpointing.read_pretrained(str(tmp_path), prefer_ema=False)[0]
  assert all(np.isfinite(v).all() for v in raw.values())


# -------------------------------------------------------------- fine-tuning --


def test_load_pretrained_prefers_ema_and_reinitialises_a_new_head(tmp_path):
  target = {'stem': {'conv': {'kernel': np.zeros((3, 3, 3, 8), np.float32)}},
            'head': {'classifier': {'kernel': np.zeros((32, 10), np.float32),
                                    'bias': np.zeros(10, np.float32)}}}
  stats = {'stem': {'bn': {'mean': np.zeros(8, np.float32)}}}
  np.savez(tmp_path / 'pretrained.npz', **{
      'params/stem/conv/kernel': np.full((3, 3, 3, 8), 1.0, np.float32),
      'ema_params/stem/conv/kernel': np.full((3, 3, 3, 8), 2.0, np.float32),
      'ema_params/head/classifier/kernel': np.ones((32, 7), np.float32),
      'ema_params/head/classifier/bias': np.ones(7, np.float32),
      'ema_params/extra/kernel': np.ones(3, np.float32),
      'ema_batch_stats/stem/bn/mean': np.full(8, 3.0, np.float32)})
  params, batch_stats, report = checkpointing.load_pretrained(
      str(tmp_path / 'pretrained.npz'), target, stats)
  assert report.used_ema
  np.testing.assert_array_equal(params['stem']['conv']['kernel'], 2.0)
  np.testing.assert_array_equal(batch_stats['stem']['bn']['mean'], 3.0)
  np.testing.assert_array_equal(params['head']['classifier']['kernel'], 0.0)
  assert set(report.reinitialised) == {'head/classifier/kernel',
                                       'head/classifier/bias'}
  assert report.unused == ['extra/kernel']
  assert 'head/classifier/kernel' in report.describe()


def test_fine_tuning_starts_from_a_training_workdir(tmp_path, cache_dir,
                                                    reference, capsys):
  pretrained, _, source = reference
  config = _tiny_config(compilation_cache_dir=cache_dir,
                        **{'train.total_steps': 2,
                           'progressive.num_stages': 1,
                           'init_from.path': source,
                           'init_from.required': True,
                           'schedule.lr_per_256': 1e-9})
  state, summary = trainer.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert summary['init_from']['used_ema']
  assert summary['init_from']['reinitialised'] == []
  assert 'loaded' in capsys.readouterr().out
  # A learning rate of 1e-9 leaves the weights where the EMA put them.
  expected = jax.device_get(pretrained.ema_params['stem']['conv']['kernel'])
  np.testing.assert_allclose(
      jax.device_get(state.params['stem']['conv']['kernel']), expected,
      atol=1e-6)
  assert np.abs(expected - jax.device_get(
      pretrained.params['stem']['conv']['kernel'])).max() > 1e-6


# ------------------------------------------------------- compile placement --


def test_compile_beside_training_only_off_gpu():
  assert compilation.compile_beside_training('cpu')
  assert compilation.compile_beside_training('tpu')
  assert not compilation.compile_beside_training('gpu')


@pytest.mark.parametrize('beside', [True, False])
def test_later_stages_compile_before_stepping_where_not_beside(
    tmp_path, cache_dir, beside):
  """Where compiles may not run beside training (GPUs), every later stage's
  step is compiled when the first stage starts stepping; elsewhere the loop
  does not wait for them."""
  waits = []
  original = compilation.Compiler.wait_all

  def recording_wait_all(self):
    seconds = original(self)
    waits.append((sorted(k for k in self._futures if k[0] == 'gradient'),
                  all(f.done() for f in self._futures.values())))
    return seconds

  config = _tiny_config(compilation_cache_dir=cache_dir)
  with mock.patch.object(compilation, 'compile_beside_training',
                         return_value=beside), \
       mock.patch.object(compilation.Compiler, 'wait_all',
                         recording_wait_all):
    _, summary = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['status'] == 'completed'
  sizes = [s['settings']['image_size'] for s in summary['stages']]
  assert len(sizes) == 2
  if beside:
    assert waits == []
  else:
    # Stage 1 waited for both stages' gradient steps (and the eval step).
    keys, all_done = waits[0]
    assert [k[2] for k in keys] == sizes and all_done


# ------------------------------------------------------ compilation cache --


def test_compilation_cache_dir_defaults_to_the_local_workdir():
  default = compilation.compilation_cache_dir
  assert default(None, '/runs/a') == '/runs/a/compilation_cache'
  assert default(None, 'gs://bucket/run') is None
  assert default(None, '/runs/a', active='/shared/cache') == '/shared/cache'
  assert default('/mine', '/runs/a', active='/shared/cache') == '/mine'
  assert default('', '/runs/a', active='/shared/cache') is None


def test_a_run_fills_its_workdir_cache_and_empty_turns_it_off(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  trainer.train_and_evaluate(_tiny_config(), str(tmp_path / 'a'))
  cache = tmp_path / 'a' / 'compilation_cache'
  assert len(os.listdir(cache)) >= 3  # gradient, update and eval steps
  # The run put the process's own setting back.
  assert jax.config.jax_compilation_cache_dir == before
  trainer.train_and_evaluate(_tiny_config(compilation_cache_dir=''),
                             str(tmp_path / 'b'))
  assert not (tmp_path / 'b' / 'compilation_cache').exists()


def test_a_cache_the_user_set_is_used_and_kept(tmp_path):
  mine = str(tmp_path / 'mine')
  jax.config.update('jax_compilation_cache_dir', mine)
  try:
    trainer.train_and_evaluate(_tiny_config(), str(tmp_path / 'run'))
    assert jax.config.jax_compilation_cache_dir == mine
    assert len(os.listdir(mine)) >= 3
    assert not (tmp_path / 'run' / 'compilation_cache').exists()
  finally:
    jax.config.update('jax_compilation_cache_dir', None)
