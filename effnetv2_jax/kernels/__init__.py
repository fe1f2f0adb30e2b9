"""How the layers' convolutions run: the convolution implementations.

`models/layers.py` says what each layer computes; an implementation says
how, and a layer takes one at construction from its `conv_impl` and compute
dtype (`choose_conv_impl`):

- 'xla': XLA's convolutions; the form for GPU/TPU and the reference.
- 'shifted': depthwise convolutions as k*k shifted multiply-adds with a
  written-out backward (`depthwise.py`; XLA:CPU's grouped convolution is
  10-50x slower), dense ones by XLA.
- 'onednn': depthwise and dense k x k convolutions as oneDNN custom calls
  (CPU, float32; `onednn.py`), and in eval mode a following BatchNorm folded
  into the call.
- 'auto': 'xla' on GPU/TPU; on CPU 'onednn' where it builds, else 'shifted'.

1x1 stride-1 convolutions are matmuls in every form (`pointwise.py`), except
eval-mode ones with their BatchNorm folded under 'onednn' on large maps.
The training BatchNorm's written-out backward is `batch_norm.py`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from effnetv2_jax.kernels import depthwise, onednn, pointwise
from effnetv2_jax.kernels.padding import same_padding

CONV_IMPLS = ('auto', 'xla', 'shifted', 'onednn')

# Eval-mode 1x1 convolutions with at least this many output rows (batch x
# height x width) run as oneDNN convolutions with the BN folded in; smaller
# ones stay XLA dots, which fuse the neighbouring BN, SE gate and residual
# work and are faster there (benchmarks/README.md, the 1x1 threshold's
# A/B table).
ONEDNN_POINTWISE_MIN_ROWS = 1536


def check_conv_impl(impl: str, dtype) -> None:
  """Fails on a bad name or an impossible pairing, naming the choices."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl == 'onednn' and jnp.dtype(dtype) != jnp.float32:
    raise ValueError("conv_impl='onednn' computes in float32; got dtype "
                     f"{jnp.dtype(dtype).name} (use 'auto' or 'xla')")


def resolve_conv_impl(impl: str, dtype=jnp.float32) -> str:
  """The implementation `impl` names here, for compute `dtype`: 'auto'
  resolved to 'xla', 'shifted' or 'onednn' (see the module docstring)."""
  check_conv_impl(impl, dtype)
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  # With several CPU devices (the fake test mesh) XLA's partitioner would
  # all-gather a custom call's operands and run it on every device.
  if (jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1
      and onednn.status().available):
    return 'onednn'
  return 'shifted'


def describe_conv_impl(impl: str, dtype=jnp.float32) -> str:
  """What `impl` resolves to here, and why, for logs and benchmark tables."""
  resolved = resolve_conv_impl(impl, dtype)
  if resolved == 'onednn':
    return f'onednn ({onednn.status().reason})'
  if impl != 'auto' or jax.default_backend() != 'cpu':
    return resolved
  if jnp.dtype(dtype) != jnp.float32:
    why = f'{jnp.dtype(dtype).name} compute'
  elif jax.device_count() > 1:
    why = f'{jax.device_count()} CPU devices'
  else:
    why = onednn.status().reason
  return f'{resolved} (not onednn: {why})'


def choose_conv_impl(impl: str, dtype=jnp.float32) -> ConvImpl:
  """The implementation object for `impl` ('auto' resolved now)."""
  return _IMPLS[resolve_conv_impl(impl, dtype)]


def is_pointwise(kernel_shape, stride: int) -> bool:
  """Whether a dense convolution is a matmul over the channels."""
  return tuple(kernel_shape[:2]) == (1, 1) and stride == 1


# Frozen dataclasses: the layers keep their implementation as a static
# attribute, which must hash and compare by value.
@dataclasses.dataclass(frozen=True)
class ConvImpl:
  """A convolution implementation; this base is 'xla', XLA's convolutions,
  and the others replace some of its methods.

  Activations are NHWC in the compute dtype; kernels HWIO (depthwise:
  (k, k, 1, C)) as stored, cast to the activations' dtype here; padding is
  TF-'SAME'.
  """
  name: ClassVar[str] = 'xla'

  def dense(self, x, kernel, stride: int):
    """A dense convolution; 1x1 stride-1 ones as matmuls."""
    if is_pointwise(kernel.shape, stride):
      return pointwise.conv(x, kernel[0, 0].astype(x.dtype))
    return self._dense_spatial(x, kernel.astype(x.dtype), stride)

  def _dense_spatial(self, x, kernel, stride: int):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def depthwise(self, x, kernel, stride: int):
    return depthwise.xla_conv(x, kernel.astype(x.dtype), stride)

  def folds_batch_norm(self, x_shape, *, pointwise: bool) -> bool:
    """Whether an eval-mode BatchNorm after this convolution of an input
    of `x_shape` runs folded into it (`conv_bias`)."""
    del x_shape, pointwise
    return False

  def conv_bias(self, x, kernel, bias, stride: int, groups: int,
                silu: bool):
    """The convolution plus a per-channel `bias`, then SiLU when `silu`, as
    one call; only where `folds_batch_norm` says so."""
    raise NotImplementedError(f'{self.name} convolutions fold no BatchNorm')


@dataclasses.dataclass(frozen=True)
class ShiftedConv(ConvImpl):
  """XLA's dense convolutions; depthwise ones as shifted multiply-adds."""
  name: ClassVar[str] = 'shifted'

  def depthwise(self, x, kernel, stride: int):
    return depthwise.shifted_conv(x, kernel.astype(x.dtype), stride)


@dataclasses.dataclass(frozen=True)
class OneDnnConv(ConvImpl):
  """Depthwise and dense k x k convolutions through oneDNN (CPU, float32).

  In eval mode a BatchNorm after any of them, and after 1x1 convolutions
  on maps of `ONEDNN_POINTWISE_MIN_ROWS` rows or more, is folded into the
  kernel and a bias, with its SiLU applied as oneDNN writes the output:
  one pass over the activations instead of two or three.
  """
  name: ClassVar[str] = 'onednn'

  def _dense_spatial(self, x, kernel, stride: int):
    return self._call(x, kernel, stride, groups=1)

  def depthwise(self, x, kernel, stride: int):
    return self._call(x, kernel.astype(x.dtype), stride, groups=x.shape[-1])

  def folds_batch_norm(self, x_shape, *, pointwise: bool) -> bool:
    if not pointwise:
      return True
    return x_shape[0] * x_shape[1] * x_shape[2] >= ONEDNN_POINTWISE_MIN_ROWS

  def conv_bias(self, x, kernel, bias, stride: int, groups: int,
                silu: bool):
    return self._call(x, kernel, stride, groups, bias=bias, silu=silu)

  @staticmethod
  def _call(x, kernel, stride: int, groups: int, bias=None,
            silu: bool = False):
    onednn.require()
    padding = tuple(same_padding(size, k, stride)
                    for size, k in zip(x.shape[1:3], kernel.shape[:2]))
    if bias is None:
      return onednn.conv2d(x, kernel, (stride, stride), padding, groups)
    return onednn.conv2d_bias(x, kernel, bias, (stride, stride), padding,
                              groups, silu)


_IMPLS = {impl.name: impl for impl in (ConvImpl(), ShiftedConv(), OneDnnConv())}
