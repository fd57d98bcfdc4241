"""Synchronized BN within groups of devices (a "virtual batch" of k devices).

With thousands of devices, statistics of the whole global batch are neither needed nor
always wanted: syncing BN over groups of ``k`` devices (flax issue #332, TPU's
``num_shards_per_group``) gives a per-group batch of ``k × per-device batch``. Under
``jax.pmap`` that is ``axis_index_groups``; here it is a mesh whose data axis is split into
``(groups, k)``, which works under ``jax.shard_map`` and plain ``jax.jit`` alike:

* ``jax.shard_map``: the batch is split over both axes, BN synchronizes over the inner axis
  only (``axis_name=GROUP_MEMBER``), and each group ends the step with its own running
  statistics; :func:`jaxbn.parallel.average_stats` over ``GROUP`` pools them.
* plain ``jax.jit``: :func:`group_batch` reshapes the batch to ``(groups, n / groups, ...)``
  sharded ``P(GROUP, GROUP_MEMBER)``; ``jax.vmap`` of BN over the leading axis computes
  per-group statistics, and XLA all-reduces over the group's devices only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbn.parallel._mesh import _check_divisible, data_mesh

GROUP = "group"
GROUP_MEMBER = "data"


def group_mesh(group_size: int, *, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh of shape ``(devices / group_size, group_size)`` with axes ``('group', 'data')``.

  Synchronize BN with ``axis_name='data'`` under ``jax.shard_map`` (in_specs
  ``P(('group', 'data'))``): the statistics are those of each group's ``group_size`` devices.
  Consecutive devices (of ``jax.devices()``) form a group, so with the default device order
  a group stays within a host where it can.

  Args:
    group_size: devices per group; must divide the number of devices.
    devices: the devices (default ``jax.devices()``: all processes').

  Returns:
    A ``jax.sharding.Mesh`` with axes ``('group', 'data')``.

  Raises:
    ValueError: ``group_size`` does not divide the number of devices.

  Example:
    >>> from jaxbn.parallel import group_mesh
    >>> dict(group_mesh(4).shape)
    {'group': 2, 'data': 4}
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(group_size, int) or group_size < 1 or len(devices) % group_size:
    divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
    raise ValueError(f"group_mesh: `group_size`={group_size!r} must be a positive divisor of the "
                     f"{len(devices)} devices, e.g. {divisors}.")
  return data_mesh((GROUP, GROUP_MEMBER), (len(devices) // group_size, group_size),
                   devices=devices)


def group_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a global batch for per-group BN under plain ``jax.jit`` (no axis name).

  Every array of ``batch`` (leading dimension ``n``, divisible by the number of devices) is
  reshaped to ``(groups, n / groups, ...)`` — group ``g`` holds the rows that
  :func:`jaxbn.parallel.shard_batch` would give to its devices — and sharded
  ``P('group', 'data')``. Map the step over the leading axis with ``jax.vmap`` (BN without
  ``axis_name``): each group's statistics reduce over its own devices only.

  Args:
    batch: pytree of arrays with the global batch as leading dimension.
    mesh: a :func:`group_mesh`.

  Returns:
    The pytree of grouped, sharded arrays.

  Indexing the result: :func:`group_mesh` has explicit mesh axes (``jax.make_mesh``'s
  default), so the arrays carry their sharding in their type and ``x[g]`` raises JAX's
  ``ShardingTypeError`` (JAX cannot tell where group ``g``'s rows should live). Say where:

  * ``np.asarray(x)[g]``: a host copy, to look at the values;
  * ``x.at[g].get(out_sharding=NamedSharding(mesh, P('data')))``: group ``g``'s rows on the
    devices, split over ``'data'`` (inside ``jax.set_mesh(mesh)``, ``out_sharding=P('data')``);
  * ``jax.sharding.reshard(x, NamedSharding(mesh, P()))[g]``: replicate first, then index;
  * ``x.reshape((-1,) + x.shape[2:])``: back to the global batch (rows in the original order),
    sharded over every device, e.g. for the loss or the outputs of the step.

  Example:
    >>> import numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from jaxbn.parallel import group_batch, group_mesh
    >>> mesh = group_mesh(4)
    >>> x = group_batch(np.arange(48.0).reshape(16, 3), mesh)
    >>> x.shape, x.sharding.spec
    ((2, 8, 3), P('group', 'data'))
    >>> np.asarray(x)[1, 0].tolist()                 # group 1 starts at row 8
    [24.0, 25.0, 26.0]
    >>> g1 = x.at[1].get(out_sharding=NamedSharding(mesh, P("data")))
    >>> g1.shape, g1.sharding.spec
    ((8, 3), P('data', None))
    >>> flat = x.reshape(16, 3)                       # the global batch again
    >>> flat.sharding.spec, bool((np.asarray(flat)[8:] == np.asarray(g1)).all())
    (P(('group', 'data'), None), True)
  """
  groups, size = mesh.shape[GROUP], mesh.shape[GROUP_MEMBER]
  sharding = NamedSharding(mesh, P(GROUP, GROUP_MEMBER))

  def place(a):
    a = jax.numpy.asarray(a) if not hasattr(a, "shape") else a
    _check_divisible("group_batch", a.shape[0], groups * size, "the batch dimension")
    return jax.device_put(a.reshape((groups, a.shape[0] // groups) + a.shape[1:]), sharding)

  return jax.tree.map(place, batch)
