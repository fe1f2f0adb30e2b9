"""Pure parts of the trainer: optimizer, schedules, stage plan, EMA, shardings."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import compilation
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import ema
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer
from effnetv2_jax.training import progressive
from effnetv2_jax.training import reporting
from effnetv2_jax.training import schedules


# --------------------------------------------------------------- optimizer --


def _tf1_rmsprop_numpy(w, grads, lrs, rho=0.9, momentum=0.9, eps=1e-3):
  """TF1 `ApplyRMSProp` (training_ops.cc), transcribed in float64."""
  w = np.asarray(w, np.float64)
  ms = np.ones_like(w)
  mom = np.zeros_like(w)
  for g, lr in zip(grads, lrs):
    g = np.asarray(g, np.float64)
    ms += (g * g - ms) * (1 - rho)
    mom = mom * momentum + g * lr / np.sqrt(ms + eps)
    w = w - mom
  return w


def _run(tx_for_lr, w, grads, lrs):
  tx = tx_for_lr(lrs[0])
  state = tx.init(w)
  for g, lr in zip(grads, lrs):
    updates, state = tx_for_lr(lr).update(g, state, w)
    w = optax.apply_updates(w, updates)
  return np.asarray(w)


def test_tf1_rmsprop_matches_numpy_transcription_under_a_decaying_rate():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(5, 7)) * s, jnp.float32)
           for s in (1.0, 0.1, 3.0, 0.5, 2.0, 0.01, 1.0, 0.3)]
  lrs = [0.3 * 0.7**i for i in range(len(grads))]
  ours = _run(lambda lr: optimizer.tf1_rmsprop(lr), w, grads, lrs)
  ref = _tf1_rmsprop_numpy(w, grads, lrs)
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6)

  # The optax idiom (rmsprop then trace then lr) multiplies the whole
  # momentum buffer by the current rate: with a decaying rate it is a
  # different optimizer, which is why ours exists.
  def optax_chain(lr):
    return optax.chain(
        optax.scale_by_rms(decay=0.9, eps=1e-3, initial_scale=1.0,
                           eps_in_sqrt=True),
        optax.trace(decay=0.9), optax.scale(-lr))
  other = _run(optax_chain, w, grads, lrs)
  assert np.abs(other - ref).max() > 1e-3


def test_tf1_rmsprop_schedule_is_called_with_the_update_count():
  seen = []

  def schedule(count):
    seen.append(count)
    return 0.1

  tx = optimizer.tf1_rmsprop(schedule)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update({'w': jnp.ones(3)}, state)
  assert [int(c) for c in seen] == [0, 1]
  assert int(state.count) == 2


def _model_params():
  """Abstract parameters of a small model: structure and shapes only."""
  from effnetv2_jax.models import arch, create_model
  from flax import nnx
  tiny = arch.Architecture(
      name='t', stages=(arch.parse_block_string('r1_k3_s1_e1_i8_o8_c1'),
                        arch.parse_block_string('r1_k3_s2_e2_i8_o16_se0.25')),
      head_channels=16)
  model = nnx.eval_shape(lambda: create_model(tiny, 10))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_l2_mask_selects_kernels_only():
  params = _model_params()
  mask = optimizer.l2_mask(params)
  assert mask['stem']['conv']['kernel'] is True
  assert mask['blocks'][1]['dw_conv']['kernel'] is True  # depthwise: included
  assert mask['head']['classifier']['kernel'] is True
  assert mask['stem']['bn']['scale'] is False
  assert mask['stem']['bn']['bias'] is False
  assert mask['blocks'][1]['se']['reduce']['bias'] is False
  assert mask['head']['classifier']['bias'] is False


def test_l2_in_the_optimizer_equals_the_gradient_of_the_l2_loss():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                        _model_params())
  wd = 1e-2

  @jax.jit
  def both(params):
    l2 = optax.add_decayed_weights(wd, optimizer.l2_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    added, _ = l2.update(zeros, l2.init(params), params)
    return added, jax.grad(lambda p: optimizer.l2_loss(p, wd))(params)

  added, expected = both(params)
  for a, e in zip(jax.tree.leaves(added), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-9)
  assert any(np.abs(np.asarray(e)).max() == 0 for e in jax.tree.leaves(expected))


def test_optimizer_state_layout_is_the_same_with_and_without_l2():
  params = {'a': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
  with_l2 = optimizer.build(0.1, weight_decay=1e-5).init(params)
  without = optimizer.build(0.1, weight_decay=0.0).init(params)
  assert (jax.tree.structure(with_l2) == jax.tree.structure(without))


def test_unknown_optimizer_name_is_rejected():
  with pytest.raises(ValueError, match='optimizer.name'):
    optimizer.build(0.1, name='lamb')


# --------------------------------------------------------------- schedules --

_N, _B = 1_256_144, 4096  # the official train split and batch


def _official_lr(step):
  """google/automl utils.py WarmupLearningRateSchedule + ExponentialDecay."""
  steps_per_epoch = _N / _B
  warmup = int(5 * steps_per_epoch)
  if step < warmup:
    return 0.256 * step / warmup
  return 0.256 * 0.97 ** np.floor(step / (2.4 * steps_per_epoch))


def _our_lr_fn(kind='exponential', total_epochs=350.0):
  schedule = {'lr_per_256': 0.016, 'kind': kind, 'warmup_epochs': 5.0,
              'decay_epochs': 2.4, 'decay_rate': 0.97}
  fn = schedules.learning_rate_fn(schedule, total_epochs=total_epochs)
  hp = schedules.stage_hparams(schedule, batch_size=_B, start_step=0,
                               start_epoch=0.0, num_train_examples=_N)
  return lambda step: float(fn(step, hp))


def test_exponential_schedule_matches_the_official_step_formula():
  lr = _our_lr_fn()
  # After the warmup the staircase agrees wherever float rounding cannot
  # move a step across a boundary.
  decay_steps = 2.4 * _N / _B
  for step in range(1534, 107_336, 997):
    if abs(step / decay_steps - round(step / decay_steps)) < 1e-3:
      continue
    assert lr(step) == pytest.approx(_official_lr(step), rel=1e-5), step
  # The warmup is written in epochs (5 * N / B = 1533.4 steps), the official
  # code rounds it to 1533 steps: a 3e-4 relative difference.
  for step in (0, 1, 100, 1000, 1532):
    assert lr(step) == pytest.approx(_official_lr(step), rel=5e-4, abs=1e-9)
  # Counted from step 0: right after the warmup the rate is 0.256 * 0.97**2.
  assert lr(1534) == pytest.approx(0.256 * 0.97**2, rel=1e-5)
  # Stage-boundary rates of the official S run (google/automl main.py).
  for step, expected in ((26_834, 0.0855), (53_668, 0.0286),
                         (80_502, 0.00926), (107_336, 0.00309)):
    assert lr(step) == pytest.approx(expected, rel=5e-3)


def test_cosine_and_constant_schedules():
  cos = _our_lr_fn('cosine', total_epochs=60.0)
  epochs_to_step = lambda e: int(e * _N / _B)
  assert cos(epochs_to_step(6)) == pytest.approx(
      0.128 * (1 + np.cos(np.pi * 6 / 60)), rel=1e-3)
  assert cos(epochs_to_step(2.5)) == pytest.approx(0.128, rel=1e-3)  # warmup
  assert cos(epochs_to_step(30)) == pytest.approx(0.128, rel=1e-3)
  assert cos(epochs_to_step(60)) == pytest.approx(0.0, abs=1e-6)
  const = _our_lr_fn('constant')
  assert const(epochs_to_step(100)) == pytest.approx(0.256)


def test_stage_hparams_follow_the_batch_size_rule_and_continue_the_epochs():
  schedule = {'lr_per_256': 0.016, 'kind': 'constant', 'warmup_epochs': 0.0}
  hp = schedules.stage_hparams(schedule, batch_size=8192, start_step=100,
                               start_epoch=12.5, num_train_examples=_N)
  assert hp['peak_lr'] == pytest.approx(0.512)
  fn = schedules.learning_rate_fn(
      dict(schedule, kind='exponential'), total_epochs=350.0)
  # At the stage's first step the epoch is start_epoch: 0.97**floor(12.5/2.4)
  assert float(fn(100, hp)) == pytest.approx(0.512 * 0.97**5, rel=1e-6)


# ------------------------------------------------------------ stage plan --


def _plan(**kw):
  args = dict(num_stages=4, epochs=350, num_train_examples=_N, batch_size=_B,
              min_image_size=128, max_image_size=300)
  args.update(kw)
  return progressive.plan_stages(**args)


def test_official_plan_for_s_matches_google_automl():
  plan = _plan(size_rule='official', randaug_magnitude=(5, 10),
               mixup_alpha=(0, 0), dropout_rate=(0.2, 0.2))
  assert [s.image_size for s in plan] == [171, 214, 257, 300]
  np.testing.assert_allclose([s.randaug_magnitude for s in plan],
                             np.linspace(5, 10, 4))
  assert [s.dropout_rate for s in plan] == [0.2] * 4
  assert [s.end_step for s in plan] == [26_834, 53_668, 80_502, 107_336]
  assert [s.start_step for s in plan] == [0, 26_834, 53_668, 80_502]


def test_official_plan_for_l_has_mixup_equal_cutmix():
  plan = _plan(size_rule='official', max_image_size=384,
               randaug_magnitude=(5, 20), mixup_alpha=(0, 0.5),
               cutmix_alpha=(0, 0.5), dropout_rate=(0.4, 0.4))
  assert [s.image_size for s in plan] == [192, 256, 320, 384]
  np.testing.assert_allclose([s.mixup_alpha for s in plan],
                             [0, 1 / 6, 1 / 3, 0.5])
  assert [s.cutmix_alpha for s in plan] == [s.mixup_alpha for s in plan]
  np.testing.assert_allclose([s.randaug_magnitude for s in plan],
                             [5, 10, 15, 20])


def test_paper_plan_interpolates_table6_linearly():
  plan = _plan(size_rule='linear', randaug_magnitude=(5, 15),
               mixup_alpha=(0, 0), dropout_rate=(0.1, 0.3))
  assert [s.image_size for s in plan] == [128, 185, 243, 300]
  np.testing.assert_allclose([s.randaug_magnitude for s in plan],
                             [5, 8.333333, 11.666667, 15], rtol=1e-6)
  np.testing.assert_allclose([s.dropout_rate for s in plan],
                             [0.1, 0.166667, 0.233333, 0.3], rtol=1e-5)
  # Epoch boundaries tile the run.
  assert plan[0].start_epoch == 0
  for a, b in zip(plan, plan[1:]):
    assert a.end_epoch == b.start_epoch
  assert plan[-1].end_epoch == pytest.approx(350, rel=1e-5)


def test_single_stage_trains_at_the_target_values():
  (stage,) = _plan(num_stages=1, dropout_rate=(0.1, 0.3),
                   randaug_magnitude=(5, 15))
  assert (stage.image_size, stage.dropout_rate, stage.randaug_magnitude) == (
      300, 0.3, 15)


def test_constant_memory_batches_keep_examples_per_stage():
  constant = _plan(size_rule='linear')
  scaled = _plan(size_rule='linear', batch_size_rule='constant_memory',
                 batch_multiple=32)
  assert scaled[-1].batch_size == _B
  for stage in scaled:
    assert stage.batch_size % 32 == 0
  assert scaled[0].batch_size == (int(_B * (300 / 128) ** 2) // 32) * 32
  for a, b in zip(constant, scaled):
    examples_a = a.num_steps * a.batch_size
    examples_b = b.num_steps * b.batch_size
    assert abs(examples_a - examples_b) <= b.batch_size / 2
  capped = _plan(batch_size_rule='constant_memory', batch_multiple=32,
                 max_batch_size=8192)
  assert max(s.batch_size for s in capped) == 8192


def test_total_steps_override_and_errors():
  plan = _plan(num_stages=2, total_steps=10, epochs=0)
  assert [s.end_step for s in plan] == [5, 10]
  with pytest.raises(ValueError, match='fewer than'):
    _plan(num_stages=4, total_steps=3)
  with pytest.raises(ValueError, match='size_rule'):
    _plan(size_rule='cubic')
  with pytest.raises(ValueError, match='min_image_size'):
    _plan(min_image_size=400)


def test_stage_settings_and_results_round_trip_through_json():
  stage = _plan()[2]
  assert progressive.StageSettings.from_dict(stage.to_dict()) == stage
  result = progressive.StageResult(
      stage, {'loss': 1.0}, {'top1': 0.5}, 3.0, eval_split='holdout',
      step_time_s=0.25, compile_cache_hit=True,
      memory={'temp_size_in_bytes': 7})
  assert progressive.StageResult.from_dict(
      json.loads(json.dumps(result.to_dict()))) == result


def test_a_checkpoints_resume_point_round_trips_and_names_another_model():
  plan = _plan()
  point = checkpointing.ResumePoint(
      step=12, history=[progressive.StageResult(plan[0], {'loss': 2.0}, {})],
      model={'name': 's', 'family': 'efficientnetv2'}, stage=plan[1],
      stage_batches=3, stage_elapsed_s=1.5,
      stage_sums={'loss': 6.0, 'count': 3}, planner={'rng': [1, 2]})
  again = checkpointing.ResumePoint.from_meta(
      json.loads(json.dumps(point.to_meta())))
  assert again == point
  checkpointing.check_same_model(again, point.model, '/runs/x')
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.model.arch: .*/runs/x.* another network'):
    checkpointing.check_same_model(again, {'name': 'm'}, '/runs/x')


def test_planner_expectations_give_shapes_to_compile_and_the_eta():
  plan = progressive.plan_stages(
      num_stages=4, epochs=0, total_steps=400, num_train_examples=1000,
      batch_size=8, min_image_size=100, max_image_size=200,
      batch_size_rule='constant_memory', batch_multiple=8)
  planner = progressive.LinearStagePlanner(plan)
  assert planner.total_epochs == plan[-1].end_epoch
  done = [progressive.StageResult(plan[0], {}, {})]
  assert planner.expected_stages(done) == plan[1:]
  # After stage 1 finished, stage 2 is running: stages 3 and 4 compile ahead.
  assert progressive.upcoming_shapes(planner, done) == [
      (s.batch_size, s.image_size) for s in plan[2:]]
  # Later stages' steps cost their pixels per batch relative to this one.
  now = plan[1]
  eta = reporting.eta_seconds(planner, done, now, now.start_step, 1.0)
  cost = lambda s: s.batch_size * s.image_size**2
  assert eta == pytest.approx(now.num_steps + sum(
      s.num_steps * cost(s) / cost(now) for s in plan[2:]))
  assert eta != pytest.approx(sum(s.num_steps for s in plan[1:]))


def test_persistent_cache_puts_the_process_settings_back(tmp_path):
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  before = {n: getattr(jax.config, n) for n in names}
  with pytest.raises(RuntimeError):
    with compilation.persistent_cache(str(tmp_path / 'cache')):
      assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache')
      assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
      raise RuntimeError('the run failed')
  assert {n: getattr(jax.config, n) for n in names} == before
  blocked = tmp_path / 'file'
  blocked.write_text('')
  with pytest.raises(config_checks.ConfigError,
                     match='config.compilation_cache_dir'):
    with compilation.persistent_cache(str(blocked / 'cache')):
      pass


def test_linear_planner_and_stage_continuity_checks():
  plan = _plan()
  planner = progressive.LinearStagePlanner(plan)
  assert planner.total_steps == plan[-1].end_step
  history = []
  for expected in plan:
    stage = planner.next_stage(history)
    assert stage == expected
    progressive.check_next_stage(stage, history, planner.total_steps)
    history.append(progressive.StageResult(stage, {}, {}))
  assert planner.next_stage(history) is None
  gap = plan[2]
  with pytest.raises(ValueError, match='previous stage ended'):
    progressive.check_next_stage(gap, history[:1], planner.total_steps)
  bad = progressive.StageSettings(**dict(plan[0].to_dict(), dropout_rate=1.5))
  with pytest.raises(ValueError, match='dropout_rate'):
    progressive.check_next_stage(bad, [], planner.total_steps)


# --------------------------------------------------------------------- EMA --


def test_ema_decay_ramp():
  assert float(ema.ema_decay(1, 0.9999)) == pytest.approx(2 / 11)
  assert float(ema.ema_decay(100, 0.9999)) == pytest.approx(101 / 110)
  assert float(ema.ema_decay(10**6, 0.9999)) == pytest.approx(0.9999)
  assert float(ema.ema_decay(1, 0.9999, ramp=False)) == pytest.approx(0.9999)


def test_ema_update_matches_tf_moving_average():
  rng = np.random.default_rng(1)
  values = [rng.normal(size=(4,)) for _ in range(20)]
  shadow = {'w': jnp.asarray(values[0], jnp.float32)}
  ref = np.asarray(values[0], np.float64)
  for t, v in enumerate(values[1:], start=1):
    decay = min(0.99, (1 + t) / (10 + t))
    ref = ref - (1 - decay) * (ref - v)
    shadow = ema.ema_update(shadow, {'w': jnp.asarray(v, jnp.float32)},
                            ema.ema_decay(t, 0.99))
  np.testing.assert_allclose(shadow['w'], ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(ref, values[-1])  # it is an average, not a copy


# --------------------------------------------------------------- shardings --


def test_fsdp_rule():
  assert mesh_lib.fsdp_spec((3, 3, 64, 128), 8, 'data', 1000) == jax.sharding.PartitionSpec(
      None, None, None, 'data')
  assert mesh_lib.fsdp_spec((3, 3, 64, 128), 8, 'data', 0) == jax.sharding.PartitionSpec()
  assert mesh_lib.fsdp_spec((16,), 8, 'data', 1000) == jax.sharding.PartitionSpec()
  # Largest dimension not divisible: the next one is used.
  assert mesh_lib.fsdp_spec((1001, 24), 8, 'data', 10) == jax.sharding.PartitionSpec(
      None, 'data')
  assert mesh_lib.fsdp_spec((1001, 7), 8, 'data', 10) == jax.sharding.PartitionSpec()


def test_mesh_shapes_and_errors():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == ('data', 'model')
  assert mesh.shape['data'] == jax.device_count()
  if jax.device_count() % 2 == 0:
    assert mesh_lib.make_mesh(model=2).shape['data'] == jax.device_count() // 2
  with pytest.raises(ValueError, match='mesh.data'):
    mesh_lib.make_mesh(data=jax.device_count() + 1)


# ------------------------------------------------------------------ imports --


def test_pure_modules_import_without_tensorflow_or_ml_collections():
  code = ('import sys\n'
          'import effnetv2_jax.training.optimizer, '
          'effnetv2_jax.training.schedules, effnetv2_jax.training.progressive, '
          'effnetv2_jax.training.ema\n'
          'from effnetv2_jax import training\n'
          'bad = [m for m in ("tensorflow", "ml_collections", "clu", '
          '"tensorflow_datasets") if m in sys.modules]\n'
          'assert not bad, bad\n')
  subprocess.run([sys.executable, '-c', code], check=True)
