"""MLP-Mixer (Tolstikhin et al. 2021) as Flax NNX modules.

Built from a `token_arch.MixerArchitecture`, with timm's layer layout of
`mixer_{s,b}16_224` (a stride-p patch convolution with bias, blocks of
pre-LayerNorm token-mixing and channel-mixing exact-GELU MLPs with biases,
LayerNorm epsilon 1e-6, a final LayerNorm, the head on the mean over tokens),
so parameter counts equal timm's and timm weights map one to one.
Initialisation follows the paper's code (google-research/vision_transformer
`models_mixer.py`): LeCun-normal kernels, zero biases, a zero head.

Image sizes. A token-mixing MLP is a dense layer across tokens, so its
weights exist for one token count: the architecture's train grid
((train_size // patch_size) squared). At any other grid (progressive
learning's smaller stages, a larger eval size) each block resamples the
normalised tokens bilinearly to the train grid, mixes them there and
resamples the mixed result back before adding it to the residual stream:
the residual path and the channel-mixing MLP stay at the image's own
resolution, and at the train grid the block is exactly the paper's. This
keeps one set of weights trainable at every stage size (as ViT's resampled
position embeddings do), where the alternatives either reject other sizes,
which rules out progressive learning, or resample the whole image, which
discards the small stages' point (fewer tokens, cheaper steps). Grids are
square; the patch embedding is 'VALID' as ViT's (see `vit.py`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import token_arch
from effnetv2_jax.models.vit import (Mlp, PatchEmbed, TokenClassifier,
                                     branch_keep, build_token_model,
                                     check_rates, layer_norm,
                                     residual_branches, resize_token_grid)

_LECUN = jax.nn.initializers.lecun_normal()
_ZEROS = jax.nn.initializers.zeros


class MixerBlock(nnx.Module):
  """One mixer block on tokens [B, N, D]:
  x + token_mlp(LN(x) across tokens), then x + channel_mlp(LN(x)); each
  branch with its own per-example stochastic depth when training.

  Args:
    tokens: the token count the token-mixing MLP is built for (a square
      grid); other square counts are resampled to it around token mixing
      (module docstring).
    width: channels D.
    token_mlp_dim: hidden width of the token-mixing MLP.
    channel_mlp_dim: hidden width of the channel-mixing MLP.
    epsilon: LayerNorm epsilon.
    dtype: compute dtype (parameters stay float32).
  """

  def __init__(self, tokens: int, width: int, token_mlp_dim: int,
               channel_mlp_dim: int, *, epsilon: float = 1e-6,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.tokens = tokens
    self.norm1 = layer_norm(width, epsilon, dtype, rngs)
    self.mlp_tokens = Mlp(tokens, token_mlp_dim, kernel_init=_LECUN,
                          bias_init=_ZEROS, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(width, epsilon, dtype, rngs)
    self.mlp_channels = Mlp(width, channel_mlp_dim, kernel_init=_LECUN,
                            bias_init=_ZEROS, dtype=dtype, rngs=rngs)

  def mix_tokens(self, h):
    """The token-mixing MLP across the N tokens of h [B, N, D], through
    the built grid when N differs from it."""
    count = h.shape[1]
    if count == self.tokens:
      return self.mlp_tokens(h.swapaxes(1, 2)).swapaxes(1, 2)
    built, side = math.isqrt(self.tokens), math.isqrt(count)
    if built * built != self.tokens or side * side != count:
      raise ValueError(
          f'MixerBlock mixes {self.tokens} tokens; {count} tokens are '
          'resampled to them only when both counts are square grids')
    h = resize_token_grid(h, (built, built))
    h = self.mlp_tokens(h.swapaxes(1, 2)).swapaxes(1, 2)
    return resize_token_grid(h, (side, side))

  def __call__(self, x, *, training: bool = False, rng=None,
               drop_path_rate=0.0):
    """[B, N, D] -> [B, N, D]; `rng` is required when training with a
    non-zero `drop_path_rate`."""
    keep = branch_keep(rng, x.shape[0], drop_path_rate, training=training,
                       branches=2, who='MixerBlock')
    return residual_branches(
        x, (lambda v: self.mix_tokens(self.norm1(v)),
            lambda v: self.mlp_channels(self.norm2(v))),
        keep=keep, drop_path_rate=drop_path_rate)


class MlpMixer(TokenClassifier):
  """The MLP-Mixer for one `MixerArchitecture`.

  Call-time dropout and stochastic-depth rates as `EfficientNetV2` and
  `ViT`; no BatchNorm (`bn_groups` is ignored). Image sizes other than the
  train size: see the module docstring.
  """

  def __init__(self, architecture: token_arch.MixerArchitecture,
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
    self.stem = PatchEmbed(a.patch_size, a.width, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        MixerBlock(a.num_tokens, a.width, a.token_mlp_dim, a.channel_mlp_dim,
                   epsilon=a.layer_norm_epsilon, dtype=dtype, rngs=rngs)
        for _ in range(a.depth)])
    self.norm = layer_norm(a.width, a.layer_norm_epsilon, dtype, rngs)
    self.head = nnx.Linear(a.width, num_classes, dtype=jnp.float32,
                           kernel_init=_ZEROS, rngs=rngs)

  def pool(self, encoded):
    return jnp.mean(encoded.astype(jnp.float32), axis=1)

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
        [B, N, D], 'pre_logits': [B, D]}.
    """
    del bn_groups
    tokens, _ = self.stem(x)
    return self.classify(tokens, training=training, rng=rng,
                         dropout_rate=dropout_rate,
                         drop_path_rate=drop_path_rate,
                         return_features=return_features)


def create_model(architecture: str | token_arch.MixerArchitecture | Mapping,
                 num_classes: int = 1000, *, rngs: nnx.Rngs | int = 0,
                 **kwargs) -> MlpMixer:
  """Builds a Mixer from a variant name, a `MixerArchitecture` or its dict."""
  return build_token_model(MlpMixer, token_arch.MixerArchitecture,
                           token_arch.mixer_architecture, 'an MLP-Mixer',
                           architecture, num_classes, rngs, kwargs)
