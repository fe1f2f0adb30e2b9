"""Randomly initialised, BN-calibrated timm and Keras reference models.

Parity with random weights is only meaningful when activations stay O(1):
random BatchNorm running statistics let them grow through 50-100 blocks until
float32 rounding alone exceeds any tolerance. So every reference gets random
BN affine parameters (gamma ~ N(1, 0.1), beta ~ N(0, 0.1)) and running
statistics equal to the moments of the very batch the test evaluates (train
mode, stochastic depth and dropout off, biased variance). Eval mode on that
batch then normalises every BN output to unit scale, logits are O(1) and a
1e-4 bound separates rounding from real differences (padding side, SE width,
BN epsilon, layouts). Statistics averaged over other batches are not enough
at test sizes: with a few values per channel in the last stages, eval-mode
activations reach 1e3-1e5 on some variants.

Even so, a random deep network at 32-65 px amplifies float32 rounding: with
every branch adding a unit-variance update, the same timm L model run in
float32 and float64 differs by 1e-4 to 8e-3 in the logits (measured at 32-128
px), so no float32 implementation could meet a 1e-4 bound. Scaling gamma and
beta of the last BN of each residual branch by BRANCH_SCALE (0.2: the spirit
of zero-init-residual, every branch still contributes 20%) brings that
float32-vs-float64 gap to ~3e-6 to 2e-5, leaving the bound to real
differences.

timm needs torchvision, whose 0.28.0 wheel here is a CUDA build: its
extension fails to load and `import torchvision` stops at "operator
torchvision::nms does not exist". `import_timm` then defines the two
operator schemas torchvision's Python code looks up and imports again; model
building works, torchvision.ops.nms does not (nothing here needs it).
"""

from __future__ import annotations

import numpy as np

# gamma and beta of the last BN of every residual branch are scaled by this.
BRANCH_SCALE = 0.2

_TORCHVISION_SCHEMAS = (
    'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms(Tensor qdets, Tensor scores, float iou_threshold, Tensor scale, '
    'int zero_point) -> Tensor',
)
_libraries = []  # keeps the schema registrations alive


def import_timm():
  """`import timm`, working around a torchvision without its extension."""
  try:
    import timm
    return timm
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  import torch
  library = torch.library.Library('torchvision', 'DEF')
  for schema in _TORCHVISION_SCHEMAS:
    library.define(schema)
  _libraries.append(library)
  import timm
  return timm


def random_batch(size: int, batch: int, seed: int) -> np.ndarray:
  """A float32 NHWC batch of unit-scale values, like normalised images."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------
# timm


def timm_reference(variant: str, batch: np.ndarray, *, seed: int = 0,
                   branch_scale: float = BRANCH_SCALE, model=None):
  """A timm `tf_efficientnetv2_<variant>` calibrated on `batch`, eval mode.

  The running statistics are the batch's own moments, with the biased
  variance BatchNorm normalises by in train mode (PyTorch stores the unbiased
  one), so eval mode on `batch` reproduces the train-mode forward: every BN
  output has unit scale. Pass the `model` of an earlier call to re-calibrate
  it for another batch (e.g. another input size).
  """
  import torch
  norms = None
  if model is None:
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(f'tf_efficientnetv2_{variant}',
                              pretrained=False)
    generator = torch.Generator().manual_seed(seed + 1)
    norms = _timm_norms(model)
    # The last BN of each residual branch (timm blocks with a skip).
    branch_ends = {[m for m in block.modules() if m in set(norms)][-1]
                   for stage in model.blocks for block in stage
                   if getattr(block, 'has_skip', False)}
    with torch.no_grad():
      for bn in norms:
        scale = branch_scale if bn in branch_ends else 1.0
        bn.weight.copy_(scale * (1 + 0.1 * torch.randn(
            bn.weight.shape, generator=generator)))
        bn.bias.copy_(scale * 0.1 * torch.randn(bn.bias.shape,
                                                generator=generator))
  norms = norms or _timm_norms(model)
  counts = {}

  def count(module, inputs):
    x = inputs[0]
    counts[module] = x.numel() // x.shape[1]

  hooks = [bn.register_forward_pre_hook(count) for bn in norms]
  with torch.no_grad():
    for bn in norms:
      bn.reset_running_stats()
      bn.momentum = None  # running stats := this batch's moments
    model.train()
    model(torch.from_numpy(batch).permute(0, 3, 1, 2))
    for bn in norms:
      n = counts[bn]
      bn.running_var.mul_((n - 1) / n)
  for hook in hooks:
    hook.remove()
  model.eval()
  return model


def _timm_norms(model):
  import torch
  return [m for m in model.modules()
          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def timm_logits(model, x: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def timm_state_dict(model) -> dict:
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------
# Keras


def keras_reference(variant: str, batch: np.ndarray, *, seed: int = 0,
                    branch_scale: float = BRANCH_SCALE, model=None):
  """A keras.applications EfficientNetV2 calibrated on `batch`.

  Built without its preprocessing layers (it sees the same normalised tensors
  as our model) and with logits out. Keras' running variance is the biased
  one, so eval mode on `batch` reproduces the train-mode forward. Pass the
  `model` of an earlier call to re-calibrate it for another batch (its graph
  takes any input size).
  """
  import keras
  rng = np.random.default_rng(seed + 1)
  if model is None:
    keras.utils.set_random_seed(seed)
    constructor = getattr(keras.applications,
                          f'EfficientNetV2{variant.upper()}')
    size = batch.shape[1]
    model = constructor(weights=None, include_preprocessing=False,
                        input_shape=(size, size, 3),
                        classifier_activation=None)
    # The graph is size-agnostic (global pooling); only the Input pins it.
    model.input_spec = None
    # Blocks with a residual have an '<block>_add' layer; their branch ends
    # with '<block>_project_bn'.
    branch_ends = {l.name[:-len('add')] + 'project_bn' for l in model.layers
                   if l.name.endswith('_add')}
    for bn in _keras_norms(model):
      channels = bn.gamma.shape[0]
      scale = branch_scale if bn.name in branch_ends else 1.0
      bn.gamma.assign((scale * (1 + 0.1 * rng.standard_normal(channels))
                       ).astype('f4'))
      bn.beta.assign((scale * 0.1 * rng.standard_normal(channels)
                      ).astype('f4'))
  dropouts = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
  rates = [d.rate for d in dropouts]
  for d in dropouts:
    d.rate = 0.0  # no stochastic depth while measuring the statistics
  norms = _keras_norms(model)
  for bn in norms:
    bn.momentum = 0.0  # running stats := this batch's moments
  model(batch, training=True)
  for d, rate in zip(dropouts, rates):
    d.rate = rate
  for bn in norms:
    bn.momentum = 0.9
  return model


def _keras_norms(model):
  import keras
  return [l for l in model.layers
          if isinstance(l, keras.layers.BatchNormalization)]


def keras_logits(model, x: np.ndarray) -> np.ndarray:
  return np.asarray(model(x, training=False))
