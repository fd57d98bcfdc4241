"""Normalizations that do not use the batch: layer, RMS, group and instance normalization.

They share one computation — statistics over some axes, then an affine map — and differ
only in which axes are reduced and which carry ``scale``/``bias``. None has running state,
so training and inference are the same function. Argument names follow flax's layers
(``reduction_axes``, ``feature_axes``, ``num_groups``, ``group_size``).

The shared engine, :func:`standardize_train` (a ``jax.custom_jvp`` with a closed-form,
rematerialized derivative), also computes the training step of batch renormalization
(per-feature statistics with constant corrections) and of ghost batch norm (statistics per
block of examples), see ``renorm.py`` and ``ghost.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.moments import (_abs2, _aliases, accumulation_dtype, bcast, combine,
                                 feature_moments)
from jaxbn._core.normalize import output_dtype

Axes = checks.Axes


def _axes(fn: str, name: str, ndim: int, axes: Axes) -> tuple[int, ...]:
  """Like ``checks.feature_axes`` but the message names the argument."""
  try:
    return checks.feature_axes(fn, ndim, axes)
  except (ValueError, TypeError) as e:
    raise type(e)(str(e).replace("`axis`", f"`{name}`")) from None


def _check_param(fn: str, name: str, v: Any, shape: tuple[int, ...], where: str) -> None:
  if v is None:
    return
  checks.float_input(fn, v, name)
  got = tuple(jnp.shape(v))
  if got != shape and got != (int(np.prod(shape)),):
    raise ValueError(
        f"{fn}: `{name}` has shape {got} but `x` has shape {shape} along {where}; pass one "
        f"entry per feature (shape {shape}), or set `feature_axes` to the axes it follows.")


def _check_affine(fn: str, x: jax.Array, feat: tuple[int, ...], feature_axes: Axes,
                  scale: Any, bias: Any) -> None:
  """Checks ``scale`` and ``bias`` (either may be None) against ``x`` along ``feat``."""
  fshape = tuple(x.shape[a] for a in feat)
  _check_param(fn, "scale", scale, fshape, f"`feature_axes`={feature_axes!r}")
  _check_param(fn, "bias", bias, fshape, f"`feature_axes`={feature_axes!r}")


def _per_example_args(fn: str, x: ArrayLike, reduction_axes: Axes, feature_axes: Axes,
                      scale: Any, bias: Any):
  """Validates layer/RMS norm's arguments; returns ``(x, reduction axes, feature axes)``."""
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  red = _axes(fn, "reduction_axes", x.ndim, reduction_axes)
  feat = _axes(fn, "feature_axes", x.ndim, feature_axes)
  _check_affine(fn, x, feat, feature_axes, scale, bias)
  return x, red, feat


# ---------------------------------------------------------------- the shared engine
# cfg = (red, pfeat, axis_name, axis_index_groups, fast, center, out_dtype, grouping):
# statistics over the axes ``red`` of x (shape of the other axes, the "stat axes"),
# parameters along ``pfeat``. ``grouping = (pos, n)`` cuts stat axis ``pos`` into ``n``
# consecutive blocks that share their statistics: the channels of group norm, the examples
# of ghost batch norm. The reductions then run on x's own layout and are summed per block
# (no reshape of x, whose inner axis stays contiguous).


def _split(v, pos, n):
  """Cuts axis ``pos`` of ``v`` into ``(n, length // n)`` (keeping an explicit sharding)."""
  shape = v.shape[:pos] + (n, v.shape[pos] // n) + v.shape[pos + 1:]
  sharding = collectives.explicit_sharding(v)
  if sharding is None:
    return v.reshape(shape)
  spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
  out = NamedSharding(sharding.mesh, P(*(spec[:pos] + (spec[pos], None) + spec[pos + 1:])))
  return lax.reshape(v, shape, out_sharding=out)


def _merge(v, pos):
  """Merges axes ``pos`` and ``pos + 1`` of ``v`` (the inverse of :func:`_split`)."""
  shape = v.shape[:pos] + (v.shape[pos] * v.shape[pos + 1],) + v.shape[pos + 2:]
  sharding = collectives.explicit_sharding(v)
  if sharding is None:
    return v.reshape(shape)
  spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
  out = NamedSharding(sharding.mesh, P(*(spec[:pos + 1] + spec[pos + 2:])))
  return lax.reshape(v, shape, out_sharding=out)


def _group_sum(v, grouping):
  """Sums a stat-shaped ``v`` over each block of the grouped axis."""
  if grouping is None:
    return v
  pos, n = grouping
  return jnp.sum(_split(v, pos, n), axis=pos + 1)


def _expand(v, grouping, length):
  """Repeats per-block values back to the grouped axis's ``length`` entries."""
  if grouping is None:
    return v
  pos, n = grouping
  e = jnp.expand_dims(v, pos + 1)
  e = jnp.broadcast_to(e, e.shape[:pos + 1] + (length // n,) + e.shape[pos + 2:])
  return _merge(e, pos)


def group_values(v, grouping):
  """One value per block of a stat-shaped ``v`` whose blocks hold equal values."""
  pos, n = grouping
  return lax.index_in_dim(_split(v, pos, n), 0, pos + 1, keepdims=False)


def _local_sums(x, red, mask, acc, rdt, shift=None):
  """Per-stat count, Σ(x − shift) and Σ(x − shift)² of the valid entries (stat-shaped)."""
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  sshape = tuple(x.shape[i] for i in sfeat)
  xa, xb = _aliases(x, 2)
  xa, xb = xa.astype(acc), xb.astype(acc)
  if shift is not None:
    sh_a, sh_b = _aliases(shift, 2)
    xa = xa - bcast(sh_a, x.shape, sfeat)
    xb = xb - bcast(sh_b, x.shape, sfeat)
  if mask is None:
    count = jnp.full(sshape, float(np.prod([x.shape[a] for a in red])), rdt)
    return count, jnp.sum(xa, axis=red), jnp.sum(_abs2(xb), axis=red).astype(rdt)
  mask = jnp.broadcast_to(mask, x.shape)
  count = jnp.sum(mask, axis=red, dtype=rdt)
  s1 = jnp.sum(jnp.where(mask, xa, 0), axis=red)
  return count, s1, jnp.sum(jnp.where(mask, _abs2(xb), 0), axis=red).astype(rdt)


def _grouped_moments(x, red, mask, grouping, axis_name, groups, fast):
  """Mean and variance per block of the grouped stat axis, expanded back to its entries.

  Reductions run over ``red`` on ``x``'s own layout and are then summed per block; the
  stable variance is two-pass (mean, then the sum of squares about it), the fast one
  ``Σx² − n·mean²``.
  """
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  length = x.shape[sfeat[grouping[0]]]
  count, s1, s2 = _local_sums(x, red, mask, acc, rdt)
  count, s1 = _group_sum(count, grouping), _group_sum(s1, grouping)
  n = jnp.maximum(count, 1.0)
  mean = s1 / n
  if fast:
    m2 = jnp.maximum(_group_sum(s2, grouping) - n * _abs2(mean), 0.0).astype(rdt)
  else:
    _, _, d2 = _local_sums(x, red, mask, acc, rdt, shift=_expand(mean, grouping, length))
    m2 = _group_sum(d2, grouping)
  count, mean, var = combine(count, mean, m2, axis_name, groups, fast)
  return tuple(_expand(v, grouping, length) for v in (count, mean, var))


def _mean_square(x, red, mask, grouping, axis_name, groups):
  """Count and mean of ``|x|²`` over ``red`` (stat-shaped), float32, one collective."""
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  count, _, s2 = _local_sums(x, red, mask, acc, rdt)
  count, s2 = _group_sum(count, grouping), _group_sum(s2, grouping)
  count, s2 = collectives.psum_stacked((count, s2), axis_name, groups)
  ms = s2 / jnp.maximum(count, 1.0)
  if grouping is not None:
    sfeat = tuple(i for i in range(x.ndim) if i not in red)
    count, ms = (_expand(v, grouping, x.shape[sfeat[grouping[0]]]) for v in (count, ms))
  return count, jnp.zeros_like(ms), ms


def _corrections(mean, var, epsilon, ref_mean, ref_var, r_lo, r_hi, d_max):
  """Batch renorm's clipped ``r = σ_B/σ``, ``d = (μ_B − μ)/σ``, ``σ = sqrt(var + ε)``."""
  inv_ref = lax.rsqrt(ref_var + epsilon)
  r = jnp.clip(jnp.sqrt(var + epsilon) * inv_ref, r_lo, r_hi)
  d = jnp.clip((mean - ref_mean) * inv_ref, -d_max, d_max)
  return r, d


def _effective(scale, bias, r, d, acc):
  """Effective ``(γ r, γ d + β)`` (None where absent): the correction folded into γ, β."""
  g = None if scale is None else scale.astype(acc)
  b = None if bias is None else bias.astype(acc)
  if r is None:
    return g, b
  g_eff = r if g is None else r * g
  b_eff = d if g is None else d * g
  return g_eff, b_eff if b is None else b_eff + b


def _stats(cfg, x, mask, epsilon, correction):
  red, pfeat, axis_name, groups, fast, center, out_dtype, grouping = cfg
  if not center:
    count, mean, var = _mean_square(x, red, mask, grouping, axis_name, groups)
  elif grouping is not None:
    count, mean, var = _grouped_moments(x, red, mask, grouping, axis_name, groups, fast)
  else:
    count, mean, var = feature_moments(x, red, mask, axis_name, groups, fast)
  inv = lax.rsqrt(var + epsilon)
  r = d = None
  if correction is not None:
    r, d = _corrections(mean, var, epsilon, *correction)
  return count, mean, var, inv, r, d


def _in_stat_shape(v, sfeat, pfeat, sshape):
  """A parameter-shaped vector broadcast to the statistics' shape (``pfeat ⊆ sfeat``)."""
  if v is None or sfeat == pfeat:
    return v
  return lax.broadcast_in_dim(v, sshape, tuple(sfeat.index(a) for a in pfeat))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def standardize_train(cfg, x, scale, bias, mask, epsilon, correction):
  r"""``y = (x − μ) s · γ_e + β_e`` with statistics over ``red``: returns (y, mean, var, count).

  The statistics (mean, variance — or the mean square when not ``center`` — and count) are
  taken over the axes ``red`` of the valid entries of ``x`` (and the entries of a block of
  the grouped stat axis with ``grouping``; synchronized over ``axis_name``) and have the
  shape of the other axes;
  ``scale``/``bias`` have the shape of ``x`` along ``pfeat``. With a ``correction`` (batch
  renorm; then ``pfeat`` are the statistics' axes) ``γ_e = γ r`` and ``β_e = γ d + β`` with
  ``r``, ``d`` constants, else ``γ_e = γ``, ``β_e = β``. Layer, RMS, group and instance norm
  and batch renorm are this function. When the parameters' axes are among the statistics'
  (batch, instance and group norm) everything folds into one coefficient and one offset per
  statistic, so the pass over ``x`` is a subtract, a multiply and an add per entry.
  Gradients are closed-form (see the JVP); the returned statistics carry none (they only
  feed running averages, under ``stop_gradient``).
  """
  red, pfeat, axis_name, groups, fast, center, out_dtype, grouping = cfg
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  count, mean, var, inv, r, d = _stats(cfg, x, mask, epsilon, correction)
  acc = accumulation_dtype(x.dtype)
  g, b = _effective(scale, bias, r, d, acc)
  sharding = collectives.explicit_sharding(x)
  bs = functools.partial(bcast, shape=x.shape, feat=sfeat, sharding=sharding)
  bp = functools.partial(bcast, shape=x.shape, feat=pfeat, sharding=sharding)
  if mask is not None:  # masked entries holding NaN/Inf must not leak into the output
    x = jnp.where(mask | jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  xa = x.astype(acc)
  if set(pfeat) <= set(sfeat):  # one coefficient and one offset per statistic
    g, b = (_in_stat_shape(v, sfeat, pfeat, inv.shape) for v in (g, b))
    k = inv if g is None else inv * g
    y = (xa - bs(mean)) * bs(k) if center else xa * bs(k)
    if b is not None:
      y = y + bs(b)
  else:
    y = (xa - bs(mean)) * bs(inv) if center else xa * bs(inv)
    if g is not None:
      y = y * bp(g)
    if b is not None:
      y = y + bp(b)
  return y.astype(out_dtype), mean, var, count


@standardize_train.defjvp
def _standardize_train_jvp(cfg, primals, tangents):
  r"""Closed-form derivative, linear in the tangents of ``x``, ``scale`` and ``bias``.

  With :math:`\hat x = (x - \mu) s`, :math:`s = (\sigma^2 + \epsilon)^{-1/2}` (``μ = 0``
  and the mean square for RMS norm) and the effective :math:`\gamma_e, \beta_e`,

  .. math::
     \dot y = \gamma_e s\,(\dot x - r_0 - \hat x\, r_1) + \hat x\,\dot\gamma_e
              + \dot\beta_e, \quad r_0 = \overline{\dot x},\ r_1 = \overline{\dot x \hat x}

  (means over the valid entries of each statistic's group, one collective for both; ``r_0 =
  0`` without centering); batch renorm's ``r``, ``d`` are constants. Reverse mode is JAX's
  transpose of this map: one pass over ``(x, dy)`` for the reductions, one for ``dx``. The
  body is rematerialized, so only ``x`` and statistic/parameter-shaped vectors are kept for
  the backward pass; each pass reads its own alias of ``x`` (see ``jaxbn.batch_norm``).
  """
  red, pfeat, axis_name, groups, fast, center, out_dtype, grouping = cfg
  x, scale, bias, mask, epsilon, correction = primals
  xd, sd, bd = tangents[:3]
  y, mean, var, count = standardize_train(cfg, *primals)
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  acc = accumulation_dtype(x.dtype)
  inv = lax.rsqrt(var + epsilon)
  r = d = None
  if correction is not None:
    r, d = _corrections(mean, var, epsilon, *correction)
  g, _ = _effective(scale, None, r, d, acc)
  # Tangents of the effective scale γr and offset γd + β (r, d are constants).
  sd_eff = None if sd is None else (sd.astype(acc) if r is None else r * sd.astype(acc))
  bd_eff = None if sd is None or d is None else d * sd.astype(acc)
  if bd is not None:
    bd_eff = bd.astype(acc) if bd_eff is None else bd_eff + bd.astype(acc)
  fold = set(pfeat) <= set(sfeat)
  glen = None if grouping is None else x.shape[sfeat[grouping[0]]]

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def tangent(x, mean, inv, g, mask, count, xd, sd_eff, bd_eff):
    sharding = collectives.explicit_sharding(x)
    bs = functools.partial(bcast, shape=x.shape, feat=sfeat, sharding=sharding)
    bp = functools.partial(bcast, shape=x.shape, feat=pfeat, sharding=sharding)
    xa, xb = _aliases(x, 2)
    mean_a, mean_b, inv_a, inv_b = _aliases(mean, 2) + _aliases(inv, 2)
    xa, xb = xa.astype(acc), xb.astype(acc)
    xdt = xd.astype(acc)
    if mask is not None:
      keep = mask | jnp.isfinite(xa)
      xa = jnp.where(keep, xa, 0)
      xb = jnp.where(keep, xb, 0)
      xdt = jnp.where(keep, xdt, 0)
    xh_a = ((xa - bs(mean_a)) if center else xa) * bs(inv_a)
    xh_b = ((xb - bs(mean_b)) if center else xb) * bs(inv_b)
    xdm = xdt if mask is None else jnp.where(mask, xdt, 0)
    xh_s = xh_a if mask is None else jnp.where(mask, xh_a, 0)
    sums = (jnp.sum(xdm, axis=red), jnp.sum(xdm * xh_s, axis=red))
    if not center:
      sums = sums[1:]
    sums = collectives.psum_stacked([_group_sum(v, grouping) for v in sums], axis_name,
                                    groups)
    n = jnp.maximum(count if grouping is None else group_values(count, grouping), 1.0)
    means = [_expand(v / n, grouping, glen) for v in sums]
    r1 = means[-1]
    r0 = means[0] if center else None
    if fold:  # per-statistic coefficients (batch, instance, group norm; as jaxbn.batch_norm)
      g_s, sd_s, bd_s = (_in_stat_shape(v, sfeat, pfeat, inv.shape)
                         for v in (g, sd_eff, bd_eff))
      if sfeat != pfeat and (sd_s is not None or bd_s is not None):
        # Transposed, the barrier makes the scale/bias gradients sums of the per-statistic
        # sums (instead of XLA merging them into second reductions over the whole of
        # dy·x̂, which it then writes out to feed both).
        sd_s, bd_s = lax.optimization_barrier((sd_s, bd_s))
      k = inv if g_s is None else inv * g_s
      c1 = -(k * r1) if sd_s is None else sd_s - k * r1
      parts = [c1]
      if center or bd_s is not None:
        c0 = -(k * r0) if center else jnp.zeros_like(c1)
        parts = [c0 if bd_s is None else c0 + bd_s, c1]
      c = collectives.to_varying_stacked(parts, axis_name)
      terms = [bs(k) * xdt, xh_b * bs(c[-1])]
      if len(c) == 2:
        terms.append(bs(c[0]))
    else:  # parameters along axes the statistics reduce over (layer and RMS norm)
      a = [inv * r1] if not center else [inv * r0, inv * r1]
      a = collectives.to_varying_stacked(a, axis_name)
      base = bs(inv) * xdt - xh_b * bs(a[-1])
      if center:
        base = base - bs(a[0])
      terms = [base if g is None else base * bp(g)]
      p = [v for v in (sd_eff, bd_eff) if v is not None]
      p = collectives.to_varying_stacked(p, axis_name) if p else []
      if sd_eff is not None:
        terms.append(xh_b * bp(p[0]))
      if bd_eff is not None:
        terms.append(bp(p[-1]))
    if jnp.finfo(out_dtype).bits < jnp.finfo(acc).bits:
      # bf16/fp16 output: the cotangent reaches each term through its own alias, up-cast
      # inside that term's fused loop (no shared float32 copy of dy).
      terms = lax.optimization_barrier(tuple(t.astype(out_dtype) for t in terms))
    y_dot = functools.reduce(lambda u, v: u + v, terms)
    return y_dot.astype(out_dtype)

  y_dot = tangent(x, mean, inv, g, mask, count, xd, sd_eff, bd_eff)
  zeros = jax.tree.map(jnp.zeros_like, (mean, var, count))
  return (y, mean, var, count), (y_dot, *zeros)


def _standardize_plain(cfg, x, scale, bias, mask, epsilon, correction):
  """Plain autodiff version (complex input)."""
  red, pfeat, axis_name, groups, fast, center, out_dtype, grouping = cfg
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  count, mean, var, inv, r, d = _stats(cfg, x, mask, epsilon, correction)
  acc = accumulation_dtype(x.dtype)
  g, b = _effective(scale, bias, r, d, acc)
  bs = functools.partial(bcast, shape=x.shape, feat=sfeat)
  bp = functools.partial(bcast, shape=x.shape, feat=pfeat)
  if mask is not None:
    x = jnp.where(mask | jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  y = ((x.astype(acc) - bs(mean)) if center else x.astype(acc)) * bs(inv)
  if g is not None:
    y = y * bp(g)
  if b is not None:
    y = y + bp(b)
  return y.astype(out_dtype), mean, var, count


def standardize(fn, x, scale, bias, *, red, param_axes, mask, epsilon, dtype, axis_name,
                axis_index_groups, use_fast_variance, center=True, correction=None,
                grouping=None):
  """Validates the shared arguments and runs :func:`standardize_train` (``y`` and stats)."""
  checks.epsilon_value(fn, epsilon)
  checks.mask_broadcasts(fn, mask, x.shape)
  checks.axis_name_bound(fn, axis_name, axis_index_groups)
  groups = None if axis_index_groups is None else tuple(
      tuple(int(i) for i in g) for g in axis_index_groups)
  out_dtype = output_dtype(x, scale, bias, dtype)
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  pshape = tuple(x.shape[a] for a in param_axes)
  scale = None if scale is None else jnp.asarray(scale).reshape(pshape)
  bias = None if bias is None else jnp.asarray(bias).reshape(pshape)
  cfg = (tuple(red), tuple(param_axes), axis_name, groups, bool(use_fast_variance),
         bool(center), out_dtype, None if grouping is None else tuple(int(g) for g in grouping))
  eps = lax.stop_gradient(jnp.asarray(epsilon, rdt))
  mask = None if mask is None else jnp.asarray(mask)
  impl = _standardize_plain if jnp.iscomplexobj(x) else standardize_train
  return impl(cfg, x, scale, bias, mask, eps, correction)


def _standardize(fn, x, scale, bias, **kw):
  return standardize(fn, x, scale, bias, **kw)[0]


def layer_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
) -> jax.Array:
  r"""Layer normalization (Ba et al., 2016): statistics per example over ``reduction_axes``.

  .. math::
     y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\, \gamma + \beta

  with mean and (biased) variance over ``reduction_axes`` (default: the last axis), separately
  for every index of the other axes. ``scale``/``bias`` are shaped like ``x`` along
  ``feature_axes``. As flax's ``LayerNorm(reduction_axes, feature_axes)``.

  When to use: sequence models and transformers, RNNs, any batch size (including 1) and
  inference identical to training; no cross-example communication.

  Numerics (all the per-example norms): statistics accumulated in float32 for bf16/fp16 input
  without an up-cast copy of ``x``; stable variance by default (``use_fast_variance=True``:
  ``E[x²] − E[x]²``, clamped at 0); output dtype ``dtype`` or ``x.dtype``. Masked statistics
  use only the valid entries (a group with none gives finite output); ``axis_name`` averages
  the statistics over devices, weighted by their counts — for model parallelism, when the
  reduced axes are sharded across devices. Gradients are JAX's autodiff.

  Args:
    x: input, float dtype.
    scale: optional ``γ``, shaped like ``x`` along ``feature_axes`` (or flattened).
    bias: optional ``β``, same shape.
    reduction_axes: axes the statistics are computed over (default -1).
    feature_axes: axes ``scale``/``bias`` follow (default -1).
    epsilon: added to the variance, > 0 (default 1e-6, as flax).
    mask: optional bool array broadcastable to ``x``: which entries count in the statistics.
    dtype: output dtype (default ``x.dtype``).
    axis_name: mapped axis name(s) across which the reduced axes are sharded.
    axis_index_groups: synchronize within these groups of device indices only.
    use_fast_variance: ``E[x²] − E[x]²`` instead of the stable variance.

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: non-float ``x``, out-of-range axes, ``scale``/``bias`` of the wrong
      shape, a ``mask`` that does not broadcast, ``epsilon <= 0``, unbound ``axis_name``.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> y = jaxbn.layer_norm(jnp.array([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]), epsilon=1e-12)
    >>> y.round(3).tolist()
    [[-1.225, 0.0, 1.225], [-0.707, -0.707, 1.414]]

  References:
    Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
  """
  fn = "layer_norm"
  x, red, feat = _per_example_args(fn, x, reduction_axes, feature_axes, scale, bias)
  return _standardize(fn, x, scale, bias, red=red, param_axes=feat, mask=mask,
                      epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance)


def rms_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
) -> jax.Array:
  r"""RMS normalization (Zhang & Sennrich, 2019): divide by the root mean square, no centering.

  .. math::
     y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}\, \gamma

  with the mean of squares over ``reduction_axes`` (default: the last axis). As flax's
  ``RMSNorm`` (no bias).

  When to use: as layer norm in transformers (LLaMA, T5 and most recent LLMs), one reduction
  instead of two and no mean to subtract. Same numerics, masks and ``axis_name`` as
  :func:`jaxbn.layer_norm`.

  Args:
    x: input, float dtype.
    scale: optional ``γ``, shaped like ``x`` along ``feature_axes`` (or flattened).
    reduction_axes: axes the mean square is computed over (default -1).
    feature_axes: axes ``scale`` follows (default -1).
    epsilon: added to the mean square, > 0 (default 1e-6).
    mask: optional bool array broadcastable to ``x``: which entries count.
    dtype: output dtype (default ``x.dtype``).
    axis_name: mapped axis name(s) across which the reduced axes are sharded.
    axis_index_groups: synchronize within these groups of device indices only.

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.layer_norm`.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=1e-12).round(4).tolist()
    [[0.8485, 1.1314]]

  References:
    Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
  """
  fn = "rms_norm"
  x, red, feat = _per_example_args(fn, x, reduction_axes, feature_axes, scale, None)
  return _standardize(fn, x, scale, None, red=red, param_axes=feat, mask=mask,
                      epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, use_fast_variance=False,
                      center=False)


def instance_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    feature_axes: Axes = -1,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
) -> jax.Array:
  r"""Instance normalization (Ulyanov et al., 2016): per example and per channel.

  Statistics over every axis except the leading (batch) axis and ``feature_axes`` (for NHWC:
  over H and W, per image and channel); ``scale``/``bias`` follow ``feature_axes``. As flax's
  ``InstanceNorm``; equal to :func:`jaxbn.group_norm` with ``group_size=1``.

  When to use: style transfer and image generation, where per-image contrast should be
  removed; any batch size. Same numerics, masks and ``axis_name`` as :func:`jaxbn.layer_norm`.

  Args:
    x: input, float dtype, rank >= 2 (axis 0 is the batch).
    scale: optional ``γ``, shaped like ``x`` along ``feature_axes``.
    bias: optional ``β``, same shape.
    feature_axes: channel axis or axes (default -1); must not include axis 0.
    epsilon: added to the variance, > 0 (default 1e-6).
    mask: optional bool array broadcastable to ``x``: which entries count.
    dtype: output dtype (default ``x.dtype``).
    axis_name: mapped axis name(s) across which the reduced (spatial) axes are sharded.
    axis_index_groups: synchronize within these groups of device indices only.
    use_fast_variance: ``E[x²] − E[x]²`` instead of the stable variance.

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.layer_norm`; also ``feature_axes`` containing the
      batch axis 0.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) * 4 + 2
    >>> y = jaxbn.instance_norm(x)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True

  References:
    Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast
    Stylization", arXiv:1607.08022, 2016.
  """
  fn = "instance_norm"
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  feat = _axes(fn, "feature_axes", x.ndim, feature_axes)
  if 0 in feat:
    raise ValueError(
        f"{fn}: `feature_axes`={feature_axes!r} includes axis 0, which instance norm treats "
        f"as the batch axis; put the batch first and pass the channel axis (e.g. -1 for "
        f"NHWC, 1 for NCHW).")
  _check_affine(fn, x, feat, feature_axes, scale, bias)
  red = tuple(a for a in range(1, x.ndim) if a not in feat)
  return _standardize(fn, x, scale, bias, red=red, param_axes=feat, mask=mask,
                      epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance)


def group_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    num_groups: Optional[int] = 32,
    group_size: Optional[int] = None,
    reduction_axes: Optional[Axes] = None,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
) -> jax.Array:
  r"""Group normalization (Wu & He, 2018): statistics per example over groups of channels.

  The channels (last axis, ``C``) are split into ``num_groups`` consecutive groups of
  ``group_size = C / num_groups`` (give exactly one of the two, as flax). Each group is
  normalized over its channels and ``reduction_axes`` (default: every axis but the leading
  batch axis — for NHWC, over H, W and the group's channels); ``scale``/``bias`` have shape
  ``(C,)``. ``num_groups=1`` is layer norm over all non-batch axes; ``group_size=1`` is
  instance norm. As flax's ``GroupNorm``, including ``reduction_axes`` that keep more than
  the batch axis (where ``flax.nnx.GroupNorm`` 0.12 repeats its statistics along the wrong
  axis).

  When to use: small or variable per-device batches (detection, segmentation, video,
  high-resolution images) where batch norm's statistics are too noisy, and whenever
  inference must not depend on the batch. No running state; costs one pass more than frozen
  or inference BN. Same numerics, masks and ``axis_name`` as :func:`jaxbn.layer_norm`.

  Args:
    x: input, float dtype, channels last.
    scale: optional ``γ`` of shape ``(C,)``.
    bias: optional ``β`` of shape ``(C,)``.
    num_groups: number of channel groups (default 32, the paper's); None with
      ``group_size``.
    group_size: channels per group (instead of ``num_groups``; pass ``num_groups=None``).
    reduction_axes: axes the statistics are computed over; must include the last (channel)
      axis. Default: all but axis 0.
    epsilon: added to the variance, > 0 (default 1e-6).
    mask: optional bool array broadcastable to ``x``: which entries count.
    dtype: output dtype (default ``x.dtype``).
    axis_name: mapped axis name(s) across which the reduced axes are sharded.
    axis_index_groups: synchronize within these groups of device indices only.
    use_fast_variance: ``E[x²] − E[x]²`` instead of the stable variance.

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.layer_norm`; also both or neither of
      ``num_groups``/``group_size``, groups that do not divide ``C``, ``reduction_axes``
      without the channel axis.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6)) * 3 + 1
    >>> y = jaxbn.group_norm(x, num_groups=3)
    >>> g = y.reshape(2, 4, 4, 3, 2)          # per image and group of 2 channels
    >>> bool(jnp.allclose(g.mean((1, 2, 4)), 0, atol=1e-5))
    True
    >>> y1 = jaxbn.group_norm(x, num_groups=None, group_size=1)
    >>> bool(jnp.allclose(y1, jaxbn.instance_norm(x), atol=1e-5))
    True

  References:
    Wu & He, "Group Normalization", ECCV 2018.
  """
  fn = "group_norm"
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  if x.ndim < 2:
    raise ValueError(f"{fn}: `x` must have a batch axis and a channel axis (rank >= 2), got "
                     f"shape {x.shape}.")
  channels = x.shape[-1]
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"{fn}: give exactly one of `num_groups` and `group_size`, got num_groups="
        f"{num_groups!r} and group_size={group_size!r}; to set group_size, also pass "
        f"num_groups=None (its default is 32).")
  if group_size is not None:
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or (
        channels % group_size):
      raise ValueError(f"{fn}: `group_size`={group_size!r} must be a positive divisor of the "
                       f"{channels} channels (last axis of `x`).")
    num_groups = channels // int(group_size)
  if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or (
      channels % num_groups):
    raise ValueError(f"{fn}: `num_groups`={num_groups!r} must be a positive divisor of the "
                     f"{channels} channels (last axis of `x`).")
  num_groups = int(num_groups)
  if reduction_axes is None:
    red = tuple(range(1, x.ndim))
  else:
    red = _axes(fn, "reduction_axes", x.ndim, reduction_axes)
    if x.ndim - 1 not in red:
      raise ValueError(
          f"{fn}: `reduction_axes`={reduction_axes!r} must include the last axis (the "
          f"channels, within each group), e.g. {tuple(sorted(set(red) | {x.ndim - 1}))}.")
  _check_param(fn, "scale", scale, (channels,), "its last (channel) axis")
  _check_param(fn, "bias", bias, (channels,), "its last (channel) axis")
  # Statistics per group: reduce over `red` without the channels on x's own layout, then
  # over each group's channels (no reshape of x: the channels stay the inner axis).
  red = tuple(a for a in red if a != x.ndim - 1)
  nstat = x.ndim - len(red)  # the channels are the last of the statistics' axes
  return _standardize(fn, x, scale, bias, red=red, param_axes=(x.ndim - 1,), mask=mask,
                      epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
                      grouping=(nstat - 1, num_groups))
