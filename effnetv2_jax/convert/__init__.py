"""Weight converters from timm and Keras EfficientNetV2 checkpoints.

    from effnetv2_jax.convert import from_timm, from_keras
    from effnetv2_jax.models import weights
    model = from_timm('tf_efficientnetv2_s.safetensors', 's')
    weights.save_model('effnetv2_s', model, source='timm')

or on the command line:

    python -m effnetv2_jax.convert --from timm --input FILE --variant s \
        --output DIR

Importing this package imports neither torch, timm, keras nor tensorflow;
reading a torch file imports torch on demand.
"""

from effnetv2_jax.convert.keras import from_keras, keras_variables
from effnetv2_jax.convert.mapping import ConversionError, model_layers
from effnetv2_jax.convert.timm import from_timm, timm_variables

__all__ = ['ConversionError', 'from_keras', 'from_timm', 'keras_variables',
           'model_layers', 'timm_variables']
