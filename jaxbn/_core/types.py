"""State and statistics containers: the pytrees every jaxbn function passes around."""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

Shape = Union[int, Sequence[int]]


class BatchStats(NamedTuple):
  """Running statistics of a batch-normalization layer (a pytree).

  Nothing mutates a ``BatchStats``: functions take one and return a new one with the same
  structure, shapes and dtypes, so it is safe as a ``jax.lax.scan`` carry or in a checkpoint.

  Attributes:
    mean: running mean, feature shape, float32 (or the dtype given to :func:`init_stats`).
    var: running variance, feature shape, same dtype as ``mean``. Biased (divided by ``n``) as
      flax stores it, unless the layer was configured with ``unbiased_running_var=True``
      (PyTorch's convention).
    count: int32 scalar, the number of updates applied (batches with at least one valid entry).
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


class Moments(NamedTuple):
  """Per-feature statistics of one (possibly masked, possibly cross-device) batch.

  Attributes:
    mean: batch mean, feature shape, at least float32 (complex64 for complex input).
    var: biased batch variance (divided by ``count``), feature shape, float32. For complex input
      the variance of ``|x - mean|``.
    count: number of valid entries that entered each feature's statistics, feature shape,
      float32 (global over all synchronized devices).
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


class PopulationMoments(NamedTuple):
  """Exact moments of all the data seen so far, per feature (a pytree).

  Attributes:
    count: number of valid entries seen, feature shape, float32.
    mean: their mean, feature shape, float32 (or the dtype given at creation).
    m2: their centered sum of squares ``Σ|x - mean|²``, feature shape, same dtype.
  """

  count: jax.Array
  mean: jax.Array
  m2: jax.Array


def _as_shape(feature_shape: Shape) -> tuple[int, ...]:
  if isinstance(feature_shape, int):
    return (feature_shape,)
  return tuple(int(d) for d in feature_shape)


def init_stats(feature_shape: Shape, dtype: DTypeLike = jnp.float32) -> BatchStats:
  """Creates fresh running statistics: mean 0, variance 1, count 0.

  Args:
    feature_shape: number of features (int) or the feature shape (tuple), i.e. the shape of
      ``x`` along the feature ``axis`` of :func:`jaxbn.batch_norm`.
    dtype: floating dtype of ``mean`` and ``var`` (default float32; flax's ``param_dtype``).

  Returns:
    A :class:`BatchStats` with ``mean`` zeros, ``var`` ones and an int32 ``count`` of 0.

  Raises:
    ValueError: ``dtype`` is not a floating dtype.

  Example:
    >>> import jaxbn
    >>> stats = jaxbn.init_stats(3)
    >>> stats.mean.shape, stats.var.dtype, int(stats.count)
    ((3,), dtype('float32'), 0)
  """
  shape = _as_shape(feature_shape)
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.inexact):
    raise ValueError(
        f"init_stats: `dtype` must be a floating dtype such as jnp.float32, got {dtype!r}."
    )
  real = jnp.finfo(dtype).dtype
  return BatchStats(
      mean=jnp.zeros(shape, dtype),
      var=jnp.ones(shape, real),
      count=jnp.zeros((), jnp.int32),
  )
