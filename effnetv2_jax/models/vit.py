"""The Vision Transformer (Dosovitskiy et al. 2021) as Flax NNX modules.

Built from a `token_arch.ViTArchitecture`, with timm's layer layout of
`vit_*_patch16_224` (a stride-p patch convolution with bias, a class token and
learned position embeddings over class token and patches, pre-LayerNorm
blocks of fused-qkv attention with bias and an exact-GELU MLP, LayerNorm
epsilon 1e-6, a final LayerNorm, the head on the class token), so parameter
counts equal timm's and timm weights map one to one. Initialisation follows
the paper's code (google-research/vision_transformer): LeCun-normal patch
embedding, position embeddings N(0, 0.02), a zero class token, Xavier-uniform
attention and MLP kernels, a zero head.

Also here, shared with `mixer.py`: the patch embedding, the token-grid
resampling and per-example stochastic depth on [B, N, D] tokens.

Image sizes: the position embeddings are stored for the architecture's train
grid (train_size // patch_size per side). An image whose token grid differs
(progressive learning's smaller stages, a larger eval size) gets them
resampled bilinearly at call time, the class token's kept apart; gradients
flow through the resampling to the stored grid. The patch embedding is a
'VALID' stride-p convolution, as in the paper's code: a side that is not a
multiple of the patch size leaves its last (side mod p) pixel rows or
columns unseen.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import token_arch
from effnetv2_jax.models.efficientnetv2 import param_rngs


def check_rates(*, dropout_rate=None, drop_path_rate=None) -> None:
  for name, rate in (('dropout_rate', dropout_rate),
                     ('drop_path_rate', drop_path_rate)):
    if rate is not None and not 0 <= rate < 1:
      raise ValueError(f'{name} must be in [0, 1), got {rate}')


def is_nonzero(rate) -> bool:
  """False only for a Python zero: a traced rate may be anything."""
  return not (isinstance(rate, (int, float)) and rate == 0)


def block_drop_rates(drop_path_rate, depth: int) -> list:
  """Per-block stochastic-depth rates, linear from 0 at the first block to
  `drop_path_rate` at the last (timm's schedule for token models)."""
  if depth == 1:
    return [0.0]
  return [0.0] + [drop_path_rate * (i / (depth - 1)) for i in range(1, depth)]


def drop_path(x, keep, rate):
  """Residual branch x [B, N, D] zeroed for the examples where `keep` [B] is
  False and the others scaled by 1 / (1 - rate)."""
  scale = keep.astype(jnp.float32) / (1.0 - rate)
  return x * scale.astype(x.dtype)[:, None, None]


def dropout(x, rate, rng):
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, x.shape)
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def resize_token_grid(tokens, grid: tuple[int, int]):
  """Tokens [B, h*w, D] of a square h x w grid, bilinearly resampled to
  `grid` (rows, columns) -> [B, rows*columns, D]; the identity when the
  grid is already that size."""
  batch, count, width = tokens.shape
  side = math.isqrt(count)
  if side * side != count:
    raise ValueError(f'resize_token_grid: {count} tokens are not a square '
                     'grid')
  if (side, side) == tuple(grid):
    return tokens
  image = tokens.reshape(batch, side, side, width)
  resized = jax.image.resize(image, (batch, *grid, width), method='bilinear')
  return resized.reshape(batch, grid[0] * grid[1], width).astype(tokens.dtype)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> linear embedding (a stride-p 'VALID'
  convolution with bias; kernel stored HWIO as a convolution's)."""

  def __init__(self, patch_size: int, width: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.dtype = dtype
    self.kernel = nnx.Param(jax.nn.initializers.lecun_normal()(
        rngs.params(), (patch_size, patch_size, 3, width)))
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

  def __call__(self, x) -> tuple[jax.Array, tuple[int, int]]:
    """Images [B, H, W, 3] -> (tokens [B, rows*cols, D], (rows, cols))."""
    p = self.patch_size
    batch, height, width, channels = x.shape
    rows, cols = height // p, width // p
    if not rows or not cols:
      raise ValueError(f'a {height}x{width} image is smaller than one '
                       f'{p} px patch')
    # A patch convolution with stride = kernel is a matmul over each
    # patch's pixels; the reshape is the 'VALID' cut.
    patches = x[:, :rows * p, :cols * p].astype(self.dtype).reshape(
        batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows * cols, p * p * channels)
    kernel = self.kernel[...].reshape(p * p * channels, -1)
    tokens = patches @ kernel.astype(self.dtype) + self.bias[...].astype(
        self.dtype)
    return tokens, (rows, cols)


def _xavier_per_part(parts: int):
  """Xavier-uniform for a kernel [D, parts * D'] that fuses `parts` dense
  layers (qkv): each part gets the fans of its own [D, D'] kernel, as the
  paper's separate query, key and value projections."""
  base = jax.nn.initializers.xavier_uniform(in_axis=0, out_axis=2,
                                            batch_axis=(1,))

  def init(key, shape, dtype=jnp.float32):
    fan_in, fused = shape
    return base(key, (fan_in, parts, fused // parts), dtype).reshape(shape)

  return init


_XAVIER = jax.nn.initializers.xavier_uniform()


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (bias) and an
  output projection (bias), timm's `Attention`."""

  def __init__(self, width: int, num_heads: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f'num_heads={num_heads} does not divide width={width}')
    self.num_heads = num_heads
    self.qkv = nnx.Linear(width, 3 * width, dtype=dtype,
                          kernel_init=_xavier_per_part(3), rngs=rngs)
    self.proj = nnx.Linear(width, width, dtype=dtype, kernel_init=_XAVIER,
                           rngs=rngs)

  def __call__(self, x):
    batch, count, width = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(batch, count, 3, heads, width // heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1],
                                       qkv[:, :, 2])
    return self.proj(out.reshape(batch, count, width))


class Mlp(nnx.Module):
  """Linear -> exact GELU -> linear, timm's `Mlp`."""

  def __init__(self, width: int, hidden: int, *, kernel_init=_XAVIER,
               bias_init=jax.nn.initializers.normal(1e-6),
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, hidden, dtype=dtype, kernel_init=kernel_init,
                          bias_init=bias_init, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, dtype=dtype, kernel_init=kernel_init,
                          bias_init=bias_init, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def layer_norm(width: int, epsilon: float, dtype, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)


def branch_keep(rng, batch: int, drop_path_rate, *, training: bool,
                branches: int, who: str):
  """Per-example keep decisions [branches, B] of a block's residual
  branches, or None when nothing is dropped.

  Raises:
    ValueError: training with a non-zero rate and no rng.
  """
  if not training or not is_nonzero(drop_path_rate):
    return None
  if rng is None:
    raise ValueError(f'{who}: training with drop_path_rate='
                     f'{drop_path_rate} needs rng=')
  return jax.random.uniform(rng, (branches, batch)) >= drop_path_rate


def residual_branches(x, branches, *, keep, drop_path_rate):
  """x + b1(x), then + b2(that), ...: each branch's output dropped per
  example with `keep[i]` (None: nothing dropped), as a pre-norm block does."""
  for index, branch in enumerate(branches):
    h = branch(x)
    if keep is not None:
      h = drop_path(h, keep[index], drop_path_rate)
    x = x + h
  return x


class TransformerBlock(nnx.Module):
  """Pre-LN encoder block on tokens [B, N, D]:
  x + attn(LN(x)), then x + mlp(LN(x)); each branch with its own per-example
  stochastic depth when training.

  Args:
    width: token dimension D.
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    epsilon: LayerNorm epsilon.
    dtype: compute dtype (parameters stay float32).
  """

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *,
               epsilon: float = 1e-6, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, epsilon, dtype, rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(width, epsilon, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, training: bool = False, rng=None,
               drop_path_rate=0.0):
    """[B, N, D] -> [B, N, D]; `rng` is required when training with a
    non-zero `drop_path_rate`."""
    keep = branch_keep(rng, x.shape[0], drop_path_rate, training=training,
                       branches=2, who='TransformerBlock')
    return residual_branches(
        x, (lambda v: self.attn(self.norm1(v)),
            lambda v: self.mlp(self.norm2(v))),
        keep=keep, drop_path_rate=drop_path_rate)


class TokenClassifier(nnx.Module):
  """What ViT and MLP-Mixer share after the embedding: the blocks with
  their stochastic-depth schedule, the final LayerNorm, the pooled
  pre-logits' dropout and the float32 head. Subclasses set `blocks`,
  `norm`, `head`, `dropout_rate`, `drop_path_rate` and `pool`."""

  def rates_and_keys(self, training: bool, rng, dropout_rate,
                     drop_path_rate):
    """(dropout rate, drop-path rate, keys or None) of one call: keys
    {'blocks': one per block, 'dropout': the pre-logits'} when training
    with an rng.

    Raises:
      ValueError: training with a non-zero rate and no rng.
    """
    dropout_rate = self.dropout_rate if dropout_rate is None else dropout_rate
    drop_path_rate = (self.drop_path_rate if drop_path_rate is None
                      else drop_path_rate)
    if training and rng is None and (is_nonzero(dropout_rate) or
                                     is_nonzero(drop_path_rate)):
      raise ValueError('training with dropout or stochastic depth needs rng=')
    if not training or rng is None:
      return dropout_rate, drop_path_rate, None
    rng_blocks, rng_dropout = jax.random.split(rng)
    keys = {'blocks': jax.random.split(rng_blocks, len(self.blocks)),
            'dropout': rng_dropout}
    return dropout_rate, drop_path_rate, keys

  def classify(self, h, *, training: bool, rng, dropout_rate,
               drop_path_rate, return_features: bool):
    """Embedded tokens h [B, N, D] -> logits (and the features dict)."""
    dropout_rate, drop_path_rate, keys = self.rates_and_keys(
        training, rng, dropout_rate, drop_path_rate)
    features = {'embed': h}
    rates = block_drop_rates(drop_path_rate, len(self.blocks))
    for i, (block, rate) in enumerate(zip(self.blocks, rates)):
      h = block(h, training=training,
                rng=None if keys is None else keys['blocks'][i],
                drop_path_rate=0.0 if keys is None else rate)
      features[f'block{i + 1}'] = h
    h = self.norm(h)
    features['encoded'] = h
    pooled = self.pool(h)
    features['pre_logits'] = pooled
    if keys is not None and is_nonzero(dropout_rate):
      pooled = dropout(pooled, dropout_rate, keys['dropout'])
    logits = self.head(pooled).astype(jnp.float32)
    if return_features:
      return logits, features
    return logits

  def pool(self, encoded):
    """[B, N, D] -> float32 pre-logits [B, D]."""
    raise NotImplementedError


class ViT(TokenClassifier):
  """The Vision Transformer for one `ViTArchitecture`.

  Dropout and stochastic-depth rates are call-time settings, as in
  `EfficientNetV2`, so progressive learning changes them per stage. There is
  no BatchNorm: `bn_groups` is accepted and ignored. See the module
  docstring for how other image sizes are handled.
  """

  def __init__(self, architecture: token_arch.ViTArchitecture,
               num_classes: int = 1000, *, dropout_rate: float | None = None,
               drop_path_rate: float = 0.0, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    check_rates(dropout_rate=dropout_rate, drop_path_rate=drop_path_rate)
    a = architecture
    self.architecture = a
    self.num_classes = num_classes
    self.dropout_rate = a.dropout_rate if dropout_rate is None else dropout_rate
    self.drop_path_rate = drop_path_rate
    self.dtype = dtype
    self.patch_embed = PatchEmbed(a.patch_size, a.width, dtype=dtype,
                                  rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, a.width), jnp.float32))
    self.pos_embed = nnx.Param(jax.nn.initializers.normal(0.02)(
        rngs.params(), (1, 1 + a.train_grid ** 2, a.width)))
    self.blocks = nnx.List([
        TransformerBlock(a.width, a.num_heads, a.mlp_dim,
                         epsilon=a.layer_norm_epsilon, dtype=dtype, rngs=rngs)
        for _ in range(a.depth)])
    self.norm = layer_norm(a.width, a.layer_norm_epsilon, dtype, rngs)
    self.head = nnx.Linear(a.width, num_classes, dtype=jnp.float32,
                           kernel_init=jax.nn.initializers.zeros, rngs=rngs)

  def position_embedding(self, grid: tuple[int, int]):
    """[1, 1 + rows*cols, D]: the class token's embedding and the stored
    patch grid's, resampled to `grid`."""
    stored = self.pos_embed[...]
    patches = resize_token_grid(stored[:, 1:], grid)
    return jnp.concatenate([stored[:, :1], patches], axis=1)

  def pool(self, encoded):
    return encoded[:, 0].astype(jnp.float32)

  def __call__(self, x, *, training: bool = False, rng=None,
               dropout_rate=None, drop_path_rate=None, bn_groups: int = 1,
               return_features: bool = False):
    """Logits [B, num_classes] in float32 for images x [B, H, W, 3].

    Args:
      x: NHWC images, already normalised.
      training: dropout and stochastic depth (with `rng`).
      rng: PRNG key, required when training with a non-zero rate.
      dropout_rate, drop_path_rate: override the construction-time rates.
      bn_groups: ignored (no BatchNorm); the trainer's signature.
      return_features: also return {'embed', 'block1'..'blockL', 'encoded':
        [B, 1 + N, D] with the class token first, 'pre_logits': [B, D]}.
    """
    del bn_groups
    tokens, grid = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                           (tokens.shape[0], 1, tokens.shape[-1]))
    h = (jnp.concatenate([cls, tokens], axis=1)
         + self.position_embedding(grid).astype(self.dtype))
    return self.classify(h, training=training, rng=rng,
                         dropout_rate=dropout_rate,
                         drop_path_rate=drop_path_rate,
                         return_features=return_features)


def build_token_model(module_cls, description_type, from_name, what: str,
                      architecture, num_classes: int, rngs, kwargs):
  """`module_cls(description, num_classes, rngs=...)` from a variant name
  (`from_name`), a `description_type` or its dict (ViT's and Mixer's
  create_model)."""
  if isinstance(architecture, str):
    architecture = from_name(architecture)
  elif isinstance(architecture, Mapping):
    architecture = description_type.from_dict(architecture)
  elif not isinstance(architecture, description_type):
    raise TypeError(f'architecture must be {what} variant name, a '
                    f'{description_type.__name__} or its dict, got '
                    f'{type(architecture).__name__}')
  if isinstance(rngs, int):
    rngs = param_rngs(rngs)
  return module_cls(architecture, num_classes, rngs=rngs, **kwargs)


def create_model(architecture: str | token_arch.ViTArchitecture | Mapping,
                 num_classes: int = 1000, *, rngs: nnx.Rngs | int = 0,
                 **kwargs) -> ViT:
  """Builds a ViT from a variant name, a `ViTArchitecture` or its dict."""
  return build_token_model(ViT, token_arch.ViTArchitecture,
                           token_arch.vit_architecture, 'a ViT',
                           architecture, num_classes, rngs, kwargs)
