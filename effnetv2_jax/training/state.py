"""The train state and the description of the network it trains.

The model is split once into a static graph definition and two pure
dictionaries (parameters and BatchNorm statistics); the jitted steps merge
them back inside the trace. Everything that must survive a restart is in
`TrainState`, so a checkpoint of it (plus the data position) is a complete
resume point: the step counter (learning rate, EMA ramp, RNG), the
parameters, BN statistics, optimizer slots, EMA copies, the base PRNG key and
any further networks trained beside the model (`extras`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import families
from effnetv2_jax.models import param_rngs


@flax.struct.dataclass
class Trainable:
  """A network trained beside the model (e.g. a self-distillation target):
  its variables, its own optimizer slots and its own weight average."""

  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when the run keeps no EMA
  ema_batch_stats: Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any  # pure dict of float32 nnx.Param values
  batch_stats: Any  # pure dict of BN running mean/var
  opt_state: Any
  ema_params: Any  # None when the EMA is disabled
  ema_batch_stats: Any
  rng: jax.Array  # uint32 key data; the step folds the step number in
  extras: dict[str, Trainable] = flax.struct.field(default_factory=dict)


class ModelSpec:
  """How to build a network: its family, a plain description, options.

  Args:
    description: what the family parses: for EfficientNetV2 a variant name,
      an `Architecture` or its dict (a dict may name its 'family').
    num_classes: classifier width.
    family: a registered family name (`models.families`); by default the one
      the description names, else EfficientNetV2.
    **options: passed to the family's `build` (drop_path_rate, bn_momentum,
      bn_epsilon, dtype, conv_impl for EfficientNetV2).
  """

  def __init__(self, description: Any, num_classes: int, *,
               family: str | None = None, **options):
    if family:
      self.family = families.get(family)
      self.description = self.family.parse(description)
    else:  # a JSON file's path is read once, by the family it names
      self.family, self.description = families.resolve(description)
    self.num_classes = int(num_classes)
    self.options = dict(options)

  @property
  def train_size(self) -> int:
    return self.family.train_size(self.description)

  @property
  def eval_size(self) -> int:
    return self.family.eval_size(self.description)

  @property
  def normalization(self) -> str:
    return self.family.normalization(self.description)

  @property
  def name(self) -> str:
    return getattr(self.description, 'name', self.family.name)

  def to_dict(self) -> dict:
    """The description as plain data (JSON), naming its family."""
    return self.family.to_dict(self.description)

  def build(self, seed: int | jax.Array = 0) -> nnx.Module:
    return self.family.build(self.description, self.num_classes,
                             rngs=param_rngs(seed), **self.options)

  def graphdef(self):
    return graphdef_of(self)

  def num_params(self) -> int:
    """Trainable parameters, counted without allocating any."""
    abstract = nnx.eval_shape(lambda: self.build(0))
    return sum(int(x.size) for x in
               jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def graphdef_of(buildable) -> Any:
  """The static module graph of anything with `build(seed)` (built
  abstractly: no weights allocated)."""
  abstract = nnx.eval_shape(lambda: buildable.build(0))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return graphdef


def split_variables(model: nnx.Module) -> tuple[dict, dict]:
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying shardings: the AOT-lowering / restore target."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


def init_sharded(init_fn, shardings) -> TrainState:
  """Builds the initial state directly in its sharded layout.

  With shardings from `jax.eval_shape(init_fn)` (no allocation), `jax.jit(...,
  out_shardings=...)` materialises each shard on its own device: no full
  copy ever sits on device 0.

  Non-partitionable threefry compiles the ~100 random draws of the
  initialiser 2-3x faster on CPU; the values still do not depend on the
  mesh.
  """
  with jax.threefry_partitionable(False):
    return jax.jit(init_fn, out_shardings=shardings)()


def initial_rng(seed: int) -> jax.Array:
  """The base key of a run's dropout and stochastic depth: a different
  stream from the parameter init, derived from the same seed."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))


def zero_step() -> jax.Array:
  return jnp.zeros([], jnp.int32)
