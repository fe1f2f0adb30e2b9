"""EfficientNetV2 as Flax NNX modules, built from an `arch.Architecture`."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models.layers import (BatchNorm, Conv2D, ConvBN,
                                        DepthwiseConv2D, SqueezeExcite,
                                        drop_path)


class Stem(nnx.Module):
  """3x3 stride-2 convolution -> BN -> SiLU."""

  conv_bn = ConvBN('conv', 'bn')

  def __init__(self, cout, *, bn_kw, dtype, conv_impl, rngs):
    self.conv = Conv2D(3, cout, 3, 2, impl=conv_impl, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(cout, dtype=dtype, rngs=rngs, **bn_kw)

  def __call__(self, x, *, training, groups):
    return self.conv_bn(x, training=training, groups=groups,
                        activation='silu')


class MBConv(nnx.Module):
  """Inverted bottleneck: [1x1 expand] -> depthwise -> [SE] -> 1x1 project."""

  expand = ConvBN('expand_conv', 'expand_bn')
  depthwise = ConvBN('dw_conv', 'dw_bn')
  project = ConvBN('project_conv', 'project_bn')

  def __init__(self, spec: arch_lib.BlockSpec, *, bn_kw, dtype,
               conv_impl, rngs):
    self.spec = spec
    mid = spec.mid_channels
    if spec.expand_ratio != 1:
      self.expand_conv = Conv2D(spec.in_channels, mid, 1, impl=conv_impl,
                                dtype=dtype, rngs=rngs)
      self.expand_bn = BatchNorm(mid, dtype=dtype, rngs=rngs, **bn_kw)
    else:
      self.expand_conv = self.expand_bn = None
    self.dw_conv = DepthwiseConv2D(mid, spec.kernel_size, spec.stride,
                                   impl=conv_impl, dtype=dtype, rngs=rngs)
    self.dw_bn = BatchNorm(mid, dtype=dtype, rngs=rngs, **bn_kw)
    self.se = (SqueezeExcite(mid, spec.se_channels, impl=conv_impl,
                             dtype=dtype, rngs=rngs)
               if spec.se_channels else None)
    self.project_conv = Conv2D(mid, spec.out_channels, 1, impl=conv_impl,
                               dtype=dtype, rngs=rngs)
    self.project_bn = BatchNorm(spec.out_channels, dtype=dtype, rngs=rngs,
                                **bn_kw)

  def __call__(self, x, *, training, groups):
    h = x
    if self.expand_conv is not None:
      h = self.expand(h, training=training, groups=groups, activation='silu')
    h = self.depthwise(h, training=training, groups=groups, activation='silu')
    if self.se is not None:
      h = self.se(h)
    # No activation after the projection BN (linear bottleneck).
    return self.project(h, training=training, groups=groups)


class FusedMBConv(nnx.Module):
  """k x k conv (expand) -> [SE] -> 1x1 project; e=1 is one conv+BN+SiLU."""

  fused = ConvBN('fused_conv', 'fused_bn')
  project = ConvBN('project_conv', 'project_bn')

  def __init__(self, spec: arch_lib.BlockSpec, *, bn_kw, dtype,
               conv_impl, rngs):
    self.spec = spec
    single = spec.expand_ratio == 1
    width = spec.out_channels if single else spec.mid_channels
    self.fused_conv = Conv2D(spec.in_channels, width, spec.kernel_size,
                             spec.stride, impl=conv_impl, dtype=dtype,
                             rngs=rngs)
    self.fused_bn = BatchNorm(width, dtype=dtype, rngs=rngs, **bn_kw)
    self.se = (SqueezeExcite(width, spec.se_channels, impl=conv_impl,
                             dtype=dtype, rngs=rngs)
               if spec.se_channels else None)
    if single:
      self.project_conv = self.project_bn = None
    else:
      self.project_conv = Conv2D(width, spec.out_channels, 1, impl=conv_impl,
                                 dtype=dtype, rngs=rngs)
      self.project_bn = BatchNorm(spec.out_channels, dtype=dtype, rngs=rngs,
                                  **bn_kw)

  def __call__(self, x, *, training, groups):
    h = self.fused(x, training=training, groups=groups, activation='silu')
    if self.se is not None:
      h = self.se(h)
    if self.project_conv is not None:
      h = self.project(h, training=training, groups=groups)
    return h


class Head(nnx.Module):
  """1x1 conv to the head width, BN, SiLU, mean-pool, dropout, classifier."""

  conv_bn = ConvBN('conv', 'bn')

  def __init__(self, cin, width, num_classes, *, bn_kw, dtype, conv_impl,
               rngs):
    self.conv = Conv2D(cin, width, 1, impl=conv_impl, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(width, dtype=dtype, rngs=rngs, **bn_kw)
    limit = 1.0 / float(num_classes) ** 0.5

    def uniform_fan_out(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -limit, limit)

    self.classifier = nnx.Linear(width, num_classes, dtype=jnp.float32,
                                 kernel_init=uniform_fan_out, rngs=rngs)


class EfficientNetV2(nnx.Module):
  """The EfficientNetV2 network for one `Architecture`.

  Dropout and stochastic-depth rates are call-time settings so progressive
  learning changes them per stage without touching the parameters.
  """

  def __init__(self, architecture: arch_lib.Architecture,
               num_classes: int = 1000, *, dropout_rate: float | None = None,
               drop_path_rate: float = 0.2, bn_momentum: float = 0.9,
               bn_epsilon: float = 1e-3, dtype: Any = jnp.float32,
               conv_impl: str = 'auto', rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    for name, rate in (('dropout_rate', dropout_rate),
                       ('drop_path_rate', drop_path_rate)):
      if rate is not None and not 0 <= rate < 1:
        raise ValueError(f'{name} must be in [0, 1), got {rate}')
    self.architecture = architecture
    self.num_classes = num_classes
    self.dropout_rate = (architecture.dropout_rate if dropout_rate is None
                         else dropout_rate)
    self.drop_path_rate = drop_path_rate
    bn_kw = dict(momentum=bn_momentum, epsilon=bn_epsilon)
    stem = architecture.stem_channels
    self.stem = Stem(stem, bn_kw=bn_kw, dtype=dtype, conv_impl=conv_impl,
                     rngs=rngs)
    stages = architecture.stage_blocks(drop_path_rate=1.0)
    # Per block: (stage index, depth fraction i/N); survival = 1 - rate * i/N.
    self.block_positions = tuple(
        (s, 1.0 - spec.survival_prob)
        for s, blocks in enumerate(stages) for spec in blocks)
    blocks = []
    for stage in stages:
      for spec in stage:
        cls = FusedMBConv if spec.fused else MBConv
        blocks.append(cls(spec, bn_kw=bn_kw, dtype=dtype,
                          conv_impl=conv_impl, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.head = Head(stages[-1][-1].out_channels, architecture.head_width,
                     num_classes, bn_kw=bn_kw, dtype=dtype,
                     conv_impl=conv_impl, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x, *, training: bool = False, rng=None,
               dropout_rate=None, drop_path_rate=None, bn_groups: int = 1,
               return_features: bool = False):
    """Logits [B, num_classes] in float32 for images x [B, H, W, 3].

    Args:
      x: NHWC images, already normalised.
      training: batch statistics (and their running update), dropout and
        stochastic depth; otherwise running statistics and identities.
      rng: PRNG key, required when training with a non-zero rate.
      dropout_rate, drop_path_rate: override the construction-time rates.
      bn_groups: number of equal batch groups with separate BN moments.
      return_features: also return a dict of intermediate tensors.
    """
    dropout_rate = self.dropout_rate if dropout_rate is None else dropout_rate
    drop_path_rate = (self.drop_path_rate if drop_path_rate is None
                      else drop_path_rate)
    stochastic = training and rng is not None
    if training and rng is None and (_nonzero(dropout_rate) or
                                     _nonzero(drop_path_rate)):
      raise ValueError('training with dropout or stochastic depth needs rng=')
    features = {}
    if stochastic:
      rng_blocks, rng_dropout = jax.random.split(rng)
      # Every block's per-example keep decision in one draw: a random call
      # per block costs XLA:CPU a threefry loop each (~530 more ops per S
      # train step; at 32 px, where overhead dominates, 190 vs 154 ms).
      depths = jnp.asarray([depth for _, depth in self.block_positions],
                           jnp.float32)
      survival = 1.0 - drop_path_rate * depths
      draws = jax.random.uniform(rng_blocks, (len(depths), x.shape[0]))
      block_keep = draws < survival[:, None]
    h = self.stem(x, training=training, groups=bn_groups)
    features['stem'] = h
    for i, (block, (stage, depth)) in enumerate(
        zip(self.blocks, self.block_positions)):
      out = block(h, training=training, groups=bn_groups)
      if block.spec.has_residual:
        if stochastic and depth > 0:
          out = drop_path(out, block_keep[i], survival[i])
        out = out + h
      h = out
      last_of_stage = (i + 1 == len(self.block_positions) or
                       self.block_positions[i + 1][0] != stage)
      if last_of_stage:
        features[f'stage{stage + 1}'] = h
    head = self.head
    h = head.conv_bn(h, training=training, groups=bn_groups,
                     activation='silu')
    features['head'] = h
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    features['pre_logits'] = pooled
    if stochastic:
      keep = 1.0 - dropout_rate
      mask = jax.random.bernoulli(rng_dropout, keep, pooled.shape)
      pooled = jnp.where(mask, pooled / keep, 0.0)
    logits = head.classifier(pooled).astype(jnp.float32)
    if return_features:
      return logits, features
    return logits


def _nonzero(rate) -> bool:
  return not (isinstance(rate, (int, float)) and rate == 0)


def create_model(architecture: str | arch_lib.Architecture | Mapping,
                 num_classes: int = 1000, *, rngs: nnx.Rngs | int = 0,
                 **kwargs) -> EfficientNetV2:
  """Builds a model from a variant name, an `Architecture` or its dict."""
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  elif isinstance(architecture, Mapping):
    architecture = arch_lib.Architecture.from_dict(architecture)
  elif not isinstance(architecture, arch_lib.Architecture):
    raise TypeError(
        'architecture must be a variant name, an Architecture or its dict, '
        f'got {type(architecture).__name__}')
  if isinstance(rngs, int):
    rngs = param_rngs(rngs)
  return EfficientNetV2(architecture, num_classes, rngs=rngs, **kwargs)


def param_rngs(seed: int | jax.Array) -> nnx.Rngs:
  """`nnx.Rngs(params=seed)`, cheap to draw from inside a trace.

  A plain Rngs counts its draws with an indexed assignment, which asks the
  traced count for its sharding; the tracer's answer is an error message
  that walks every equation traced so far. Once per parameter, building a
  model abstractly (jax.eval_shape, the sharded init under jit) was
  quadratic: 4.1 s for L, 6.5 for XL on a 2-core CPU. A counter held in a
  mutable array ref asks nothing: 0.9-1.3 s for L. Same keys, same weights.
  """
  with nnx.var_defaults(ref=True):
    return nnx.Rngs(params=seed)


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BN running statistics excluded)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
