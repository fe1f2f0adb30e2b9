"""EfficientNetV2 models: the architecture table and the Flax NNX modules."""

from effnetv2_jax.models import arch
from effnetv2_jax.models.efficientnetv2 import (EfficientNetV2, FusedMBConv,
                                                MBConv, count_params,
                                                create_model, param_rngs)

__all__ = ['arch', 'EfficientNetV2', 'FusedMBConv', 'MBConv', 'count_params',
           'create_model', 'param_rngs']
