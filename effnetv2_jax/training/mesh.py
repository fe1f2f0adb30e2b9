"""The device mesh and the shardings of batches and train state.

One mesh with axes ('data', 'model'). By default every device is on 'data':
batches are split over it and the state is replicated, which is plain data
parallelism with BatchNorm statistics over the global batch (XLA inserts the
all-reduce under jit). For the large variants an FSDP-style rule shards every
state array with at least `fsdp_min_size` elements along its largest
dimension divisible by the axis size, so parameters, optimizer slots and the
EMA copy each take 1/n of the memory per device; XLA all-gathers them where
the step needs them whole.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'model')


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh; -1 on `data` takes the remaining devices.

  Axes are `Auto` (XLA's sharding propagation decides intermediate
  layouts): the step reshapes sharded batches (grouped BatchNorm) and that
  needs no annotations under Auto axes.
  """
  devices = jax.devices() if devices is None else list(devices)
  count = len(devices)
  if model < 1 or count % model:
    raise ValueError(
        f'mesh.model={model} must be a positive divisor of the device count '
        f'{count}')
  if data == -1:
    data = count // model
  if data * model != count:
    raise ValueError(
        f'mesh.data * mesh.model = {data} * {model} does not match the '
        f'{count} devices; set mesh.data=-1 to use them all')
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, model), AXES, axis_types=(auto, auto),
                       devices=devices)


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
  return make_mesh(mesh_config.get('data', -1), mesh_config.get('model', 1))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis: str,
              min_size: int) -> P:
  """PartitionSpec for one array under the FSDP rule (replicated if small)."""
  if not min_size or axis_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  # Largest dimension first, so the shards are as even as possible.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, *, fsdp_min_size: int = 0,
                    fsdp_axis: str = 'data'):
  """NamedShardings for every leaf of an (abstract) state pytree."""
  axis_size = mesh.shape[fsdp_axis]

  def one(leaf):
    return NamedSharding(
        mesh, fsdp_spec(tuple(leaf.shape), axis_size, fsdp_axis,
                        fsdp_min_size))

  return jax.tree.map(one, abstract_state)


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape['data']
