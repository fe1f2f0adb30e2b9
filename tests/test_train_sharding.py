"""The jitted train step over a mesh of 8 fake CPU devices.

The sharded step must compute what the single-device step computes, and
BatchNorm must use the statistics it claims: global-batch moments by
default, per-group moments in the official grouped mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import task as task_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason='needs 8 (fake) devices')

ARCH = arch_lib.Architecture(
    name='shard_test',
    stages=(arch_lib.parse_block_string('r1_k3_s1_e1_i8_o8_c1'),
            arch_lib.parse_block_string('r2_k3_s2_e2_i8_o16_se0.25')),
    head_channels=32, dropout_rate=0.1)
BATCH, SIZE, CLASSES = 16, 16, 10
SCHEDULE = {'lr_per_256': 0.5, 'kind': 'constant', 'warmup_epochs': 0.0}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
          'label': np.eye(CLASSES, dtype=np.float32)[
              rng.integers(0, CLASSES, BATCH)]}


def _task(devices: int, *, bn_groups=1, fsdp_min_size=0, dtype=jnp.float32):
  # No EMA copy: it is elementwise (sharding cannot change it) and would
  # only lengthen every compile here.
  return task_lib.TrainTask(
      state_lib.ModelSpec(ARCH, CLASSES, drop_path_rate=0.2, dtype=dtype),
      mesh=mesh_lib.make_mesh(devices=jax.devices()[:devices]),
      make_optimizer=functools.partial(optimizer.build, weight_decay=1e-4),
      schedule=SCHEDULE, total_epochs=1.0, num_train_examples=1000,
      ema_decay=0.0, drop_path_rate=0.2, bn_groups=bn_groups,
      fsdp_min_size=fsdp_min_size)


@functools.lru_cache(maxsize=None)
def _initial():
  # One initial state for every mesh (initialising per mesh would only
  # recompile the same initialiser).
  with jax.threefry_partitionable(False):
    return jax.device_get(jax.jit(_task(1).init)())


@functools.lru_cache(maxsize=None)
def _train(devices: int, *, bn_groups=1, fsdp_min_size=0):
  """One train step on a mesh of `devices`: (live state, host state, metrics)."""
  task = _task(devices, bn_groups=bn_groups, fsdp_min_size=fsdp_min_size)
  state = jax.device_put(_initial(), task.shardings)
  jitted = jax.jit(task.train_step,
                   in_shardings=(task.shardings, task.batch_sharding,
                                 task.replicated),
                   out_shardings=(task.shardings, task.replicated),
                   donate_argnums=(0,))
  hparams = task.hparams(batch_size=BATCH, start_step=0, start_epoch=0.0,
                         dropout_rate=0.1)
  state, metrics = jitted(state, jax.device_put(_batch(), task.batch_sharding),
                          hparams)
  return state, jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_sharded_step_equals_single_device_step():
  _, single, single_metrics = _train(1)
  live, multi, multi_metrics = _train(8)
  # The batch really was split over 8 devices; the state is replicated.
  assert live.params['stem']['conv']['kernel'].sharding.num_devices == 8
  _assert_trees_close(single, multi)
  assert single_metrics['loss'] == pytest.approx(multi_metrics['loss'],
                                                 rel=1e-5)
  # The step moved the weights and the batch statistics (the comparison is
  # not between two untouched initialisations).
  initial = _initial()
  for name in ('params', 'batch_stats'):
    moved = max(np.abs(a - b).max() for a, b in zip(
        jax.tree.leaves(getattr(initial, name)),
        jax.tree.leaves(getattr(single, name))))
    assert moved > 1e-3, name


def test_fsdp_sharded_state_gives_the_same_step():
  _, replicated, _ = _train(8)
  live, fsdp, _ = _train(8, fsdp_min_size=256)
  specs = [x.sharding.spec for x in jax.tree.leaves(live.params)]
  assert any('data' in tuple(s) for s in specs)  # some arrays are sharded
  assert any(tuple(s) == () for s in specs)  # small ones are not
  _assert_trees_close(replicated, fsdp)


def _stem_conv_numpy(images, kernel):
  """3x3 stride-2 TF-'SAME' convolution (pads 0 before, 1 after on 16 px)."""
  x = np.pad(images.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
  out = np.zeros((images.shape[0], 8, 8, kernel.shape[-1]))
  for di in range(3):
    for dj in range(3):
      patch = x[:, di:di + 16:2, dj:dj + 16:2, :]
      out += np.einsum('bhwc,co->bhwo', patch, kernel[di, dj])
  return out


@pytest.mark.parametrize('replicas_per_group', [0, 2])
def test_batchnorm_moments_match_numpy(replicas_per_group):
  """Running-statistics update of the stem BN after one step on 8 devices.

  0: moments over the global batch of 16. 2: the official grouped BN with
  groups of 2 replicas, i.e. 4 groups of 4 consecutive examples; the running
  statistics take the mean over groups of the group moments.
  """
  groups = task_lib.bn_group_count(replicas_per_group, 8)
  assert groups == (1 if replicas_per_group == 0 else 4)
  kernel = _initial().params['stem']['conv']['kernel']
  _, after, _ = _train(8, bn_groups=groups) if groups > 1 else _train(8)

  conv = _stem_conv_numpy(_batch(0)['image'], kernel)
  grouped = conv.reshape((groups, BATCH // groups) + conv.shape[1:])
  mean = grouped.mean(axis=(1, 2, 3))
  var = (grouped**2).mean(axis=(1, 2, 3)) - mean**2
  expected_mean = 0.1 * mean.mean(0)  # momentum 0.9 from 0
  expected_var = 0.9 + 0.1 * var.mean(0)  # from 1
  bn = after.batch_stats['stem']['bn']
  np.testing.assert_allclose(bn['mean'], expected_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn['var'], expected_var, rtol=1e-4, atol=1e-5)
  if groups > 1:
    # Grouped moments are not the global ones (so the test can tell).
    global_var = conv.var(axis=(0, 1, 2))
    assert np.abs(0.9 + 0.1 * global_var - expected_var).max() > 1e-4


def test_bfloat16_compute_keeps_float32_gradients_and_statistics():
  """The TPU/GPU setting: bf16 activations, float32 weights and statistics."""
  task = _task(1, dtype=jnp.bfloat16)
  grads, stats, metrics = jax.device_get(jax.jit(task.gradient_step)(
      _initial(), _batch(), {'dropout_rate': np.float32(0.1)}))
  for leaf in jax.tree.leaves((grads, stats)):
    assert leaf.dtype == np.float32 and np.isfinite(leaf).all()
  # The float32 run of the same first step (same weights, batch and masks):
  # close, not identical, so bfloat16 really computed.
  _, reference, reference_metrics = _train(1)
  assert metrics['loss'] == pytest.approx(reference_metrics['loss'],
                                          rel=2e-2)
  assert metrics['loss'] != reference_metrics['loss']
  model_stats, extra_stats = stats
  assert extra_stats == {}
  for a, b in zip(jax.tree.leaves(model_stats),
                  jax.tree.leaves(reference.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)
