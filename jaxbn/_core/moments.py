"""The one moment algebra: a sampled shift, local sums, the cross-device combine, merges.

Every statistic in jaxbn — batch norm and its variants, the per-example norms, the precise
statistics and the pooling of per-device running statistics — is computed here.

**Algorithm.** For each statistic (a feature, or a block of them for grouped norms) a *shift*
``K`` is taken from the batch itself: the mean of the valid entries of a small strided sample
of ``x`` (at most :data:`SAMPLE_PER_AXIS` evenly spaced positions along each reduced axis,
e.g. 64 entries per feature of an NHWC batch, a read of a few kilobytes). Then one fused pass
over ``x`` accumulates, in at least float32,

.. math::
   n = \\sum_i m_i, \\quad S_1 = \\sum_i m_i (x_i - K), \\quad S_2 = \\sum_i m_i |x_i - K|^2

and ``μ = K + S_1/n``, ``M_2 = S_2 − S_1²/n``. The subtraction loses about ``log2(c)`` bits,
``c = S_2 / M_2 = 1 + (μ − K)²/σ²``. Because ``K`` is a mean of ``r`` of the data's own
values, ``(K − μ)² ≤ (1/r) Σ_sample (x_s − μ)² ≤ n σ² / r``: ``c ≤ 1 + n/r`` whatever the
offset of the data (typically ``c ≈ 1 + 1/r`` for exchangeable rows), and ``x − K`` is exact
in floating point where ``K`` is within a factor 2 of ``x`` (Sterbenz). So the statistics are
exact for any offset — float32 ``1e4 + N(0, 1)`` keeps a relative variance error near
``c · log2(n) · eps`` — with no guard, no conditional and no second pass.

**Synchronized** (``axis_name``): each device takes its own sampled shift ``K_d`` and makes
its pass about it (it does not wait for any collective). Round 1, one ``psum`` of ``C``
numbers (``2C`` with a mask: the sample's valid counts weight it) that depends only on the
sample and so overlaps the pass, gives the common shift ``K`` = the mean of the devices'
shifts. Each device moves its sums to ``K`` exactly in algebra and well conditioned in
floating point (``δ = K_d − K`` is of the order of the data's spread):
``S_2 ← S_2 + 2δ S_1 + n δ²``, ``S_1 ← S_1 + n δ``. Round 2, one ``psum`` of ``(S_1, S_2[,
n])`` — ``2C`` or ``3C`` numbers, independent of the number of devices — gives the global
sums about the common shift. Under plain ``jax.jit`` on sharded arrays the sample spans every
shard and XLA's partitioner inserts the two all-reduces.

A sample without a valid entry (a fully masked window) falls back to the caller's ``shift``
(batch norm's running mean, else 0); only then does the bound above not hold.

XLA:CPU only (``lax.platform_dependent``): each pass reads its own alias of ``x`` through one
``optimization_barrier`` for inputs of at least :data:`ALIAS_MIN_SIZE` entries, which keeps
XLA:CPU from writing the up-cast of a bf16 ``x`` out in full. The CUDA and TPU programs hold
no barrier and no conditional.

**Merge.** :func:`merge` is Chan, Golub & LeVeque's pairwise update of ``(n, μ, M_2)``, used
for population statistics; :func:`merge_along` pools per-device running statistics.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.types import Moments

# Positions sampled along each reduced axis for the shift (evenly spaced, the first included).
SAMPLE_PER_AXIS = 4


def accumulation_dtype(dtype) -> jnp.dtype:
  """At least float32 (complex64 for complex input); float64 stays float64."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return jnp.promote_types(dtype, jnp.float32)


def abs2(z):
  """``|z|²`` (``z·z`` for real input), real."""
  if jnp.iscomplexobj(z):
    return z.real * z.real + z.imag * z.imag
  return z * z


# XLA:CPU only: below this many elements a pass costs less than a barrier's kernel boundary.
ALIAS_MIN_SIZE = 1 << 16


def large(x) -> bool:
  """Whether ``x`` is large enough for per-pass aliases on CPU (a symbolic size counts)."""
  size = x.size
  return not isinstance(size, int) or size >= ALIAS_MIN_SIZE


def on_cpu(fn, *args):
  """``fn(*args)`` in the XLA:CPU program, ``args`` unchanged in every other one.

  For XLA:CPU-specific devices (optimization barriers): ``lax.platform_dependent`` keeps
  them out of the CUDA and TPU programs (lowered for one platform, its index is a constant
  that XLA folds away).
  """
  # A barrier types all its outputs device-varying when one input is (shard_map): give
  # every input the same varying axes first so that both branches have one type.
  vma = frozenset().union(*(collectives.varying_axes(v) for v in jax.tree.leaves(args)))
  if vma:
    def vary(v):
      missing = tuple(sorted(vma - collectives.varying_axes(v)))
      return lax.pcast(v, missing, to="varying") if missing else v
    args = jax.tree.map(vary, args)
  return lax.platform_dependent(*args, cpu=fn, default=lambda *a: a)


def barrier(*args):
  """``lax.optimization_barrier(args)`` in the XLA:CPU program, ``args`` elsewhere."""
  return on_cpu(lambda *v: lax.optimization_barrier(v), *args)


def aliases(v: jax.Array, n: int, x: jax.Array):
  """``n`` aliases of ``v`` that XLA:CPU cannot merge (one ``optimization_barrier``, CPU only).

  When one value (a bf16 ``x`` up-cast to float32, or a broadcast per-feature vector) feeds
  several fused passes over ``x``, XLA:CPU writes it out in full, a temporary the size of
  ``x``; giving each pass its own alias keeps the computation inside each pass's loop. The
  aliases must come from a single barrier: separate identical barriers are merged and then
  removed. None (``v`` ``n`` times) for an ``x`` below :data:`ALIAS_MIN_SIZE` entries, where
  a barrier's kernel boundary costs more than the temporary it avoids; other backends fuse
  multi-output reductions themselves and get ``v`` ``n`` times.
  """
  if n < 2 or not large(x):
    return (v,) * n
  return barrier(*((v,) * n))


def broadcaster(x: jax.Array, feat: tuple[int, ...]):
  """Broadcasts vectors along ``feat`` against ``x`` (``broadcast_in_dim``, no reshape), with
  ``x``'s explicit sharding (see :func:`jaxbn._core.collectives.explicit_sharding`)."""
  sharding = collectives.explicit_sharding(x)
  return lambda v: lax.broadcast_in_dim(v, x.shape, feat, out_sharding=sharding)


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
  return _reshape(e, v.shape[:pos] + (length,) + v.shape[pos + 1:],  # (n, length // n) merged
                  lambda s: s[:pos + 1] + s[pos + 2:])


def block_values(v, grouping):
  """One value per block of a stat-shaped ``v`` whose blocks hold equal values."""
  if grouping is None:
    return v
  pos, n = grouping
  return lax.index_in_dim(split(v, pos, n), 0, pos + 1, keepdims=False)


# ---------------------------------------------------------------- the sampled shift


def _sample(v, red):
  """Evenly spaced entries of ``v`` along each axis in ``red`` (at most SAMPLE_PER_AXIS each).

  One strided ``slice`` over all axes at once (chained slices are materialized one by one
  by XLA:TPU). An axis sharded over mesh axes (plain ``jax.jit`` on an explicit mesh) is
  first cut into ``(shards, local)``, and each shard is sampled, so every device contributes
  and no slice crosses a shard boundary. A symbolic axis (``jax.export``) contributes its
  first entry. Returns the sample and its reduced axes.
  """
  sharding = collectives.explicit_sharding(v)
  spec = (None,) * v.ndim if sharding is None else tuple(sharding.spec) + (None,) * v.ndim
  sampled = []  # axes of the (split) array to stride
  axes = []
  offset = 0
  for a in sorted(red):
    pos = a + offset
    shards = math.prod(sharding.mesh.shape[p] for p in collectives.names(spec[a]))
    if shards > 1:
      v = split(v, pos, shards)
      axes.append(pos)
      offset += 1
      pos += 1
    sampled.append(pos)
    axes.append(pos)
  strided = [i in sampled and isinstance(d, int) for i, d in enumerate(v.shape)]
  limits = tuple(d if s or i not in sampled else 1  # symbolic: the first entry
                 for i, (d, s) in enumerate(zip(v.shape, strided)))
  strides = tuple(max(1, -(-d // SAMPLE_PER_AXIS)) if s else 1 for d, s in zip(v.shape, strided))
  return lax.slice(v, (0,) * v.ndim, limits, strides), tuple(axes)


def _sampled_shift(x, mask, red, grouping, fallback):
  """Per-statistic shift from the sample (block-shaped) and its valid weight.

  ``K`` is the mean of the sample's valid entries; where there is none, or the mean is not
  finite (a NaN in the data), it is ``fallback``. The weight ``w`` is the number of valid
  sampled entries (None without a mask: the same number on every device).
  """
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  xs, axes = _sample(lax.stop_gradient(x), red)
  xs = xs.astype(acc)
  if mask is None:
    w = None
    total = jnp.sum(xs, axis=axes)
    per_block = 1 if grouping is None else total.shape[grouping[0]] // grouping[1]
    k = block_sum(total, grouping) / (math.prod(xs.shape[a] for a in axes) * per_block)
    ok = jnp.isfinite(abs2(k))
  else:
    ms, _ = _sample(jnp.broadcast_to(mask, x.shape), red)
    total = block_sum(jnp.sum(jnp.where(ms, xs, jnp.zeros((), acc)), axis=axes), grouping)
    w = block_sum(jnp.sum(ms, axis=axes, dtype=rdt), grouping)
    k = total / jnp.maximum(w, 1.0)
    ok = (w > 0) & jnp.isfinite(abs2(k))
    w = jnp.where(ok, w, jnp.zeros((), rdt))
  return jnp.where(ok, k, like(fallback, k)), w


def like(v, ref):
  """``v`` with the explicit sharding of ``ref`` (plain jit on an explicit mesh), else ``v``."""
  sharding = collectives.explicit_sharding(ref)
  if sharding is None or collectives.explicit_sharding(v) == sharding:
    return v
  return jax.sharding.reshard(v, sharding)


# ---------------------------------------------------------------- local sums and the combine


class Plan(NamedTuple):
  """How the statistics of one normalization are taken (static, hashable).

  Attributes:
    red: axes of ``x`` reduced; the others are the statistics' ("stat") axes.
    axis_name: mapped axis name(s) the sums are synchronized over, or None.
    groups: ``axis_index_groups`` as a tuple of tuples, or None.
    center: False for a mean square about 0 (RMS norm): no shift.
    grouping: ``(pos, n)`` blocks of stat axis ``pos`` sharing statistics, or None.
  """

  red: tuple
  axis_name: Any = None
  groups: Any = None
  center: bool = True
  grouping: Any = None


def _local_sums(x, red, mask, shift, need_s1=True):
  """One fused pass: count, ``Σ(x − shift)`` and ``Σ|x − shift|²`` over ``red`` (stat-shaped).

  ``count`` is a Python float when there is no mask (every entry counts) and the shape is
  static (an array for a symbolic one, ``jax.export``).
  """
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  if mask is None:
    count = math.prod(x.shape[a] for a in red)
    count = float(count) if isinstance(count, int) else jnp.full(
        tuple(x.shape[i] for i in sfeat), jnp.asarray(count, rdt))
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axis=red, dtype=rdt)
  passes = 1 + int(need_s1)
  xs = aliases(x, passes, x)
  ks = (shift,) * passes if shift is None else aliases(shift, passes, x)

  def centered(xv, k):
    d = xv.astype(acc)
    kb = None if k is None else broadcaster(x, sfeat)(k.astype(acc))
    if mask is not None:  # masked entries (even NaN/Inf ones) become the shift: d = 0 there
      d = jnp.where(mask, d, jnp.zeros((), acc) if kb is None else kb)
    return d if kb is None else d - kb

  s1 = jnp.sum(centered(xs[0], ks[0]), axis=red) if need_s1 else None
  s2 = jnp.sum(abs2(centered(xs[-1], ks[-1])), axis=red).astype(rdt)
  return count, s1, s2


def batch_moments(x: jax.Array, mask: Optional[jax.Array], plan: Plan,
                  shift: Optional[jax.Array] = None):
  """Global ``(count, mean, var)`` of ``x``'s valid entries, each stat-shaped.

  Exact for any offset of the data, with no conditional (see the module docstring).
  ``shift`` (block-shaped, i.e. the stat shape with the grouped axis cut to its blocks; the
  same on every device of ``plan.axis_name``) is only the fallback for a statistic whose
  sample holds no valid entry; None is 0. ``mean`` and ``var`` of a statistic without valid
  entries are 0. With ``plan.center=False`` ``mean`` is 0 and ``var`` is the mean square.
  """
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  red, grouping, axis_name = plan.red, plan.grouping, plan.axis_name
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  sshape = tuple(x.shape[i] for i in sfeat)
  glen = None if grouping is None else sshape[grouping[0]]
  bshape = sshape if grouping is None else (
      sshape[:grouping[0]] + (grouping[1],) + sshape[grouping[0] + 1:])

  def block_counts(c):
    if isinstance(c, float):  # every entry counts: a static number per block
      return jnp.full(bshape, c * (1 if grouping is None else glen // grouping[1]), rdt)
    return block_sum(c, grouping)

  def psum(parts):
    return list(collectives.psum_stacked(parts, axis_name, plan.groups))

  def total(sums, count, static):
    """The global sums, in one collective (a static count is the same everywhere: not sent)."""
    if static:
      return psum(sums), count * collectives.axis_size(axis_name, plan.groups)
    *sums, count = psum(sums + [count.astype(sums[0].dtype)])
    return sums, count.real

  if not plan.center:
    count, _, s2 = _local_sums(x, red, mask, None, need_s1=False)
    static = isinstance(count, float)
    count, s2 = block_counts(count), block_sum(s2, grouping)
    (s2,), count = total([s2], count, static)
    out = (count, jnp.zeros(bshape, acc), s2 / jnp.maximum(count, 1.0))
    return tuple(expand(v, grouping, glen) for v in out)

  fallback = jnp.zeros(bshape, acc) if shift is None else lax.stop_gradient(
      jnp.asarray(shift).astype(acc))
  fallback = jnp.where(jnp.isfinite(abs2(fallback)), fallback, jnp.zeros((), acc))
  k_local, w = _sampled_shift(x, mask, red, grouping, fallback)
  count, s1, s2 = _local_sums(x, red, mask, expand(k_local, grouping, glen))
  static = isinstance(count, float)
  count, s1, s2 = block_counts(count), block_sum(s1, grouping), block_sum(s2, grouping)
  k = k_local
  if axis_name is not None:
    # Round 1 (depends on the sample only, so it overlaps the pass): the common shift.
    if mask is None:
      k = psum([k_local])[0] / collectives.axis_size(axis_name, plan.groups)
    else:
      kw, wsum = psum([k_local * w, w.astype(acc)])
      wsum = wsum.real
      k = jnp.where(wsum > 0, kw / jnp.maximum(wsum, 1.0), like(fallback, kw))
    # Move the local sums to the common shift (δ is of the order of the data's spread).
    delta = k_local - k
    s2 = s2 + (2.0 * (delta.conj() * s1).real + count * abs2(delta)).astype(rdt)
    s1 = s1 + count * delta
    # Round 2: the global sums.
    (s1, s2), count = total([s1, s2.astype(acc)], count, static)
    s2 = s2.real.astype(rdt)
  n = jnp.maximum(count, 1.0)
  d = s1 / n
  mean = jnp.where(count > 0, k + d, jnp.zeros((), acc))
  var = jnp.maximum(s2 - n * abs2(d), 0.0) / n
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

  Numerics: one fused pass accumulates ``Σ(x − K)`` and ``Σ|x − K|²`` in float32 (or wider),
  without an up-cast copy of ``x``, about a per-feature shift ``K`` taken from the batch
  itself (the mean of a strided sample of a few entries per feature), so the result is exact
  for any offset of the data — float32 data ``1e4 + N(0, 1)`` keeps a relative error near
  float32's rounding, synchronized or not — with no conditional and no second pass.
  With ``axis_name`` the statistics are those of the union of all devices' valid entries,
  weighted by their true counts: one ``psum`` of ``features`` numbers (``2 × features`` with a
  mask) agrees on a common shift while the pass runs, one of ``2–3 × features`` numbers sums
  the moments — both independent of the number of devices.

  Args:
    x: input array, any float dtype (complex allowed: the variance is that of ``|x - mean|``).
    axis: feature axis or axes (default -1 for NHWC; 1 for NCHW).
    mask: optional bool array broadcastable to ``x``: which entries count in the statistics
      (False ones do not, even if they hold NaN or Inf).
    axis_name: mapped axis name(s) to synchronize statistics over (``shard_map``, ``pmap``,
      ``vmap``); not needed under plain ``jax.jit`` on sharded arrays.
    axis_index_groups: synchronize within these groups of device indices only (``pmap``).
    use_fast_variance: accepted for flax compatibility: both modes compute the same exact
      one-pass statistics (flax's fast ``E[x²] − E[x]²`` loses the variance far from zero).
    shift: optional per-feature fallback offset (feature shape, treated as a constant, the
      same on every device), used only for a feature whose sample holds no valid entry.

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
  checks.feature_shape_matches(fn, "shift", shift, fshape,
                               "pass one value per feature (e.g. a running mean).")
  plan = Plan(red=checks.reduction_axes(x.ndim, feat), axis_name=axis_name,
              groups=collectives.groups_tuple(axis_index_groups))
  k = None if shift is None else jnp.asarray(shift).reshape(fshape)
  count, mean, var = batch_moments(x, None if mask is None else jnp.asarray(mask), plan, k)
  return Moments(mean, var, count)
