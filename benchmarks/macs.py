"""FLOPs of an EfficientNetV2 train step or forward pass, from the architecture.

Model FLOP utilisation and the progressive-learning prediction count from the
architecture (`effnetv2_jax/models/macs.py`: convolutions with every kernel
tap, squeeze-excite and the classifier, the convention of the official
figures, e.g. S 5.31 G MACs at 300 px, 8.38 G at 384 px), not from XLA's cost
analysis: that gives custom calls (cuDNN on GPU, oneDNN on CPU) no cost.
"""

from __future__ import annotations

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import macs as macs_lib


def forward_macs(architecture: arch_lib.Architecture | str, image_size: int,
                 num_classes: int = 1000) -> int:
  """MACs of one image's forward pass at `image_size` x `image_size`."""
  return macs_lib.count_macs(architecture, image_size, num_classes).total


def train_flops(architecture, image_size: int, num_classes: int = 1000) -> int:
  """FLOPs of one image's train step: forward + backward = 3 x 2 x MACs."""
  return 6 * forward_macs(architecture, image_size, num_classes)


def inference_flops(architecture, image_size: int,
                    num_classes: int = 1000) -> int:
  """FLOPs of one image's forward pass: 2 x MACs."""
  return 2 * forward_macs(architecture, image_size, num_classes)
