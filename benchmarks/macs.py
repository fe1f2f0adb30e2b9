"""Multiply-accumulates of an EfficientNetV2 forward pass, from the architecture.

XLA's cost analysis on GPU leaves out convolutions that run as cuDNN calls, so
model FLOP utilisation and the progressive-learning prediction count from the
architecture table instead: convolutions (every kernel tap, padding included),
squeeze-excite and the classifier; BN, activations and adds are not counted.
This is the convention of the official `model/flops` figures (S: 5.31 G at
300 px, 8.38 G at 384 px).
"""

from __future__ import annotations

from effnetv2_jax.models import arch as arch_lib


def _out(size: int, stride: int) -> int:
  return -(-size // stride)  # TF 'SAME': ceil(size / stride)


def forward_macs(architecture: arch_lib.Architecture | str, image_size: int,
                 num_classes: int = 1000) -> int:
  """MACs of one image's forward pass at `image_size` x `image_size`."""
  if isinstance(architecture, str):
    architecture = arch_lib.get_architecture(architecture)
  size = _out(image_size, 2)
  stem = architecture.stem_channels
  macs = size * size * 9 * 3 * stem
  for stage in architecture.stage_blocks():
    for block in stage:
      out = _out(size, block.stride)
      k2 = block.kernel_size ** 2
      if block.fused:
        width = (block.out_channels if block.expand_ratio == 1
                 else block.mid_channels)
        macs += out * out * k2 * block.in_channels * width
        if block.expand_ratio != 1:
          macs += out * out * width * block.out_channels
      else:
        width = block.mid_channels
        if block.expand_ratio != 1:
          macs += size * size * block.in_channels * width
        macs += out * out * k2 * width
        macs += out * out * width * block.out_channels
      if block.se_channels:
        macs += 2 * width * block.se_channels
      size = out
  last = architecture.stage_blocks()[-1][-1].out_channels
  head = architecture.head_width
  macs += size * size * last * head + head * num_classes
  return macs


def train_flops(architecture, image_size: int, num_classes: int = 1000) -> int:
  """FLOPs of one image's train step: forward + backward = 3 x 2 x MACs."""
  return 6 * forward_macs(architecture, image_size, num_classes)


def inference_flops(architecture, image_size: int,
                    num_classes: int = 1000) -> int:
  return 2 * forward_macs(architecture, image_size, num_classes)
