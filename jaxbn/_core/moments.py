"""The one moment algebra: local sums, the cross-device combine, the exactness guard, merges.

Every statistic in jaxbn — batch norm and its variants, the per-example norms, the precise
statistics and the pooling of per-device running statistics — is computed here.

**Algorithm.** For each statistic (a feature, or a block of them for grouped norms) one fused
pass over ``x`` accumulates, in at least float32,

.. math::
   n = \\sum_i m_i, \\quad S_1 = \\sum_i m_i (x_i - K), \\quad S_2 = \\sum_i m_i |x_i - K|^2

about a *shift* ``K`` that is the same on every device (batch norm uses its running mean;
without running statistics ``K = 0`` unless the caller gives one). One ``psum`` of the stacked
``(S_1, S_2[, n])`` — ``2C`` or ``3C`` numbers, whatever the number of devices — gives the
global sums; then ``μ = K + S_1/n`` and ``M_2 = S_2 − S_1²/n``.

**Guard.** The subtraction ``S_2 − S_1²/n`` loses about ``log2(c)`` bits, with the condition
number ``c = S_2 / M_2 = 1 + (μ − K)²/σ²``. When ``c`` exceeds the limit of the variance
mode for some statistic, a ``lax.cond`` — whose predicate is computed from the all-reduced
sums, so every device takes the same branch — adds one exact correction: a second fused pass
about the global mean ``μ`` (the sums ``Σ(x−μ)``, ``Σ|x−μ|²``) and one more ``psum`` of
``2C`` numbers. Its condition number is ``1 + O(eps)``, so the result has the rounding error
of the textbook two-pass algorithm. The fallback runs on the first steps from fresh running
statistics or after a jump of the data; on ordinary data it never runs.

Limits: ``STABLE_LIMIT = 16`` (``use_fast_variance=False``: at most 4 bits more rounding error
than two-pass; the mean may drift 3.9 σ from the shift) and ``FAST_LIMIT = 1024`` (flax's
``use_fast_variance=True``: ``K = 0`` and flax's numbers wherever ``mean² < 1023 σ²``). The
condition number is taken relative to ``var + ε`` for a normalization (``floor``), the quantity
it divides by, so a constant feature whose shift is not exactly its value does not take the
branch. In float32 the relative error of the variance stays below ``limit · n_eff · eps`` where
``n_eff`` is the accumulation error growth of the reduction (about ``sqrt(n)`` on CPU).

Small local inputs (fewer than ``ALIAS_MIN_SIZE`` entries, no ``axis_name``, not sharded) take
two dependent passes instead — the mean, then the sums about it — because on CPU a conditional's
dispatch costs more than a pass over a small array.

**Merge.** :func:`merge` is Chan, Golub & LeVeque's pairwise update of ``(n, μ, M_2)``, used
for population statistics, ghost batches and the pooling of per-device running statistics.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.types import Moments

# Largest condition number S2 / M2 trusted without the exact correction, per variance mode.
STABLE_LIMIT = 16.0
FAST_LIMIT = 1024.0


def accumulation_dtype(dtype) -> jnp.dtype:
  """At least float32 (complex64 for complex input); float64 stays float64."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def abs2(z):
  """``|z|²`` (``z·z`` for real input), real."""
  if jnp.iscomplexobj(z):
    return z.real * z.real + z.imag * z.imag
  return z * z


# Below this many elements a pass over x costs less than a kernel launch: no barriers.
ALIAS_MIN_SIZE = 1 << 16


def large(x) -> bool:
  """Whether ``x`` is large enough for per-pass aliases (a symbolic size counts as large)."""
  try:
    return bool(x.size >= ALIAS_MIN_SIZE)
  except Exception:  # noqa: BLE001 - a symbolic dimension (jax.export) cannot be compared
    return True


def aliases(x: jax.Array, n: int):
  """``n`` aliases of ``x`` that XLA cannot merge (one ``optimization_barrier``).

  When one value (a bf16 ``x`` up-cast to float32, or a broadcast per-feature vector) feeds
  several fused passes, XLA:CPU writes it out in full, a temporary the size of ``x``; giving
  each pass its own alias keeps the computation inside each pass's loop. The aliases must
  come from a single barrier: separate identical barriers are merged and then removed.
  """
  return lax.optimization_barrier((x,) * n)


def bcast(v: jax.Array, shape: tuple[int, ...], feat: tuple[int, ...],
          sharding: Any = None) -> jax.Array:
  """Broadcasts a stat-shaped vector against ``x`` (``broadcast_in_dim``, no reshape)."""
  return lax.broadcast_in_dim(v, shape, feat, out_sharding=sharding)


# ---------------------------------------------------------------- blocks (grouped statistics)
# ``grouping = (pos, n)`` cuts stat axis ``pos`` into ``n`` consecutive blocks that share
# their statistics: the channels of group norm, the examples of ghost batch norm. The
# reductions run on x's own layout and are then summed per block (x is never reshaped).


def _reshape(v, shape, spec_of):
  sharding = collectives.explicit_sharding(v)
  if sharding is None:
    return v.reshape(shape)
  spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
  return lax.reshape(v, shape, out_sharding=NamedSharding(sharding.mesh, P(*spec_of(spec))))


def split(v, pos, n):
  """Cuts axis ``pos`` of ``v`` into ``(n, length // n)`` (keeping an explicit sharding)."""
  shape = v.shape[:pos] + (n, v.shape[pos] // n) + v.shape[pos + 1:]
  return _reshape(v, shape, lambda s: s[:pos] + (s[pos], None) + s[pos + 1:])


def _merge_axes(v, pos):
  shape = v.shape[:pos] + (v.shape[pos] * v.shape[pos + 1],) + v.shape[pos + 2:]
  return _reshape(v, shape, lambda s: s[:pos + 1] + s[pos + 2:])


def block_sum(v, grouping):
  """Sums a stat-shaped ``v`` over each block of the grouped axis (block-shaped result)."""
  if grouping is None:
    return v
  pos, n = grouping
  return jnp.sum(split(v, pos, n), axis=pos + 1)


def expand(v, grouping, length):
  """Repeats block-shaped values back to the grouped axis's ``length`` entries."""
  if grouping is None:
    return v
  pos, n = grouping
  e = jnp.expand_dims(v, pos + 1)
  e = jnp.broadcast_to(e, e.shape[:pos + 1] + (length // n,) + e.shape[pos + 2:])
  return _merge_axes(e, pos)


def block_values(v, grouping):
  """One value per block of a stat-shaped ``v`` whose blocks hold equal values."""
  if grouping is None:
    return v
  pos, n = grouping
  return lax.index_in_dim(split(v, pos, n), 0, pos + 1, keepdims=False)


# ---------------------------------------------------------------- local sums and the combine


class Plan(NamedTuple):
  """How the statistics of one normalization are taken (static, hashable).

  Attributes:
    red: axes of ``x`` reduced; the others are the statistics' ("stat") axes.
    axis_name: mapped axis name(s) the sums are synchronized over, or None.
    groups: ``axis_index_groups`` as a tuple of tuples, or None.
    limit: largest trusted condition number (:data:`STABLE_LIMIT` or :data:`FAST_LIMIT`).
    center: False for a mean square about 0 (RMS norm): no shift, no guard.
    grouping: ``(pos, n)`` blocks of stat axis ``pos`` sharing statistics, or None.
  """

  red: tuple
  axis_name: Any = None
  groups: Any = None
  limit: float = STABLE_LIMIT
  center: bool = True
  grouping: Any = None


def variance_limit(use_fast_variance: bool) -> float:
  return FAST_LIMIT if use_fast_variance else STABLE_LIMIT


def _local_sums(x, red, mask, shift, need_s1=True, need_s2=True):
  """One fused pass: count, ``Σ(x − shift)`` and ``Σ|x − shift|²`` over ``red`` (stat-shaped).

  ``count`` is a Python float when there is no mask (every entry counts) and the shape is
  static.
  """
  acc = accumulation_dtype(x.dtype)
  rdt = real_dtype(acc)
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  if mask is None:
    count = math.prod(x.shape[a] for a in red)
    # a static count stays a Python float; a symbolic one (jax.export) becomes an array
    count = float(count) if isinstance(count, int) else jnp.full(
        tuple(x.shape[i] for i in sfeat), jnp.asarray(count, rdt))
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axis=red, dtype=rdt)
  # Each sum reads its own alias of x (and of the broadcast shift), so that XLA keeps the
  # up-cast and the subtraction inside each reduction loop instead of writing x − K out.
  passes = int(need_s1) + int(need_s2)
  xs = aliases(x, passes) if large(x) else (x,) * passes
  ks = (shift,) * passes if shift is None or not large(x) else aliases(shift, passes)

  def centered(xv, k):
    d = xv.astype(acc)
    if k is not None:
      d = d - bcast(k.astype(acc), x.shape, sfeat, collectives.explicit_sharding(x))
    return d if mask is None else jnp.where(mask, d, jnp.zeros((), acc))

  s1 = jnp.sum(centered(xs[0], ks[0]), axis=red) if need_s1 else None
  s2 = jnp.sum(abs2(centered(xs[-1], ks[-1])), axis=red).astype(rdt) if need_s2 else None
  return count, s1, s2


def batch_moments(x: jax.Array, mask: Optional[jax.Array], plan: Plan,
                  shift: Optional[jax.Array] = None, floor: Any = 0.0):
  """Global ``(count, mean, var)`` of ``x``'s valid entries, each stat-shaped.

  ``shift`` (block-shaped, i.e. the stat shape with the grouped axis cut to its blocks) is
  the per-statistic offset ``K``; None is 0. It must be the same on every device of
  ``plan.axis_name``. The result is exact for any offset of the data (see the module
  docstring); ``mean`` and ``var`` of a statistic without valid entries are 0.
  With ``plan.center=False`` ``mean`` is 0 and ``var`` is the mean square.

  ``floor`` (a normalization's epsilon) is the variance below which digits do not matter: the
  guard bounds the error relative to ``var + floor``, the quantity a normalization divides
  by, so a constant (e.g. dead) feature whose shift is not exactly its value does not take
  the correction branch on every step.
  """
  acc = accumulation_dtype(x.dtype)
  rdt = real_dtype(acc)
  red, grouping = plan.red, plan.grouping
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  sshape = tuple(x.shape[i] for i in sfeat)
  glen = None if grouping is None else sshape[grouping[0]]
  bshape = sshape if grouping is None else (
      sshape[:grouping[0]] + (grouping[1],) + sshape[grouping[0] + 1:])

  def as_counts(c):
    if not isinstance(c, float):
      return c
    per_block = 1 if grouping is None else glen // grouping[1]
    size = collectives.axis_size(plan.axis_name, plan.groups)
    return jnp.full(bshape, c * per_block * size, rdt)

  def global_sums(count, s1, s2, known_count=None):
    """Block sums, then ONE psum of ``(S1, S2[, count])``; a known count is not resent."""
    if known_count is not None:
      count = known_count
    elif not isinstance(count, float):
      count = block_sum(count, grouping)
    s1 = None if s1 is None else block_sum(s1, grouping)
    s2 = None if s2 is None else block_sum(s2, grouping)
    parts = [v for v in (s1, s2) if v is not None]
    send_count = known_count is None and not isinstance(count, float)
    if send_count:
      parts.append(count.astype(parts[0].dtype))
    if plan.axis_name is not None:
      parts = list(collectives.psum_stacked(parts, plan.axis_name, plan.groups))
    s1g = parts.pop(0) if s1 is not None else None
    s2g = parts.pop(0).real.astype(rdt) if s2 is not None else None
    if send_count:
      count = parts.pop(0).real.astype(rdt)
    elif isinstance(count, float):
      count = as_counts(count)
    return count, s1g, s2g

  if not plan.center:
    count, _, s2 = global_sums(*_local_sums(x, red, mask, None, need_s1=False))
    n = jnp.maximum(count, 1.0)
    out = (count, jnp.zeros(bshape, acc), s2 / n)
    return tuple(expand(v, grouping, glen) for v in out)

  if shift is None:
    k = jnp.zeros(bshape, acc)
  else:
    k = lax.stop_gradient(jnp.asarray(shift).astype(acc))
    k = jnp.where(jnp.isfinite(abs2(k)), k, jnp.zeros((), acc))  # a corrupt shift is 0

  def shifted(k, known_count=None):
    count, s1, s2 = global_sums(*_local_sums(x, red, mask, expand(k, grouping, glen)),
                                known_count=known_count)
    n = jnp.maximum(count, 1.0)
    d = s1 / n
    return count, k + d, jnp.maximum(s2 - n * abs2(d), 0.0), s2

  if not large(x) and plan.axis_name is None and collectives.explicit_sharding(x) is None:
    # A small local x: kernel dispatch dominates, and two dependent passes (the mean, then
    # the sums about it) cost less than a conditional. Exact for any offset, no guard.
    count, s1, _ = global_sums(*_local_sums(x, red, mask, expand(k, grouping, glen),
                                            need_s2=False))
    _, mean, m2, _ = shifted(k + s1 / jnp.maximum(count, 1.0), known_count=count)
    var = m2 / jnp.maximum(count, 1.0)
    mean = jnp.where(count > 0, mean, jnp.zeros((), acc))
    return tuple(expand(v, grouping, glen) for v in (count, mean, var))

  count, mean, m2, s2 = shifted(k)
  # Trusted where S2 <= limit * (M2 + n * floor), i.e. the shift is within sqrt(limit - 1)
  # std of the mean (NaN-safe: a non-finite sum is not trusted).
  floor = lax.stop_gradient(jnp.asarray(floor, rdt))
  trusted = jnp.all(s2 <= plan.limit * (m2 + count * floor))

  def exact():
    _, mean2, m2_2, _ = shifted(mean, known_count=count)
    return mean2, m2_2

  def select():
    exact_mean, exact_m2 = exact()
    return jnp.where(trusted, mean, exact_mean), jnp.where(trusted, m2, exact_m2)

  try:
    mean, m2 = lax.cond(trusted, lambda: (mean, m2), exact)
  except Exception as e:  # noqa: BLE001 - JAX's sharding errors only; the rest re-raised
    if "sharding" not in str(e) and "not found in mesh" not in str(e):
      raise
    # jax.vmap over an explicitly sharded axis cannot batch a data-dependent cond (JAX
    # 0.10 raises a sharding error for the batched predicate): compute both and select.
    mean, m2 = select()
  valid = count > 0
  mean = jnp.where(valid, mean, jnp.zeros((), acc))
  var = m2 / jnp.maximum(count, 1.0)
  return tuple(expand(v, grouping, glen) for v in (count, mean, var))


# ---------------------------------------------------------------- merges


def merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
  r"""Chan et al.'s pairwise merge of two sets of ``(n, μ, M_2)``, exact in the weights.

  .. math::
     n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad
     \mu = \mu_a + \delta \frac{n_b}{n}, \quad
     M_2 = M_{2,a} + M_{2,b} + |\delta|^2 \frac{n_a n_b}{n}

  A side with ``n = 0`` leaves the other unchanged. Broadcasts like NumPy.
  """
  n = count_a + count_b
  safe = jnp.maximum(n, 1.0)
  delta = mean_b - mean_a
  mean = mean_a + delta * (count_b / safe).astype(delta.dtype)
  m2 = m2_a + m2_b + abs2(delta) * (count_a * count_b / safe).astype(m2_a.dtype)
  keep_a = count_b <= 0
  return (n, jnp.where(keep_a, mean_a, mean), jnp.where(keep_a, m2_a, m2))


def merge_along(count, mean, m2, axis: int = 0):
  """Merges the ``(n, μ, M_2)`` stacked along ``axis`` into one (the exact pooled moments).

  Two steps, each a plain sum: the total mean ``Σ n_i μ_i / n``, then
  ``M_2 = Σ M_{2,i} + Σ n_i |μ_i − μ|²`` (the pairwise merge applied to all at once).
  """
  n = jnp.sum(count, axis=axis)
  safe = jnp.maximum(n, 1.0)
  mean_t = jnp.sum(count * mean, axis=axis) / safe
  dev = abs2(mean - jnp.expand_dims(mean_t, axis))
  m2_t = jnp.sum(m2, axis=axis) + jnp.sum(count * dev, axis=axis)
  return n, mean_t, m2_t


# ---------------------------------------------------------------- public: moments()


def moments(
    x: ArrayLike,
    *,
    axis: checks.Axes = -1,
    mask: Optional[ArrayLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
    shift: Optional[ArrayLike] = None,
) -> Moments:
  r"""Per-feature mean, biased variance and count of ``x`` over all non-feature axes.

  .. math::
     \mu = \frac{1}{n}\sum_{i \in \text{valid}} x_i, \qquad
     \sigma^2 = \frac{1}{n}\sum_{i \in \text{valid}} |x_i - \mu|^2

  Numerics: one fused pass accumulates ``Σ(x − K)`` and ``Σ|x − K|²`` in float32 (or wider)
  about a per-feature shift ``K`` (``shift``, default 0), without an up-cast copy of ``x``.
  Where the shift is far from the mean (``(μ − K)² > 15 σ²``, or ``1023 σ²`` with
  ``use_fast_variance=True``) an exact correction pass about the mean is added, so the result
  is exact for any offset of the data — e.g. float32 data ``1e4 + N(0, 1)`` keeps a relative
  error near float32's rounding, synchronized or not. Pass a shift close to the mean (a
  running mean, a previous batch's mean) to keep one pass on data far from zero.
  With ``axis_name`` the statistics are those of the union of all devices' valid entries,
  weighted by their true counts, computed with one ``psum`` of ``2–3 × features`` numbers
  (independent of the number of devices); the shift must be the same on every device.

  Args:
    x: input array, any float dtype (complex allowed: the variance is that of ``|x - mean|``).
    axis: feature axis or axes (default -1, channels-last); the others are reduced.
    mask: optional bool array broadcastable to ``x``; False entries do not count (even if they
      hold NaN or Inf).
    axis_name: name or tuple of names of mapped axes (``shard_map``/``pmap``/``vmap``) over
      which to synchronize the statistics; None for none.
    axis_index_groups: optional groups of device indices to synchronize within (``pmap``).
    use_fast_variance: flax's ``E[x²] − E[x]²`` numbers where they are accurate (the
      correction pass only where ``mean² > 1023 var``); ignores ``shift``.
    shift: optional per-feature offset ``K`` (feature shape), treated as a constant.

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
  fshape = tuple(x.shape[a] for a in feat)
  if shift is not None:
    checks.feature_shape_matches(fn, "shift", shift, fshape,
                                 "pass one value per feature (e.g. a running mean).")
  plan = Plan(red=checks.reduction_axes(x.ndim, feat), axis_name=axis_name,
              groups=collectives.groups_tuple(axis_index_groups),
              limit=variance_limit(use_fast_variance))
  k = None if shift is None or use_fast_variance else jnp.asarray(shift).reshape(fshape)
  count, mean, var = batch_moments(x, None if mask is None else jnp.asarray(mask), plan, k)
  return Moments(mean, var, count)
