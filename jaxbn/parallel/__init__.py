"""Data-parallel conveniences around synchronized batch norm (thin layers over JAX).

``jaxbn.batch_norm(..., axis_name=...)`` already synchronizes the statistics under
``jax.shard_map``, ``jax.pmap`` and ``jax.vmap`` (and needs no name under plain ``jax.jit`` on
sharded arrays). This module adds what a data-parallel training loop needs around it:

* :func:`data_mesh`, :func:`batch_sharding`: a mesh over the devices of every process, and
  the sharding that splits the batch dimension;
* :func:`shard_batch` (a global batch) and :func:`shard_local_batch` (each process's part):
  placing the batch on the mesh;
* :func:`shard_map_step`, :func:`pmap_step`: the ``shard_map``/``pmap`` wrappers of a
  per-device train step, with their gradient semantics documented;
* :func:`group_mesh`, :func:`group_batch`: synchronize BN within groups of devices (a
  "virtual batch") under ``shard_map`` and plain ``jit``;
* :func:`pad_batch`: pad a last partial batch and get the mask of real examples;
* :func:`average_stats`: combine per-device running statistics (models trained without sync).

Counting and sizing the collectives of a compiled program moved to :mod:`jaxbn.testing`
(``jaxbn.parallel.collective_counts``/``collective_bytes`` still work for one release, with a
``DeprecationWarning``).
"""

import importlib as _importlib
import warnings as _warnings

from jaxbn.parallel._groups import group_batch, group_mesh
from jaxbn.parallel._mesh import batch_sharding, data_mesh, shard_batch, shard_local_batch
from jaxbn.parallel._padding import pad_batch
from jaxbn.parallel._stats import average_stats
from jaxbn.parallel._steps import pmap_step, shard_map_step

__all__ = [
    "average_stats",
    "batch_sharding",
    "data_mesh",
    "group_batch",
    "group_mesh",
    "pad_batch",
    "pmap_step",
    "shard_batch",
    "shard_local_batch",
    "shard_map_step",
]

# Moved to jaxbn.testing in 0.2: still reachable here for one release, with a DeprecationWarning.
_MOVED = ("collective_bytes", "collective_counts")


def __getattr__(name):  # PEP 562
  if name in _MOVED:
    _warnings.warn(
        f"jaxbn.parallel.{name} moved to jaxbn.testing.{name}; the old name will be removed in "
        f"jaxbn 0.3.", DeprecationWarning, stacklevel=2)
    return getattr(_importlib.import_module("jaxbn.testing"), name)
  raise AttributeError(f"module 'jaxbn.parallel' has no attribute {name!r}")
