"""The paper's tables beside ours, from this code, on the present device.

    python -m effnetv2_jax.tables params       # Table 7: params, FLOPs
    python -m effnetv2_jax.tables fused        # Table 3: Fused-MBConv in B4
    python -m effnetv2_jax.tables progressive  # Table 6: progressive settings
    python -m effnetv2_jax.tables speed        # training images/s here
    python -m effnetv2_jax.tables imagenet     # Table 7: top-1, commands
    python -m effnetv2_jax.tables transfer     # Table 8: top-1, commands
    python -m effnetv2_jax.tables record WORKDIR  # a finished run's top-1

Each prints a text table, or with --markdown / --json the README's markdown
or the rows. One module per table; the published figures are in `paper`,
the recorded runs in `registry`. Nothing here chooses the JAX platform: the
tables run on the default device, and XLA's MAC count (params) compiles for
the CPU backend explicitly.
"""

from effnetv2_jax.tables.cli import main
from effnetv2_jax.tables.params import (format_params_markdown,
                                        format_params_table, macs_row,
                                        params_table, xla_macs)

__all__ = ['main', 'format_params_markdown', 'format_params_table',
           'macs_row', 'params_table', 'xla_macs']
