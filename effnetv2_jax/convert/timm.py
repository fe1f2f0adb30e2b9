"""timm `tf_efficientnetv2_*` state dicts -> our params and batch statistics.

timm's `tf_` variants are the official TF weights ported to PyTorch, with
TF-'SAME' padding and BatchNorm epsilon 1e-3, so they compute what our model
computes. Their module names (`blocks.{stage}.{index}.conv_pw`, ...) follow
the block type; we derive them from our architecture rather than listing them
per variant:

  Fused, e=1 (timm ConvBnAct):            conv, bn1
  Fused, e>1 (EdgeResidual):              conv_exp, bn1, [se], conv_pwl, bn2
  MBConv, e>1 (InvertedResidual):         conv_pw, bn1, conv_dw, bn2, [se],
                                          conv_pwl, bn3
  MBConv, e=1 (DepthwiseSeparableConv):   conv_dw, bn1, [se], conv_pw, bn2
  stem / head:                            conv_stem, bn1 / conv_head, bn2,
                                          classifier

Layouts: conv weights are OIHW (ours HWIO), depthwise (C, 1, k, k) (ours
(k, k, 1, C)), the classifier [classes, features] (ours [features, classes]).
Neither timm nor torchvision is needed; reading a .pth file needs torch,
reading .safetensors needs only the `safetensors` package.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from effnetv2_jax.convert import mapping
from effnetv2_jax.models import arch as arch_lib

_BLOCK_NAMES = {
    # (fused, expanded) -> our role -> timm module name
    (True, False): {'fused_conv': 'conv', 'fused_bn': 'bn1'},
    (True, True): {'fused_conv': 'conv_exp', 'fused_bn': 'bn1',
                   'project_conv': 'conv_pwl', 'project_bn': 'bn2'},
    (False, True): {'expand_conv': 'conv_pw', 'expand_bn': 'bn1',
                    'dw_conv': 'conv_dw', 'dw_bn': 'bn2',
                    'project_conv': 'conv_pwl', 'project_bn': 'bn3'},
    (False, False): {'dw_conv': 'conv_dw', 'dw_bn': 'bn1',
                     'project_conv': 'conv_pw', 'project_bn': 'bn2'},
}
_SE_NAMES = {'se.reduce': 'se.conv_reduce', 'se.expand': 'se.conv_expand'}
_OUTER_NAMES = {'stem.conv': 'conv_stem', 'stem.bn': 'bn1',
                'head.conv': 'conv_head', 'head.bn': 'bn2',
                'head.classifier': 'classifier'}


def _layer_name(layer: mapping.Layer) -> str:
  if layer.block is None:
    return _OUTER_NAMES[layer.role]
  spec = layer.block
  names = _BLOCK_NAMES[(spec.fused, spec.expand_ratio != 1)]
  name = _SE_NAMES.get(layer.role) or names[layer.role]
  return f'blocks.{layer.stage}.{layer.index}.{name}'


def _oihw(shape):
  kh, kw, cin, cout = shape
  return (cout, cin, kh, kw)


def _hwio(a):
  return a.transpose(2, 3, 1, 0)


NAMING = mapping.Naming(
    framework='timm',
    layer_name=_layer_name,
    separator='.',
    rules={
        ('conv', 'kernel'): mapping.Rule('weight', _oihw, _hwio),
        ('conv', 'bias'): mapping.Rule('bias'),
        # (k, k, 1, C) <-> (C, 1, k, k): the same transpose as a dense conv.
        ('depthwise', 'kernel'): mapping.Rule('weight', _oihw, _hwio),
        ('bn', 'scale'): mapping.Rule('weight'),
        ('bn', 'bias'): mapping.Rule('bias'),
        ('bn', 'mean'): mapping.Rule('running_mean'),
        ('bn', 'var'): mapping.Rule('running_var'),
        ('dense', 'kernel'): mapping.Rule(
            'weight', lambda s: (s[1], s[0]), lambda a: a.T),
        ('dense', 'bias'): mapping.Rule('bias'),
    },
    ignorable=lambda name: name.endswith('.num_batches_tracked'),
    classifier_name='classifier.weight',
    classes_from_shape=lambda shape: shape[0],
)

# Keys under which training scripts nest the weights; EMA first when wanted.
_NESTED_KEYS = ('state_dict', 'model')
_NESTED_EMA_KEYS = ('state_dict_ema', 'model_ema')


def timm_model_name(variant: str) -> str:
  """timm's name of a variant's TF-ported model, e.g. 'tf_efficientnetv2_s'."""
  return f'tf_efficientnetv2_{arch_lib.normalize_variant_name(variant)}'


def _to_numpy(value: Any, name: str, source: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic, int, float)):
    array = np.asarray(value)
    if array.dtype.kind in 'biuf':
      return array
  raise mapping.ConversionError(
      f'{source}: entry {name!r} is a {type(value).__name__}, not a tensor')


def _unwrap(obj: Any, source: str, use_ema: bool) -> Mapping[str, Any]:
  """The state dict inside a checkpoint (timm/DDP wrappers stripped)."""
  if not isinstance(obj, Mapping):
    raise mapping.ConversionError(
        f'{source}: holds a {type(obj).__name__}, not a state dict')
  keys = (_NESTED_EMA_KEYS if use_ema else ()) + _NESTED_KEYS
  for key in keys:
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  names = list(obj)
  if names and all(isinstance(n, str) and n.startswith('module.')
                   for n in names):
    obj = {n[len('module.'):]: v for n, v in obj.items()}
  return obj


def load_state_dict(source: str | os.PathLike | Mapping[str, Any], *,
                    use_ema: bool = True) -> dict[str, np.ndarray]:
  """Name -> float numpy array from a timm checkpoint file or a state dict.

  Args:
    source: a .safetensors file, a torch file (.pth/.pt/.bin/.ckpt), or an
      in-memory state dict (torch tensors or numpy arrays).
    use_ema: for training checkpoints holding both, take `state_dict_ema`.

  Raises:
    ConversionError: the file is missing, unreadable or not a state dict.
  """
  if isinstance(source, Mapping):
    label = 'state dict'
    raw = _unwrap(source, label, use_ema)
  elif not isinstance(source, (str, os.PathLike)):
    raise mapping.ConversionError(
        f'expected a checkpoint path or a state dict, got '
        f'{type(source).__name__}')
  else:
    label = os.fspath(source)
    if not os.path.isfile(label):
      raise mapping.ConversionError(f'{label}: no such file')
    raw = _unwrap(_read_file(label), label, use_ema)
  return {name: _to_numpy(value, name, label) for name, value in raw.items()}


def _read_file(path: str) -> Any:
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise mapping.ConversionError(
          f'{path}: reading .safetensors needs the safetensors package'
      ) from None
    try:
      return load_file(path)
    except Exception as e:
      raise mapping.ConversionError(
          f'{path}: not a readable safetensors file ({mapping.first_line(e)})'
      ) from None
  try:
    import torch
  except ImportError:
    raise mapping.ConversionError(
        f'{path}: reading a torch checkpoint needs PyTorch (or convert the '
        'file to .safetensors)') from None
  try:
    # weights_only: never execute pickled code from a downloaded file.
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise mapping.ConversionError(
        f'{path}: not a readable torch checkpoint ({mapping.first_line(e)})'
    ) from None


def timm_variables(source: str | os.PathLike | Mapping[str, Any],
                   architecture: arch_lib.Architecture | str, *,
                   use_ema: bool = True) -> tuple[dict, dict, int]:
  """(params, batch_stats, num_classes) converted from a timm checkpoint.

  The pure dicts are shaped like `nnx.to_pure_dict(state)`; `num_classes`
  comes from the checkpoint's classifier.
  """
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  tensors = load_state_dict(source, use_ema=use_ema)
  label = 'state dict' if isinstance(source, Mapping) else os.fspath(source)
  num_classes = mapping.infer_num_classes(tensors, NAMING, label)
  params, batch_stats = mapping.match_tensors(
      tensors, architecture, num_classes, NAMING, source=label)
  return params, batch_stats, num_classes


def from_timm(source: str | os.PathLike | Mapping[str, Any],
              variant: arch_lib.Architecture | str, *, use_ema: bool = True,
              **model_kwargs):
  """An EfficientNetV2 holding a timm `tf_efficientnetv2_*` checkpoint.

  Args:
    source: .safetensors / torch file, or a state dict.
    variant: 's', 'm', 'l', 'xl', 'b0'..'b3' (or an Architecture).
    use_ema: prefer the EMA weights of a timm training checkpoint.
    **model_kwargs: `create_model` options (dtype, conv_impl, ...).

  Raises:
    ConversionError: one line naming the first tensor that does not fit.
  """
  from effnetv2_jax.models import weights

  if isinstance(variant, str):
    variant = arch_lib.get_architecture(variant)
  params, batch_stats, num_classes = timm_variables(source, variant,
                                                    use_ema=use_ema)
  model_kwargs.setdefault('bn_epsilon', 1e-3)
  return weights.model_from_variables(variant, num_classes, params,
                                      batch_stats, what='timm conversion',
                                      **model_kwargs)
