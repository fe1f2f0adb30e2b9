"""Dense and depthwise convolutions on CPU through oneDNN, as XLA custom calls.

XLA:CPU (jaxlib 0.10) convolves with Eigen, which is slowest exactly where an
EfficientNetV2 trains on a CPU: the kernel gradients of the narrow 3x3
convolutions of the Fused-MBConv stages, the stem, and (written as shifted
multiply-adds) the depthwise convolutions. oneDNN is the library PyTorch uses
for the same work. Per-shape and whole-step figures: benchmarks/README.md.

`onednn_conv.cc`, beside this file, holds the XLA FFI handlers: forward,
input gradient, kernel gradient, and a forward with a bias and SiLU applied
as the output is written (eval-mode BatchNorm folded in: `conv2d_bias`).
The first `status()` of a process compiles it with the system's C++
compiler against oneDNN (the `onednn-cpu-gomp` wheel, a dependency on Linux
x86-64, or `EFFNETV2_ONEDNN_ROOT`) and jaxlib's FFI headers, caches the
library under a key of everything the build depends on
(`EFFNETV2_CACHE_DIR`, default `~/.cache/effnetv2_jax`), and registers the
handlers with XLA. Nothing is required: when oneDNN, the compiler or the
build is missing, `status()` says why and `conv_impl='auto'` keeps the other
CPU convolutions (`effnetv2_jax.kernels`).

Threads: oneDNN runs on OpenMP threads of its own, beside XLA's, which may
run other operations at the same time; a team that cannot get every core
then waits at its barriers, which costs a small call many times its work.
So a call with fewer than `EFFNETV2_ONEDNN_SERIAL_MACS` multiply-adds
(default 16 Mi) runs on the calling thread alone, and larger ones on every
core.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name('onednn_conv.cc')
_TARGETS = {  # XLA custom-call target -> symbol in the built library
    'effnetv2_onednn_conv_forward': 'Effnetv2ConvForward',
    'effnetv2_onednn_conv_forward_bias': 'Effnetv2ConvForwardBias',
    'effnetv2_onednn_conv_input_grad': 'Effnetv2ConvInputGrad',
    'effnetv2_onednn_conv_kernel_grad': 'Effnetv2ConvKernelGrad',
}
_BUILD_TIMEOUT_S = 600


class OneDnnUnavailable(RuntimeError):
  """The oneDNN convolutions were asked for but cannot be used here."""


class OneDnnNotInstalled(OneDnnUnavailable):
  """No oneDNN >= 3 on this machine (expected off Linux x86-64)."""


@dataclasses.dataclass(frozen=True)
class Status:
  available: bool
  reason: str  # why not, or what was loaded
  library: Path | None = None


@dataclasses.dataclass(frozen=True)
class OneDnn:
  include_dir: Path
  library: Path  # libdnnl.so*
  version: str


def _candidate_roots() -> list[Path]:
  if os.environ.get('EFFNETV2_ONEDNN_ROOT'):
    return [Path(os.environ['EFFNETV2_ONEDNN_ROOT'])]
  # The wheel installs into the environment's prefix (its .data/data tree).
  roots = [sys.prefix, sysconfig.get_paths()['data'], sys.base_prefix,
           '/usr/local', '/usr']
  return list(dict.fromkeys(Path(r) for r in roots))


def _read_version(header: Path) -> tuple[int, int, int] | None:
  text = header.read_text(errors='replace')
  parts = [re.search(rf'#define\s+DNNL_VERSION_{name}\s+(\d+)', text)
           for name in ('MAJOR', 'MINOR', 'PATCH')]
  if not all(parts):
    return None
  return tuple(int(p.group(1)) for p in parts)


def find_onednn() -> OneDnn:
  """The first oneDNN >= 3 with headers and a shared library; else raises."""
  seen = []
  for root in _candidate_roots():
    header = root / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h'
    if not header.is_file():
      continue
    version = _read_version(header)
    libraries = [d / name for d in (root / 'lib', root / 'lib64',
                                    root / 'lib' / 'x86_64-linux-gnu')
                 for name in ('libdnnl.so', 'libdnnl.so.3')
                 if (d / name).exists()]
    if version is None or version[0] < 3 or not libraries:
      seen.append(f'{root} (version {version}, library '
                  f'{"found" if libraries else "missing"})')
      continue
    return OneDnn(root / 'include', libraries[0],
                  '.'.join(map(str, version)))
  detail = f'; unusable: {", ".join(seen)}' if seen else ''
  raise OneDnnNotInstalled(
      'oneDNN >= 3.0 not found (pip install onednn-cpu-gomp '
      'onednn-devel-cpu-gomp, or set EFFNETV2_ONEDNN_ROOT)' + detail)


def find_compiler() -> str:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  raise OneDnnUnavailable('no C++ compiler (set CXX, or install g++)')


def cache_dir() -> Path:
  if os.environ.get('EFFNETV2_CACHE_DIR'):
    return Path(os.environ['EFFNETV2_CACHE_DIR'])
  base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(base) / 'effnetv2_jax'


def _compile_command(compiler: str, onednn: OneDnn, output: Path) -> list[str]:
  return [compiler, '-O2', '-std=c++17', '-shared', '-fPIC',
          '-w',  # XLA's FFI headers warn under GCC; ours would show anyway
          f'-I{jax.ffi.include_dir()}', f'-I{onednn.include_dir}',
          str(SOURCE), '-o', str(output), str(onednn.library),
          f'-Wl,-rpath,{onednn.library.parent}']


def library_path(compiler: str, onednn: OneDnn) -> Path:
  """Where the build for this source, jaxlib, oneDNN and compiler lives."""
  version = subprocess.run([compiler, '--version'], capture_output=True,
                           text=True, check=False).stdout.split('\n')[0]
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(),
               onednn.version.encode(), str(onednn.library).encode(),
               version.encode(),
               ' '.join(_compile_command(compiler, onednn, Path())).encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'onednn_conv-{key.hexdigest()[:16]}.so'


def build(compiler: str, onednn: OneDnn, output: Path) -> Path:
  """Compiles the handlers to `output` (atomically: concurrent builders of
  the same key, pytest workers say, each write a file of their own)."""
  output.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=output.parent)
  os.close(fd)
  logging.info('effnetv2_jax: compiling the oneDNN convolutions (once; a '
               'few seconds) into %s', output)
  try:
    result = subprocess.run(_compile_command(compiler, onednn, Path(tmp)),
                            capture_output=True, text=True,
                            timeout=_BUILD_TIMEOUT_S, check=False)
    if result.returncode != 0:
      lines = result.stderr.strip().split('\n')
      # The first errors explain; what follows them is mostly fallout.
      errors = [line for line in lines if 'error' in line] or lines[-5:]
      raise OneDnnUnavailable(
          f'compiling {SOURCE.name} failed ({compiler}, exit '
          f'{result.returncode}):\n' + '\n'.join(errors[:6]))
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return output


_lock = threading.Lock()
_status: Status | None = None
# XLA takes one handler per target name for the life of the process, so the
# first library that loads is the one registered; it is kept referenced
# because XLA holds its function pointers.
_registered: ctypes.CDLL | None = None


def _load(path: Path) -> None:
  """Opens the built library (OSError if it is not one) and registers its
  handlers, unless a library registered them already in this process."""
  global _registered
  library = ctypes.CDLL(str(path))
  try:
    handlers = {name: getattr(library, symbol)
                for name, symbol in _TARGETS.items()}
  except AttributeError as e:
    raise OSError(f'{path} lacks a handler: {e}') from e
  if _registered is None:
    for name, handler in handlers.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler),
                                  platform='cpu')
    _registered = library


def status() -> Status:
  """Builds (first time), loads and registers the kernels; says how it went.

  Memoized for the process: a failure is not retried until `reset()`.
  """
  global _status
  with _lock:
    if _status is not None:
      return _status
    path = None
    try:
      _check_serial_macs()
      onednn = find_onednn()
      compiler = find_compiler()
      path = library_path(compiler, onednn)
      if not path.exists():
        build(compiler, onednn, path)
      try:
        _load(path)
      except OSError:
        # A cached file another process cut short, or a foreign one.
        path.unlink(missing_ok=True)
        _load(build(compiler, onednn, path))
      _status = Status(True, f'oneDNN {onednn.version} from '
                       f'{onednn.library.parent}', path)
    except (OneDnnUnavailable, OSError, subprocess.SubprocessError) as e:
      _status = Status(False, str(e), path)
      # A oneDNN that is there but does not build is worth a warning; a
      # platform without it (macOS, ARM) is not.
      quiet = isinstance(e, OneDnnNotInstalled)
      (logging.info if quiet else logging.warning)(
          'effnetv2_jax: oneDNN convolutions unavailable, using XLA\'s: %s',
          e)
    return _status


def reset() -> None:
  """Forget `status()` (tests; after installing oneDNN in a live process).
  Handlers already registered stay registered."""
  global _status
  with _lock:
    _status = None


def require() -> None:
  """Raises OneDnnUnavailable, saying why, unless the kernels can run."""
  if jax.default_backend() != 'cpu':
    raise OneDnnUnavailable(
        "conv_impl='onednn' runs on CPU; the default backend is "
        f"{jax.default_backend()} (use 'auto' or 'xla')")
  current = status()
  if not current.available:
    raise OneDnnUnavailable(
        f"conv_impl='onednn' needs the oneDNN convolutions: {current.reason}")


SERIAL_MACS_VARIABLE = 'EFFNETV2_ONEDNN_SERIAL_MACS'


def _check_serial_macs() -> None:
  """The handlers read this variable themselves (atoll: a typo would be 0)."""
  value = os.environ.get(SERIAL_MACS_VARIABLE)
  if value is not None and not value.strip().isdigit():
    raise OneDnnUnavailable(
        f'{SERIAL_MACS_VARIABLE} must be a whole number of multiply-adds '
        f'(calls below it run on one thread), got {value!r}')


def export_exemptions() -> list:
  """`disabled_checks` for `jax.export.export` of a program that calls these
  kernels: JAX serializes only custom calls it guarantees, and these are
  ours. The export then holds this version's target names and attributes;
  the process that runs it must call `status()` first, which registers them.
  """
  return [jax.export.DisabledSafetyCheck.custom_call(name)
          for name in _TARGETS]


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]):
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def _attributes(strides, padding, groups):
  (top, bottom), (left, right) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_left=np.int64(left),
              pad_bottom=np.int64(bottom), pad_right=np.int64(right),
              groups=np.int64(groups))


def _call(target: str, shape, *operands, strides, padding, groups,
          **extra_attributes):
  return jax.ffi.ffi_call(
      target, jax.ShapeDtypeStruct(shape, np.float32),
      vmap_method='sequential')(*operands,
                                **_attributes(strides, padding, groups),
                                **extra_attributes)


def _check_float32(*arrays):
  if any(a.dtype != np.float32 for a in arrays):
    raise TypeError('the oneDNN convolutions take float32 inputs, got '
                    + ', '.join(str(a.dtype) for a in arrays))


def _output_shape(x, kernel, strides, padding):
  return (x.shape[0],
          output_size(x.shape[1], kernel.shape[0], strides[0], padding[0]),
          output_size(x.shape[2], kernel.shape[1], strides[1], padding[1]),
          kernel.shape[3])


def conv2d(x, kernel, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]], groups: int = 1):
  """`lax.conv_general_dilated(x, kernel, strides, padding,
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)` through oneDNN.

  float32 only; differentiable in x and kernel. Call `require()` (or check
  `status()`) first: tracing does not build the library.
  """
  _check_float32(x, kernel)
  return _conv(x, kernel, tuple(strides),
               tuple(tuple(p) for p in padding), groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
  return _call('effnetv2_onednn_conv_forward',
               _output_shape(x, kernel, strides, padding), x, kernel,
               strides=strides, padding=padding, groups=groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  return _conv(x, kernel, strides, padding, groups), (x, kernel)


def _input_and_kernel_grads(x, kernel, dy, settings):
  dx = _call('effnetv2_onednn_conv_input_grad', x.shape, dy, kernel,
             **settings)
  depthwise = settings['groups'] > 1 and kernel.shape[2] == 1
  if depthwise and (x.shape[1] < kernel.shape[0]
                    or x.shape[2] < kernel.shape[1]):
    # On maps smaller than the kernel (the last stages of small images)
    # oneDNN 3.2 drops its depthwise kernel for a much slower grouped one
    # that pads each channel to 16 x 16 blocks. With the padding applied
    # beforehand the map is no smaller than the kernel, and the sums are the
    # same.
    x = jax.numpy.pad(x, ((0, 0), settings['padding'][0],
                          settings['padding'][1], (0, 0)))
    settings = dict(settings, padding=((0, 0), (0, 0)))
  dkernel = _call('effnetv2_onednn_conv_kernel_grad', kernel.shape, x, dy,
                  **settings)
  return dx, dkernel


def _conv_bwd(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  return _input_and_kernel_grads(
      x, kernel, dy, dict(strides=strides, padding=padding, groups=groups))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d_bias(x, kernel, bias, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]],
                groups: int = 1, silu: bool = False):
  """`conv2d(...) + bias`, then SiLU when `silu`, in one pass: oneDNN adds
  the bias and applies the activation as it writes the output.

  For eval-mode BatchNorm folded into the kernel (scaled per output channel)
  and the bias. Differentiable: the backward recomputes the pre-activation,
  so nothing beyond the inputs is kept.
  """
  _check_float32(x, kernel, bias)
  return _conv_bias(x, kernel, bias, tuple(strides),
                    tuple(tuple(p) for p in padding), groups, bool(silu))


def _conv_bias_call(x, kernel, bias, strides, padding, groups, silu):
  return _call('effnetv2_onednn_conv_forward_bias',
               _output_shape(x, kernel, strides, padding), x, kernel, bias,
               strides=strides, padding=padding, groups=groups,
               silu=np.int64(silu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv_bias(x, kernel, bias, strides, padding, groups, silu):
  return _conv_bias_call(x, kernel, bias, strides, padding, groups, silu)


def _conv_bias_fwd(x, kernel, bias, strides, padding, groups, silu):
  return (_conv_bias(x, kernel, bias, strides, padding, groups, silu),
          (x, kernel, bias))


def _conv_bias_bwd(strides, padding, groups, silu, residuals, dy):
  x, kernel, bias = residuals
  if silu:
    z = _conv_bias_call(x, kernel, bias, strides, padding, groups, False)
    gate = jax.nn.sigmoid(z)
    dy = dy * gate * (1 + z * (1 - gate))
  dx, dkernel = _input_and_kernel_grads(
      x, kernel, dy, dict(strides=strides, padding=padding, groups=groups))
  return dx, dkernel, dy.sum(axis=(0, 1, 2))


_conv_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)
