"""The timed workloads: the trainer's programs and the references'.

Ours is the trainer's own `TrainTask` (effnetv2_jax/training/task.py), built
from `recipes.base_config()` by `task_from_config` as every experiment config
is: the official TF1 RMSProp with L2 on kernels, label smoothing 0.1, the
weight average (EMA 0.9999), stochastic depth 0.2 and the architecture's
dropout. A train step is what the trainer's loop runs: the compiled gradient
program (forward and backward), then the compiled update program
(optimizer, EMA, step counter), which donates the state. Inference is the
task's eval program (the model in eval mode, plus the eval sums). All are
compiled with `xla_options`, as the trainer's `Compiler` does, on one device,
with a synthetic batch already there.

The timm reference runs the same step shape: channels_last, autocast to
bfloat16 where asked, label-smoothed cross-entropy, timm's `RMSpropTF` with
its L2 weight decay in the multi-tensor form, and timm's own weight average
(`ModelEmaV3`, parameters and buffers, what its train.py's `--model-ema`
runs).
"""

from __future__ import annotations

import functools
import os
import sys

from benchmarks.harness import Runner

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-5
DROP_PATH_RATE = 0.2  # the model's default stochastic depth
LEARNING_RATE = 0.016  # the official lr_base at batch 256; value irrelevant
EMA_DECAY = 0.9999
NUM_CLASSES = 1000
# Converts steps to epochs in the learning-rate schedule; speed does not
# depend on it.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def jax_backend() -> str:
  import jax
  return jax.default_backend()


def resolve_dtype(name: str, backend: str) -> str:
  if name == 'auto':
    return 'float32' if backend == 'cpu' else 'bfloat16'
  return name


# --------------------------------------------------------------------------
# Architectures: the official variants and the repository's small models.

SMALL_MODELS = ('micro', 'tiny', 'digits')


def architecture_for(name: str):
  """An official variant, `tiny` / `digits` (the networks of configs/tiny.py
  and configs/digits.py, from `effnetv2_jax.models.small`), or `micro` (two
  blocks, for --quick runs)."""
  from effnetv2_jax.models import arch, small
  if name in arch.VARIANTS:
    return arch.get_architecture(name)
  if name in small.ARCHITECTURES:
    return small.ARCHITECTURES[name]
  if name == 'micro':
    return arch.Architecture(
        name='micro', stages=(
            arch.parse_block_string('r1_k3_s2_e1_i16_o16_c1'),
            arch.parse_block_string('r1_k3_s2_e2_i16_o24_se0.25')),
        head_channels=32, train_size=32, eval_size=32)
  raise SystemExit(f'unknown variant {name!r}: choose one of '
                   f'{", ".join(arch.VARIANTS + SMALL_MODELS)}')


# --------------------------------------------------------------------------
# Ours: the trainer's task.


def train_task(architecture, *, dtype: str, conv_impl: str = 'auto',
               num_classes: int = NUM_CLASSES):
  """The `TrainTask` the trainer builds for `architecture`, on one device.

  The config is `recipes.base_config()` with only the network changed, so
  the optimizer, L2 mask, loss, weight average and stochastic depth are
  the trainer's defaults. The mesh holds the first device alone, as the
  references run on one.
  """
  import jax
  import jax.numpy as jnp
  from effnetv2_jax.training import mesh as mesh_lib
  from effnetv2_jax.training import recipes
  from effnetv2_jax.training import task as task_lib
  config = recipes.base_config()
  config.model.arch = architecture.to_dict()
  config.model.num_classes = num_classes
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  model = task_lib.model_spec_from_config(config, num_classes=num_classes,
                                          dtype=jnp.dtype(dtype))
  return task_lib.task_from_config(
      config, mesh=mesh, model=model,
      num_train_examples=IMAGENET_TRAIN_EXAMPLES,
      total_epochs=config.train.epochs)


def compile_program(task, kind: str, *shape: int):
  """`task`'s 'gradient', 'update' or 'eval' program, compiled ahead of time
  with the trainer's compiler options."""
  from effnetv2_jax.models import xla_options
  return xla_options.compile_lowered(task.lower(kind, *shape))


def stage_hparams(task, batch: int, *, dropout_rate: float,
                  start_step: int = 0):
  """The traced scalars of a stage starting at `start_step`."""
  return task.hparams(
      batch_size=batch, start_step=start_step,
      start_epoch=start_step * batch / task.num_train_examples,
      dropout_rate=dropout_rate)


def synthetic_batch(task, batch: int, size: int, *, with_mask=False, seed=0):
  """Normal images [B, size, size, 3] and one-hot labels (and an all-ones
  eval mask), float32, placed as the task places batches."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  num_classes = task.model.num_classes
  out = {
      'image': rng.standard_normal((batch, size, size, 3), np.float32),
      'label': np.eye(num_classes, dtype=np.float32)[
          rng.integers(0, num_classes, batch)]}
  if with_mask:
    out['mask'] = np.ones((batch,), np.float32)
  return jax.device_put(out, task.batch_sharding)


def train_step(gradient, update):
  """(state, batch, hparams) -> (state, metrics): the two compiled programs
  one after the other, as the trainer's loop calls them."""

  def step(state, batch, hparams):
    grads, batch_stats, metrics = gradient(state, batch, hparams)
    state, update_metrics = update(state, grads, batch_stats, hparams)
    return state, (metrics, update_metrics)

  return step


def jax_runner(name: str, architecture, *, size: int, batch: int, mode: str,
               dtype: str, conv_impl='auto') -> Runner:
  import time
  import jax
  task = train_task(architecture, dtype=dtype, conv_impl=conv_impl)
  state = task.init_sharded()

  def sync(out):
    jax.block_until_ready(out)

  # Compiled ahead of time and timed, so that the first step's own cost
  # (program load, library set-up: ~20 s for S's train step on an H100) is
  # reported apart from the compile.
  if mode == 'infer':
    params, stats = state.params, state.batch_stats
    del state
    data = synthetic_batch(task, batch, size, with_mask=True)
    start = time.perf_counter()
    evaluate = compile_program(task, 'eval', batch, size)
    compile_s = time.perf_counter() - start
    return Runner(name, lambda: evaluate(params, stats, data), sync,
                  compile_s=compile_s)

  data = synthetic_batch(task, batch, size)
  hparams = stage_hparams(task, batch,
                          dropout_rate=architecture.dropout_rate)
  start = time.perf_counter()
  step = train_step(compile_program(task, 'gradient', batch, size),
                    compile_program(task, 'update'))
  compile_s = time.perf_counter() - start
  holder = [state]
  del state

  def run():
    holder[0], metrics = step(holder[0], data, hparams)
    return metrics

  def close():
    holder.clear()

  return Runner(name, run, sync, close, compile_s=compile_s)


def measure_matmul_peak(dtype: str) -> float:
  """Matmul FLOP/s of the default JAX device in `dtype`: the best of five
  timings of 8192^3 on an accelerator, 2048^3 on a CPU (big enough to reach
  the vector units' rate, small enough to take a second)."""
  import time
  import jax
  on_cpu = jax.default_backend() == 'cpu'
  n, calls = (2048, 3) if on_cpu else (8192, 10)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(calls):
      out = mm(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2 * n ** 3 / best


# --------------------------------------------------------------------------
# timm (PyTorch).


def import_timm():
  """Imports timm, defining torchvision's op schemas first if its C++
  extension cannot load (a CUDA torchvision wheel beside a CPU torch)."""
  import torch
  try:
    import torchvision  # noqa: F401
  except (RuntimeError, OSError):
    for mod in [m for m in sys.modules if m.split('.')[0] == 'torchvision']:
      del sys.modules[mod]
    lib = torch.library.Library('torchvision', 'DEF')
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor qdets, Tensor qscores, Tensor qzero_points, '
               'float iou_threshold, float qscale) -> Tensor')
    import_timm._keep = lib  # the schemas live as long as the library object
  import timm
  import timm.optim  # noqa: F401 - not imported by `import timm`
  import timm.utils  # noqa: F401
  return timm


def torch_available() -> bool:
  try:
    import_timm()
    return True
  except Exception:  # noqa: BLE001 - any failure means "not available"
    return False


def torch_device():
  import torch
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def torch_runner(name: str, variant: str, *, size: int, batch: int, mode: str,
                 dtype: str, threads: int, compiled: bool,
                 timm_name: str | None = None) -> Runner:
  import torch
  timm = import_timm()
  torch.set_num_threads(threads)
  device = torch_device()
  # The regularisation our train step applies (the architecture's dropout,
  # stochastic depth 0.2), so both steps do the same work.
  model = timm.create_model(
      timm_name or f'tf_efficientnetv2_{variant}', num_classes=NUM_CLASSES,
      drop_rate=architecture_for(variant).dropout_rate,
      drop_path_rate=DROP_PATH_RATE)
  model = model.to(device).to(memory_format=torch.channels_last)
  forward = torch.compile(model) if compiled else model
  gen = torch.Generator(device=device).manual_seed(0)
  images = torch.randn(batch, 3, size, size, device=device, generator=gen)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES, (batch,), device=device,
                         generator=gen)
  autocast = functools.partial(torch.autocast, device.type,
                               dtype=torch.bfloat16,
                               enabled=dtype == 'bfloat16')

  def sync(out):
    if device.type == 'cuda':
      torch.cuda.synchronize()

  if mode == 'infer':
    model.eval()

    @torch.inference_mode()
    def infer():
      with autocast():
        return forward(images)

    return Runner(name, infer, sync, _torch_close(model))

  model.train()
  opt = _torch_rmsprop(timm, model.parameters())
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
  # timm's train.py --model-ema: a multi-tensor lerp of every parameter and
  # buffer after each optimizer step, the work of our update's EMA.
  ema = timm.utils.ModelEmaV3(model, decay=EMA_DECAY)

  def train():
    with autocast():
      loss = criterion(forward(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update(model)
    return loss

  return Runner(name, train, sync, _torch_close(model, ema, opt))


def _torch_rmsprop(timm, params):
  """timm's TF-style RMSProp, multi-tensor ('foreach'), so the optimizer is
  a few kernels rather than one Python loop over ~800 tensors; older timm
  without that option gets torch's own foreach RMSprop (same cost)."""
  import inspect
  import torch
  kwargs = dict(lr=LEARNING_RATE, alpha=0.9, eps=1e-3, momentum=0.9,
                weight_decay=WEIGHT_DECAY)
  if 'foreach' in inspect.signature(timm.optim.RMSpropTF).parameters:
    return timm.optim.RMSpropTF(params, foreach=True, **kwargs)
  return torch.optim.RMSprop(params, foreach=True, **kwargs)


def _torch_close(*objects):
  def close():
    import torch
    for obj in objects:
      if isinstance(obj, torch.nn.Module):
        obj.to('cpu')
      elif hasattr(obj, 'state'):
        obj.state.clear()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  return close


def torch_compile_available() -> tuple[bool, str]:
  """torch.compile needs a C++ compiler on CPU and Triton on GPU."""
  import shutil
  import torch
  if not hasattr(torch, 'compile'):
    return False, 'torch.compile missing'
  if torch.cuda.is_available():
    try:
      import triton  # noqa: F401
    except ImportError:
      return False, 'no triton'
    return True, ''
  if not (shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')):
    return False, 'no C++ compiler'
  return True, ''


# --------------------------------------------------------------------------
# keras.applications (inference only).

_KERAS_MODELS = {
    's': 'EfficientNetV2S', 'm': 'EfficientNetV2M', 'l': 'EfficientNetV2L',
    'b0': 'EfficientNetV2B0', 'b1': 'EfficientNetV2B1',
    'b2': 'EfficientNetV2B2', 'b3': 'EfficientNetV2B3',
}


def keras_available() -> tuple[bool, str]:
  import importlib.util
  if importlib.util.find_spec('keras') is None:
    return False, 'keras not installed'
  backend = os.environ.get('KERAS_BACKEND', 'tensorflow')
  if backend == 'tensorflow' and importlib.util.find_spec('tensorflow') is None:
    return False, 'tensorflow not installed'
  return True, ''


def keras_runner(name: str, variant: str, *, size: int, batch: int,
                 dtype: str, threads: int) -> Runner:
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  import numpy as np
  import tensorflow as tf
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TF already initialised by an earlier keras runner in this process
  import keras
  keras.mixed_precision.set_global_policy(
      'mixed_bfloat16' if dtype == 'bfloat16' else 'float32')
  model = getattr(keras.applications, _KERAS_MODELS[variant])(
      weights=None, input_shape=(size, size, 3), include_preprocessing=False)
  images = tf.constant(
      np.random.default_rng(0).standard_normal((batch, size, size, 3)),
      tf.float32)

  def forward(x):
    return model(x, training=False)

  infer = tf.function(forward, autograph=False)  # no Python control flow

  def close():
    keras.backend.clear_session()

  return Runner(name, lambda: infer(images), lambda out: out.numpy(), close)


def keras_supports(variant: str) -> bool:
  return variant in _KERAS_MODELS


def describe_dtype(dtype: str) -> str:
  return {'float32': 'f32', 'bfloat16': 'bf16'}.get(dtype, dtype)

