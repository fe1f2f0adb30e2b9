"""`python -m effnetv2_jax.tables`."""

import sys

from effnetv2_jax.tables.cli import main

sys.exit(main())
