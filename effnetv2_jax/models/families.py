"""Model families: how the trainer builds and describes any network.

The trainer, checkpoints and the summary only ever talk to a `ModelFamily`:
it turns a plain description (a variant name, a dict from a config or a JSON
file, or a family's own description object) into a module, and answers the
questions a run asks of a network before building it: its train and eval
image sizes, its input normalisation, and a plain-dict form to store beside
weights. EfficientNetV2 (with its B0-B3 rows and the EfficientNet-V1 B0-B7
rows) is the default family; the token models 'vit' (ViT) and 'mixer'
(MLP-Mixer) are registered beside it, and others register with `register`.

A variant name is routed to the family that lists it (`variant_names`, e.g.
'vit-s/16', 'mixer-digits') or whose name it starts with ('vit-...',
'mixer_...'), else to EfficientNetV2; such a name is never read as a file's
path, although some contain a '/'.

A description may also be the path of a JSON file holding a description dict
(`Architecture.to_dict()`, possibly naming its 'family'): a string ending in
'.json' or with a directory part ('./arch', 'gs://bucket/arch.json') is read
as one. `resolve` reads it and parses the dict; what a run stores (`to_dict`)
is that dict, never the path.

Importable without tensorflow or ml_collections.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Protocol

from flax import nnx

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import token_arch


class ModelFamily(Protocol):
  """What a family of networks tells the trainer.

  A family may also list `variant_names` (a tuple of lower-case names its
  `parse` accepts): those names are routed to it.
  """

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


class _DescribedFamily:
  """What every family here reads off its description objects: their
  image sizes, normalisation and `to_dict`."""

  name: str

  def train_size(self, description) -> int:
    return description.train_size

  def eval_size(self, description) -> int:
    return description.eval_size

  def normalization(self, description) -> str:
    return description.normalization

  def to_dict(self, description) -> dict:
    return dict(description.to_dict(), family=self.name)


class EfficientNetV2Family(_DescribedFamily):
  """`Architecture` descriptions, built by `models.create_model`."""

  name = 'efficientnetv2'
  description_type = arch_lib.Architecture

  def parse(self, description: Any) -> arch_lib.Architecture:
    if isinstance(description, arch_lib.Architecture):
      return description
    if is_description_file(description):
      return self.parse(read_description_file(description))
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



class _TokenFamily(_DescribedFamily):
  """A token model family: a description dataclass with to_dict/from_dict,
  a name table and a module's `create_model`.

  Token models have no BatchNorm and a single way to convolve (the patch
  embedding is a matmul), so `build` drops the BN and convolution options
  the trainer passes to every family.
  """

  name: str
  description_type: type
  variant_names: tuple[str, ...]
  _IGNORED_OPTIONS = ('bn_momentum', 'bn_epsilon', 'conv_impl')

  def _from_name(self, name: str):
    raise NotImplementedError

  def _module(self):
    raise NotImplementedError

  def parse(self, description: Any):
    if isinstance(description, self.description_type):
      return description
    if is_description_file(description):
      return self.parse(read_description_file(description))
    if isinstance(description, str):
      return self._from_name(description)
    if isinstance(description, Mapping):
      return self.description_type.from_dict(
          {k: v for k, v in dict(description).items() if k != 'family'})
    raise TypeError(
        f'a {self.name} description is a variant name, a '
        f'{self.description_type.__name__} or its dict, got '
        f'{type(description).__name__}')

  def build(self, description, num_classes, *, rngs, **options):
    options = {k: v for k, v in options.items()
               if k not in self._IGNORED_OPTIONS}
    return self._module().create_model(description, num_classes, rngs=rngs,
                                       **options)



class ViTFamily(_TokenFamily):
  """`token_arch.ViTArchitecture` descriptions, built by `vit.create_model`."""

  name = 'vit'
  description_type = token_arch.ViTArchitecture
  variant_names = token_arch.vit_names()

  def _from_name(self, name: str):
    return token_arch.vit_architecture(name)

  def _module(self):
    from effnetv2_jax.models import vit  # pylint: disable=g-import-not-at-top
    return vit


class MixerFamily(_TokenFamily):
  """`token_arch.MixerArchitecture` descriptions, built by
  `mixer.create_model`."""

  name = 'mixer'
  description_type = token_arch.MixerArchitecture
  variant_names = token_arch.mixer_names()

  def _from_name(self, name: str):
    return token_arch.mixer_architecture(name)

  def _module(self):
    from effnetv2_jax.models import mixer  # pylint: disable=g-import-not-at-top
    return mixer


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
  """Adds a family under `family.name` (replacing one of the same name)."""
  _FAMILIES[family.name] = family
  return family


register(EfficientNetV2Family())
register(ViTFamily())
register(MixerFamily())
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
  """The family a description names (a dict's 'family' key, also in a JSON
  file; a variant name's family, see the module docstring), else the
  default one."""
  if is_description_file(description):
    description = read_description_file(description)
  if isinstance(description, Mapping) and 'family' in description:
    return get(description['family'])
  if isinstance(description, str):
    return _family_of_name(description) or get(DEFAULT_FAMILY)
  for family in _FAMILIES.values():
    if isinstance(description, family.description_type):
      return family
  return get(DEFAULT_FAMILY)


def _family_of_name(name: str) -> ModelFamily | None:
  """The family a variant name belongs to: the one listing it in its
  `variant_names`, else the one whose name it starts with ('vit-x' -> vit,
  so an unknown ViT name is answered with the ViT variants)."""
  key = name.lower().strip()
  for family in _FAMILIES.values():
    if key in getattr(family, 'variant_names', ()):
      return family
  for family in _FAMILIES.values():
    if key.startswith((family.name + '-', family.name + '_')):
      return family
  return None


def resolve(description: Any) -> tuple[ModelFamily, Any]:
  """(its family, the parsed description) of a description; a JSON file's
  path is read once and its dict parsed by the family it names.

  Raises:
    ValueError, TypeError, KeyError: a description no family accepts, or a
      file that cannot be read as a description dict.
  """
  if is_description_file(description):
    description = read_description_file(description)
  family = family_of(description)
  return family, family.parse(description)


def is_description_file(description: Any) -> bool:
  """Whether a description is the path of a JSON description file.

  A path is told from a name by its form, not by whether such a file
  happens to exist: it ends in '.json', or has a '/' and is not a family's
  variant name (listed, or starting with a family's name and '-' or '_':
  'vit-s/16' and 'vit-l/16' are names, the second an unknown one).
  """
  if not isinstance(description, str):
    return False
  if description.lower().endswith('.json'):
    return True
  return (('/' in description or os.sep in description)
          and _family_of_name(description) is None)


def read_description_file(path: str) -> dict:
  """The description dict a JSON file holds.

  Raises:
    ValueError: one line naming the path: it is missing or unreadable, not
      JSON, or JSON that is not an object.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    text = epath.Path(path).read_text()
  except OSError as e:
    raise ValueError(f'cannot read {path}: {e.strerror or e}') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not a text file: {e}') from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not JSON: {e}') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path} holds a JSON {type(data).__name__}, not a '
                     'description dict (Architecture.to_dict())')
  return data
