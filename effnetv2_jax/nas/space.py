"""The stage-based factorised search space of EfficientNetV2 (§3.3).

Tan & Le 2021 search over a backbone (EfficientNet-B4 in the paper) one stage
at a time, as MnasNet does (Tan et al. 2019): each stage chooses its block
type (MBConv or Fused-MBConv), its number of layers (the backbone's, one
fewer or one more), its kernel size (3 or 5) and its expansion ratio (1, 4
or 6). Everything else (channels, strides, the stem, the head, the width
multiplier and its rounding) is the backbone's, so a decoded sample is an
ordinary `Architecture` the trainer builds like any variant.

A sample is a list of ints, one option index per decision in stage-major
order [stage0.block, stage0.layers, stage0.kernel, stage0.expand, stage1...]:
exactly the numbers PyGlove's DNA holds for a flat list of `oneof`s, and what
the search's ledger stores. Framework-free: no PyGlove here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import small

FIELDS = ('block', 'layers', 'kernel', 'expand')
BLOCKS = ('mbconv', 'fused_mbconv')
KERNELS = (3, 5)
EXPANSIONS = (1, 4, 6)

BACKBONES = (('tiny', 'digits') + arch_lib.VARIANTS +
             tuple(f'efficientnet-b{i}' for i in range(8)))

_BLOCK_LETTERS = {'mbconv': 'M', 'fused_mbconv': 'F'}


@dataclasses.dataclass(frozen=True)
class Decision:
  """One categorical choice of the space."""

  name: str  # e.g. 'stage3.kernel'
  stage: int
  field: str  # one of FIELDS
  options: tuple  # the values, e.g. (3, 5)


def backbone(name: str) -> arch_lib.Architecture:
  """The architecture a search starts from, by name (one of BACKBONES)."""
  key = name.lower().strip()
  if key in small.ARCHITECTURES:
    return small.ARCHITECTURES[key]
  try:
    return arch_lib.get_architecture(key)
  except ValueError:
    raise ValueError(f'unknown NAS backbone {name!r}; choose one of '
                     f'{", ".join(BACKBONES)}') from None


def layer_options(repeats: int) -> tuple[int, ...]:
  """The backbone's (scaled) repeats, one fewer and one more, never below 1."""
  return tuple(sorted({max(1, repeats + d) for d in (-1, 0, 1)}))


def mbconv_se_ratio(architecture: arch_lib.Architecture) -> float | None:
  """The squeeze-excite ratio a searched MBConv stage gets: the backbone's
  MBConv one, else any stage's (a backbone with SE only on Fused stages),
  else None (no SE anywhere)."""
  mbconv = [s.se_ratio for s in architecture.stages
            if not s.fused and s.se_ratio]
  anywhere = [s.se_ratio for s in architecture.stages if s.se_ratio]
  return (mbconv or anywhere or [None])[0]


class SearchSpace:
  """Per-stage block type, layers, kernel and expansion over a backbone.

  Args:
    backbone: the architecture whose stages, channels, strides, head and
      scaling the samples keep.
    name: the space's name in records; by default the backbone's.
  """

  def __init__(self, backbone: arch_lib.Architecture, *,
               name: str | None = None):
    if not isinstance(backbone, arch_lib.Architecture):
      raise TypeError('backbone must be an Architecture, got '
                      f'{type(backbone).__name__}')
    self.backbone = backbone
    self.name = name or backbone.name
    self.se_ratio = mbconv_se_ratio(backbone)
    decisions = []
    for i, stage in enumerate(backbone.stages):
      repeats = backbone.round_repeats(stage.repeats)
      for field, options in zip(FIELDS, (BLOCKS, layer_options(repeats),
                                         KERNELS, EXPANSIONS)):
        decisions.append(Decision(f'stage{i}.{field}', i, field, options))
    self.decisions = tuple(decisions)
    self.size = math.prod(len(d.options) for d in self.decisions)

  @property
  def num_stages(self) -> int:
    return len(self.backbone.stages)

  def choices(self, numbers: Sequence[int]) -> list[dict]:
    """Per stage {'block', 'layers', 'kernel', 'expand'}: the chosen values."""
    self._check(numbers)
    stages = [{} for _ in range(self.num_stages)]
    for decision, index in zip(self.decisions, numbers):
      stages[decision.stage][decision.field] = decision.options[int(index)]
    return stages

  def encode(self, choices: Sequence[dict]) -> list[int]:
    """The numbers of per-stage choices (the inverse of `choices`)."""
    if len(choices) != self.num_stages:
      raise ValueError(f'{len(choices)} stages of choices for a space of '
                       f'{self.num_stages} stages')
    numbers = []
    for decision in self.decisions:
      stage = choices[decision.stage]
      if decision.field not in stage:
        raise ValueError(f'stage {decision.stage} choices {stage!r} lack '
                         f'{decision.field!r}')
      value = stage[decision.field]
      if value not in decision.options:
        raise ValueError(f'{decision.name}={value!r} is not in the space; '
                         f'choose one of {decision.options}')
      numbers.append(decision.options.index(value))
    return numbers

  def decode(self, numbers: Sequence[int]) -> arch_lib.Architecture:
    """The backbone with each stage's choices applied, depth multiplier 1."""
    stages = []
    for spec, chosen in zip(self.backbone.stages, self.choices(numbers)):
      fused = chosen['block'] == 'fused_mbconv'
      stages.append(dataclasses.replace(
          spec, repeats=chosen['layers'], kernel_size=chosen['kernel'],
          expand_ratio=chosen['expand'], fused=fused,
          # Fused-MBConv stages carry no SE, as in EfficientNetV2.
          se_ratio=None if fused else self.se_ratio))
    return self.backbone.replace(
        name=f'{self.backbone.name}_nas_{self.describe(numbers, sep="-")}',
        stages=tuple(stages), depth_multiplier=1.0)

  def describe(self, numbers: Sequence[int], sep: str = ' ') -> str:
    """Compact per-stage summary: 'F1k3e1 F2k3e4 M3k5e6 ...' (block letter,
    layers, kernel, expansion)."""
    return sep.join(
        f'{_BLOCK_LETTERS[c["block"]]}{c["layers"]}k{c["kernel"]}e{c["expand"]}'
        for c in self.choices(numbers))

  def to_dict(self) -> dict[str, Any]:
    """JSON identity of the space: two searches with equal dicts sample the
    same architectures from the same numbers."""
    return {
        'name': self.name,
        'backbone': self.backbone.to_dict(),
        'decisions': [{'name': d.name, 'options': list(d.options)}
                      for d in self.decisions],
    }

  def random_numbers(self, rng: np.random.Generator) -> list[int]:
    """A uniform sample."""
    return [int(rng.integers(len(d.options))) for d in self.decisions]

  def _check(self, numbers: Sequence[int]) -> None:
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, '__len__'):
      raise ValueError(f'numbers must be a list of ints, got {numbers!r}')
    if len(numbers) != len(self.decisions):
      raise ValueError(f'{len(numbers)} numbers for a space of '
                       f'{len(self.decisions)} decisions')
    for decision, index in zip(self.decisions, numbers):
      if (isinstance(index, bool) or
          not isinstance(index, (int, np.integer)) or
          not 0 <= index < len(decision.options)):
        raise ValueError(
            f'{decision.name} index {index!r} is not one of '
            f'0..{len(decision.options) - 1} (options {decision.options})')
