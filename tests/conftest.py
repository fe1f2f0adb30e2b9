"""Test-wide setup: eight fake CPU devices, so sharded code is exercised.

XLA reads the flag once, when the backend starts, so it must be set before any
test module imports jax.
"""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
      _flags + ' --xla_force_host_platform_device_count=8').strip()
# TensorFlow must never grab an accelerator or spawn many threads in tests.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
