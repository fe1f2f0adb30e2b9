"""Stacked self-distillation as a training mode (config.distill).

The loss term's gradients (none reach the second extractor through the
target), the taps' shapes, a run that trains both networks but exports the
plain one, the ablation, the config's errors, and an exact resume after
SIGKILL with the extractor in the state.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.distill import extractors
from effnetv2_jax.distill import setup as distill_setup
from effnetv2_jax.distill import term as term_lib
from effnetv2_jax.models import small
from effnetv2_jax.training import checkpointing
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import task as task_lib
from effnetv2_jax.training import trainer
from config_files import REPO, load_config
from interruptions import committed_steps, main_killed_after_checkpoint

CLASSES, BATCH, SIZE = 10, 8, 24
TINY_CONFIG = os.path.join(REPO, 'configs', 'tiny.py')


def _distill_task(head_weight=1.0, weight=1.0, devices=1):
  model = state_lib.ModelSpec(small.TINY, CLASSES, drop_path_rate=0.0)
  shapes = distill_setup.feature_shapes(model, SIZE)
  spec = extractors.select('mbconv-d1-e4',
                           extractors.catalogue(shapes['stage2'][-1],
                                                'mbconv'))
  extra = task_lib.ExtraNetwork(
      'distill0', distill_setup.ExtractorNetwork(spec, CLASSES))
  term = term_lib.StackedDistillation(
      (term_lib.Tap('stage2', 'distill0'),), task_lib.ClassificationLoss(),
      weight=weight, head_weight=head_weight)
  return task_lib.TrainTask(
      model, mesh=mesh_lib.make_mesh(devices=jax.devices()[:devices]),
      make_optimizer=optimizer.build,
      schedule={'lr_per_256': 0.5, 'kind': 'constant', 'warmup_epochs': 0.0},
      total_epochs=1.0, num_train_examples=100, terms=[term], extras=[extra],
      ema_decay=0.0)


def _batch():
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
          'label': np.eye(CLASSES, dtype=np.float32)[
              rng.integers(0, CLASSES, BATCH)]}


def _gradients(task):
  state = jax.jit(task.init)()
  hparams = task.hparams(batch_size=BATCH, start_step=0, start_epoch=0.0,
                         dropout_rate=0.0)
  (model_grads, extra_grads), _, metrics = jax.jit(task.gradient_step)(
      state, _batch(), hparams)
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x))
                                for x in jax.tree.leaves(tree)))
  return norm(model_grads), norm(extra_grads['distill0']), metrics


def test_no_gradient_reaches_the_extractor_through_the_target():
  # Distance only: the model is pulled, the extractor gets nothing.
  model_norm, extra_norm, metrics = _gradients(_distill_task(head_weight=0.0))
  assert model_norm > 0 and extra_norm == 0.0
  assert float(metrics['loss_distill']) > 0
  # The extractor learns from its own head's task loss.
  _, extra_norm, _ = _gradients(_distill_task(head_weight=1.0))
  assert extra_norm > 0


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_a_distill_step_over_8_devices_equals_the_one_device_step():
  initial, results = None, {}
  for devices in (1, 8):
    task = _distill_task(devices=devices)
    if initial is None:
      initial = jax.device_get(jax.jit(task.init)())
    step = jax.jit(task.train_step,
                   in_shardings=(task.shardings, task.batch_sharding,
                                 task.replicated),
                   out_shardings=(task.shardings, task.replicated),
                   donate_argnums=(0,))
    hparams = task.hparams(batch_size=BATCH, start_step=0, start_epoch=0.0,
                           dropout_rate=0.0)
    state, metrics = step(jax.device_put(initial, task.shardings),
                          jax.device_put(_batch(), task.batch_sharding),
                          hparams)
    results[devices] = (state, jax.device_get(state), jax.device_get(metrics))
  live = results[8][0].extras['distill0'].params
  assert jax.tree.leaves(live)[0].sharding.num_devices == 8
  assert float(results[1][2]['loss_distill']) == pytest.approx(
      float(results[8][2]['loss_distill']), rel=1e-5)
  for name in ('params', 'extras'):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(getattr(results[1][1], name))[0],
        jax.tree.leaves(getattr(results[8][1], name))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6,
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')
  # The step moved the extractor (not two untouched initialisations).
  moved = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(initial.extras['distill0'].params),
      jax.tree.leaves(results[1][1].extras['distill0'].params)))
  assert moved > 1e-4


def test_distance_is_scale_free_and_zero_at_the_target():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 16))
  for kind in term_lib.DISTANCES:
    assert float(term_lib.distance(x, x, kind)) == pytest.approx(0, abs=1e-5)
    far = float(term_lib.distance(x, -x, kind))
    assert far > 1.0
    assert float(term_lib.distance(10 * x, -10 * x, kind)) == pytest.approx(
        far, rel=1e-4)
  with pytest.raises(ValueError, match='distance'):
    term_lib.distance(x, x, 'l1')


@pytest.mark.parametrize('arch', ['digits', 'vit-digits'])
def test_every_tap_keeps_its_shape_through_every_extractor(arch):
  description = small.ARCHITECTURES.get(arch, arch)
  model = state_lib.ModelSpec(description, CLASSES)
  shapes = distill_setup.feature_shapes(model, 32)
  taps = [name for name in shapes
          if name.startswith(('stage', 'block')) or name == 'encoded']
  assert len(taps) >= 3
  taps = [taps[0], taps[-1]]  # the widest and the last: each extractor kind
  for tap in taps:
    for spec in distill_setup.candidates_for(model.family.name, shapes[tap]):
      module = extractors.build_extractor(spec, CLASSES, rngs=0)
      f1 = jnp.zeros((2,) + shapes[tap][1:])
      f2, logits = module(f1, training=False)
      assert f2.shape == f1.shape, (tap, spec.name)
      assert logits.shape == (2, CLASSES)
  assert distill_setup.resolve_taps(('auto',), shapes)[0] in taps


def _tiny_distill(**overrides):
  settings = {'distill.mode': 'stacked', 'distill.extractor': 'mbconv-d1-e4',
              'train.total_steps': 8}
  settings.update(overrides)
  return load_config('tiny', None, **settings)


def test_a_distilled_run_trains_both_and_exports_the_plain_network(tmp_path):
  state, summary = trainer.train_and_evaluate(_tiny_distill(),
                                              str(tmp_path / 'run'))
  assert set(state.extras) == {'distill0'}
  losses = [s['train_metrics']['loss_distill'] for s in summary['stages']]
  assert all(np.isfinite(losses))
  plain = state_lib.ModelSpec(small.TINY, 10).num_params()
  assert summary['num_params'] == plain
  assert 'mbconv-d1-e4 (by name)' in summary['distillation']
  from effnetv2_jax.models import weights
  exported = weights.load_model(summary['model_dir'])
  from effnetv2_jax.models import efficientnetv2
  assert efficientnetv2.count_params(exported) == plain
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints'))
  restored, _ = ckpt.restore(ckpt.latest_step(), None)
  ckpt.close()
  assert 'distill0' in jax.tree_util.keystr(
      jax.tree_util.tree_flatten_with_path(restored)[0])
  # A second run starts its extractor from the first's (EMA) weights and,
  # frozen, keeps them.
  first = state.extras['distill0']
  pretrained = first.ema_params if first.ema_params is not None else first.params
  frozen, _ = trainer.train_and_evaluate(
      _tiny_distill(**{'distill.init_from': str(tmp_path / 'run'),
                       'distill.second': 'frozen', 'train.total_steps': 2}),
      str(tmp_path / 'frozen'))
  for a, b in zip(jax.tree.leaves(pretrained),
                  jax.tree.leaves(frozen.extras['distill0'].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Another extractor does not fit: one line naming a variable.
  with pytest.raises(trainer.ConfigError,
                     match=r"^config.distill.init_from=.*extra 'distill0' "
                     r'does not fit: params/.* \(a different extractor'):
    trainer.train_and_evaluate(
        _tiny_distill(**{'distill.init_from': str(tmp_path / 'run'),
                         'distill.extractor': 'mbconv-d2-e4'}),
        str(tmp_path / 'other'))


def test_the_label_heads_ablation_runs(tmp_path):
  state, summary = trainer.train_and_evaluate(
      _tiny_distill(**{'distill.mode': 'label_heads'}), str(tmp_path))
  assert set(state.extras) == {'distill0'}
  assert all(np.isfinite(s['train_metrics']['loss_label_heads'])
             for s in summary['stages'])


@pytest.mark.parametrize('overrides, message', [
    ({'distill.mode': 'teacher'}, 'config.distill.mode'),
    ({'distill.taps': ('stage9',)}, "no feature 'stage9'"),
    ({'distill.extractor': 'mbconv-d9'}, 'mbconv-d9'),
    ({'distill.init_from': '/nonexistent/run'}, 'no such file'),
    ({'distill.mode': 'label_heads', 'distill.init_from': '/tmp'},
     "only a 'stacked' run"),
    ({'distill.budget.min_accuracy': 1.5}, 'top-1 fraction'),
])
def test_bad_distill_settings_are_one_line_config_errors(
    tmp_path, overrides, message):
  with pytest.raises(config_checks.ConfigError) as error:
    trainer.train_and_evaluate(_tiny_distill(**overrides), str(tmp_path))
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_distill_resume_after_sigkill_is_bitwise_identical(tmp_path):
  overrides = {'train.total_steps': 24, 'checkpoint.every_steps': 2,
               'checkpoint.keep': 20,
               'compilation_cache_dir': str(tmp_path / 'cache')}
  reference, _ = trainer.train_and_evaluate(_tiny_distill(**overrides),
                                            str(tmp_path / 'reference'))
  workdir = str(tmp_path / 'killed')
  flags = [f'--config.{k}={v}' for k, v in dict(
      overrides, **{'distill.mode': 'stacked',
                    'distill.extractor': 'mbconv-d1-e4'}).items()]
  killed = main_killed_after_checkpoint(
      [f'--config={TINY_CONFIG}', f'--workdir={workdir}'] + flags, workdir,
      14, tmp_path / 'job.log', REPO)
  assert killed, (tmp_path / 'job.log').read_text()[-3000:]
  assert 14 <= committed_steps(workdir)[-1] < 24
  resumed, summary = trainer.train_and_evaluate(_tiny_distill(**overrides),
                                                workdir)
  assert summary['final_step'] == 24
  for name in ('params', 'batch_stats', 'opt_state', 'extras', 'rng'):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(
            jax.device_get(getattr(reference, name)))[0],
        jax.tree.leaves(jax.device_get(getattr(resumed, name)))):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}{path}')


def test_auto_measures_the_candidates_and_keeps_within_the_budget():
  config = _tiny_distill(**{'distill.extractor': 'auto',
                            'distill.budget.max_mmacs': 0.15})
  model = state_lib.ModelSpec(small.TINY, 10)
  shape = distill_setup.feature_shapes(model, SIZE)['stage2']
  candidates = [extractors.select(name, extractors.catalogue(
      shape[-1], 'mbconv')) for name in ('mbconv-d1-e4', 'mbconv-d2-e4')]
  choose = distill_setup.measured_chooser(
      config, mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]),
      model_spec=model, num_train_examples=100, total_epochs=1.0,
      batch_size=BATCH, image_size=SIZE)
  choice = choose(candidates, shape)
  macs = {row['name']: row['macs'] for row in choice.rows}
  memory = {row['name']: row['memory_bytes'] for row in choice.rows}
  # Measured: the deeper stack costs more of both.
  assert macs['mbconv-d2-e4'] > macs['mbconv-d1-e4'] > 0
  assert memory['mbconv-d2-e4'] > memory['mbconv-d1-e4'] > 0
  expected = max((n for n in macs if macs[n] <= 0.15e6), key=macs.get)
  assert choice.spec.name == expected
  assert '*' in choice.table
