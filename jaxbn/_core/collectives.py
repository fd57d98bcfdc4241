"""The cross-device reductions of the forward pass (the only place jaxbn communicates).

A synchronized BN call issues two small collectives in its forward pass (the common shift,
``C`` numbers, which overlaps the pass over ``x``; then the moments, ``2–3 C``) and one in
its backward pass (``2 C``): everything that must be reduced at one point is stacked into one
array first. Nothing here is conditional.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def names(axis_name: Any) -> tuple:
  """``axis_name`` as a tuple of names (``()`` for None)."""
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return () if axis_name is None else (axis_name,)


def psum(x: jax.Array, axis_name: Any, axis_index_groups: Optional[Sequence] = None):
  """``lax.psum`` over ``axis_name`` (a no-op when it is None)."""
  if axis_name is None:
    return x
  return lax.psum(x, names(axis_name), axis_index_groups=axis_index_groups)


def axis_size(axis_name: Any, axis_index_groups: Optional[Sequence] = None) -> int:
  """Number of devices a ``psum`` over ``axis_name`` (within its group) adds up (1 for None)."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return math.prod(int(lax.axis_size(name)) for name in names(axis_name))


def groups_tuple(axis_index_groups: Optional[Sequence]) -> Optional[tuple]:
  """``axis_index_groups`` as a hashable tuple of tuples of ints (or None)."""
  if axis_index_groups is None:
    return None
  return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def varying_axes(v) -> frozenset:
  """The manual mesh axes ``v`` varies over inside ``jax.shard_map`` (empty elsewhere)."""
  mat = getattr(jax.typeof(v), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()))


def to_varying(x: jax.Array, axis_name: Any):
  """Marks ``x`` device-varying over the manual axes of ``axis_name`` it does not vary over.

  Casting a replicated value once, at its own (small) shape, makes its transpose one psum of
  that shape; left to JAX, the cast happens where it meets device-varying data, after any
  broadcast — an activation-sized psum in the backward pass. Only the axes that are manual
  here (inside ``jax.shard_map``/``pmap``) are marked: outside ``shard_map``'s type system
  (``vmap``) there is nothing to mark.
  """
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  missing = (frozenset(names(axis_name)) & frozenset(manual)) - varying_axes(x)
  if not missing:
    return x
  return lax.pcast(x, tuple(sorted(missing)), to="varying")


def psum_stacked(parts: Sequence[jax.Array], axis_name: Any,
                 axis_index_groups: Optional[Sequence] = None) -> tuple:
  """Sums the equally shaped ``parts`` over ``axis_name`` in ONE collective (stacked).

  Without an axis name the parts are returned as they are: stacking them would only give
  XLA's SPMD partitioner (plain ``jax.jit`` on sharded arrays) a concatenate whose transpose
  it partitions badly (it all-gathers whole batch-sized operands).
  """
  if axis_name is None:
    return tuple(parts)
  total = psum(jnp.stack(parts), axis_name, axis_index_groups)
  return tuple(total[i] for i in range(len(parts)))


def to_varying_stacked(parts: Sequence[jax.Array], axis_name: Any) -> tuple:
  """:func:`to_varying` of the equally shaped ``parts`` in one stacked cast.

  Its transpose (reverse mode) is one ``psum`` of the stacked cotangents.
  """
  if not names(axis_name):
    return tuple(parts)
  stacked = to_varying(jnp.stack(parts), axis_name)
  return tuple(stacked[i] for i in range(len(parts)))


def explicit_sharding(x: jax.Array):
  """``x``'s sharding when its type carries mesh axes (plain ``jax.jit`` on an explicit-axes
  mesh), else None.

  Per-feature vectors broadcast against such an ``x`` should get this sharding: broadcast
  without it they are typed replicated, and the transpose (backward pass) of that broadcast
  all-gathers the batch-sized cotangent.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(s is None for s in spec):
    return None
  return sharding
