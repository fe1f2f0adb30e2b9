"""Multiply-accumulates of an EfficientNetV2 forward pass, from its description.

The count walks an `arch.Architecture` at one image size; it needs no model,
no compiler and no accelerator. It follows the convention of the reference
figures in `arch.REFERENCE_GMACS` (S: 5.31 G at 300 px, 8.38 G at 384 px),
which it reproduces to their printed digits for all eight variants at the
train and eval sizes:

- a convolution costs output pixels x kernel taps x input channels x output
  channels (a depthwise one: x channels once), every tap counted, taps over
  the TF-'SAME' padding included, as TensorFlow's profiler counts Conv2D and
  DepthwiseConv2dNative in the official code;
- squeeze-excite costs its two 1x1 convolutions on the pooled vector plus one
  multiply per feature-map element (the gate);
- the classifier costs width x classes;
- BatchNorm, activations, residual adds and pooling cost nothing.

The official training logs (`model/flops`, TensorFlow's profiler over the
whole graph, divided by 2) count element-wise ops too and read about 0.4%
higher (the google/automl README's 8.4B, 24.7B and 56.3B for S, M and L).

With `padding_taps=False` a convolution counts only the taps that land inside
the image, which is how XLA's cost analysis counts its convolutions; the
difference between the two is the padding's share.
"""

from __future__ import annotations

import dataclasses

from effnetv2_jax.models import arch as arch_lib

PARTS = ('stem', 'expand', 'depthwise', 'se', 'project', 'head', 'classifier')


@dataclasses.dataclass(frozen=True)
class MacCount:
  """MACs of one image's forward pass, by part of the network.

  `expand` holds MBConv's 1x1 expansions and Fused-MBConv's k x k
  convolution (its only convolution when the expansion ratio is 1);
  `project` the 1x1 projections back to the block's output width.
  """

  stem: int = 0
  expand: int = 0
  depthwise: int = 0
  se: int = 0
  project: int = 0
  head: int = 0
  classifier: int = 0

  @property
  def blocks(self) -> int:
    return self.expand + self.depthwise + self.se + self.project

  @property
  def total(self) -> int:
    return self.stem + self.blocks + self.head + self.classifier

  def __add__(self, other: 'MacCount') -> 'MacCount':
    return MacCount(**{p: getattr(self, p) + getattr(other, p) for p in PARTS})

  def as_dict(self) -> dict[str, int]:
    """The parts, then `blocks` and `total`, as plain ints."""
    d = {p: getattr(self, p) for p in PARTS}
    d['blocks'] = self.blocks
    d['total'] = self.total
    return d


def output_size(size: int, stride: int) -> int:
  """TF-'SAME' output size: ceil(size / stride)."""
  return -(-size // stride)


def kernel_taps(size: int, kernel: int, stride: int, *,
                padding_taps: bool = True) -> int:
  """Kernel taps summed over the outputs along one spatial dimension.

  With `padding_taps=False`, only taps on input pixels count. TF-'SAME'
  pads (total // 2) before and the rest after.
  """
  out = output_size(size, stride)
  if padding_taps:
    return out * kernel
  before = max((out - 1) * stride + kernel - size, 0) // 2
  taps = 0
  for i in range(out):
    first = i * stride - before
    taps += min(first + kernel, size) - max(first, 0)
  return taps


def conv_macs(size: int, kernel: int, stride: int, in_channels: int,
              out_channels: int, *, depthwise: bool = False,
              padding_taps: bool = True) -> int:
  """MACs of one convolution on a `size` x `size` map (batch 1).

  A depthwise convolution has `in_channels == out_channels` and costs one
  channel's taps per output channel.
  """
  taps = kernel_taps(size, kernel, stride, padding_taps=padding_taps) ** 2
  return taps * (out_channels if depthwise else in_channels * out_channels)


def block_macs(block: arch_lib.BlockSpec, size: int, *,
               padding_taps: bool = True) -> MacCount:
  """MACs of one (Fused-)MBConv block whose input map is `size` x `size`."""
  k, s = block.kernel_size, block.stride
  out = output_size(size, s)
  expand = depthwise = project = 0
  if block.fused:
    width = (block.out_channels if block.expand_ratio == 1
             else block.mid_channels)
    expand = conv_macs(size, k, s, block.in_channels, width,
                       padding_taps=padding_taps)
  else:
    width = block.mid_channels
    if block.expand_ratio != 1:
      expand = conv_macs(size, 1, 1, block.in_channels, width)
    depthwise = conv_macs(size, k, s, width, width, depthwise=True,
                          padding_taps=padding_taps)
  if not block.fused or block.expand_ratio != 1:
    project = conv_macs(out, 1, 1, width, block.out_channels)
  se = 0
  if block.se_channels:
    se = 2 * width * block.se_channels + out * out * width
  return MacCount(expand=expand, depthwise=depthwise, se=se, project=project)


def count_macs(architecture: arch_lib.Architecture | str, image_size: int,
               num_classes: int = 1000, *,
               padding_taps: bool = True) -> MacCount:
  """MACs of one image's forward pass at `image_size` x `image_size`.

  Args:
    architecture: an `arch.Architecture` or a variant name ('s', 'b0', ...).
    image_size: input height and width in pixels.
    num_classes: classifier outputs.
    padding_taps: count kernel taps over the 'SAME' padding (the reference
      convention); False counts only taps inside the image (XLA's).

  Returns:
    A `MacCount`; `.total` is the whole forward pass.
  """
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  elif not isinstance(architecture, arch_lib.Architecture):
    raise TypeError('architecture must be a variant name or an Architecture, '
                    f'got {type(architecture).__name__}')
  for name, value in (('image_size', image_size), ('num_classes', num_classes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')
  stem = conv_macs(image_size, 3, 2, 3, architecture.stem_channels,
                   padding_taps=padding_taps)
  total = MacCount(stem=stem)
  size = output_size(image_size, 2)
  for stage in architecture.stage_blocks():
    for block in stage:
      total += block_macs(block, size, padding_taps=padding_taps)
      size = output_size(size, block.stride)
  last = architecture.stage_blocks()[-1][-1].out_channels
  head_width = architecture.head_width
  return total + MacCount(
      head=conv_macs(size, 1, 1, last, head_width),
      classifier=head_width * num_classes)
