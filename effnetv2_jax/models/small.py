"""The repository's own small networks: the quickstart's and the test runs'.

`configs/digits.py` and `configs/tiny.py` train them and the benchmarks time
them (`--variant digits`, `--variant tiny`); both read them from here, a
module that needs no ml_collections, so there is one definition of each.
"""

from __future__ import annotations

from effnetv2_jax.models import arch as arch_lib

# EfficientNetV2-S at a quarter of its width and depth (12 blocks, a 128-wide
# head) for 32 px images: the digits quickstart.
DIGITS = arch_lib.scaled(
    arch_lib.get_architecture('s'), width=0.25, depth=0.25,
    head_channels=128, name='s_digits').replace(
        train_size=32, eval_size=32, dropout_rate=0.2)

# Two stages of 8-16 channels: seconds-long runs for tests and smoke checks.
TINY = arch_lib.Architecture(
    name='tiny',
    stages=(arch_lib.parse_block_string('r1_k3_s1_e1_i8_o8_c1'),
            arch_lib.parse_block_string('r2_k3_s2_e2_i8_o16_se0.25')),
    head_channels=32, dropout_rate=0.1, train_size=24, eval_size=32,
    normalization='inception')

ARCHITECTURES = {'digits': DIGITS, 'tiny': TINY}
