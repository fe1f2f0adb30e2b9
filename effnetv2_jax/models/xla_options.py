"""XLA compiler options that pay for this model, per backend.

They are passed per compilation (`compile_lowered`, or `jax.jit(...,
compiler_options=compiler_options())`) rather than through XLA_FLAGS: they
then apply to our programs only, and work in a process whose backend already
started (a Colab kernel, a test session).
"""

from __future__ import annotations

import logging

import jax

_YNN_FUSION_TYPES = 'xla_cpu_experimental_ynn_fusion_type'

# XLA:CPU (jaxlib 0.10) gives dots, reductions and convolutions to YNNPACK.
# Its convolutions are the slow part of a CPU train step: the kernel gradient
# of a dense 3x3 convolution (a convolution whose window is the whole image)
# ran at 3-6 GMAC/s, the 3-channel stem at 1.4. So convolutions stay with XLA
# and only dots and reductions go to YNNPACK (S train steps at 128 px 5-15%
# faster than the defaults); YNNPACK element-wise fusions are left off, as
# they made the step 30% slower (benchmarks/README.md, "XLA:CPU compiler
# options").
CPU_OPTIONS = {
    _YNN_FUSION_TYPES: 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}

# XLA:GPU: cuBLAS rather than Triton for the GEMMs (the 1x1 convolutions),
# 5% faster S train steps at 300 px, batch 128, bf16 on an H100
# (benchmarks/README.md, GPU findings).
GPU_OPTIONS = {'xla_gpu_enable_triton_gemm': False}

# The names `jax.default_backend()` gives a GPU.
GPU_BACKENDS = ('gpu', 'cuda', 'rocm')

_warned: set[str] = set()


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """The options for `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return dict(CPU_OPTIONS)
  if backend in GPU_BACKENDS:
    return dict(GPU_OPTIONS)
  return {}


def compile_lowered(lowered, backend: str | None = None):
  """`lowered.compile()` with `compiler_options(backend)`.

  An XLA that does not know an option (another jaxlib than the pinned one)
  compiles without them, with one warning, rather than failing.
  """
  options = compiler_options(backend)
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    if not any(name in str(e) for name in options):
      raise
    key = str(e).split('\n')[0]
    if key not in _warned:
      _warned.add(key)
      logging.warning('XLA rejected effnetv2_jax compiler options (%s); '
                      'compiling with defaults.', key)
    return lowered.compile()
