"""EfficientNetV2 in JAX/Flax NNX: models, progressive training, converters.

Importing the package is cheap: no tensorflow, tfds, clu or ml_collections
until a submodule that needs them is imported (the trainer, the input
pipeline).
"""

__version__ = '0.1.0'
