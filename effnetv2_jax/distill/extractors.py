"""Second extractors: dimension-preserving stacks placed on a tapped feature.

A second extractor reads the first extractor's feature F1 at a tap and
returns F2 of the same shape, plus a classifier head's logits on F2 (the
head is what trains it). Four kinds, each built from the blocks of a model
family of this package:

- 'mbconv', 'fused_mbconv': stride-1 MBConv / Fused-MBConv blocks at the
  tapped width with the residual add EfficientNetV2 gives equal-width
  stride-1 blocks (Tan & Le 2021); MBConv with squeeze-excite 0.25, as
  EfficientNetV2's MBConv stages. F1 is NHWC.
- 'transformer': pre-norm encoder blocks (ViT, Dosovitskiy et al. 2021);
  'mixer': MLP-Mixer blocks (Tolstikhin et al. 2021). F1 is [B, N, D].

`catalogue` lists the store for one tap, `extractor_macs` counts a
candidate's multiply-accumulates per image, and `determine` chooses among
measured candidates under memory, MAC and accuracy budgets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import efficientnetv2
from effnetv2_jax.models import macs as macs_lib

CONV_KINDS = ('mbconv', 'fused_mbconv')
TOKEN_KINDS = ('transformer', 'mixer')
KINDS = CONV_KINDS + TOKEN_KINDS

CATALOGUE_DEPTHS = (1, 2, 4)
CATALOGUE_EXPANSIONS = {
    'fused_mbconv': (1, 4),
    'mbconv': (4, 6),
    'transformer': (2, 4),
    'mixer': (2, 4),
}
CATALOGUE_KERNEL = 3
SE_RATIO = 0.25  # EfficientNetV2's MBConv stages; its Fused stages have none
HEAD_WIDTH = 64  # ViT's per-head width at every size


def default_heads(width: int) -> int:
  """Attention heads of ViT's 64-wide heads: the most heads that divide
  `width` and are each at least 64 wide (1 below 128)."""
  for heads in range(width // HEAD_WIDTH, 0, -1):
    if width % heads == 0:
      return heads
  return 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractorSpec:
  """One second extractor, as plain data.

  Attributes:
    name: the store's name for it ('mbconv-d2-e4'); derived when empty.
    kind: one of `KINDS`.
    width: channels (conv kinds) or token width D; the tap's last axis.
    depth: number of blocks.
    expansion: the blocks' expansion ratio (conv kinds) or MLP ratio (token
      kinds: the channel MLP's hidden width is expansion x width).
    kernel: convolution kernel size (conv kinds only; 3 when None).
    heads: attention heads ('transformer' only; `default_heads` when None).
    tokens: token count N ('mixer' only, required: the token-mixing MLP
      acts along that axis).
  """

  name: str = ''
  kind: str
  width: int
  depth: int
  expansion: int
  kernel: int | None = None
  heads: int | None = None
  tokens: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'extractor kind must be one of {KINDS}, '
                       f'got {self.kind!r}')
    for field in ('width', 'depth', 'expansion'):
      _check_positive_int(f'ExtractorSpec.{field}', getattr(self, field))
    conv = self.kind in CONV_KINDS
    if conv and self.kernel is None:
      object.__setattr__(self, 'kernel', CATALOGUE_KERNEL)
    if self.kind == 'transformer' and self.heads is None:
      object.__setattr__(self, 'heads', default_heads(self.width))
    for field, needed in (('kernel', conv),
                          ('heads', self.kind == 'transformer'),
                          ('tokens', self.kind == 'mixer')):
      value = getattr(self, field)
      if needed:
        _check_positive_int(f'ExtractorSpec.{field} (kind {self.kind!r})',
                            value)
      elif value is not None:
        raise ValueError(f'ExtractorSpec.{field}={value!r} has no meaning '
                         f'for kind {self.kind!r}; leave it None')
    if self.kind == 'transformer' and self.width % self.heads:
      raise ValueError(f'ExtractorSpec.heads={self.heads} does not divide '
                       f'width {self.width}')
    if not isinstance(self.name, str):
      raise ValueError(f'ExtractorSpec.name must be a str, got {self.name!r}')
    if not self.name:
      object.__setattr__(self, 'name', self._default_name())

  def _default_name(self) -> str:
    letter = 'e' if self.kind in CONV_KINDS else 'r'
    name = f'{self.kind}-d{self.depth}-{letter}{self.expansion}'
    if self.kernel not in (None, CATALOGUE_KERNEL):
      name += f'-k{self.kernel}'
    if self.kind == 'transformer' and self.heads != default_heads(self.width):
      name += f'-h{self.heads}'
    return name

  @property
  def mlp_dim(self) -> int:
    """Token kinds: the channel MLP's hidden width."""
    return self.expansion * self.width

  @property
  def token_mlp_dim(self) -> int:
    """Mixer: the token-mixing MLP's hidden width, D/2 as at every size of
    MLP-Mixer (Tolstikhin et al. 2021, Table 1)."""
    return max(1, self.width // 2)

  def block_spec(self) -> arch_lib.BlockSpec:
    """Conv kinds: the one block the stack repeats."""
    if self.kind not in CONV_KINDS:
      raise ValueError(f'kind {self.kind!r} has no conv block; '
                       f'conv kinds are {CONV_KINDS}')
    fused = self.kind == 'fused_mbconv'
    se = None if fused else max(1, int(self.width * SE_RATIO))
    return arch_lib.BlockSpec(
        kernel_size=self.kernel, stride=1, expand_ratio=self.expansion,
        in_channels=self.width, out_channels=self.width, se_channels=se,
        fused=fused, survival_prob=1.0)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ExtractorSpec':
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f'unknown ExtractorSpec field {unknown[0]!r}; '
                       f'fields are {", ".join(fields)}')
    return cls(**d)


def _check_positive_int(what: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{what} must be a positive int, got {value!r}')


def catalogue(width: int, kind: str, *, tokens: int | None = None
              ) -> list[ExtractorSpec]:
  """The store's candidates for a tap of `width`: depths 1, 2, 4 by two
  expansion (or MLP) ratios, kernel 3.

  Args:
    width: the tap's channels or token width.
    kind: one of `KINDS`.
    tokens: the tap's token count; required for 'mixer', ignored by the
      other kinds.
  """
  if kind not in KINDS:
    raise ValueError(f'extractor kind must be one of {KINDS}, got {kind!r}')
  if kind == 'mixer' and tokens is None:
    raise ValueError("catalogue(kind='mixer') needs tokens= (the tap's "
                     'token count)')
  return [ExtractorSpec(kind=kind, width=width, depth=depth,
                        expansion=expansion,
                        tokens=tokens if kind == 'mixer' else None)
          for depth in CATALOGUE_DEPTHS
          for expansion in CATALOGUE_EXPANSIONS[kind]]


def select(name: str, candidates: Sequence[ExtractorSpec]) -> ExtractorSpec:
  """The candidate called `name`."""
  for spec in candidates:
    if spec.name == name:
      return spec
  names = ', '.join(spec.name for spec in candidates)
  raise ValueError(f'no second extractor {name!r}; choose from {names}')


def build_extractor(spec: ExtractorSpec, num_classes: int, *, rngs,
                    dtype=None, bn_momentum: float = 0.9,
                    bn_epsilon: float = 1e-3, conv_impl: str = 'auto'):
  """The extractor as an `nnx.Module`.

  Called as `extractor(f1, *, training, rng=None, bn_groups=1)`, it returns
  `(f2, logits)`: F2 of F1's shape, and float32 logits [B, num_classes] of
  a mean-pool + linear head on F2 (token kinds: LayerNorm first).

  Args:
    spec: what to build.
    num_classes: the head's outputs.
    rngs: `nnx.Rngs` for the parameters, or an int seed.
    dtype: compute dtype (float32 when None); parameters are float32.
    bn_momentum, bn_epsilon, conv_impl: as for EfficientNetV2 (conv kinds).
  """
  _check_positive_int('num_classes', num_classes)
  if isinstance(rngs, int):
    rngs = efficientnetv2.param_rngs(rngs)
  dtype = jnp.float32 if dtype is None else dtype
  if spec.kind in CONV_KINDS:
    return ConvExtractor(spec, num_classes,
                         bn_kw=dict(momentum=bn_momentum, epsilon=bn_epsilon),
                         dtype=dtype, conv_impl=conv_impl, rngs=rngs)
  # The token models' modules load only when a token extractor is built.
  if spec.kind == 'transformer':
    from effnetv2_jax.models import vit  # pylint: disable=g-import-not-at-top
    blocks = [vit.TransformerBlock(spec.width, spec.heads, spec.mlp_dim,
                                   dtype=dtype, rngs=rngs)
              for _ in range(spec.depth)]
  else:
    from effnetv2_jax.models import mixer  # pylint: disable=g-import-not-at-top
    blocks = [mixer.MixerBlock(spec.tokens, spec.width, spec.token_mlp_dim,
                               spec.mlp_dim, dtype=dtype, rngs=rngs)
              for _ in range(spec.depth)]
  return TokenExtractor(spec, blocks, num_classes, rngs=rngs)


class ConvExtractor(nnx.Module):
  """Stride-1 (Fused-)MBConv blocks with residuals, then a pooled linear
  head; see `build_extractor`."""

  def __init__(self, spec: ExtractorSpec, num_classes: int, *, bn_kw, dtype,
               conv_impl, rngs):
    self.spec = spec
    block = spec.block_spec()
    cls = (efficientnetv2.FusedMBConv if block.fused
           else efficientnetv2.MBConv)
    self.blocks = nnx.List([cls(block, bn_kw=bn_kw, dtype=dtype,
                                conv_impl=conv_impl, rngs=rngs)
                            for _ in range(spec.depth)])
    self.classifier = nnx.Linear(spec.width, num_classes, dtype=jnp.float32,
                                 rngs=rngs)

  def __call__(self, f1, *, training: bool, rng=None, bn_groups: int = 1):
    del rng  # nothing stochastic
    _check_batch(self.spec, f1)
    h = f1
    for block in self.blocks:
      h = block(h, training=training, groups=bn_groups) + h
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return h, self.classifier(pooled).astype(jnp.float32)


class TokenExtractor(nnx.Module):
  """Transformer or Mixer blocks on [B, N, D], then LayerNorm, mean over the
  tokens and a linear head; see `build_extractor`."""

  def __init__(self, spec: ExtractorSpec, blocks: list, num_classes: int, *,
               rngs):
    self.spec = spec
    self.blocks = nnx.List(blocks)
    self.norm = nnx.LayerNorm(spec.width, epsilon=1e-6, dtype=jnp.float32,
                              rngs=rngs)
    self.classifier = nnx.Linear(spec.width, num_classes, dtype=jnp.float32,
                                 rngs=rngs)

  def __call__(self, f1, *, training: bool, rng=None, bn_groups: int = 1):
    del bn_groups  # no BatchNorm
    _check_batch(self.spec, f1)
    keys = ([None] * len(self.blocks) if rng is None
            else list(jax.random.split(rng, len(self.blocks))))
    h = f1
    for block, key in zip(self.blocks, keys):
      h = block(h, training=training, rng=key)
    pooled = jnp.mean(self.norm(h.astype(jnp.float32)), axis=1)
    return h, self.classifier(pooled).astype(jnp.float32)


def extractor_macs(spec: ExtractorSpec, input_shape: Sequence[int], *,
                   num_classes: int = 0, padding_taps: bool = True) -> int:
  """Multiply-accumulates of one image through the extractor.

  Conventions as `models.macs` (BN, activations, adds, softmax and pooling
  are free). Conv kinds: each block's convolutions and squeeze-excite,
  kernel taps over the 'SAME' padding counted unless `padding_taps=False`.
  Transformer, per block: qkv (3ND^2), scores and their weighted sum
  (2N^2D), the output projection (ND^2) and the MLP (2N D mlp_dim).
  Mixer, per block: the token MLP (2D tokens token_mlp_dim, on the token
  count it is built for; resampling other square grids to it is free) and
  the channel MLP (2ND mlp_dim).

  Args:
    spec: the extractor.
    input_shape: F1's shape for one image, (H, W, C) or (N, D); a leading
      batch axis is ignored.
    num_classes: the head's outputs; 0 counts the stack alone.
    padding_taps: conv kinds: count taps over the padding (the network's
      reference convention) or only those inside the map (XLA's).
  """
  shape = _per_image_shape(spec, input_shape)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
      num_classes < 0):
    raise ValueError(f'num_classes must be an int >= 0, got {num_classes!r}')
  head = spec.width * num_classes
  if spec.kind in CONV_KINDS:
    height, width, _ = shape
    if height != width:
      raise ValueError(f'conv extractors are counted on square maps, got '
                       f'{height}x{width}')
    block = macs_lib.block_macs(spec.block_spec(), height,
                                padding_taps=padding_taps).total
    return spec.depth * block + head
  tokens, width = shape
  if spec.kind == 'transformer':
    block = (4 * tokens * width * width + 2 * tokens * tokens * width
             + 2 * tokens * width * spec.mlp_dim)
  else:
    block = (2 * width * spec.tokens * spec.token_mlp_dim
             + 2 * tokens * width * spec.mlp_dim)
  return spec.depth * block + head


def _per_image_shape(spec: ExtractorSpec, input_shape) -> tuple[int, ...]:
  """(H, W, C) or (N, D), checked against the spec's kind and width.

  A mixer's token count may differ from the one it is built for: its blocks
  resample square token grids (progressive learning's smaller images)."""
  shape = tuple(int(n) for n in input_shape)
  rank = 3 if spec.kind in CONV_KINDS else 2
  if len(shape) == rank + 1:
    shape = shape[1:]
  if len(shape) != rank:
    layout = '(H, W, C)' if rank == 3 else '(N, D)'
    raise ValueError(f'{spec.kind} extractor {spec.name!r} takes a '
                     f'{layout} feature, got shape {tuple(input_shape)}')
  if shape[-1] != spec.width:
    raise ValueError(f'extractor {spec.name!r} has width {spec.width}, '
                     f'the feature {tuple(input_shape)} has {shape[-1]}')
  return shape


def _check_batch(spec: ExtractorSpec, f1) -> None:
  """A batch of features the extractor reads: [B, H, W, C] or [B, N, D]."""
  rank = 4 if spec.kind in CONV_KINDS else 3
  if f1.ndim != rank:
    layout = '[B, H, W, C]' if rank == 4 else '[B, N, D]'
    raise ValueError(f'{spec.kind} extractor {spec.name!r} takes a '
                     f'{layout} batch, got shape {tuple(f1.shape)}')
  _per_image_shape(spec, f1.shape)


# ---------------------------------------------------------------------------
# Choosing one


@dataclasses.dataclass(frozen=True)
class _Budget:
  argument: str  # determine's keyword
  measurement: str  # the key of measure()'s dict
  limit: float
  at_most: bool  # a ceiling (memory, MACs) or a floor (accuracy)

  def admits(self, value) -> bool:
    if value is None:  # an accuracy not measured (not trialled, failed)
      return False
    return value <= self.limit if self.at_most else value >= self.limit

  def describe(self) -> str:
    return f'{self.argument}={_number(self.limit)}'

  def column(self) -> str:
    sign = '<=' if self.at_most else '>='
    limit = _COLUMN_FORMAT[self.measurement](self.limit)
    return f'{_COLUMN_LABEL[self.measurement]}{sign}{limit}'


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `determine` chose and why.

  Attributes:
    spec: the chosen extractor.
    table: every candidate with its measurements and whether it is within
      each budget; the chosen row starts with '*'.
    reason: one line: why that one.
    rows: the table as dicts (name, memory_bytes, macs, accuracy, fits:
      {budget argument: bool}, chosen).
  """

  spec: ExtractorSpec
  table: str
  reason: str
  rows: tuple[dict, ...]


def determine(candidates: Sequence[ExtractorSpec], *,
              measure: Callable[[ExtractorSpec], Mapping[str, Any]],
              max_memory_bytes: float | None = None,
              max_macs: float | None = None,
              min_accuracy: float | None = None) -> Choice:
  """Chooses the extractor with the most capacity that the budgets allow.

  Among the candidates within every given budget, the one with the most
  MACs; ties go to fewer memory bytes, then to the earlier candidate.

  Args:
    candidates: the specs to choose from (distinct names).
    measure: spec -> dict(memory_bytes=..., macs=..., accuracy=... or
      None), called once per candidate in order.
    max_memory_bytes, max_macs: ceilings; None for no budget.
    min_accuracy: a floor; a candidate whose accuracy is None (not
      trialled because a ceiling already excludes it, or its trial failed)
      is outside it.

  Raises:
    ValueError: no candidates, repeated names, a malformed measurement, or
      none within the budgets (naming the budget that admits fewest).
  """
  candidates = list(candidates)
  if not candidates:
    raise ValueError('determine needs at least one candidate extractor')
  names = [spec.name for spec in candidates]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'candidate extractor names must be distinct; '
                     f'{repeated[0]!r} repeats')
  budgets = _budgets(max_memory_bytes, max_macs, min_accuracy)
  rows = []
  for spec in candidates:
    measured = _measurement(spec, measure(spec), budgets)
    fits = {b.argument: b.admits(measured[b.measurement]) for b in budgets}
    rows.append(dict(name=spec.name, **measured, fits=fits, chosen=False))
  within = [i for i, row in enumerate(rows) if all(row['fits'].values())]
  if not within:
    raise ValueError(_nothing_fits(rows, budgets))
  best = min(within, key=lambda i: (-rows[i]['macs'],
                                    rows[i]['memory_bytes'], i))
  rows[best]['chosen'] = True
  rows = tuple(rows)
  return Choice(spec=candidates[best], table=_table(rows, budgets),
                reason=_reason(rows, best, within, budgets), rows=rows)


def _budgets(max_memory_bytes, max_macs, min_accuracy) -> list[_Budget]:
  budgets = []
  for argument, measurement, limit, at_most in (
      ('max_memory_bytes', 'memory_bytes', max_memory_bytes, True),
      ('max_macs', 'macs', max_macs, True),
      ('min_accuracy', 'accuracy', min_accuracy, False)):
    if limit is None:
      continue
    if not _is_number(limit) or (at_most and limit < 0):
      raise ValueError(f'{argument} must be a non-negative number or None, '
                       f'got {limit!r}')
    budgets.append(_Budget(argument, measurement, limit, at_most))
  return budgets


def _measurement(spec, measured, budgets) -> dict:
  """measure()'s answer for `spec`, checked: memory_bytes, macs, accuracy."""
  if not isinstance(measured, Mapping):
    raise ValueError(f'measure({spec.name!r}) must return a dict, got '
                     f'{type(measured).__name__}')
  out = {}
  for key in ('memory_bytes', 'macs'):
    value = measured.get(key)
    if not _is_number(value) or value < 0:
      raise ValueError(f'measure({spec.name!r})[{key!r}] must be a '
                       f'non-negative number, got {value!r}')
    out[key] = value
  accuracy = measured.get('accuracy')
  if accuracy is not None and not _is_number(accuracy):
    raise ValueError(f'measure({spec.name!r})["accuracy"] must be a number '
                     f'or None, got {accuracy!r}')
  out['accuracy'] = accuracy
  return out


def _is_number(value) -> bool:
  if isinstance(value, bool):
    return False
  try:
    return math.isfinite(float(value))
  except (TypeError, ValueError):
    return False


def _nothing_fits(rows, budgets) -> str:
  """One line naming the budget that admits the fewest candidates."""
  admitted = [sum(row['fits'][b.argument] for row in rows) for b in budgets]
  order = sorted(range(len(budgets)), key=lambda j: admitted[j])
  tightest = budgets[order[0]]
  message = (f'no second extractor is within the budgets: the tightest, '
             f'{tightest.describe()}, admits {admitted[order[0]]} of '
             f'{len(rows)} candidates')
  values = [row[tightest.measurement] for row in rows]
  measured = [i for i in range(len(rows)) if values[i] is not None]
  if not admitted[order[0]] and measured:
    closest = (min if tightest.at_most else max)(measured,
                                                 key=lambda i: values[i])
    message += (f' (closest: {rows[closest]["name"]!r} with '
                f'{tightest.measurement}={_number(values[closest])})')
  return message + ''.join(f'; {budgets[j].describe()} admits {admitted[j]}'
                           for j in order[1:])


def _reason(rows, best, within, budgets) -> str:
  chosen = rows[best]
  scope = (f'the {len(within)} of {len(rows)} candidates within '
           + ', '.join(b.describe() for b in budgets)
           if budgets else f'all {len(rows)} candidates (no budget given)')
  reason = (f'{chosen["name"]!r}: the most MACs '
            f'({_macs_text(chosen["macs"])}) of {scope}')
  tied = [rows[i]['name'] for i in within
          if i != best and rows[i]['macs'] == chosen['macs']]
  if tied:
    memory = _bytes_text(chosen['memory_bytes'])
    reason += (f'; tied on MACs with {", ".join(map(repr, tied))}, it needs '
               f'the fewest memory bytes ({memory})')
  return reason


def _table(rows, budgets) -> str:
  header = ['', 'extractor', 'MACs', 'memory', 'accuracy']
  header += [b.column() for b in budgets]
  lines = [header]
  for row in rows:
    accuracy = '-' if row['accuracy'] is None else f'{row["accuracy"]:.4f}'
    line = ['*' if row['chosen'] else '', row['name'], _macs_text(row['macs']),
            _bytes_text(row['memory_bytes']), accuracy]
    line += ['yes' if row['fits'][b.argument] else 'no' for b in budgets]
    lines.append(line)
  widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
  return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(line, widths)
                             ).rstrip() for line in lines)


def _macs_text(macs) -> str:
  return _scaled(macs, 1000, ('', ' K', ' M', ' G', ' T'))


def _bytes_text(nbytes) -> str:
  return _scaled(nbytes, 1024, (' B', ' KiB', ' MiB', ' GiB', ' TiB'))


def _scaled(value, base: int, units: Sequence[str]) -> str:
  """Three significant digits in the largest unit that keeps value >= 1."""
  value = float(value)
  power = 0
  while abs(value) >= base and power + 1 < len(units):
    value /= base
    power += 1
  if power == 0 and value.is_integer():
    return f'{int(value)}{units[0]}'
  return f'{value:.3g}{units[power]}'


_COLUMN_LABEL = {'memory_bytes': 'memory', 'macs': 'MACs',
                 'accuracy': 'accuracy'}
_COLUMN_FORMAT = {'memory_bytes': _bytes_text, 'macs': _macs_text,
                  'accuracy': lambda a: f'{a:g}'}


def _number(value) -> str:
  value = float(value)
  return f'{int(value):,}' if value.is_integer() else f'{value:g}'
