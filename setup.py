"""effnetv2_jax: EfficientNetV2 in JAX/Flax NNX with progressive learning.

Versions are pinned to the set tested together (see README, "Tested stack").
torch and torchvision are pinned side by side on purpose: an unpinned
torchvision pulls a CUDA torch and gigabytes of nvidia wheels.
"""

import setuptools

LINUX_X86_64 = 'platform_system == "Linux" and platform_machine == "x86_64"'

CORE = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'clu==0.0.12',
    'ml-collections==1.1.0',
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    # clu's TensorBoard writer imports tensorboard, which tensorflow-cpu
    # 2.21 does not install.
    'tensorboard==2.21.0',
    'numpy==2.4.6',
    'ml-dtypes==0.6.0',
    'protobuf==7.36.2',
    'pillow==13.0.0',
    'scikit-learn==1.9.1',
    'matplotlib==3.11.2',
    'tqdm==4.70.1',
    # `tfds build` (the command our not-prepared errors name) imports it.
    'importlib_resources==7.1.0',
    # The CPU convolutions (effnetv2_jax/kernels/onednn.py), compiled on first
    # use. The GNU OpenMP build: no Intel runtimes, 39 MB. Elsewhere the
    # models keep XLA's convolutions.
    'onednn-cpu-gomp==2023.2.0; ' + LINUX_X86_64,
    'onednn-devel-cpu-gomp==2023.2.0; ' + LINUX_X86_64,
]

REFERENCE = [
    'torch==2.13.0',
    'torchvision==0.28.0',
    'timm==1.0.31',
    'safetensors==0.8.0',
    'keras==3.15.1',
]

NAS = ['pyglove==0.4.5', 'ray[tune]==2.60.0']

# `python -m effnetv2_jax.export --format onnx` and running ONNX exports.
# jax2onnx 0.13.0 is the newest release that installs beside
# orbax-checkpoint 0.12.8 (0.13.1 and later require orbax < 0.11.37).
EXPORT = ['jax2onnx==0.13.0', 'onnx==1.23.2', 'onnxruntime==1.32.0']

COLAB = ['nbclient==0.11.0', 'nbformat==5.11.1', 'ipykernel==7.4.0']

EXTRAS = {
    # Reading timm .pth/.safetensors and Keras .weights.h5 files.
    'convert': ['torch==2.13.0', 'torchvision==0.28.0', 'safetensors==0.8.0',
                'keras==3.15.1'],
    # The architecture search: PyGlove's algorithms, Ray Tune for clusters.
    'nas': NAS,
    'export': EXPORT,
    'colab': COLAB,
    # CI executes the notebooks too.
    'test': REFERENCE + NAS + EXPORT + COLAB + ['pytest==9.2.0',
                                                'pytest-xdist==3.8.0'],
}

setuptools.setup(
    name='effnetv2_jax',
    version='0.1.0',
    description='EfficientNetV2 (Tan & Le, 2021) in JAX/Flax NNX: exact '
                'models, progressive learning, converters.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['effnetv2_jax', 'effnetv2_jax.*']),
    package_data={'effnetv2_jax.kernels': ['onednn_conv.cc'],
                  'effnetv2_jax.tables': ['results.json']},
    install_requires=CORE,
    extras_require=EXTRAS,
)
