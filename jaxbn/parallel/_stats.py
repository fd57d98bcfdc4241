"""Averaging per-device running statistics of models trained without synchronized BN."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._core.moments import merge_along
from jaxbn._core.types import BatchStats


def _is_stats(node: Any) -> bool:
  if isinstance(node, BatchStats):
    return True
  return (isinstance(node, Mapping) and "mean" in node and "var" in node
          and not isinstance(node["mean"], Mapping))


def _abs2(z):
  return jnp.real(z * jnp.conj(z)) if jnp.iscomplexobj(z) else z * z


def average_stats(tree: Any, *, axis_name: Any = None, axis: int = 0) -> Any:
  r"""Averages running statistics over devices, pooling the variances.

  Without synchronized BN, every device keeps its own running statistics (under ``jax.pmap``
  or a ``shard_map`` with per-device state). Before evaluating or checkpointing, combine them
  as the statistics of the union of the devices' data (equal weights):

  .. math::
     \mu = \frac{1}{D}\sum_d \mu_d, \qquad
     \sigma^2 = \frac{1}{D}\sum_d \left(\sigma_d^2 + (\mu_d - \mu)^2\right)

  (law of total variance; plain averaging of the variances, as flax's ImageNet example's
  ``pmean``, leaves out the spread of the device means). The count of a :class:`BatchStats`
  is the largest device count; any other floating leaf is averaged, any other integer leaf
  takes its largest value.

  Works on :class:`jaxbn.BatchStats` and on flax-style ``{'mean': ..., 'var': ...}`` dicts
  anywhere in a pytree, e.g. a whole ``variables['batch_stats']`` collection.

  Args:
    tree: pytree holding the statistics. Without ``axis_name``: leaves stacked over devices
      along ``axis`` (what ``jax.pmap`` returns). With ``axis_name``: this device's leaves.
    axis_name: inside ``jax.pmap``/``jax.shard_map``/``jax.vmap``: the mapped axis name(s) to
      average over (the result is the same on every device).
    axis: the device axis of the stacked leaves (default 0), when ``axis_name`` is None.

  Returns:
    The pytree with the averaged statistics (without the device axis when ``axis_name`` is
    None).

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> from jaxbn.parallel import average_stats
    >>> per_device = jaxbn.BatchStats(mean=jnp.array([[0.], [2.]]), var=jnp.array([[1.], [1.]]),
    ...                               count=jnp.array([5, 5]))
    >>> avg = average_stats(per_device)
    >>> avg.mean.tolist(), avg.var.tolist(), int(avg.count)
    ([1.0], [2.0], 5)
  """
  if axis_name is None:  # over the stacked device axis
    mean, largest = functools.partial(jnp.mean, axis=axis), functools.partial(jnp.max, axis=axis)
  else:
    mean = functools.partial(lax.pmean, axis_name=axis_name)
    largest = functools.partial(lax.pmax, axis_name=axis_name)

  def plain(v):
    v = jnp.asarray(v)
    return mean(v) if jnp.issubdtype(v.dtype, jnp.inexact) else largest(v)

  def pooled(node):
    if not _is_stats(node):
      return plain(node)
    m_in = jnp.asarray(node["mean"] if isinstance(node, Mapping) else node.mean)
    v_in = jnp.asarray(node["var"] if isinstance(node, Mapping) else node.var)
    if axis_name is None:  # the one merge of the core, each device weighted 1
      ones = jnp.ones_like(v_in)
      n, m, m2 = merge_along(ones, m_in, v_in, axis=axis)
      v = (m2 / n).astype(v_in.dtype)
    else:  # the same two steps, across devices: the mean, then the pooled variance
      m = mean(m_in)
      v = mean(v_in + _abs2(m_in - m).astype(v_in.dtype))
    if isinstance(node, BatchStats):
      return BatchStats(m, v, largest(jnp.asarray(node.count)))
    out = {k: m if k == "mean" else v if k == "var" else plain(val) for k, val in node.items()}
    return type(node)(out) if not isinstance(node, dict) else out

  return jax.tree.map(pooled, tree, is_leaf=_is_stats)
