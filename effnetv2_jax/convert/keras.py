"""Keras `keras.applications.EfficientNetV2*` weights -> our variables.

Keras ships S, M, L and B0-B3 (no XL), with TF-'SAME' padding and BatchNorm
epsilon 1e-3. Its layer names follow the block position,
`block{stage + 1}{letter}_...` with letters a, b, c, ... inside a stage:

  Fused, e=1:   project_conv (the k x k conv), project_bn
  Fused, e>1:   expand_conv (k x k), expand_bn, [se_reduce, se_expand],
                project_conv, project_bn
  MBConv:       [expand_conv, expand_bn], dwconv2, bn, [se_reduce,
                se_expand], project_conv, project_bn
  stem / head:  stem_conv, stem_bn / top_conv, top_bn, predictions

Kernels are HWIO like ours, except depthwise kernels (k, k, C, 1) (ours
(k, k, 1, C)). BatchNorm stores gamma, beta, moving_mean, moving_variance.

Sources: a Keras 3 `.weights.h5` file, a `.keras` archive, a legacy Keras 2
HDF5 file (`save_weights('x.h5')`, a full-model `.h5`, or the downloaded
keras-applications weight files), or a live Keras model. Files are read with
h5py only: neither keras nor tensorflow is imported.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any, Iterator

import numpy as np

from effnetv2_jax.convert import mapping
from effnetv2_jax.models import arch as arch_lib

_BLOCK_NAMES = {
    # (fused, expanded) -> our role -> Keras layer suffix
    (True, False): {'fused_conv': 'project_conv', 'fused_bn': 'project_bn'},
    (True, True): {'fused_conv': 'expand_conv', 'fused_bn': 'expand_bn',
                   'project_conv': 'project_conv', 'project_bn': 'project_bn'},
    (False, True): {'expand_conv': 'expand_conv', 'expand_bn': 'expand_bn',
                    'dw_conv': 'dwconv2', 'dw_bn': 'bn',
                    'project_conv': 'project_conv',
                    'project_bn': 'project_bn'},
    (False, False): {'dw_conv': 'dwconv2', 'dw_bn': 'bn',
                     'project_conv': 'project_conv',
                     'project_bn': 'project_bn'},
}
_SE_NAMES = {'se.reduce': 'se_reduce', 'se.expand': 'se_expand'}
_OUTER_NAMES = {'stem.conv': 'stem_conv', 'stem.bn': 'stem_bn',
                'head.conv': 'top_conv', 'head.bn': 'top_bn',
                'head.classifier': 'predictions'}

# Variable order inside a Keras 3 `.weights.h5` layer group, by layer class.
_VARIABLE_ORDER = {
    'conv2d': ('kernel', 'bias'),
    'depthwise_conv2d': ('kernel', 'bias'),
    'dense': ('kernel', 'bias'),
    'batch_normalization': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
}
# Keras class (snake case) of each of our layer kinds.
_KERAS_CLASS = {'conv': 'conv2d', 'depthwise': 'depthwise_conv2d',
                'bn': 'batch_normalization', 'dense': 'dense'}
# Input-scaling layers of `include_preprocessing=True`: constants, not weights.
_PREPROCESSING = re.compile(r'^(rescaling|normalization)(_\d+)?/')


def _layer_name(layer: mapping.Layer) -> str:
  if layer.block is None:
    return _OUTER_NAMES[layer.role]
  spec = layer.block
  names = _BLOCK_NAMES[(spec.fused, spec.expand_ratio != 1)]
  suffix = _SE_NAMES.get(layer.role) or names[layer.role]
  return f'block{layer.stage + 1}{chr(ord("a") + layer.index)}_{suffix}'


def _dw_reference_shape(shape):
  k1, k2, _, channels = shape
  return (k1, k2, channels, 1)


NAMING = mapping.Naming(
    framework='keras',
    layer_name=_layer_name,
    separator='/',
    rules={
        ('conv', 'kernel'): mapping.Rule('kernel'),
        ('conv', 'bias'): mapping.Rule('bias'),
        ('depthwise', 'kernel'): mapping.Rule(
            'kernel', _dw_reference_shape, lambda a: a.transpose(0, 1, 3, 2)),
        ('bn', 'scale'): mapping.Rule('gamma'),
        ('bn', 'bias'): mapping.Rule('beta'),
        ('bn', 'mean'): mapping.Rule('moving_mean'),
        ('bn', 'var'): mapping.Rule('moving_variance'),
        ('dense', 'kernel'): mapping.Rule('kernel'),
        ('dense', 'bias'): mapping.Rule('bias'),
    },
    ignorable=lambda name: bool(_PREPROCESSING.match(name)),
    classifier_name='predictions/kernel',
    classes_from_shape=lambda shape: shape[1],
)

KERAS_VARIANTS = ('s', 'm', 'l', 'b0', 'b1', 'b2', 'b3')


def keras_application_name(variant: str) -> str:
  """Keras' constructor name of a variant, e.g. 'EfficientNetV2B0'."""
  key = arch_lib.normalize_variant_name(variant)
  if key not in KERAS_VARIANTS:
    raise ValueError(f'keras.applications has no EfficientNetV2-{key.upper()}')
  return f'EfficientNetV2{key.upper()}'


# ----------------------------------------------------------------------------
# Reading tensors.


def _h5py():
  try:
    import h5py
  except ImportError:
    raise mapping.ConversionError(
        'reading Keras weight files needs the h5py package') from None
  return h5py


def _class_of(group_name: str) -> str:
  """'batch_normalization_12' -> 'batch_normalization'."""
  return re.sub(r'_\d+$', '', group_name)


def _keras3_layers(group, h5py) -> Iterator[tuple[str, str, list]]:
  """(group name, layer name or '', [datasets]) under a Keras 3 `layers`."""
  for group_name in group:
    layer = group[group_name]
    if not isinstance(layer, h5py.Group):
      continue
    if 'layers' in layer:  # a nested model
      yield from _keras3_layers(layer['layers'], h5py)
    variables = layer.get('vars')
    if not isinstance(variables, h5py.Group) or not len(variables):
      continue
    name = variables.attrs.get('name', '')
    if isinstance(name, bytes):
      name = name.decode()
    datasets = [variables[k] for k in sorted(variables, key=int)]
    yield group_name, str(name), datasets


def _array(dataset) -> np.ndarray:
  value = np.asarray(dataset)
  # Keras 3 stores bfloat16 variables as raw 16-bit words, tagged.
  if dataset.attrs.get('dtype') in ('bfloat16', b'bfloat16'):
    import ml_dtypes  # a jax dependency
    value = value.view(ml_dtypes.bfloat16)
  return value.astype(np.float32) if value.dtype.kind == 'f' else value


def _read_keras3(f, h5py) -> dict[str, np.ndarray]:
  """A Keras 3 weights file: `layers/<class>_<n>/vars/<i>` datasets."""
  entries = list(_keras3_layers(f['layers'], h5py))
  named = all(name for _, name, _ in entries)
  tensors = {}
  for group_name, name, datasets in entries:
    cls = _class_of(group_name)
    order = _VARIABLE_ORDER.get(cls)
    # Files written before Keras recorded layer names are addressed by their
    # structural path (class and creation order), as Keras itself loads them.
    # They are marked here and resolved once the architecture is known.
    layer = name if named else _STRUCTURAL + group_name
    for i, dataset in enumerate(datasets):
      leaf = order[i] if order and i < len(order) else str(i)
      tensors[f'{layer}/{leaf}'] = _array(dataset)
  return tensors


_STRUCTURAL = 'structural:'


def _read_legacy(root) -> dict[str, np.ndarray]:
  """A Keras 2 HDF5 file: root attr `layer_names`, per layer `weight_names`."""
  tensors = {}
  for layer_name in root.attrs['layer_names']:
    layer_name = layer_name.decode() if isinstance(layer_name, bytes) \
        else str(layer_name)
    group = root[layer_name]
    for weight_name in group.attrs.get('weight_names', ()):
      weight_name = weight_name.decode() if isinstance(weight_name, bytes) \
          else str(weight_name)
      leaf = weight_name.split('/')[-1].split(':')[0]
      tensors[f'{layer_name}/{leaf}'] = _array(group[weight_name])
  return tensors


def _read_h5(handle, label: str) -> dict[str, np.ndarray]:
  h5py = _h5py()
  try:
    f = h5py.File(handle, 'r')
  except (OSError, ValueError) as e:
    raise mapping.ConversionError(
        f'{label}: not a readable HDF5 weights file ({mapping.first_line(e)})'
    ) from None
  try:
    with f:
      if 'layer_names' in f.attrs:
        return _read_legacy(f)
      if 'model_weights' in f and 'layer_names' in f['model_weights'].attrs:
        return _read_legacy(f['model_weights'])
      if 'layers' in f:
        return _read_keras3(f, h5py)
  except (OSError, KeyError, ValueError) as e:
    raise mapping.ConversionError(
        f'{label}: damaged Keras weights file ({mapping.first_line(e)})'
    ) from None
  raise mapping.ConversionError(
      f'{label}: an HDF5 file without Keras weights (no layers found)')


def _read_keras_archive(path: str) -> dict[str, np.ndarray]:
  try:
    with zipfile.ZipFile(path) as archive:
      data = archive.read('model.weights.h5')
  except (zipfile.BadZipFile, KeyError, OSError) as e:
    raise mapping.ConversionError(
        f'{path}: not a readable .keras archive ({mapping.first_line(e)})'
    ) from None
  return _read_h5(io.BytesIO(data), path)


def _is_keras_model(source: Any) -> bool:
  return hasattr(source, 'layers') and hasattr(source, 'get_layer')


def _read_model(model: Any) -> dict[str, np.ndarray]:
  """Tensors of a live Keras model (Keras 3 or tf.keras 2)."""
  tensors = {}

  def visit(layer):
    children = getattr(layer, 'layers', None)
    if children:
      for child in children:
        visit(child)
      return
    for variable in layer.weights:
      leaf = variable.name.split('/')[-1].split(':')[0]
      value = variable.numpy() if hasattr(variable, 'numpy') else variable
      tensors[f'{layer.name}/{leaf}'] = np.asarray(value)

  visit(model)
  return tensors


def read_keras_weights(source: Any) -> dict[str, np.ndarray]:
  """Name ('layer/variable') -> numpy array from any supported source.

  Names written before Keras recorded layer names come back prefixed with
  'structural:' (class-and-order names); `keras_variables` resolves them.
  """
  if _is_keras_model(source):
    return _read_model(source)
  if not isinstance(source, (str, os.PathLike)):
    raise mapping.ConversionError(
        'expected a Keras weights file or a Keras model, got '
        f'{type(source).__name__}')
  label = os.fspath(source)
  if not os.path.isfile(label):
    raise mapping.ConversionError(f'{label}: no such file')
  if label.endswith('.keras'):
    return _read_keras_archive(label)
  return _read_h5(label, label)


def _resolve_structural(tensors: dict[str, np.ndarray],
                        architecture: arch_lib.Architecture
                        ) -> dict[str, np.ndarray]:
  """Structural names ('conv2d_7/kernel') -> layer names, by creation order.

  Keras numbers layers of one class in the order the model creates them,
  which is our forward order; preprocessing layers have other classes.
  """
  counters: dict[str, int] = {}
  renames = {}
  # Names do not depend on the class count; 1 stands in for it.
  for layer in mapping.model_layers(architecture, 1):
    cls = _KERAS_CLASS[layer.kind]
    n = counters.get(cls, 0)
    counters[cls] = n + 1
    renames[cls if n == 0 else f'{cls}_{n}'] = NAMING.layer_name(layer)
  out = {}
  for name, value in tensors.items():
    group, _, leaf = name[len(_STRUCTURAL):].partition('/')
    out[f'{renames.get(group, group)}/{leaf}'] = value
  return out


def keras_variables(source: Any, architecture: arch_lib.Architecture | str
                    ) -> tuple[dict, dict, int]:
  """(params, batch_stats, num_classes) converted from Keras weights."""
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  tensors = read_keras_weights(source)
  label = (f'Keras model {getattr(source, "name", "")!r}'
           if _is_keras_model(source) else os.fspath(source))
  if tensors and all(k.startswith(_STRUCTURAL) for k in tensors):
    tensors = _resolve_structural(tensors, architecture)
  num_classes = mapping.infer_num_classes(tensors, NAMING, label)
  params, batch_stats = mapping.match_tensors(
      tensors, architecture, num_classes, NAMING, source=label)
  return params, batch_stats, num_classes


def from_keras(source: Any, variant: arch_lib.Architecture | str,
               **model_kwargs):
  """An EfficientNetV2 holding Keras EfficientNetV2 weights.

  Args:
    source: .weights.h5 / .h5 / .keras path, or a Keras model object.
    variant: 's', 'm', 'l', 'b0'..'b3' (or an Architecture).
    **model_kwargs: `create_model` options (dtype, conv_impl, ...).

  Raises:
    ConversionError: one line naming the first tensor that does not fit.
  """
  from effnetv2_jax.models import weights

  if isinstance(variant, str):
    variant = arch_lib.get_architecture(variant)
  params, batch_stats, num_classes = keras_variables(source, variant)
  model_kwargs.setdefault('bn_epsilon', 1e-3)
  return weights.model_from_variables(variant, num_classes, params,
                                      batch_stats, what='Keras conversion',
                                      **model_kwargs)
