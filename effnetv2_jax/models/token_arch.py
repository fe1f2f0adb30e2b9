"""Framework-free descriptions of the token models: ViT and MLP-Mixer.

A ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") cuts the
image into patches, embeds each linearly, prepends a class token, adds
learned position embeddings and runs pre-LayerNorm transformer blocks; the
head reads the class token after a final LayerNorm. An MLP-Mixer (Tolstikhin
et al. 2021) embeds patches the same way, then alternates a token-mixing MLP
(across patches, per channel) and a channel-mixing MLP (across channels, per
patch), each after a LayerNorm and inside a residual; the head reads the
mean over tokens after a final LayerNorm.

The rows below are the published shapes, laid out as timm's
`vit_{tiny,small,base}_patch16_224` and `mixer_{s,b}16_224` (qkv bias,
LayerNorm epsilon 1e-6, exact GELU); `PUBLISHED_PARAMS` holds their
parameter counts at 1000 classes and 224 px. 'vit-digits' and
'mixer-digits' are small networks for 32 px digits and the tests.

The Flax modules (`vit.py`, `mixer.py`) only interpret these descriptions;
the trainer reaches them through `families` ('vit' and 'mixer').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

NORMALIZATIONS = ('inception', 'imagenet')


def _check_positive_ints(description, fields) -> None:
  kind = type(description).__name__
  for field in fields:
    value = getattr(description, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{kind}.{field} must be a positive int, got {value!r}')


def _check_common(description) -> None:
  """What both families need: whole patches at both sizes, known input
  normalisation, a dropout rate in [0, 1), a positive epsilon."""
  kind = type(description).__name__
  patch = description.patch_size
  for field in ('train_size', 'eval_size'):
    size = getattr(description, field)
    if size < patch:
      raise ValueError(f'{kind}.{field}={size} is smaller than one '
                       f'{patch} px patch')
  if description.train_size % patch:
    raise ValueError(
        f'{kind}.train_size={description.train_size} is not a multiple of '
        f'patch_size={patch}: the stored token grid must cover the image')
  if description.normalization not in NORMALIZATIONS:
    raise ValueError(f'{kind}.normalization={description.normalization!r}; '
                     f'choose one of {", ".join(NORMALIZATIONS)}')
  if not 0 <= description.dropout_rate < 1:
    raise ValueError(f'{kind}.dropout_rate must be in [0, 1), got '
                     f'{description.dropout_rate!r}')
  if not description.layer_norm_epsilon > 0:
    raise ValueError(f'{kind}.layer_norm_epsilon must be positive, got '
                     f'{description.layer_norm_epsilon!r}')


def _from_dict(cls, d: Mapping[str, Any]):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {", ".join(unknown)}; '
                     f'its fields: {", ".join(sorted(known))}')
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class ViTArchitecture:
  """A Vision Transformer.

  Attributes:
    name: the variant's name.
    patch_size: side of the square patches (the stride of the embedding).
    width: token dimension D.
    depth: number of transformer blocks.
    num_heads: attention heads; must divide `width`.
    mlp_dim: hidden width of each block's MLP.
    train_size: the image size the position embeddings are stored for (a
      grid of train_size // patch_size squared); other sizes resample them.
    eval_size: the evaluation image size.
    normalization: input normalisation, 'inception' ((x - 128) / 128, what
      the ViT checkpoints' mean 0.5 / std 0.5 is) or 'imagenet'.
    dropout_rate: dropout on the pre-logits (the trainer's progressive plan
      sets its own per stage).
    layer_norm_epsilon: of every LayerNorm.
  """

  name: str
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  train_size: int = 224
  eval_size: int = 224
  normalization: str = 'inception'
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    _check_positive_ints(self, ('patch_size', 'width', 'depth', 'num_heads',
                                'mlp_dim', 'train_size', 'eval_size'))
    if self.width % self.num_heads:
      raise ValueError(f'ViTArchitecture.num_heads={self.num_heads} does not '
                       f'divide width={self.width}')
    _check_common(self)

  @property
  def train_grid(self) -> int:
    """Patches per side at the train size: the stored embedding grid."""
    return self.train_size // self.patch_size

  def replace(self, **changes) -> 'ViTArchitecture':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ViTArchitecture':
    return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class MixerArchitecture:
  """An MLP-Mixer.

  Attributes:
    name: the variant's name.
    patch_size: side of the square patches.
    width: channel dimension C of every token.
    depth: number of mixer blocks.
    token_mlp_dim: hidden width of the token-mixing MLP (D_S in the paper).
    channel_mlp_dim: hidden width of the channel-mixing MLP (D_C).
    train_size: the image size whose token grid the token-mixing MLPs are
      built for ((train_size // patch_size) squared tokens); at other sizes
      the model resamples the grid to it around token mixing (`mixer.py`).
    eval_size: the evaluation image size.
    normalization: 'inception' or 'imagenet', as for ViT.
    dropout_rate: dropout on the pre-logits.
    layer_norm_epsilon: of every LayerNorm.
  """

  name: str
  patch_size: int
  width: int
  depth: int
  token_mlp_dim: int
  channel_mlp_dim: int
  train_size: int = 224
  eval_size: int = 224
  normalization: str = 'inception'
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    _check_positive_ints(self, ('patch_size', 'width', 'depth',
                                'token_mlp_dim', 'channel_mlp_dim',
                                'train_size', 'eval_size'))
    _check_common(self)

  @property
  def train_grid(self) -> int:
    return self.train_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Tokens the token-mixing MLPs act on (the train grid's)."""
    return self.train_grid ** 2

  def replace(self, **changes) -> 'MixerArchitecture':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'MixerArchitecture':
    return _from_dict(cls, d)


_VIT = {
    # name: (patch, width, depth, heads, mlp_dim, train size, eval size)
    'vit-ti/16': (16, 192, 12, 3, 768, 224, 224),
    'vit-s/16': (16, 384, 12, 6, 1536, 224, 224),
    'vit-b/16': (16, 768, 12, 12, 3072, 224, 224),
    # 8x8 tokens of 64 channels at 32 px: the digits quickstart and tests.
    'vit-digits': (4, 64, 4, 4, 128, 32, 32),
}

_MIXER = {
    # name: (patch, width, depth, token mlp, channel mlp, train, eval size)
    'mixer-s/16': (16, 512, 8, 256, 2048, 224, 224),
    'mixer-b/16': (16, 768, 12, 384, 3072, 224, 224),
    'mixer-digits': (4, 64, 4, 32, 128, 32, 32),
}

VIT_VARIANTS = tuple(_VIT)
MIXER_VARIANTS = tuple(_MIXER)

# timm's names of the published rows.
_TIMM_NAMES = {
    'vit_tiny_patch16_224': 'vit-ti/16',
    'vit_small_patch16_224': 'vit-s/16',
    'vit_base_patch16_224': 'vit-b/16',
    'mixer_s16_224': 'mixer-s/16',
    'mixer_b16_224': 'mixer-b/16',
}

# Trainable parameters at 1000 classes and 224 px, as timm counts
# vit_{tiny,small,base}_patch16_224 and mixer_{s,b}16_224 (its results
# tables list them as 5.72M, 22.05M, 86.57M, 18.53M, 59.88M).
PUBLISHED_PARAMS = {
    'vit-ti/16': 5_717_416,
    'vit-s/16': 22_050_664,
    'vit-b/16': 86_567_656,
    'mixer-s/16': 18_528_264,
    'mixer-b/16': 59_880_472,
}


def _key(name: str, table: Mapping[str, Any], family: str) -> str:
  key = name.lower().strip()
  key = _TIMM_NAMES.get(key, key)
  if key not in table:
    raise ValueError(f'unknown {family} variant {name!r}; choose one of '
                     f'{", ".join(table)}')
  return key


def vit_architecture(name: str) -> ViTArchitecture:
  """A ViT row by name ('vit-s/16', or timm's 'vit_small_patch16_224')."""
  key = _key(name, _VIT, 'ViT')
  patch, width, depth, heads, mlp, train, evals = _VIT[key]
  return ViTArchitecture(name=key, patch_size=patch, width=width, depth=depth,
                         num_heads=heads, mlp_dim=mlp, train_size=train,
                         eval_size=evals)


def mixer_architecture(name: str) -> MixerArchitecture:
  """A Mixer row by name ('mixer-b/16', or timm's 'mixer_b16_224')."""
  key = _key(name, _MIXER, 'MLP-Mixer')
  patch, width, depth, token_mlp, channel_mlp, train, evals = _MIXER[key]
  return MixerArchitecture(name=key, patch_size=patch, width=width,
                           depth=depth, token_mlp_dim=token_mlp,
                           channel_mlp_dim=channel_mlp, train_size=train,
                           eval_size=evals)


def vit_names() -> tuple[str, ...]:
  """Every accepted spelling of a ViT row (lower case)."""
  return VIT_VARIANTS + tuple(k for k, v in _TIMM_NAMES.items() if v in _VIT)


def mixer_names() -> tuple[str, ...]:
  return MIXER_VARIANTS + tuple(k for k, v in _TIMM_NAMES.items()
                                if v in _MIXER)
