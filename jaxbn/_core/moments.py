"""Per-feature batch moments: masked, float32-accumulated, synchronized across devices."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.types import Moments


def accumulation_dtype(dtype) -> jnp.dtype:
  """At least float32 (complex64 for complex input); float64 stays float64."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return jnp.promote_types(dtype, jnp.float32)


def _abs2(z):
  if jnp.iscomplexobj(z):
    return (z.real * z.real + z.imag * z.imag)
  return z * z


def _real_dtype(dtype):
  return jnp.finfo(dtype).dtype


def _aliases(x: jax.Array, n: int):
  """``n`` aliases of ``x`` that XLA cannot merge (one ``optimization_barrier``).

  When one value (a bf16 ``x`` up-cast to float32, or a broadcast per-feature vector) feeds
  several fused passes, XLA:CPU writes it out in full, a temporary the size of ``x``; giving
  each pass its own alias keeps the computation inside each pass's loop. The aliases must
  come from a single barrier: separate identical barriers are merged and then removed.
  """
  return lax.optimization_barrier((x,) * n)


def bcast(v: jax.Array, shape: tuple[int, ...], feat: tuple[int, ...],
          sharding: Any = None) -> jax.Array:
  """Broadcasts a feature-shaped vector against ``x`` (``broadcast_in_dim``, no reshape).

  A vector broadcast into several passes over ``x`` should be given one alias per pass
  (:func:`_aliases`): XLA:CPU otherwise writes the shared broadcast out at the full size of
  ``x`` instead of fusing it into each pass's loop.
  """
  return lax.broadcast_in_dim(v, shape, feat, out_sharding=sharding)


# Fast (one-pass) variance is trusted while mean² <= FAST_VARIANCE_LIMIT · var per feature.
FAST_VARIANCE_LIMIT = 1e3


def local_moments(x: jax.Array, red: tuple[int, ...], mask: Optional[jax.Array],
                  fast: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Count, mean and centered sum of squares ``M2`` of this device's data (feature shape).

  Stable mode (default) is the two-pass algorithm: ``mean = Σx / n``, then
  ``M2 = Σ(x − mean)²``. It is accurate whatever the offset of the data (for float32 data
  with ``|mean| / std = 1e4`` the relative error of the variance is about 1e-5, where the
  one-pass formula returns garbage). Fast mode (flax's ``use_fast_variance``) is the one-pass
  ``M2 = Σx² − (Σx)²/n``, clamped at 0, guarded: its float32 rounding error relative to the
  variance grows like ``eps · mean²/var``, so when some feature has ``mean² > 1000 · var``
  (where flax's formula starts to return garbage) a ``lax.cond`` recomputes ``M2`` with the
  exact two-pass algorithm. On ordinary data the guard never fires and the result is flax's;
  on data far from zero it is still right. (Under ``axis_name`` the cross-device merge of
  fast mode is the plain one-pass formula, as in flax.)

  Sums are accumulated in float32 (or wider) inside the reduction loops. Each pass reads its
  own alias of ``x`` and per-feature vectors are broadcast with ``broadcast_in_dim``, so that
  XLA fuses the up-cast and the centering into each reduction loop instead of writing a
  temporary the size of ``x``: on CPU the two passes cost about what flax's two one-pass
  reductions cost.
  """
  acc = accumulation_dtype(x.dtype)
  rdt = _real_dtype(acc)
  feat = tuple(i for i in range(x.ndim) if i not in red)
  fshape = tuple(x.shape[i] for i in feat)
  xa, xb, xc = _aliases(x, 3)
  if mask is None:
    n = 1.0
    for a in red:
      n *= x.shape[a]
    count = jnp.full(fshape, n, rdt)
    n = max(n, 1.0)  # an empty batch: sums are 0, so mean and M2 are 0 (not 0/0)
    s1 = jnp.sum(xa.astype(acc), axis=red)
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axis=red, dtype=rdt)
    n = jnp.maximum(count, 1.0)
    s1 = jnp.sum(jnp.where(mask, xa.astype(acc), 0), axis=red)
  mean = s1 / n
  mean_var, mean = _aliases(mean, 2)

  def centered(xv, m):
    d2 = _abs2(xv.astype(acc) - bcast(m, x.shape, feat))
    if mask is not None:
      d2 = jnp.where(mask, d2, 0)
    return jnp.sum(d2, axis=red).astype(rdt)

  if not fast:
    return count, mean, centered(xb, mean_var)
  sq = _abs2(xb.astype(acc))
  if mask is not None:
    sq = jnp.where(mask, sq, 0)
  m2 = jnp.maximum(jnp.sum(sq, axis=red) - n * _abs2(mean), 0.0).astype(rdt)
  trusted = jnp.all(n * _abs2(mean) <= FAST_VARIANCE_LIMIT * m2)
  m2 = lax.cond(trusted, lambda: m2, lambda: centered(xc, mean_var))
  return count, mean, m2


def combine(count, mean, m2, axis_name, axis_index_groups, fast: bool):
  """Global (count, mean, variance) from every device's local moments, in one collective.

  Fast mode sums ``[n, Σx, Σ|x|²]`` (one ``psum``). Stable mode gathers every device's
  ``(n, mean, M2)`` (one all-reduce of a ``devices × 3 × features`` buffer) and merges them
  with Chan et al.'s pairwise formula ``M2 = Σ M2_i + Σ n_i (mean_i - mean)²``, which is
  exact in the weights (uneven and masked devices) and free of cancellation.
  """
  if axis_name is None:
    var = m2 / jnp.maximum(count, 1.0)
    return count, mean, var
  cdt = mean.dtype
  if fast:
    stacked = jnp.stack([count.astype(cdt), count * mean, m2 + count * _abs2(mean)])
    total = collectives.psum(stacked, axis_name, axis_index_groups)
    n = total[0].real.astype(count.dtype)
    safe = jnp.maximum(n, 1.0)
    g_mean = total[1] / safe
    var = jnp.maximum(total[2].real / safe - _abs2(g_mean), 0.0)
    return n, g_mean, var.astype(count.dtype)
  stacked = jnp.stack([count.astype(cdt), mean, m2.astype(cdt)])
  rows = collectives.gather(stacked, axis_name, axis_index_groups)
  n_i, mean_i, m2_i = rows[:, 0].real.astype(count.dtype), rows[:, 1], rows[:, 2].real
  n = jnp.sum(n_i, axis=0)
  safe = jnp.maximum(n, 1.0)
  g_mean = jnp.sum(n_i * mean_i, axis=0) / safe
  g_m2 = jnp.sum(m2_i, axis=0) + jnp.sum(n_i * _abs2(mean_i - g_mean), axis=0)
  return n, g_mean, (g_m2 / safe).astype(count.dtype)


def feature_moments(x, red, mask, axis_name, axis_index_groups, fast):
  """Global ``(count, mean, var)`` of ``x``, each of the feature shape."""
  count, mean, m2 = local_moments(x, red, mask, fast)
  return combine(count, mean, m2, axis_name, axis_index_groups, fast)


def moments_keepdims(x, red, mask, axis_name, axis_index_groups, fast):
  """:func:`feature_moments` reshaped to broadcast against ``x`` (size-1 reduced axes)."""
  kshape = tuple(1 if i in red else d for i, d in enumerate(x.shape))
  return tuple(v.reshape(kshape)
               for v in feature_moments(x, red, mask, axis_name, axis_index_groups, fast))


def feature_shape(x_shape, feat):
  return tuple(x_shape[a] for a in feat)


def moments(
    x: ArrayLike,
    *,
    axis: checks.Axes = -1,
    mask: Optional[ArrayLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
) -> Moments:
  r"""Per-feature mean, biased variance and count of ``x`` over all non-feature axes.

  .. math::
     \mu = \frac{1}{n}\sum_{i \in \text{valid}} x_i, \qquad
     \sigma^2 = \frac{1}{n}\sum_{i \in \text{valid}} |x_i - \mu|^2

  Numerics: sums are accumulated in float32 (or wider) for bf16/fp16 input, inside the
  reduction loops (no up-cast copy of ``x`` is written). The default variance is stable for
  any offset of the data (shifted-data one-pass, or two-pass with a mask); with
  ``use_fast_variance=True`` it is flax's ``E[x²] - E[x]²`` clamped at 0, which loses all
  precision when ``|mean| / std`` is large. With ``axis_name`` the statistics are those of the
  union of all devices' valid entries, weighted by their true counts, computed with one
  collective.

  Args:
    x: input array, any float dtype (complex allowed: the variance is that of ``|x - mean|``).
    axis: feature axis or axes (default -1, channels-last); the others are reduced.
    mask: optional bool array broadcastable to ``x``; False entries do not count (even if they
      hold NaN or Inf).
    axis_name: name or tuple of names of mapped axes (``shard_map``/``pmap``/``vmap``) over
      which to synchronize the statistics; None for none.
    axis_index_groups: optional groups of device indices to synchronize within (``pmap``).
    use_fast_variance: use ``E[x²] - E[x]²`` (cheaper sync, unstable for large means).

  Returns:
    :class:`Moments` ``(mean, var, count)`` of the feature shape. ``count`` is 0 (and mean and
    var are 0) for a feature without any valid entry.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.moments(jnp.array([[1., 10.], [3., 30.]]))
    >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
    ([2.0, 20.0], [1.0, 100.0], [2.0, 2.0])
  """
  fn = "moments"
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  feat = checks.feature_axes(fn, x.ndim, axis)
  checks.mask_broadcasts(fn, mask, x.shape)
  checks.axis_name_bound(fn, axis_name, axis_index_groups)
  red = checks.reduction_axes(x.ndim, feat)
  count, mean, var = feature_moments(x, red, None if mask is None else jnp.asarray(mask),
                                     axis_name, axis_index_groups, use_fast_variance)
  return Moments(mean, var, count)
