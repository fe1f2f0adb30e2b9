"""Official google/automl EfficientNetV2 checkpoints -> our variables.

The released weights (`efficientnetv2-s.tgz`, `efficientnetv2-l-21k.tgz`,
`efficientnetv2-xl-21k-ft1k.tgz`, ...) are TF1 name-based checkpoints of the
official Keras-layer model (google/automl `efficientnetv2/effnetv2_model.py`).
Every variable sits under the model name, e.g. `efficientnetv2-s/`; blocks
are numbered globally (`blocks_0` ... `blocks_39`), and inside a block the
official code names its layers in creation order, convolutions `conv2d`,
`conv2d_1`, ... and BatchNorms `tpu_batch_normalization`, `_1`, `_2`:

  MBConv:        [conv2d (1x1 expand), tpu_batch_normalization],
                 depthwise_conv2d, tpu_batch_normalization(_1),
                 [se/conv2d, se/conv2d_1 (with biases)],
                 conv2d(_1) (1x1 project), tpu_batch_normalization(_2)
  Fused, e > 1:  conv2d (k x k), tpu_batch_normalization, [se/...],
                 conv2d_1 (1x1 project), tpu_batch_normalization_1
  Fused, e = 1:  conv2d (k x k), tpu_batch_normalization
  stem / head:   stem/conv2d, stem/tpu_batch_normalization / head/conv2d,
                 head/tpu_batch_normalization, head/dense

Kernels are HWIO like ours except depthwise kernels, (k, k, C, 1) (ours
(k, k, 1, C)); BatchNorm stores gamma, beta, moving_mean, moving_variance.
Training checkpoints also hold `<name>/ExponentialMovingAverage` copies (the
official evaluation uses them), optimizer slots (`<name>/RMSProp`, ...) and
`global_step`; EMA copies are taken when present unless raw weights are
asked for, the rest is ignored.

The official evaluation preprocessing depends on what a checkpoint was
trained on (the dataset configs of google/automl `datasets.py` override the
model's): ImageNet-1k weights use the variant's own (B0-B3 the legacy
centre crop with ImageNet mean/std, S-XL (x - 128) / 128 with a centre crop
only below 320 px); ImageNet-21k pretraining (21843 classes) evaluates at
224 px with (x - 128) / 128 and the centre crop; 21k weights fine-tuned on
1k ('-21k-ft1k') resize the whole image and scale with (x / 255 - 0.5) / 0.5.

Reading a checkpoint imports TensorFlow (`tf.train.load_checkpoint`); this
module does not import it at load time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
import tarfile
import tempfile
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from effnetv2_jax.convert import mapping
from effnetv2_jax.models import arch as arch_lib

EMA_SUFFIX = '/ExponentialMovingAverage'
IMAGENET21K_CLASSES = 21843
IMAGENET21K_EVAL_SIZE = 224
# What a release was trained on, as google/automl's `get_model(weights=...)`
# names it.
RELEASES = ('imagenet', 'imagenet21k', 'imagenet21k-ft1k')

# Slots of the TF1 optimizers google/automl's `build_optimizer` offers, and
# their scalar state: training state, not model weights.
_OPTIMIZER_SLOT = re.compile(r'/(RMSProp|Momentum|Adam)(_\d+)?$')
_TRAINING_SCALARS = frozenset({'global_step', 'beta1_power', 'beta2_power',
                               '_CHECKPOINTABLE_OBJECT_GRAPH'})
_FINETUNED_ON_1K = re.compile(r'21k[-_]ft1k')
_STEP = re.compile(r'-(\d+)$')
_STATE_ENTRY = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$', re.M)
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


# ----------------------------------------------------------------------------
# Naming.


def _numbered(base: str, index: int) -> str:
  return base if index == 0 else f'{base}_{index}'


def block_layer_names(spec: arch_lib.BlockSpec) -> dict[str, str]:
  """Our role -> the official layer name inside one block.

  The official blocks number their convolutions and BatchNorms in the
  order they create them, so the names follow from the block's layout.
  """
  convs, norms = [], []
  if spec.fused:
    convs.append('fused_conv')
    norms.append('fused_bn')
  else:
    if spec.expand_ratio != 1:
      convs.append('expand_conv')
      norms.append('expand_bn')
    norms.append('dw_bn')
  if not (spec.fused and spec.expand_ratio == 1):
    convs.append('project_conv')
    norms.append('project_bn')
  names = {role: _numbered('conv2d', i) for i, role in enumerate(convs)}
  names.update({role: _numbered('tpu_batch_normalization', i)
                for i, role in enumerate(norms)})
  names.update({'dw_conv': 'depthwise_conv2d', 'se.reduce': 'se/conv2d',
                'se.expand': 'se/conv2d_1'})
  return names


_OUTER_NAMES = {'stem.conv': 'stem/conv2d',
                'stem.bn': 'stem/tpu_batch_normalization',
                'head.conv': 'head/conv2d',
                'head.bn': 'head/tpu_batch_normalization',
                'head.classifier': 'head/dense'}


def _dw_reference_shape(shape):
  k1, k2, _, channels = shape
  return (k1, k2, channels, 1)


def is_training_state(name: str) -> bool:
  """Optimizer slots, step counters and TF bookkeeping: not weights."""
  return name in _TRAINING_SCALARS or bool(_OPTIMIZER_SLOT.search(name))


def official_naming(model_name: str) -> mapping.Naming:
  """The official names of our variables under `model_name/`."""

  def layer_name(layer: mapping.Layer) -> str:
    if layer.block is None:
      return f'{model_name}/{_OUTER_NAMES[layer.role]}'
    block_index = layer.path[1]
    local = block_layer_names(layer.block)[layer.role]
    return f'{model_name}/blocks_{block_index}/{local}'

  return mapping.Naming(
      framework='official',
      layer_name=layer_name,
      separator='/',
      rules={
          ('conv', 'kernel'): mapping.Rule('kernel'),
          ('conv', 'bias'): mapping.Rule('bias'),
          ('depthwise', 'kernel'): mapping.Rule(
              'depthwise_kernel', _dw_reference_shape,
              lambda a: a.transpose(0, 1, 3, 2)),
          ('bn', 'scale'): mapping.Rule('gamma'),
          ('bn', 'bias'): mapping.Rule('beta'),
          ('bn', 'mean'): mapping.Rule('moving_mean'),
          ('bn', 'var'): mapping.Rule('moving_variance'),
          ('dense', 'kernel'): mapping.Rule('kernel'),
          ('dense', 'bias'): mapping.Rule('bias'),
      },
      ignorable=is_training_state,
      classifier_name=f'{model_name}/head/dense/kernel',
      classes_from_shape=lambda shape: shape[1],
  )


# ----------------------------------------------------------------------------
# Finding the checkpoint: a .tgz release, the directory it unpacks to, or a
# checkpoint prefix.


def _is_archive(path: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(_ARCHIVE_SUFFIXES)


def _archive_stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in _ARCHIVE_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _check_member(member: tarfile.TarInfo, label: str) -> None:
  """Refuses members that could write outside the extraction directory."""
  name = member.name
  parts = posixpath.normpath(name.replace('\\', '/')).split('/')
  if name.startswith(('/', '\\')) or re.match(r'^[A-Za-z]:', name) \
      or '..' in parts:
    raise mapping.ConversionError(
        f'{label}: archive member {name!r} points outside the archive; '
        'refusing to extract it')
  if not (member.isfile() or member.isdir()):
    raise mapping.ConversionError(
        f'{label}: archive member {name!r} is a link or special file; '
        'refusing to extract it')


def _extract(archive_path: str, destination: str) -> None:
  try:
    with tarfile.open(archive_path) as archive:
      members = archive.getmembers()
      for member in members:
        _check_member(member, archive_path)
      # Where tarfile has extraction filters (3.11.4+), 'data' repeats the
      # checks above and also drops the archive's owners and odd modes.
      options = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
      archive.extractall(destination, members=members, **options)
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise mapping.ConversionError(
        f'{archive_path}: not a readable .tgz archive '
        f'({mapping.first_line(e)})') from None


def _prefix_of(path: str) -> str | None:
  """The checkpoint prefix a path names, if it names one."""
  if path.endswith('.index') and os.path.isfile(path):
    return path[:-len('.index')]
  data = re.match(r'^(.*)\.data-\d+-of-\d+$', path)
  if data and os.path.isfile(data.group(1) + '.index'):
    return data.group(1)
  if os.path.isfile(path + '.index'):
    return path
  return None


def _named_by_state_file(directory: str) -> str | None:
  """The prefix a TF `checkpoint` state file names, when it is present.

  The state file often records the training machine's path (gs://...), so
  only its base name is looked up next to the file.
  """
  state = os.path.join(directory, 'checkpoint')
  if not os.path.isfile(state):
    return None
  try:
    with open(state) as f:
      match = _STATE_ENTRY.search(f.read())
  except (OSError, UnicodeDecodeError):
    return None
  if not match:
    return None
  prefix = os.path.join(directory, posixpath.basename(match.group(1)))
  return prefix if os.path.isfile(prefix + '.index') else None


def find_prefix(directory: str, label: str) -> str:
  """The one checkpoint prefix inside `directory` (searched recursively)."""
  candidates, chosen = [], []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    candidates += sorted(os.path.join(root, f[:-len('.index')])
                         for f in files if f.endswith('.index'))
    named = _named_by_state_file(root)
    if named:
      chosen.append(named)
  if not candidates:
    raise mapping.ConversionError(
        f'{label}: no TF checkpoint inside (no *.index file)')
  if len(candidates) == 1:
    return candidates[0]
  if len(chosen) == 1:
    return chosen[0]
  names = ', '.join(os.path.relpath(c, directory) for c in candidates[:4])
  raise mapping.ConversionError(
      f'{label} holds {len(candidates)} checkpoints ({names}'
      f'{", ..." if len(candidates) > 4 else ""}); pass the prefix of one '
      'as --input')


@contextlib.contextmanager
def open_prefix(path: str | os.PathLike) -> Iterator[tuple[str, list[str]]]:
  """Yields (checkpoint prefix, names that may tell the release).

  A .tgz/.tar.gz is extracted to a temporary directory that lives as long
  as the context.

  Raises:
    ConversionError: no checkpoint at `path`, an unreadable or unsafe
      archive, or several checkpoints to choose from.
  """
  label = os.fspath(path)
  if _is_archive(label):
    with tempfile.TemporaryDirectory(prefix='effnetv2_official_') as tmp:
      _extract(label, tmp)
      prefix = find_prefix(tmp, label)
      hints = [_archive_stem(label)] + os.path.relpath(prefix, tmp).split(
          os.sep)
      yield prefix, hints
    return
  if os.path.isdir(label):
    prefix = find_prefix(label, label)
    hints = [os.path.basename(os.path.abspath(label))] + os.path.relpath(
        prefix, label).split(os.sep)
    yield prefix, hints
    return
  prefix = _prefix_of(label)
  if prefix is None:
    raise mapping.ConversionError(
        f'{label}: no such .tgz archive, directory or TF checkpoint prefix '
        '(no .index file)')
  yield prefix, [os.path.basename(os.path.dirname(os.path.abspath(prefix))),
                 os.path.basename(prefix)]


# ----------------------------------------------------------------------------
# Reading tensors.


class _StoredTensor:
  """A checkpoint tensor read only when converted (`np.asarray`).

  `match_tensors` needs every shape but only the tensors it keeps, so the
  EMA copies, raw weights and optimizer slots that are not chosen are never
  read into memory.
  """

  def __init__(self, reader, name: str, shape):
    self._reader = reader
    self._name = name
    self.shape = tuple(int(d) for d in shape)

  def __array__(self, dtype=None, copy=None):
    value = np.asarray(self._reader.get_tensor(self._name))
    return value if dtype is None else value.astype(dtype)


def _tensorflow():
  # TF's C++ start-up messages would break the one-line error contract.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import tensorflow as tf
  except ImportError:
    raise mapping.ConversionError(
        'reading official TF checkpoints needs tensorflow') from None
  return tf


def _open_reader(prefix: str, label: str):
  tf = _tensorflow()
  try:
    return tf.train.load_checkpoint(prefix)
  except Exception as e:  # TF raises many types for a damaged checkpoint
    raise mapping.ConversionError(
        f'{label}: not a readable TF checkpoint ({mapping.first_line(e)})'
    ) from None


def _model_name(names, label: str) -> str:
  """The variable prefix shared by the weights, e.g. 'efficientnetv2-s'."""
  if any('.ATTRIBUTES' in n for n in names):
    raise mapping.ConversionError(
        f'{label}: a TF2 object-based checkpoint, not the official name-based '
        'release format')
  counts: dict[str, int] = {}
  for name in names:
    if '/' in name and not is_training_state(name):
      top = name.split('/', 1)[0]
      counts[top] = counts.get(top, 0) + 1
  if not counts:
    raise mapping.ConversionError(
        f'{label}: no model variables (expected names like '
        "'efficientnetv2-s/stem/conv2d/kernel')")
  return max(counts, key=lambda top: (counts[top], top))


def select_tensors(shapes: Mapping[str, Any], *, use_ema: bool
                   ) -> tuple[dict[str, str], int]:
  """Weight name -> the stored name to read, and how many are EMA copies.

  With `use_ema`, a weight's `/ExponentialMovingAverage` copy replaces it
  where the checkpoint has one (the official EMA also covers the BatchNorm
  moving statistics); otherwise EMA copies are left out. Training state is
  passed through under its own name (the matcher ignores it).
  """
  chosen, from_ema = {}, 0
  for name in shapes:
    if name.endswith(EMA_SUFFIX):
      continue
    chosen[name] = name
  for name in shapes:
    if not name.endswith(EMA_SUFFIX) or not use_ema:
      continue
    base = name[:-len(EMA_SUFFIX)]
    chosen[base] = name
    from_ema += 1
  return chosen, from_ema


@dataclasses.dataclass
class OfficialWeights:
  """A converted official checkpoint.

  Attributes:
    params, batch_stats: pure dicts as `nnx.to_pure_dict` gives them.
    num_classes: from the classifier kernel (21843 for ImageNet-21k).
    architecture: the variant, given or inferred from `model_name`.
    model_name: the checkpoint's variable prefix, e.g. 'efficientnetv2-s'.
    release: 'imagenet', 'imagenet21k' or 'imagenet21k-ft1k' (see
      `release_of`).
    ema_tensors: how many tensors came from EMA copies (0: raw weights).
    global_step: the checkpoint's step, when it records one.
  """

  params: dict
  batch_stats: dict
  num_classes: int
  architecture: arch_lib.Architecture
  model_name: str
  release: str
  ema_tensors: int
  global_step: int | None

  def preprocessing(self) -> tuple[str, int]:
    """(normalization, eval size) of the official evaluation."""
    return official_preprocessing(self.architecture, self.release)

  def to_model(self, **model_kwargs):
    """An eval-ready EfficientNetV2 holding these weights."""
    from effnetv2_jax.models import weights

    model_kwargs.setdefault('bn_epsilon', 1e-3)
    return weights.model_from_variables(
        self.architecture, self.num_classes, self.params, self.batch_stats,
        what='official conversion', **model_kwargs)


def release_of(num_classes: int, hints: list[str]) -> str:
  """What the weights were trained on.

  A 21843-class head is ImageNet-21k pretraining; 1000-class weights count
  as fine-tuned from 21k when their file or directory name says so
  ('efficientnetv2-s-21k-ft1k'), since the tensors look the same.
  """
  if num_classes == IMAGENET21K_CLASSES:
    return 'imagenet21k'
  if any(_FINETUNED_ON_1K.search(h.lower()) for h in hints):
    return 'imagenet21k-ft1k'
  return 'imagenet'


def official_preprocessing(architecture: arch_lib.Architecture,
                           release: str) -> tuple[str, int]:
  """(normalization, eval size) google/automl evaluates a release with.

  `effnetv2_jax.predict` applies the centre crop by normalization and size
  exactly as the official code does ('imagenet' always crops; 'inception'
  below 320 px; 'ft' never).
  """
  if release == 'imagenet21k':
    return 'inception', IMAGENET21K_EVAL_SIZE
  if release == 'imagenet21k-ft1k':
    return 'ft', architecture.eval_size
  if release == 'imagenet':
    return architecture.normalization, architecture.eval_size
  raise ValueError(f'release must be one of {RELEASES}, got {release!r}')


def _variant_of(model_name: str, label: str) -> arch_lib.Architecture:
  try:
    return arch_lib.get_architecture(
        arch_lib.normalize_variant_name(model_name))
  except ValueError:
    raise mapping.ConversionError(
        f'{label}: cannot tell the variant from the variable prefix '
        f'{model_name!r}; pass --variant (one of '
        f'{", ".join(arch_lib.VARIANTS)})') from None


def official_variables(source: str | os.PathLike,
                       architecture: arch_lib.Architecture | str | None = None,
                       *, use_ema: bool = True) -> OfficialWeights:
  """Converts an official checkpoint (.tgz, its directory, or a prefix).

  Args:
    source: a released .tgz/.tar.gz, the directory it unpacks to, or a TF
      checkpoint prefix (`.../model.ckpt-12345`).
    architecture: the variant; None infers it from the variable prefix.
    use_ema: take the `/ExponentialMovingAverage` copies where present.

  Raises:
    ConversionError: one line naming the first tensor that does not fit,
      or why the checkpoint cannot be read.
  """
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  label = os.fspath(source)
  with open_prefix(source) as (prefix, hints):
    reader = _open_reader(prefix, label)
    shapes = reader.get_variable_to_shape_map()
    model_name = _model_name(shapes, label)
    if architecture is None:
      architecture = _variant_of(model_name, label)
    chosen, from_ema = select_tensors(shapes, use_ema=use_ema)
    tensors = {name: _StoredTensor(reader, stored, shapes[stored])
               for name, stored in chosen.items()}
    naming = official_naming(model_name)
    num_classes = mapping.infer_num_classes(tensors, naming, label)
    params, batch_stats = mapping.match_tensors(
        tensors, architecture, num_classes, naming, source=label)
    global_step = None
    if 'global_step' in shapes and not shapes['global_step']:
      global_step = int(reader.get_tensor('global_step'))
  return OfficialWeights(
      params=params, batch_stats=batch_stats, num_classes=num_classes,
      architecture=architecture, model_name=model_name,
      release=release_of(num_classes, hints), ema_tensors=from_ema,
      global_step=global_step)


def from_official(source: str | os.PathLike,
                  variant: arch_lib.Architecture | str | None = None, *,
                  use_ema: bool = True, **model_kwargs):
  """An EfficientNetV2 holding an official google/automl checkpoint.

  Args:
    source: .tgz release, its directory, or a TF checkpoint prefix.
    variant: 's', ..., 'b3' (or an Architecture); None infers it.
    use_ema: prefer the EMA copies (what the official evaluation uses).
    **model_kwargs: `create_model` options (dtype, conv_impl, ...).

  Raises:
    ConversionError: one line naming the first tensor that does not fit.
  """
  return official_variables(source, variant,
                            use_ema=use_ema).to_model(**model_kwargs)
