"""A data-parallel mesh, and placing a batch on it (one process or many)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AxisNames = Union[str, Sequence[str]]


def _names(axis_names: AxisNames) -> tuple[str, ...]:
  return (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)


def data_mesh(
    axis_names: AxisNames = "data",
    shape: Optional[Sequence[int]] = None,
    *,
    devices: Optional[Sequence[jax.Device]] = None,
) -> Mesh:
  """A mesh over all devices (of every process) for data parallelism.

  This is ``jax.make_mesh(shape, axis_names, devices=devices)`` with a default shape: one
  axis over every device. Its axes are JAX's default *explicit* axes, so a batch must be
  placed on it (:func:`shard_batch`, :func:`shard_local_batch`) before ``jax.shard_map`` sees
  it. Synchronize batch norm over all of its axes with ``axis_name=mesh.axis_names``.

  Args:
    axis_names: one name (default ``'data'``) or several, e.g. ``('data', 'fsdp')``.
    shape: the mesh shape; default ``(number of devices,)`` (needs a single axis name).
    devices: the devices to use; default ``jax.devices()`` (all processes' devices).

  Returns:
    A ``jax.sharding.Mesh``.

  Raises:
    ValueError: several axis names without a ``shape``, or a ``shape`` whose product is not
      the number of devices.

  Example:
    >>> from jaxbn.parallel import data_mesh
    >>> dict(data_mesh().shape)
    {'data': 8}
    >>> data_mesh(('data', 'fsdp'), (4, 2)).axis_names
    ('data', 'fsdp')
  """
  names = _names(axis_names)
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    if len(names) != 1:
      raise ValueError(
          f"data_mesh: `axis_names`={names!r} has {len(names)} axes but no `shape` was given; "
          f"pass one, e.g. shape=({len(devices)}, 1).")
    shape = (len(devices),)
  shape = tuple(int(d) for d in shape)
  if len(shape) != len(names) or math.prod(shape) != len(devices):
    raise ValueError(
        f"data_mesh: `shape`={shape} with `axis_names`={names!r} does not fit "
        f"{len(devices)} devices; give one size per axis name, with product {len(devices)}.")
  return jax.make_mesh(shape, names, devices=devices)


def batch_sharding(mesh: Mesh, axis_names: Optional[AxisNames] = None) -> NamedSharding:
  """``NamedSharding`` that splits the leading (batch) dimension over mesh axes.

  Args:
    mesh: the mesh.
    axis_names: the mesh axes to split the batch over (default: all of them, in order).

  Returns:
    ``NamedSharding(mesh, P(axis_names))``; the other dimensions are not split.

  Example:
    >>> from jaxbn.parallel import batch_sharding, data_mesh
    >>> batch_sharding(data_mesh(('data', 'fsdp'), (4, 2))).spec
    P(('data', 'fsdp'),)
  """
  names = tuple(mesh.axis_names) if axis_names is None else _names(axis_names)
  return NamedSharding(mesh, P(names[0] if len(names) == 1 else names))


def _check_divisible(fn: str, n: int, shards: int, what: str) -> None:
  if n % shards:
    raise ValueError(
        f"{fn}: {what} of size {n} does not split evenly over {shards} devices; pad it with "
        f"jaxbn.parallel.pad_batch(batch, {-(-n // shards) * shards}) and pass the returned "
        f"mask to batch_norm (and to the loss), so that no example is dropped.")


def _num_shards(sharding: NamedSharding) -> int:
  return math.prod(sharding.mesh.shape[n] for n in _names(sharding.spec[0]))


def shard_batch(batch: Any, mesh: Mesh, *, axis_names: Optional[AxisNames] = None) -> Any:
  """Places a *global* batch on the mesh, split along its leading dimension.

  Every leaf of ``batch`` (a pytree of arrays with the same leading size) becomes a global
  ``jax.Array`` sharded with :func:`batch_sharding`. In one process this is
  ``jax.device_put``; with several processes, each process passes the same global batch and
  keeps only the pieces of its own devices (``jax.make_array_from_callback``). When each
  process loads only its own part, use :func:`shard_local_batch`.

  Args:
    batch: pytree of NumPy or JAX arrays, leading dimension divisible by the number of shards.
    mesh: the mesh (:func:`data_mesh`).
    axis_names: mesh axes to split over (default all).

  Returns:
    The same pytree of sharded global arrays.

  Raises:
    ValueError: a leading dimension that does not split evenly (with the pad_batch fix).

  Example:
    >>> import numpy as np
    >>> from jaxbn.parallel import data_mesh, shard_batch
    >>> x = shard_batch(np.ones((16, 3), np.float32), data_mesh())
    >>> x.sharding.spec, x.addressable_shards[0].data.shape
    (P('data',), (2, 3))
  """
  sharding = batch_sharding(mesh, axis_names)
  shards = _num_shards(sharding)

  def place(a):
    shape = np.shape(a)
    _check_divisible("shard_batch", shape[0] if shape else 0, shards, "a batch leaf")
    if jax.process_count() == 1:
      return jax.device_put(a, sharding)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(place, batch)


def shard_local_batch(local_batch: Any, mesh: Mesh, *,
                      axis_names: Optional[AxisNames] = None) -> Any:
  """Builds global batch arrays from the part of the batch that this process loaded.

  Each process passes its own ``local_batch`` (the rows destined to its devices); the result
  is one global ``jax.Array`` per leaf whose leading size is the sum over processes
  (``jax.make_array_from_process_local_data``). In one process it equals
  :func:`shard_batch`.

  Args:
    local_batch: pytree of this process's arrays (leading dimension divisible by its number
      of local shards).
    mesh: the mesh (:func:`data_mesh`).
    axis_names: mesh axes to split over (default all).

  Returns:
    The pytree of global sharded arrays.

  Example:
    >>> import jax, numpy as np
    >>> from jaxbn.parallel import data_mesh, shard_local_batch
    >>> x = shard_local_batch(np.ones((16, 3), np.float32), data_mesh())
    >>> x.shape == (16 * jax.process_count(), 3)
    True
  """
  sharding = batch_sharding(mesh, axis_names)
  local_shards = _num_shards(sharding) // jax.process_count()

  def place(a):
    shape = np.shape(a)
    _check_divisible("shard_local_batch", shape[0] if shape else 0, max(local_shards, 1),
                     "this process's batch leaf")
    return jax.make_array_from_process_local_data(sharding, np.asarray(a))

  return jax.tree.map(place, local_batch)
