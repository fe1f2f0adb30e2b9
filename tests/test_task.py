"""TrainTask's seams: loss terms, extra networks, planner state, run options.

A loss term that asks for the model's features and trains a second network
beside it (a stand-in for self-distillation), a planner with state of its
own, and library-style runs that must leave the process as they found it.
"""

import dataclasses
import gc
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effnetv2_jax.data import pipeline
from effnetv2_jax.models import families
from effnetv2_jax.models import small
from effnetv2_jax.training import compilation
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer
from effnetv2_jax.training import progressive
from effnetv2_jax.training import schedules
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import task as task_lib
from effnetv2_jax.training import trainer
from config_files import load_config
from interruptions import run_and_signal

ARCH = small.TINY  # its pre-logits are 32 wide
CLASSES, BATCH, SIZE = 10, 8, 16
SCHEDULE = {'lr_per_256': 0.5, 'kind': 'constant', 'warmup_epochs': 0.0}
EXTRA_LR = 0.05


class _Projector(nnx.Module):
  """A second network: pre-logits (32) -> 8, with BatchNorm statistics."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(32, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.linear(x), use_running_average=False)


class _ProjectorSpec:

  def build(self, seed):
    return _Projector(nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class _FeatureMatch:
  """Pulls the first 8 pre-logit features toward the projector's output,
  and the projector toward them: both networks get gradients."""

  name: str = 'match'
  needs_features: bool = True
  weight: float = 0.5

  def __call__(self, inputs: task_lib.LossInputs):
    features = inputs.features['pre_logits']
    target = inputs.extras['proj'](features)
    return self.weight * jnp.mean((features[:, :8] - target) ** 2)


def _extra():
  return task_lib.ExtraNetwork(
      'proj', _ProjectorSpec(), make_optimizer=optax.sgd)


def _task(terms=(), extras=(), ema_decay=0.9):
  return task_lib.TrainTask(
      state_lib.ModelSpec(ARCH, CLASSES, drop_path_rate=0.2),
      mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]),
      make_optimizer=optimizer.build, schedule=SCHEDULE, total_epochs=1.0,
      num_train_examples=100, terms=terms, extras=extras, ema_decay=ema_decay,
      ema_ramp=False)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
          'label': np.eye(CLASSES, dtype=np.float32)[
              rng.integers(0, CLASSES, BATCH)]}


def _hparams(task):
  return task.hparams(batch_size=BATCH, start_step=0, start_epoch=0.0,
                      dropout_rate=0.1)


def test_hparam_names_are_what_the_schedule_produces():
  produced = schedules.stage_hparams(SCHEDULE, batch_size=8, start_step=0,
                                     start_epoch=0.0, num_train_examples=100)
  assert set(produced) == set(schedules.STAGE_HPARAM_NAMES)
  task = _task()
  assert set(_hparams(task)) == set(task.hparams_spec()) == set(
      task_lib.HPARAM_NAMES)


def test_every_program_lowers_from_the_tasks_own_signatures():
  task = _task(terms=[_FeatureMatch()], extras=[_extra()])
  for kind, shape in (('gradient', (BATCH, SIZE)), ('update', ()),
                      ('eval', (BATCH, 24))):
    assert task.lower(kind, *shape).as_text()
  with pytest.raises(ValueError, match='unknown program'):
    task.abstract_args('evaluate')


def test_a_loss_term_adds_to_the_loss_and_is_logged():
  plain, with_term = _task(extras=[_extra()]), _task(
      terms=[_FeatureMatch()], extras=[_extra()])
  state = jax.jit(with_term.init)()
  _, _, base = jax.jit(plain.gradient_step)(state, _batch(), _hparams(plain))
  _, _, metrics = jax.jit(with_term.gradient_step)(state, _batch(),
                                                   _hparams(with_term))
  assert 'loss_match' not in base
  assert float(metrics['loss_match']) > 0
  # Same weights, batch and masks: the term is the whole difference.
  np.testing.assert_allclose(float(metrics['loss']),
                             float(base['loss'] + metrics['loss_match']),
                             rtol=1e-5)


def test_an_extra_network_trains_with_its_own_optimizer_ema_and_statistics():
  task = _task(terms=[_FeatureMatch()], extras=[_extra()])
  state = jax.jit(task.init)()
  before = jax.device_get(state.extras['proj'])
  grads, stats, _ = jax.jit(task.gradient_step)(state, _batch(),
                                                _hparams(task))
  after, metrics = jax.jit(task.train_step)(state, _batch(), _hparams(task))
  after = jax.device_get(after.extras['proj'])
  extra_grads = jax.device_get(grads[1]['proj'])
  lr = float(metrics['learning_rate'])
  # Plain SGD, not the model's RMSProp: params - lr * grad, leaf by leaf.
  for (path, new), old, g in zip(
      jax.tree_util.tree_flatten_with_path(after.params)[0],
      jax.tree.leaves(before.params), jax.tree.leaves(extra_grads)):
    assert np.abs(g).max() > 0, path
    np.testing.assert_allclose(new, old - lr * g, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # Its BatchNorm statistics moved, and so did its weight average (decay
  # 0.9: one tenth of the way to the new weights).
  np.testing.assert_allclose(after.batch_stats['bn']['mean'],
                             jax.device_get(stats[1]['proj'])['bn']['mean'])
  assert np.abs(after.batch_stats['bn']['mean']).max() > 0
  np.testing.assert_allclose(
      after.ema_params['linear']['kernel'],
      before.ema_params['linear']['kernel'] + 0.1 * (
          after.params['linear']['kernel'] -
          before.ema_params['linear']['kernel']), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- through the trainer --


def _tiny_config(**overrides):
  return load_config('tiny', **overrides)


class _DrawingPlanner(progressive.StagePlanner):
  """Draws each stage's dropout from its own random stream: a resumed run
  makes the same draws only if the stream's state was checkpointed."""

  def __init__(self, plan):
    self._linear = progressive.LinearStagePlanner(plan)
    self.total_steps = self._linear.total_steps
    self.total_epochs = self._linear.total_epochs
    self.num_stages = self._linear.num_stages
    self._rng = np.random.default_rng(123)

  def next_stage(self, history):
    stage = self._linear.next_stage(history)
    if stage is None:
      return None
    return dataclasses.replace(
        stage, dropout_rate=float(self._rng.uniform(0.0, 0.3)))

  def expected_stages(self, history):
    return self._linear.expected_stages(history)

  def state_dict(self):
    return {'rng': self._rng.bit_generator.state}

  def load_state_dict(self, state):
    self._rng.bit_generator.state = state['rng']


def _planner():
  return _DrawingPlanner(progressive.plan_stages(
      num_stages=3, epochs=0, total_steps=12, num_train_examples=1437,
      batch_size=16, min_image_size=16, max_image_size=24,
      randaug_magnitude=(0, 0)))


def _seam_run(workdir, cache_dir, planner):
  config = _tiny_config(**{'compilation_cache_dir': cache_dir,
                           'train.total_steps': 12,
                           'checkpoint.every_steps': 2})
  return trainer.train_and_evaluate(
      config, workdir, planner=planner, terms=[_FeatureMatch()],
      extras=[_extra()])


def test_extras_and_planner_state_resume_bitwise_after_sigterm(tmp_path):
  cache = str(tmp_path / 'cache')
  ref_state, ref_summary = _seam_run(str(tmp_path / 'ref'), cache, _planner())
  assert 'loss_match' in ref_summary['stages'][0]['train_metrics']

  workdir = str(tmp_path / 'interrupted')
  _, summary = run_and_signal(
      lambda: _seam_run(workdir, cache, _planner()), workdir, 6)
  assert summary['status'] == 'preempted' and summary['final_step'] < 12

  resumed, summary = _seam_run(workdir, cache, _planner())
  assert summary['final_step'] == 12
  # The resumed planner made the reference's draws, and the stage means
  # cover the whole stage although it ran in two processes' worth of parts.
  assert [s['settings'] for s in summary['stages']] == [
      s['settings'] for s in ref_summary['stages']]
  for got, want in zip(summary['stages'], ref_summary['stages']):
    assert got['train_metrics']['loss'] == pytest.approx(
        want['train_metrics']['loss'], rel=1e-6)
  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(jax.device_get(ref_state))[0],
      jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert 'proj' in resumed.extras


def test_library_runs_write_only_results_and_leave_the_process_as_found(
    tmp_path):
  settings = ('jax_compilation_cache_dir',
              'jax_persistent_cache_min_compile_time_secs',
              'jax_persistent_cache_min_entry_size_bytes')
  before = {name: getattr(jax.config, name) for name in settings}
  threads_before = set(threading.enumerate())
  options = trainer.RunOptions(checkpoints=False, tensorboard=False,
                               plots=False, export=False)
  for index in range(3):
    workdir = tmp_path / f'run{index}'
    _, summary = trainer.train_and_evaluate(
        _tiny_config(compilation_cache_dir=str(tmp_path / 'cache')),
        str(workdir), options=options)
    assert summary['status'] == 'completed'
    assert sorted(os.listdir(workdir)) == ['metrics.jsonl', 'summary.json']
  assert {name: getattr(jax.config, name) for name in settings} == before
  gc.collect()
  assert set(threading.enumerate()) <= threads_before
  assert all(it._dataset is None for it in pipeline._live_iterators)  # pylint: disable=protected-access


def test_step_memory_counts_the_whole_state_and_both_programs():
  task = _task()
  compiler = compilation.Compiler(task, cache_enabled=False)
  try:
    gradient, _ = compiler.get('gradient', BATCH, SIZE)
    update, _ = compiler.get('update')
  finally:
    compiler.close()
  state_bytes = compilation.per_device_bytes(task.target)
  params_bytes = compilation.per_device_bytes(task.target.params)
  # RMSProp's two slots and the EMA copy: the state is several times the
  # weights, and the gradient program alone never sees most of it.
  assert state_bytes > 3 * params_bytes
  assert gradient.memory['argument_size_in_bytes'] < state_bytes
  step = compilation.step_memory(
      gradient.memory, update.memory, state_bytes=state_bytes,
      batch_bytes=compilation.per_device_bytes(task.batch_spec(BATCH, SIZE)))
  total = lambda m: (m['argument_size_in_bytes'] + m['output_size_in_bytes'] +
                     m['temp_size_in_bytes'] - m.get('alias_size_in_bytes', 0))
  assert total(step) >= max(total(gradient.memory), total(update.memory))


@dataclasses.dataclass(frozen=True)
class _ToyDescription:
  width: int


class _ToyMlp(nnx.Module):
  """A network of another family: mean-pooled pixels through one layer."""

  def __init__(self, width, num_classes, rngs):
    self.hidden = nnx.Linear(3, width, rngs=rngs)
    self.out = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x, *, training=False, rng=None, dropout_rate=None,
               drop_path_rate=None, bn_groups=1, return_features=False):
    del training, rng, dropout_rate, drop_path_rate, bn_groups
    features = {'pre_logits': jax.nn.relu(self.hidden(x.mean(axis=(1, 2))))}
    logits = self.out(features['pre_logits'])
    return (logits, features) if return_features else logits


class _ToyFamily:
  name = 'toy_mlp'
  description_type = _ToyDescription

  def parse(self, description):
    if isinstance(description, _ToyDescription):
      return description
    return _ToyDescription(width=int(description['width']))

  def build(self, description, num_classes, *, rngs, **options):
    del options
    return _ToyMlp(description.width, num_classes, rngs)

  def train_size(self, description):
    return 16

  def eval_size(self, description):
    return 16

  def normalization(self, description):
    return 'inception'

  def to_dict(self, description):
    return {'family': self.name, 'width': description.width}


def test_the_task_trains_any_registered_model_family(monkeypatch):
  with pytest.raises(ValueError, match='unknown model family .toy_mlp.'):
    state_lib.ModelSpec({'family': 'toy_mlp', 'width': 4}, CLASSES)
  monkeypatch.setitem(families._FAMILIES, 'toy_mlp', _ToyFamily())  # pylint: disable=protected-access
  spec = state_lib.ModelSpec({'family': 'toy_mlp', 'width': 4}, CLASSES)
  assert spec.description == _ToyDescription(4)
  assert state_lib.ModelSpec(spec.to_dict(), CLASSES).to_dict() == {
      'family': 'toy_mlp', 'width': 4}
  assert spec.num_params() == 3 * 4 + 4 + 4 * CLASSES + CLASSES
  task = task_lib.TrainTask(
      spec, mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]),
      make_optimizer=optimizer.build, schedule=SCHEDULE, total_epochs=1.0,
      num_train_examples=100)
  state = jax.jit(task.init)()
  after, metrics = jax.jit(task.train_step)(state, _batch(), _hparams(task))
  assert np.isfinite(float(metrics['loss']))
  assert int(after.step) == 1
  assert not np.allclose(after.params['out']['kernel'],
                         state.params['out']['kernel'])
  # The default family still parses variant names.
  assert state_lib.ModelSpec('b0', CLASSES).eval_size == 224
