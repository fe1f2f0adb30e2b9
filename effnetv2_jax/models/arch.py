"""Framework-free architecture description of the EfficientNetV2 family.

Everything that distinguishes one variant from another lives in this file as
plain data: the official block tables (google/automl `effnetv2_configs.py`),
the width/depth multipliers of B0-B3 and the rounding rules. EfficientNet-V1
B0-B7 (Tan & Le 2019; google/automl `efficientnet_builder.py`) are rows of
the same kind: MBConv-only stages, built by the same modules. The Flax modules
in `efficientnetv2.py` only interpret an `Architecture`; a NAS driver builds
new networks by writing a new `Architecture` (or a block-string list) and never
touches module code.

Block-string grammar (the official one): `r2_k3_s1_e1_i24_o24_c1` means
repeats 2, kernel 3, stride 1, expansion 1, in/out channels 24/24, Fused-MBConv
(`c1`); `se0.25` adds squeeze-excite. Without `c1` the block is an MBConv.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of identical blocks, before width/depth scaling."""

  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int
  se_ratio: float | None = None
  fused: bool = False

  def __post_init__(self):
    for field in ('repeats', 'kernel_size', 'stride', 'expand_ratio',
                  'in_channels', 'out_channels'):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'StageSpec.{field} must be a positive int, got {value!r}')
    if self.se_ratio is not None and not 0 < self.se_ratio <= 1:
      raise ValueError(f'StageSpec.se_ratio must be in (0, 1], got {self.se_ratio!r}')

  def to_string(self) -> str:
    parts = [f'r{self.repeats}', f'k{self.kernel_size}', f's{self.stride}',
             f'e{self.expand_ratio}', f'i{self.in_channels}',
             f'o{self.out_channels}']
    if self.se_ratio:
      parts.append(f'se{self.se_ratio:g}')
    if self.fused:
      parts.append('c1')
    return '_'.join(parts)


_TOKEN = re.compile(r'^(se|r|k|s|e|i|o|c)(\d+(?:\.\d+)?)$')


def parse_block_string(text: str) -> StageSpec:
  """Parses one official block string such as `r4_k3_s2_e4_i24_o48_c1`."""
  fields = {}
  for token in text.strip().split('_'):
    match = _TOKEN.match(token)
    if not match:
      raise ValueError(f'bad token {token!r} in block string {text!r}')
    fields[match.group(1)] = match.group(2)
  missing = [k for k in 'rkseio' if k not in fields]
  if missing:
    raise ValueError(f'block string {text!r} lacks {", ".join(missing)}')
  se = float(fields['se']) if 'se' in fields else None
  return StageSpec(
      repeats=int(fields['r']), kernel_size=int(fields['k']),
      stride=int(fields['s']), expand_ratio=int(fields['e']),
      in_channels=int(fields['i']), out_channels=int(fields['o']),
      se_ratio=se or None, fused=fields.get('c', '0') == '1')


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One block after scaling: what a module needs to build itself."""

  kernel_size: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int
  se_channels: int | None  # reduced SE width, from the block's input channels
  fused: bool
  survival_prob: float  # stochastic depth keep probability at full rate

  @property
  def mid_channels(self) -> int:
    return self.in_channels * self.expand_ratio

  @property
  def has_residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A whole network: stage table plus the scaling and head settings."""

  name: str
  stages: tuple[StageSpec, ...]
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  head_channels: int = 1280
  depth_divisor: int = 8
  min_depth: int = 8
  dropout_rate: float = 0.2
  train_size: int = 300
  eval_size: int = 384
  normalization: str = 'inception'  # (x-128)/128; 'imagenet' = mean/std
  # EfficientNet-V1's filter rounding never rounds a width down by more than
  # 10%; EfficientNetV2's official code dropped that guard.
  round_down_guard: bool = False

  def __post_init__(self):
    if not self.stages:
      raise ValueError(f'architecture {self.name!r} has no stages')
    if self.width_multiplier <= 0 or self.depth_multiplier <= 0:
      raise ValueError('width and depth multipliers must be positive')

  def round_filters(self, filters: int) -> int:
    """Official rounding: the scaled width to the nearest multiple of
    `depth_divisor`, at least `min_depth`; with `round_down_guard` (V1) one
    divisor more where that lost over 10% of the scaled width."""
    scaled = filters * self.width_multiplier
    divisor = self.depth_divisor
    rounded = max(self.min_depth,
                  int(scaled + divisor / 2) // divisor * divisor)
    if self.round_down_guard and rounded < 0.9 * scaled:
      rounded += divisor
    return rounded

  def round_repeats(self, repeats: int) -> int:
    return int(math.ceil(self.depth_multiplier * repeats))

  @property
  def stem_channels(self) -> int:
    return self.round_filters(self.stages[0].in_channels)

  @property
  def head_width(self) -> int:
    return self.round_filters(self.head_channels)

  def stage_blocks(self, drop_path_rate: float = 0.2) -> list[list[BlockSpec]]:
    """Scaled blocks grouped by stage, with the linear stochastic-depth rule.

    Survival of global block i out of N is 1 - rate * i / N, so the first
    block is never dropped (official `survival_prob` schedule).
    """
    repeats = [self.round_repeats(s.repeats) for s in self.stages]
    total = sum(repeats)
    index = 0
    out = []
    for spec, count in zip(self.stages, repeats):
      blocks = []
      cin = self.round_filters(spec.in_channels)
      cout = self.round_filters(spec.out_channels)
      for j in range(count):
        block_in = cin if j == 0 else cout
        se = (max(1, int(block_in * spec.se_ratio))
              if spec.se_ratio else None)
        blocks.append(BlockSpec(
            kernel_size=spec.kernel_size,
            stride=spec.stride if j == 0 else 1,
            expand_ratio=spec.expand_ratio,
            in_channels=block_in,
            out_channels=cout,
            se_channels=se,
            fused=spec.fused,
            survival_prob=1.0 - drop_path_rate * index / total))
        index += 1
      out.append(blocks)
    return out

  def replace(self, **changes) -> 'Architecture':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """Plain JSON-able description (block strings), e.g. for NAS records.

    Fields added after checkpoints were first written are left out while
    they hold their default, so a stored model dict still equals the one
    its architecture gives today.
    """
    d = dataclasses.asdict(self)
    d['stages'] = [s.to_string() for s in self.stages]
    for field in _OMITTED_AT_DEFAULT:
      if d[field] == _FIELD_DEFAULTS[field]:
        del d[field]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> 'Architecture':
    d = dict(d)
    d['stages'] = tuple(
        s if isinstance(s, StageSpec) else parse_block_string(s)
        for s in d['stages'])
    return cls(**d)


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Architecture)}
_OMITTED_AT_DEFAULT = ('round_down_guard',)


def _stages(strings: Sequence[str]) -> tuple[StageSpec, ...]:
  return tuple(parse_block_string(s) for s in strings)


_BASE = _stages([
    'r1_k3_s1_e1_i32_o16_c1',
    'r2_k3_s2_e4_i16_o32_c1',
    'r2_k3_s2_e4_i32_o48_c1',
    'r3_k3_s2_e4_i48_o96_se0.25',
    'r5_k3_s1_e6_i96_o112_se0.25',
    'r8_k3_s2_e6_i112_o192_se0.25',
])

_S = _stages([
    'r2_k3_s1_e1_i24_o24_c1',
    'r4_k3_s2_e4_i24_o48_c1',
    'r4_k3_s2_e4_i48_o64_c1',
    'r6_k3_s2_e4_i64_o128_se0.25',
    'r9_k3_s1_e6_i128_o160_se0.25',
    'r15_k3_s2_e6_i160_o256_se0.25',
])

_M = _stages([
    'r3_k3_s1_e1_i24_o24_c1',
    'r5_k3_s2_e4_i24_o48_c1',
    'r5_k3_s2_e4_i48_o80_c1',
    'r7_k3_s2_e4_i80_o160_se0.25',
    'r14_k3_s1_e6_i160_o176_se0.25',
    'r18_k3_s2_e6_i176_o304_se0.25',
    'r5_k3_s1_e6_i304_o512_se0.25',
])

_L = _stages([
    'r4_k3_s1_e1_i32_o32_c1',
    'r7_k3_s2_e4_i32_o64_c1',
    'r7_k3_s2_e4_i64_o96_c1',
    'r10_k3_s2_e4_i96_o192_se0.25',
    'r19_k3_s1_e6_i192_o224_se0.25',
    'r25_k3_s2_e6_i224_o384_se0.25',
    'r7_k3_s1_e6_i384_o640_se0.25',
])

_XL = _stages([
    'r4_k3_s1_e1_i32_o32_c1',
    'r8_k3_s2_e4_i32_o64_c1',
    'r8_k3_s2_e4_i64_o96_c1',
    'r16_k3_s2_e4_i96_o192_se0.25',
    'r24_k3_s1_e6_i192_o256_se0.25',
    'r32_k3_s2_e6_i256_o512_se0.25',
    'r8_k3_s1_e6_i512_o640_se0.25',
])

# name: (stages, width, depth, train size, eval size, dropout, normalization)
_VARIANTS = {
    's': (_S, 1.0, 1.0, 300, 384, 0.2, 'inception'),
    'm': (_M, 1.0, 1.0, 384, 480, 0.3, 'inception'),
    'l': (_L, 1.0, 1.0, 384, 480, 0.4, 'inception'),
    'xl': (_XL, 1.0, 1.0, 384, 512, 0.4, 'inception'),
    'b0': (_BASE, 1.0, 1.0, 192, 224, 0.2, 'imagenet'),
    'b1': (_BASE, 1.0, 1.1, 192, 240, 0.2, 'imagenet'),
    'b2': (_BASE, 1.1, 1.2, 208, 260, 0.3, 'imagenet'),
    'b3': (_BASE, 1.2, 1.4, 240, 300, 0.3, 'imagenet'),
}

VARIANTS = tuple(_VARIANTS)

# EfficientNet-V1 (Tan & Le 2019): `_DEFAULT_BLOCKS_ARGS` of the official
# efficientnet_builder.py (its `s11`/`s22` strides written `s1`/`s2`). Every
# stage is an MBConv with SE 0.25 of the block's input width; the first
# one has no expansion convolution (e1). V1's BN momentum (0.99 where V2
# uses 0.9) is a model option (config.model.bn_momentum), not table data.
_V1 = _stages([
    'r1_k3_s1_e1_i32_o16_se0.25',
    'r2_k3_s2_e6_i16_o24_se0.25',
    'r2_k5_s2_e6_i24_o40_se0.25',
    'r3_k3_s2_e6_i40_o80_se0.25',
    'r3_k5_s1_e6_i80_o112_se0.25',
    'r4_k5_s2_e6_i112_o192_se0.25',
    'r1_k3_s1_e6_i192_o320_se0.25',
])

# `efficientnet_params` of the official builder: (width, depth, resolution,
# dropout), laid out as the V2 rows; V1 trains and evaluates at one size.
_V1_VARIANTS = {
    'efficientnet-b0': (_V1, 1.0, 1.0, 224, 224, 0.2, 'imagenet'),
    'efficientnet-b1': (_V1, 1.0, 1.1, 240, 240, 0.2, 'imagenet'),
    'efficientnet-b2': (_V1, 1.1, 1.2, 260, 260, 0.3, 'imagenet'),
    'efficientnet-b3': (_V1, 1.2, 1.4, 300, 300, 0.3, 'imagenet'),
    'efficientnet-b4': (_V1, 1.4, 1.8, 380, 380, 0.4, 'imagenet'),
    'efficientnet-b5': (_V1, 1.6, 2.2, 456, 456, 0.4, 'imagenet'),
    'efficientnet-b6': (_V1, 1.8, 2.6, 528, 528, 0.5, 'imagenet'),
    'efficientnet-b7': (_V1, 2.0, 3.1, 600, 600, 0.5, 'imagenet'),
}

V1_VARIANTS = tuple(_V1_VARIANTS)

# Trainable parameter counts at 1000 classes, from the official unit test
# (effnetv2_model_test.py counts BN moving statistics too; these exclude them).
OFFICIAL_PARAMS = {
    's': 21_458_488, 'm': 54_139_356, 'l': 118_515_272, 'xl': 208_119_808,
    'b0': 7_139_704, 'b1': 8_141_052, 'b2': 10_096_086, 'b3': 14_358_406,
    # EfficientNet-V1: the published trainable counts of its ports (timm's
    # efficientnet_b0..b7 and tf_efficientnet_*, keras.applications
    # EfficientNetB0..B7).
    'efficientnet-b0': 5_288_548, 'efficientnet-b1': 7_794_184,
    'efficientnet-b2': 9_109_994, 'efficientnet-b3': 12_233_232,
    'efficientnet-b4': 19_341_616, 'efficientnet-b5': 30_389_784,
    'efficientnet-b6': 43_040_704, 'efficientnet-b7': 66_347_960,
}

# Reference MACs (G, convs + SE + FC) at (train size, eval size).
REFERENCE_GMACS = {
    's': (5.31, 8.38), 'm': (15.75, 24.61), 'l': (35.93, 56.13),
    'xl': (52.58, 93.4), 'b0': (0.529, 0.719), 'b1': (0.748, 1.199),
    'b2': (1.045, 1.700), 'b3': (1.911, 3.016),
}

# What the paper's Table 7 / README prints, for the side-by-side table.
PAPER_FIGURES = {
    's': '22M (ICML) / 24M, 8.8B (pre-release arch)',
    'm': '54M, 24B', 'l': '120M, 53B', 'xl': '208M, 94B',
    'b0': '7.1M, 0.72B', 'b1': '8.1M, 1.2B', 'b2': '10.1M, 1.7B',
    'b3': '14.4M, 3.0B',
}


def normalize_variant_name(name: str) -> str:
  """An EfficientNetV2 variant's key ('s', 'b0', ...) from any spelling of it.

  V1 names are not accepted here: the V2 recipes, converters and tables
  use this; `get_architecture` accepts both families.
  """
  key = name.lower().strip()
  for prefix in ('efficientnetv2-', 'efficientnetv2_', 'tf_efficientnetv2_'):
    if key.startswith(prefix):
      key = key[len(prefix):]
  if key not in _VARIANTS:
    raise ValueError(
        f'unknown EfficientNetV2 variant {name!r}; choose one of '
        f'{", ".join(VARIANTS)}')
  return key


# 'efficientnet-b4', 'efficientnet_b4', 'EfficientNetB4' (keras),
# 'tf_efficientnet_b4' (timm), 'v1-b4'; never an 'efficientnetv2' name.
_V1_NAME = re.compile(r'^(?:(?:tf_)?efficientnet[-_]?|v1[-_])(b\d+)$')


def normalize_v1_name(name: str) -> str | None:
  """'efficientnet-bN' for a spelling of an EfficientNet-V1 name, else None.

  Raises:
    ValueError: a V1-style name of a variant not in the table (b8, l2).
  """
  match = _V1_NAME.match(name.lower().strip())
  if not match:
    return None
  key = f'efficientnet-{match.group(1)}'
  if key not in _V1_VARIANTS:
    raise ValueError(f'unknown EfficientNet (V1) variant {name!r}; choose one '
                     f'of {", ".join(V1_VARIANTS)}')
  return key


def canonical_name(name: str) -> str:
  """The table key of a V2 ('s', 'b0') or V1 ('efficientnet-b0') variant."""
  v1 = normalize_v1_name(name)
  if v1 is not None:
    return v1
  try:
    return normalize_variant_name(name)
  except ValueError as e:
    raise ValueError(f'{e}; or an EfficientNet (V1) variant: '
                     f'{", ".join(V1_VARIANTS)}') from None


def get_architecture(name: str) -> Architecture:
  """The official architecture of a named variant: EfficientNetV2 s, m, l,
  xl, b0..b3, or EfficientNet-V1 efficientnet-b0..efficientnet-b7."""
  key = canonical_name(name)
  v1 = key in _V1_VARIANTS
  row = _V1_VARIANTS[key] if v1 else _VARIANTS[key]
  stages, width, depth, train, evals, dropout, norm = row
  return Architecture(
      name=key, stages=stages, width_multiplier=width, depth_multiplier=depth,
      dropout_rate=dropout, train_size=train, eval_size=evals,
      normalization=norm, round_down_guard=v1)


def scaled(arch: Architecture, *, width: float = 1.0, depth: float = 1.0,
           head_channels: int | None = None, name: str | None = None
           ) -> Architecture:
  """A smaller or larger sibling of `arch` (used by the digits quickstart)."""
  return arch.replace(
      name=name or f'{arch.name}_w{width:g}_d{depth:g}',
      width_multiplier=arch.width_multiplier * width,
      depth_multiplier=arch.depth_multiplier * depth,
      head_channels=head_channels or arch.head_channels)
