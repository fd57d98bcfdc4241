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
* :func:`average_stats`: combine per-device running statistics (models trained without sync);
* :func:`collective_counts`, :func:`collective_bytes`: count and size the collectives in a
  compiled program.
"""

from jaxbn.parallel._hlo import collective_bytes, collective_counts
from jaxbn.parallel._groups import group_batch, group_mesh
from jaxbn.parallel._mesh import batch_sharding, data_mesh, shard_batch, shard_local_batch
from jaxbn.parallel._padding import pad_batch
from jaxbn.parallel._stats import average_stats
from jaxbn.parallel._steps import pmap_step, shard_map_step

__all__ = [
    "average_stats",
    "batch_sharding",
    "collective_bytes",
    "collective_counts",
    "data_mesh",
    "group_batch",
    "group_mesh",
    "pad_batch",
    "pmap_step",
    "shard_batch",
    "shard_local_batch",
    "shard_map_step",
]
