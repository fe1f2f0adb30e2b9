"""Random variables for a model: what converter and predict tests store."""

import jax
import numpy as np
from flax import nnx

from effnetv2_jax.models import weights


def random_variables(architecture, num_classes, seed, *, stats_high=1.5):
  """(params, batch_stats) in our layout: parameters uniform in
  [-0.5, 0.5), BN statistics in [0.5, stats_high) (variances positive)."""
  abstract = weights.abstract_model(architecture, num_classes,
                                    conv_impl='xla')
  _, params, stats, _ = weights._split(abstract)
  rng = np.random.default_rng(seed)

  def fill(tree, low, high):
    return jax.tree.map(
        lambda s: rng.uniform(low, high, s.shape).astype(np.float32), tree)

  return (fill(nnx.to_pure_dict(params), -0.5, 0.5),
          fill(nnx.to_pure_dict(stats), 0.5, stats_high))
