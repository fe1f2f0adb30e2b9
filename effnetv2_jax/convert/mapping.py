"""What the converters share: our variable layout and strict tensor matching.

`model_layers` walks an `Architecture` in forward order and lists every layer
that owns variables, with its path in our pure-dict trees, its kind and its
shape. A reference implementation only has to say how it names each layer
(`Naming`); `match_tensors` then pairs every variable with one reference
tensor, checks the shape, converts the layout and fails on the first tensor
that does not fit, naming it and both shapes. Every reference tensor must be
consumed: a leftover is an error too, so a checkpoint of a bigger variant does
not load silently into a smaller one.

Neither torch nor Keras is imported here: references arrive as name -> array
mappings.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from effnetv2_jax.models import arch as arch_lib


class ConversionError(ValueError):
  """A reference checkpoint cannot be read or does not fit the model.

  The message is one line, meant to be printed as-is by the command line.
  """


# Our leaf names per layer kind, and the collection each leaf lives in.
_LEAVES = {
    'conv': (('params', 'kernel'), ('params', 'bias')),
    'depthwise': (('params', 'kernel'),),
    'bn': (('params', 'scale'), ('params', 'bias'),
           ('batch_stats', 'mean'), ('batch_stats', 'var')),
    'dense': (('params', 'kernel'), ('params', 'bias')),
}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer that owns variables, located in our module tree.

  Attributes:
    path: module path in the pure-dict trees, e.g. ('blocks', 3, 'dw_conv').
    kind: 'conv' (HWIO kernel), 'depthwise' (k, k, 1, C), 'bn' or 'dense'
      (kernel [features, classes]).
    shape: our kernel shape; (C,) for BatchNorm.
    bias: whether a conv or dense layer has a bias.
    role: the layer's place in its block or in the network, e.g. 'stem.conv',
      'expand_conv', 'se.reduce', 'head.classifier'.
    block: the block's BlockSpec, or None outside the blocks.
    stage: stage index (0-based) of the block, else None.
    index: index of the block inside its stage, else None.
  """

  path: tuple
  kind: str
  shape: tuple[int, ...]
  bias: bool
  role: str
  block: arch_lib.BlockSpec | None = None
  stage: int | None = None
  index: int | None = None

  def leaves(self) -> list[tuple[str, str, tuple[int, ...]]]:
    """(collection, leaf name, our shape) of each variable of the layer."""
    out = []
    for collection, leaf in _LEAVES[self.kind]:
      if leaf == 'bias' and self.kind in ('conv', 'dense') and not self.bias:
        continue
      if self.kind == 'bn' or leaf == 'bias':
        shape = (self.shape[-1],)
      else:
        shape = self.shape
      out.append((collection, leaf, shape))
    return out


def model_layers(architecture: arch_lib.Architecture,
                 num_classes: int) -> list[Layer]:
  """Every variable-owning layer of the model, in forward order."""
  layers = []

  def add(path, kind, shape, role, bias=False, **where):
    layers.append(Layer(tuple(path), kind, tuple(shape), bias, role, **where))

  def conv_bn(prefix, conv_name, bn_name, k, cin, cout, role_prefix='',
              **where):
    add(prefix + (conv_name,), 'conv', (k, k, cin, cout),
        role_prefix + conv_name, **where)
    add(prefix + (bn_name,), 'bn', (cout,), role_prefix + bn_name, **where)

  def squeeze_excite(prefix, channels, reduced, **where):
    add(prefix + ('se', 'reduce'), 'conv', (1, 1, channels, reduced),
        'se.reduce', bias=True, **where)
    add(prefix + ('se', 'expand'), 'conv', (1, 1, reduced, channels),
        'se.expand', bias=True, **where)

  conv_bn(('stem',), 'conv', 'bn', 3, 3, architecture.stem_channels,
          role_prefix='stem.')
  global_index = 0
  last_channels = architecture.stem_channels
  for stage, blocks in enumerate(architecture.stage_blocks()):
    for index, spec in enumerate(blocks):
      prefix = ('blocks', global_index)
      where = dict(block=spec, stage=stage, index=index)
      k, cin, cout, mid = (spec.kernel_size, spec.in_channels,
                           spec.out_channels, spec.mid_channels)
      if spec.fused:
        width = cout if spec.expand_ratio == 1 else mid
        conv_bn(prefix, 'fused_conv', 'fused_bn', k, cin, width, **where)
        if spec.se_channels:
          squeeze_excite(prefix, width, spec.se_channels, **where)
        if spec.expand_ratio != 1:
          conv_bn(prefix, 'project_conv', 'project_bn', 1, mid, cout, **where)
      else:
        if spec.expand_ratio != 1:
          conv_bn(prefix, 'expand_conv', 'expand_bn', 1, cin, mid, **where)
        add(prefix + ('dw_conv',), 'depthwise', (k, k, 1, mid), 'dw_conv',
            **where)
        add(prefix + ('dw_bn',), 'bn', (mid,), 'dw_bn', **where)
        if spec.se_channels:
          squeeze_excite(prefix, mid, spec.se_channels, **where)
        conv_bn(prefix, 'project_conv', 'project_bn', 1, mid, cout, **where)
      global_index += 1
      last_channels = cout
  conv_bn(('head',), 'conv', 'bn', 1, last_channels, architecture.head_width,
          role_prefix='head.')
  add(('head', 'classifier'), 'dense', (architecture.head_width, num_classes),
      'head.classifier', bias=True)
  return layers


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one of our leaves is stored by a reference implementation.

  Attributes:
    name: the reference's leaf name ('weight', 'gamma', ...).
    reference_shape: our shape -> the reference tensor's shape.
    to_ours: reference array -> our layout.
  """

  name: str
  reference_shape: Callable[[tuple], tuple] = tuple
  to_ours: Callable[[np.ndarray], np.ndarray] = lambda a: a


@dataclasses.dataclass(frozen=True)
class Naming:
  """How a reference implementation names and lays out our variables.

  Attributes:
    framework: 'timm' or 'keras', for messages.
    layer_name: our Layer -> the reference's layer name (without the leaf).
    separator: joins layer name and leaf name ('.' in timm, '/' in Keras).
    rules: (kind, our leaf) -> Rule.
    ignorable: reference names that may be left over (e.g. timm's
      `num_batches_tracked`, Keras preprocessing layers).
    classifier_name: full name of the classifier kernel.
    classes_from_shape: classifier kernel shape -> number of classes.
  """

  framework: str
  layer_name: Callable[[Layer], str]
  separator: str
  rules: Mapping[tuple[str, str], Rule]
  ignorable: Callable[[str], bool]
  classifier_name: str
  classes_from_shape: Callable[[tuple], int]

  def tensor_name(self, layer: Layer, leaf: str) -> str:
    rule = self.rules[(layer.kind, leaf)]
    return f'{self.layer_name(layer)}{self.separator}{rule.name}'

  def expected_names(self, architecture: arch_lib.Architecture,
                     num_classes: int) -> list[tuple[str, tuple]]:
    """(reference name, reference shape) of every tensor, in forward order."""
    out = []
    for layer in model_layers(architecture, num_classes):
      for _, leaf, shape in layer.leaves():
        rule = self.rules[(layer.kind, leaf)]
        out.append((self.tensor_name(layer, leaf),
                    tuple(rule.reference_shape(shape))))
    return out


def first_line(error: BaseException) -> str:
  """'TypeName: first line of the message', for one-line error reports."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'.rstrip(': ')


def shape_text(shape) -> str:
  return '(' + ', '.join(str(int(d)) for d in shape) + ')'


def variant_label(architecture: arch_lib.Architecture) -> str:
  name = architecture.name
  if name in arch_lib.VARIANTS:
    return f'EfficientNetV2-{name.upper()}'
  return f'architecture {name!r}'


def infer_num_classes(tensors: Mapping[str, np.ndarray], naming: Naming,
                      source: str) -> int:
  """Number of classes from the reference classifier's kernel shape."""
  kernel = tensors.get(naming.classifier_name)
  if kernel is None:
    raise ConversionError(
        f'{source}: no classifier tensor {naming.classifier_name!r} (a '
        'headless checkpoint, e.g. saved without the top, cannot be '
        'converted)')
  shape = tuple(np.shape(kernel))
  if len(shape) != 2:
    raise ConversionError(
        f'{source}: classifier tensor {naming.classifier_name!r} has shape '
        f'{shape_text(shape)}, expected a 2-D kernel')
  return int(naming.classes_from_shape(shape))


def match_tensors(tensors: Mapping[str, np.ndarray],
                  architecture: arch_lib.Architecture, num_classes: int,
                  naming: Naming, *, source: str) -> tuple[dict, dict]:
  """Pairs every model variable with its reference tensor, strictly.

  Args:
    tensors: reference name -> array (any array-like with `.shape`).
    architecture: the model to fill.
    num_classes: classifier width.
    naming: the reference implementation's naming and layout rules.
    source: how to name the checkpoint in messages (usually its path).

  Returns:
    (params, batch_stats) as nested pure dicts shaped like
    `nnx.to_pure_dict(state)` (int keys under 'blocks'), float32 numpy.

  Raises:
    ConversionError: on the first missing tensor or shape mismatch, in
      forward order, then on the first reference tensor left over.
  """
  label = variant_label(architecture)
  trees = {'params': {}, 'batch_stats': {}}
  used = set()
  for layer in model_layers(architecture, num_classes):
    for collection, leaf, shape in layer.leaves():
      rule = naming.rules[(layer.kind, leaf)]
      name = naming.tensor_name(layer, leaf)
      expected = tuple(rule.reference_shape(shape))
      if name not in tensors:
        raise ConversionError(
            f'{source} does not fit {label}: tensor {name!r} is missing '
            f'(expected shape {shape_text(expected)})'
            + _fitting_variant(tensors, naming, num_classes))
      value = tensors[name]
      found = tuple(np.shape(value))
      if found != expected:
        raise ConversionError(
            f'{source} does not fit {label}: tensor {name!r} has shape '
            f'{shape_text(found)}, expected {shape_text(expected)}'
            + _fitting_variant(tensors, naming, num_classes))
      array = np.asarray(rule.to_ours(np.asarray(value)), dtype=np.float32)
      _insert(trees[collection], layer.path + (leaf,), array)
      used.add(name)
  for name in tensors:
    if name not in used and not naming.ignorable(name):
      raise ConversionError(
          f'{source} does not fit {label}: unexpected tensor {name!r} with '
          f'shape {shape_text(np.shape(tensors[name]))} (the variant has no '
          'such tensor)' + _fitting_variant(tensors, naming, num_classes))
  return trees['params'], trees['batch_stats']


def _fitting_variant(tensors: Mapping[str, np.ndarray], naming: Naming,
                     num_classes: int) -> str:
  """'; it fits EfficientNetV2-S' when a named variant takes every tensor."""
  names = {n for n in tensors if not naming.ignorable(n)}
  for variant in arch_lib.VARIANTS:
    expected = naming.expected_names(arch_lib.get_architecture(variant),
                                     num_classes)
    if (len(expected) == len(names) and
        all(n in names and tuple(np.shape(tensors[n])) == shape
            for n, shape in expected)):
      return f'; it fits {variant_label(arch_lib.get_architecture(variant))}'
  return ''


def _insert(tree: dict, path: Iterable, value) -> None:
  *parents, leaf = path
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value
