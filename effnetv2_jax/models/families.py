"""Model families: how the trainer builds and describes any network.

The trainer, checkpoints and the summary only ever talk to a `ModelFamily`:
it turns a plain description (a variant name, a dict from a config or a JSON
file, or a family's own description object) into a module, and answers the
questions a run asks of a network before building it: its train and eval
image sizes, its input normalisation, and a plain-dict form to store beside
weights. EfficientNetV2 (and its V1-style B0-B3 rows) is the family today;
token models register beside it with `register`.

Importable without tensorflow or ml_collections.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from flax import nnx

from effnetv2_jax.models import arch as arch_lib


class ModelFamily(Protocol):
  """What a family of networks tells the trainer."""

  name: str
  description_type: type  # what `parse` returns

  def parse(self, description: Any) -> Any:
    """A variant name, a dict or a description object -> the description.

    Raises ValueError, TypeError or KeyError for one it does not accept.
    """

  def build(self, description: Any, num_classes: int, *, rngs: nnx.Rngs,
            **options) -> nnx.Module:
    """The module; `options` are the config's model options."""

  def train_size(self, description: Any) -> int: ...

  def eval_size(self, description: Any) -> int: ...

  def normalization(self, description: Any) -> str: ...

  def to_dict(self, description: Any) -> dict: ...


class EfficientNetV2Family:
  """`Architecture` descriptions, built by `models.create_model`."""

  name = 'efficientnetv2'
  description_type = arch_lib.Architecture

  def parse(self, description: Any) -> arch_lib.Architecture:
    if isinstance(description, arch_lib.Architecture):
      return description
    if isinstance(description, str):
      return arch_lib.get_architecture(description)
    if isinstance(description, Mapping):
      fields = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in dict(description).items() if k != 'family'}
      return arch_lib.Architecture.from_dict(fields)
    raise TypeError(
        'an EfficientNetV2 description is a variant name, an Architecture '
        f'or its dict, got {type(description).__name__}')

  def build(self, description, num_classes, *, rngs, **options):
    from effnetv2_jax.models import efficientnetv2  # pylint: disable=g-import-not-at-top
    return efficientnetv2.create_model(description, num_classes, rngs=rngs,
                                       **options)

  def train_size(self, description) -> int:
    return description.train_size

  def eval_size(self, description) -> int:
    return description.eval_size

  def normalization(self, description) -> str:
    return description.normalization

  def to_dict(self, description) -> dict:
    return dict(description.to_dict(), family=self.name)


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
  """Adds a family under `family.name` (replacing one of the same name)."""
  _FAMILIES[family.name] = family
  return family


register(EfficientNetV2Family())
DEFAULT_FAMILY = EfficientNetV2Family.name


def names() -> tuple[str, ...]:
  return tuple(sorted(_FAMILIES))


def get(name: str) -> ModelFamily:
  try:
    return _FAMILIES[name]
  except KeyError:
    raise ValueError(f'unknown model family {name!r}; registered: '
                     f'{", ".join(names())}') from None


def family_of(description: Any) -> ModelFamily:
  """The family a description names (a dict's 'family' key), else the
  default one."""
  if isinstance(description, Mapping) and 'family' in description:
    return get(description['family'])
  for family in _FAMILIES.values():
    if isinstance(description, family.description_type):
      return family
  return get(DEFAULT_FAMILY)

