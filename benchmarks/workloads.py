"""The timed workloads: our train step and inference, and the references'.

Our train step is self-contained (the trainer in effnetv2_jax/training is not
used, so the benchmarks measure the model alone): forward, label-smoothed
cross-entropy plus the official L2 term on kernels, backward, and the official
TF1-style RMSProp update (optax.rmsprop with ms initialised to 1, eps 1e-3
inside the square root, learning rate inside the momentum), all in one jitted
function that donates its state. Data is synthetic and already on the device.

The state crosses the jit boundary as flat lists of arrays: flattening NNX
Variables on every call costs tens of milliseconds of Python per step with
~800 variables, which is not the model's cost.

The timm reference runs the same step shape: channels_last, autocast to
bfloat16 where asked, label-smoothed cross-entropy, timm's `RMSpropTF` in its
multi-tensor form.
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
NUM_CLASSES = 1000


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
  """An official variant, or `tiny` / `digits` (copies of the architectures
  in configs/tiny.py and configs/digits.py, which import ml_collections;
  tests/test_benchmarks.py keeps the copies equal), or `micro` (two blocks,
  for --quick runs)."""
  from effnetv2_jax.models import arch
  if name in arch.VARIANTS:
    return arch.get_architecture(name)
  if name == 'tiny':
    return arch.Architecture(
        name='tiny', stages=(
            arch.parse_block_string('r1_k3_s1_e1_i8_o8_c1'),
            arch.parse_block_string('r2_k3_s2_e2_i8_o16_se0.25')),
        head_channels=32, dropout_rate=0.1, train_size=24, eval_size=32)
  if name == 'digits':
    return arch.scaled(arch.get_architecture('s'), width=0.25, depth=0.25,
                       head_channels=128, name='s_digits').replace(
                           train_size=32, eval_size=32, dropout_rate=0.2)
  if name == 'micro':
    return arch.Architecture(
        name='micro', stages=(
            arch.parse_block_string('r1_k3_s2_e1_i16_o16_c1'),
            arch.parse_block_string('r1_k3_s2_e2_i16_o24_se0.25')),
        head_channels=32, train_size=32, eval_size=32)
  raise SystemExit(f'unknown variant {name!r}: choose one of '
                   f'{", ".join(arch.VARIANTS + SMALL_MODELS)}')


# --------------------------------------------------------------------------
# Ours.


def _kernel_mask(tree) -> list[bool]:
  """Per leaf: is it a weight matrix/kernel (L2-regularised)?"""
  import jax
  mask = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    mask.append(bool(names) and names[-1] == 'kernel')
  return mask


def rmsprop_tf(learning_rate=LEARNING_RATE):
  """TF1 RMSPropOptimizer(decay=0.9, momentum=0.9, epsilon=1e-3) in optax."""
  import optax
  return optax.rmsprop(learning_rate, decay=0.9, eps=1e-3, initial_scale=1.0,
                       eps_in_sqrt=True, momentum=0.9)


def _fill(abstract_state, seed):
  """Concrete values for an abstract model state, drawn with numpy.

  Eager `create_model` compiles one random-normal program per distinct
  parameter shape (1-2 s each on XLA:CPU, a minute for S), and speed does not
  depend on the values as long as they are sane: kernels get the model's
  fan-out normal scale, BN scale/var 1, biases and means 0.
  """
  import math
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = names[-1] if names else ''
    if name == 'kernel':
      fan_out = math.prod(leaf.shape[:-2]) * (
          1 if len(leaf.shape) == 4 and leaf.shape[2] == 1 else leaf.shape[-1])
      x = rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_out)
    elif name in ('scale', 'var'):
      x = np.ones(leaf.shape)
    else:
      x = np.zeros(leaf.shape)
    # Cast in numpy: a float64 -> float32 cast in jax compiles per shape.
    return jax.device_put(np.asarray(x, dtype=leaf.dtype))

  return jax.tree_util.tree_map_with_path(value, abstract_state)


class JaxModel:
  """Our model split into a graph and flat state, with jitted steps.

  Parameters come from `_fill` (numpy) rather than the model's own init, so
  building S takes a second instead of compiling ~100 random programs.
  """

  def __init__(self, architecture, *, dtype: str, conv_impl='auto',
               num_classes=NUM_CLASSES, seed=0):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from effnetv2_jax.models import create_model
    self.num_classes = num_classes
    abstract = nnx.eval_shape(lambda: create_model(
        architecture, num_classes, rngs=seed, dtype=jnp.dtype(dtype),
        conv_impl=conv_impl))
    self.graphdef, params, stats = nnx.split(abstract, nnx.Param,
                                             nnx.BatchStat)
    params, stats = _fill(params, seed), _fill(stats, seed)
    self.param_leaves, self.param_def = jax.tree.flatten(params)
    self.stat_leaves, self.stat_def = jax.tree.flatten(stats)
    self.decay_mask = _kernel_mask(params)
    self.tx = rmsprop_tf()

  def _merge(self, param_leaves, stat_leaves):
    import jax
    from flax import nnx
    return nnx.merge(self.graphdef,
                     jax.tree.unflatten(self.param_def, param_leaves),
                     jax.tree.unflatten(self.stat_def, stat_leaves))

  def init_train_state(self):
    import jax
    opt_state = jax.jit(self.tx.init)(self.param_leaves)
    return (list(self.param_leaves), list(self.stat_leaves), opt_state)

  def train_step_fn(self):
    """Pure (state, images, labels, rng) -> (state, loss), not yet jitted."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(param_leaves, stat_leaves, images, labels, rng):
      model = self._merge(param_leaves, stat_leaves)
      logits = model(images, training=True, rng=rng)
      targets = optax.smooth_labels(
          jax.nn.one_hot(labels, self.num_classes), LABEL_SMOOTHING)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      l2 = sum(jnp.sum(jnp.square(p)) for p, m in
               zip(param_leaves, self.decay_mask) if m)
      new_stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
      return loss + WEIGHT_DECAY * 0.5 * l2, new_stats

    def step(state, images, labels, rng):
      param_leaves, stat_leaves, opt_state = state
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          param_leaves, stat_leaves, images, labels, rng)
      updates, opt_state = self.tx.update(grads, opt_state, param_leaves)
      param_leaves = optax.apply_updates(param_leaves, updates)
      return (param_leaves, new_stats, opt_state), loss

    return step

  def jit_train_step(self):
    import jax
    from effnetv2_jax.models import xla_options
    return jax.jit(self.train_step_fn(), donate_argnums=(0,),
                   compiler_options=xla_options.compiler_options())

  def jit_infer(self):
    import jax
    from effnetv2_jax.models import xla_options

    def infer(param_leaves, stat_leaves, images):
      return self._merge(param_leaves, stat_leaves)(images, training=False)

    return jax.jit(infer, compiler_options=xla_options.compiler_options())


def synthetic_batch(batch: int, size: int, num_classes=NUM_CLASSES, seed=0):
  """Normal images [B, size, size, 3] float32 and labels, on the device."""
  import jax
  k1, k2 = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(k1, (batch, size, size, 3), 'float32')
  labels = jax.random.randint(k2, (batch,), 0, num_classes)
  return images, labels


def jax_runner(name: str, architecture, *, size: int, batch: int, mode: str,
               dtype: str, conv_impl='auto') -> Runner:
  import time
  import jax
  model = JaxModel(architecture, dtype=dtype, conv_impl=conv_impl)
  images, labels = synthetic_batch(batch, size)

  def sync(out):
    jax.block_until_ready(out)

  # Compiled ahead of time and timed, so that the first step's own cost
  # (program load, library set-up: ~20 s for S's train step on an H100) is
  # reported apart from the compile.
  if mode == 'infer':
    params, stats = model.param_leaves, model.stat_leaves
    start = time.perf_counter()
    infer = model.jit_infer().lower(params, stats, images).compile()
    compile_s = time.perf_counter() - start
    return Runner(name, lambda: infer(params, stats, images), sync,
                  compile_s=compile_s)

  holder = [model.init_train_state()]
  rng = jax.random.key(1)
  start = time.perf_counter()
  step = model.jit_train_step().lower(holder[0], images, labels, rng).compile()
  compile_s = time.perf_counter() - start

  def run():
    holder[0], loss = step(holder[0], images, labels, rng)
    return loss

  def close():
    holder.clear()

  return Runner(name, run, sync, close, compile_s=compile_s)


def measure_matmul_peak(dtype: str) -> float:
  """Matmul FLOP/s of the default JAX device in `dtype`: the best of five
  timings of 8192^3 on an accelerator, 2048^3 on a CPU (big enough to reach
  the vector units' rate, small enough to take a second)."""
  import time
  import jax
  import jax.numpy as jnp
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

  def train():
    with autocast():
      loss = criterion(forward(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return Runner(name, train, sync, _torch_close(model, opt))


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

