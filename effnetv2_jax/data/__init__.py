"""Input pipelines: datasets by name, the official augmentations, multi-host.

    from effnetv2_jax import data
    info = data.dataset_info('digits')
    train = data.make_train_iterator('digits', global_batch_size=64,
                                     image_size=32, seed=0)
    batch = next(train)   # {'image': [64, 32, 32, 3], 'label': [64, 10]}
    for batch in data.make_eval_iterator('digits', global_batch_size=128,
                                         image_size=32,
                                         normalization='inception'):
      ...                 # + 'mask': [128], 0 on padding

A validation set carved from train (`holdout`: a fraction or a count) for
datasets without one; the train iterator then skips those examples:

    train = data.make_train_iterator('digits', ..., holdout=0.1)
    val = data.make_eval_iterator('digits', split=data.HOLDOUT_SPLIT,
                                  holdout=0.1, ...)

TensorFlow and tfds are imported when a pipeline is built, not here.
See `sources` (datasets and splits), `preprocess` (crops, eval rule,
normalisation), `randaugment` / `autoaugment` / `augment_ops` (policies),
`mix` (mixup, CutMix) and `pipeline` (order, resume, sharding).
"""

from effnetv2_jax.data.pipeline import EvalIterator
from effnetv2_jax.data.pipeline import host_slice
from effnetv2_jax.data.pipeline import make_eval_iterator
from effnetv2_jax.data.pipeline import make_train_iterator
from effnetv2_jax.data.pipeline import TrainIterator
from effnetv2_jax.data.sources import clear_cache
from effnetv2_jax.data.sources import DATASET_NAMES
from effnetv2_jax.data.sources import dataset_info
from effnetv2_jax.data.sources import DatasetInfo
from effnetv2_jax.data.sources import DatasetNotPreparedError
from effnetv2_jax.data.sources import HOLDOUT_SPLIT
from effnetv2_jax.data.sources import TRAIN_PROBE_SPLIT
from effnetv2_jax.data.sources import holdout_size
from effnetv2_jax.data.sources import SkippedFilesWarning

__all__ = [
    'DATASET_NAMES', 'DatasetInfo', 'DatasetNotPreparedError', 'EvalIterator',
    'HOLDOUT_SPLIT', 'SkippedFilesWarning', 'TRAIN_PROBE_SPLIT',
    'TrainIterator', 'clear_cache', 'dataset_info', 'holdout_size', 'host_slice', 'make_eval_iterator',
    'make_train_iterator',
]
