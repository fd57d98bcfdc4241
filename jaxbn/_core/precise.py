"""Population statistics ("precise BN", Wu & Johnson 2021) for :func:`jaxbn.recompute_stats`:
:func:`merge_moments` adds each batch to an exact, count-weighted (count, mean, M2) per feature
(:class:`~jaxbn.PopulationMoments`) with the one merge of ``moments.py`` (Chan et al.'s pairwise
formula); :func:`population_stats` gives the accumulated moments as :class:`~jaxbn.BatchStats`.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbn._core.ema import select
from jaxbn._core.moments import merge
from jaxbn._core.types import (BatchStats, Moments, PopulationMoments, Shape, _as_shape,
                               init_stats)


def init_population_moments(feature_shape: Shape,
                            dtype: DTypeLike = jnp.float32) -> PopulationMoments:
  """An empty accumulator: count 0, mean 0, M2 0.

  Args:
    feature_shape: number of features (int) or the feature shape (tuple).
    dtype: floating dtype of ``mean`` and ``m2`` (default float32).

  Returns:
    A :class:`PopulationMoments` of zeros.

  Example:
    >>> import jaxbn
    >>> jaxbn.init_population_moments(3).count.tolist()
    [0.0, 0.0, 0.0]
  """
  shape = _as_shape(feature_shape)
  zeros = jnp.zeros(shape, dtype)
  return PopulationMoments(jnp.zeros(shape, jnp.float32), zeros, zeros)


def merge_moments(acc: PopulationMoments, batch: Moments, *,
                  skip_nonfinite: bool = True) -> PopulationMoments:
  r"""Adds one batch's moments to the accumulator, weighted by its true counts.

  Chan, Golub & LeVeque's pairwise update, exact in the weights and free of cancellation:

  .. math::
     n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad
     \mu = \mu_a + \delta \frac{n_b}{n}, \quad
     M_2 = M_{2,a} + n_b \sigma_b^2 + \delta^2 \frac{n_a n_b}{n}

  Batches of different sizes, masked batches and fully masked features (``count == 0``,
  which leave the accumulator unchanged) are all weighted exactly. A batch of one value per
  feature is merged too (population moments are exact sums, so its variance 0 is right).

  Bad data: a feature whose batch mean or variance is not finite (a NaN or Inf in the data)
  is not merged (its count, mean and M2 stay as they were), so one corrupt batch does not
  make the recomputed statistics NaN; ``skip_nonfinite=False`` merges it (NaN propagates).

  Args:
    acc: the accumulator so far (:func:`init_population_moments`).
    batch: a batch's :class:`~jaxbn.Moments` (biased variance, per-feature counts), e.g. from
      :func:`jaxbn.moments`.
    skip_nonfinite: leave features with non-finite batch moments out (default True).

  Returns:
    The updated :class:`PopulationMoments` (same shapes and dtypes).

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> acc = jaxbn.init_population_moments(1)
    >>> for b in (jnp.array([[1.0], [2.0]]), jnp.array([[6.0]])):
    ...   acc = jaxbn.merge_moments(acc, jaxbn.moments(b))
    >>> s = jaxbn.population_stats(acc)   # the data 1, 2, 6: mean 3, variance 14/3
    >>> s.mean.tolist(), s.var.tolist()
    ([3.0], [4.666...])
  """
  if jnp.shape(batch.mean) != jnp.shape(acc.mean):
    raise ValueError(
        f"merge_moments: batch moments have feature shape {jnp.shape(batch.mean)} but the "
        f"accumulator has {jnp.shape(acc.mean)}; create it with "
        f"init_population_moments({jnp.shape(batch.mean)}).")
  dt = acc.mean.dtype
  nb = jnp.asarray(batch.count, jnp.float32)
  mean_b = jnp.asarray(batch.mean).astype(dt)
  m2_b = (nb * jnp.asarray(batch.var, jnp.float32)).astype(dt)
  if skip_nonfinite:  # a select, not a weight: 0 * NaN is NaN
    ok = jnp.isfinite(mean_b) & jnp.isfinite(m2_b)
    nb = jnp.where(ok, nb, 0.0)
    mean_b = select(ok, mean_b, acc.mean)
    m2_b = jnp.where(ok, m2_b, jnp.zeros((), dt))
  return PopulationMoments(*merge(acc.count, acc.mean, acc.m2, nb, mean_b, m2_b))


def population_stats(acc: PopulationMoments, stats: Optional[BatchStats] = None, *,
                     unbiased_running_var: bool = False) -> BatchStats:
  r"""The accumulated population moments as running statistics.

  ``mean`` is the population mean and ``var`` the population variance ``M2 / n`` (biased,
  flax's convention), or ``M2 / (n - 1)`` with ``unbiased_running_var=True`` (PyTorch's).

  Args:
    acc: the :class:`PopulationMoments` of all batches.
    stats: optional current :class:`~jaxbn.BatchStats`; the result keeps its dtypes and its
      ``count``, and features that never had a valid entry keep its values. Without it,
      float32 statistics with count 0, and mean 0 / variance 1 for features never seen.
    unbiased_running_var: store ``M2 / (n - 1)``.

  Returns:
    :class:`~jaxbn.BatchStats` with the population mean and variance.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> acc = jaxbn.merge_moments(jaxbn.init_population_moments(1),
    ...                           jaxbn.moments(jnp.array([[1.0], [3.0]])))
    >>> jaxbn.population_stats(acc, unbiased_running_var=True).var.tolist()
    [2.0]
  """
  if stats is None:
    stats = init_stats(jnp.shape(acc.mean))
  if jnp.shape(stats.mean) != jnp.shape(acc.mean):
    raise ValueError(
        f"population_stats: the accumulator has feature shape {jnp.shape(acc.mean)} but "
        f"`stats.mean` has shape {jnp.shape(stats.mean)}.")
  n = acc.count
  denom = jnp.maximum(n - 1.0, 1.0) if unbiased_running_var else jnp.maximum(n, 1.0)
  var = acc.m2 / denom.astype(acc.m2.dtype)
  seen = n > 0
  return BatchStats(
      mean=jnp.where(seen, acc.mean, stats.mean).astype(stats.mean.dtype),
      var=jnp.where(seen, var, stats.var).astype(stats.var.dtype),
      count=stats.count,
  )
