"""The one engine: ``standardize``, with a closed-form, rematerialized derivative.

Every normalization in jaxbn is this function with a different :class:`Config`: which axes
the statistics reduce over (``plan.red``), which axes carry ``scale``/``bias``
(``pfeat``), blocks of statistics (group norm's channel groups, ghost BN's virtual batches),
centering (not for RMS norm), synchronization (``plan.axis_name``) and batch renorm's
constant correction. Batch norm is ``pfeat`` = the statistics' axes and no blocks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core import moments as mom
from jaxbn._core import normalize
from jaxbn._core.moments import accumulation_dtype


class Config(NamedTuple):
  """Static description of one normalization call (hashable; a ``custom_jvp`` nondiff arg).

  Attributes:
    plan: how the statistics are taken (:class:`jaxbn._core.moments.Plan`).
    pfeat: axes of ``x`` that ``scale``/``bias`` follow.
    out_dtype: dtype of ``y``.
  """

  plan: mom.Plan
  pfeat: tuple
  out_dtype: Any


def _scales(mean, var, epsilon, correction):
  """``s = (var + ε)^{-1/2}`` and batch renorm's clipped ``r = σ_B/σ``, ``d = (μ_B − μ)/σ``,
  ``σ = sqrt(var_run + ε)`` (``r = d = None`` without a ``correction``)."""
  inv = lax.rsqrt(var + epsilon)
  if correction is None:
    return inv, None, None
  ref_mean, ref_var, r_lo, r_hi, d_max = correction
  inv_ref = lax.rsqrt(ref_var + epsilon)
  r = jnp.clip(jnp.sqrt(var + epsilon) * inv_ref, r_lo, r_hi)
  d = jnp.clip((mean - ref_mean) * inv_ref, -d_max, d_max)
  return inv, r, d


def _effective(scale, bias, r, d, acc):
  """Effective ``(γ r, γ d + β)`` (None where absent): the correction folded into γ, β."""
  g = None if scale is None else scale.astype(acc)
  b = None if bias is None else bias.astype(acc)
  if r is None:
    return g, b
  g_eff = r if g is None else r * g
  b_eff = d if g is None else d * g
  return g_eff, b_eff if b is None else b_eff + b


def _in_stat_shape(v, sfeat, pfeat, sshape):
  """A parameter-shaped vector broadcast to the statistics' shape (``pfeat ⊆ sfeat``)."""
  if v is None or sfeat == pfeat:
    return v
  return lax.broadcast_in_dim(v, sshape, tuple(sfeat.index(a) for a in pfeat))


def _forward(cfg, x, scale, bias, mask, epsilon, correction, shift):
  plan, pfeat, out_dtype = cfg
  sfeat = tuple(i for i in range(x.ndim) if i not in plan.red)
  count, mean, var = mom.batch_moments(x, mask, plan, shift)
  inv, r, d = _scales(mean, var, epsilon, correction)
  acc = accumulation_dtype(x.dtype)
  g, b = _effective(scale, bias, r, d, acc)
  bs, bp = mom.broadcaster(x, sfeat), mom.broadcaster(x, pfeat)
  if mask is not None:  # masked entries holding NaN/Inf must not leak into the output
    x = jnp.where(mask | jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  xa = x.astype(acc)
  if set(pfeat) <= set(sfeat):  # one coefficient and one offset per statistic
    g, b = (_in_stat_shape(v, sfeat, pfeat, inv.shape) for v in (g, b))
    k = inv if g is None else inv * g
    y = (xa - bs(mean)) * bs(k) if plan.center else xa * bs(k)
    if b is not None:
      y = y + bs(b)
  else:
    y = (xa - bs(mean)) * bs(inv) if plan.center else xa * bs(inv)
    if g is not None:
      y = y * bp(g)
    if b is not None:
      y = y + bp(b)
  return y.astype(out_dtype), mean, var, count


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def standardize_train(cfg, x, scale, bias, mask, epsilon, correction, shift):
  r"""``y = (x − μ) s · γ_e + β_e`` with batch statistics: returns ``(y, mean, var, count)``.

  The statistics (mean and variance — or the mean square without centering — and count)
  are taken over the axes ``cfg.plan.red`` of the valid entries of ``x`` (and over each
  block with ``grouping``; synchronized over ``axis_name``) by
  :func:`jaxbn._core.moments.batch_moments`, about ``shift``. ``scale``/``bias`` have the
  shape of ``x`` along ``cfg.pfeat``. With a ``correction`` (batch renorm) ``γ_e = γ r``
  and ``β_e = γ d + β`` with ``r``, ``d`` held constant, else ``γ_e = γ``, ``β_e = β``. When
  the parameters' axes are among the statistics' (batch, instance and group norm)
  everything folds into one coefficient and one offset per statistic, so the pass over
  ``x`` is a subtract, a multiply and an add per entry. Derivatives: see the JVP; the
  returned ``mean`` and ``var`` are differentiable too.
  """
  return _forward(cfg, x, scale, bias, mask, epsilon, correction, shift)


@standardize_train.defjvp
def _standardize_train_jvp(cfg, primals, tangents):
  r"""The closed-form derivative, linear in the tangents of ``x``, ``scale`` and ``bias``.

  With :math:`\hat x = (x - \mu) s`, :math:`s = (\sigma^2 + \epsilon)^{-1/2}` (``μ = 0``
  and the mean square for RMS norm) and the effective :math:`\gamma_e, \beta_e`,

  .. math::
     \dot y = \gamma_e s\,(\dot x - r_0 - \hat x\, r_1) + \hat x\,\dot\gamma_e
              + \dot\beta_e, \quad r_0 = \overline{\dot x},\ r_1 = \overline{\dot x \hat x},
     \quad \dot\mu = r_0,\ \dot{\sigma^2} = 2 r_1 / s

  (means over the valid entries of each statistic's group, one collective for both; ``r_0 =
  0`` without centering), plus ``−½ γ_e x̂ s² ε̇`` for a differentiated ``epsilon``; batch
  renorm's ``r``, ``d`` are constants. Reverse mode is JAX's
  transpose of this map, which is the fused closed-form backward: one pass reduces ``Σdy``
  and ``Σdy·x̂`` (shared with the ``scale``/``bias`` gradients), one collective sums both,
  one pass forms ``dx``. The body is rematerialized (``jax.checkpoint``), so only ``x`` and
  per-statistic vectors are kept for the backward pass; each pass reads its own alias of
  ``x`` and recomputes ``x̂`` inside its fused loop. Transposing (rather than hand-writing a
  ``custom_vjp``) keeps gradients of replicated parameters right under ``pmap``,
  ``shard_map`` and ``vmap`` alike, and gives forward mode and higher orders the same form.
  """
  plan, pfeat, out_dtype = cfg
  red, axis_name, groups, center, grouping = plan
  x, scale, bias, mask, epsilon, correction, shift = primals
  xd, sd, bd = tangents[:3]
  eps_dot = tangents[4]  # a learned epsilon: dy/dε = −½ γ_e x̂ s², a per-statistic coefficient
  y, mean, var, count = standardize_train(cfg, *primals)
  sfeat = tuple(i for i in range(x.ndim) if i not in red)
  acc = accumulation_dtype(x.dtype)
  inv, r, d = _scales(mean, var, epsilon, correction)
  g, _ = _effective(scale, None, r, d, acc)
  # Tangents of the effective scale γr and offset γd + β (r, d are constants).
  sd_eff = None if sd is None else (sd.astype(acc) if r is None else r * sd.astype(acc))
  bd_eff = None if sd is None or d is None else d * sd.astype(acc)
  if bd is not None:
    bd_eff = bd.astype(acc) if bd_eff is None else bd_eff + bd.astype(acc)
  fold = set(pfeat) <= set(sfeat)
  glen = None if grouping is None else x.shape[sfeat[grouping[0]]]

  def tangent(x, mean, inv, g, mask, count, xd, sd_eff, bd_eff, eps_dot):
    bs, bp = mom.broadcaster(x, sfeat), mom.broadcaster(x, pfeat)
    # The device axes the data varies over (shard_map): replicated coefficients that meet it
    # are cast to varying at their own small shape, so each transposes to a small psum.
    data_axes = collectives.varying_axes(x)
    vary = tuple(sorted(data_axes | set(collectives.names(axis_name))))
    # Two aliases of x: one for the statistics' tangents (whose transpose is elementwise,
    # part of dx), one for y's tangent (whose transpose holds the reductions Σdy, Σdy·x̂).
    # Distinct aliases keep XLA from sharing one materialized x̂ between the passes.
    xa, xb = mom.aliases(x, 2, x)
    mean_a, mean_b = mom.aliases(mean, 2, x)
    inv_a, inv_b = mom.aliases(inv, 2, x)
    xa, xb = xa.astype(acc), xb.astype(acc)
    xdt = xd.astype(acc)
    if mask is not None:
      # As in the forward pass, non-finite masked entries are replaced by 0. Every output
      # (masked or not) depends on the statistics, which only the valid entries enter.
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
    sums = collectives.psum_stacked([mom.block_sum(v, grouping) for v in sums], axis_name,
                                    groups)
    n = jnp.maximum(mom.block_values(count, grouping), 1.0)
    means = [mom.expand(v / n, grouping, glen) for v in sums]
    r1 = means[-1]
    r0 = means[0] if center else None
    mean_dot = r0 if center else jnp.zeros_like(mean)
    var_dot = 2.0 * r1 / inv
    if fold:  # per-statistic coefficients (batch, instance, group norm)
      # Parameter tangents vary over the data's device axes before they are broadcast to
      # the statistics' shape (e.g. group norm's (N, C)): their transpose is a C-sized psum.
      # Over the synchronized axes they join the one stacked cast below.
      early = tuple(sorted(data_axes - set(collectives.names(axis_name))))
      sd_eff, bd_eff = (None if v is None else collectives.to_varying(v, early)
                        for v in (sd_eff, bd_eff))
      g_s, sd_s, bd_s = (_in_stat_shape(v, sfeat, pfeat, inv.shape)
                         for v in (g, sd_eff, bd_eff))
      if sfeat != pfeat and (sd_s is not None or bd_s is not None):
        # Transposed, the barrier makes the scale/bias gradients sums of the per-statistic
        # sums (instead of XLA merging them into second reductions over the whole of
        # dy·x̂, which it then writes out to feed both).
        sd_s, bd_s = mom.barrier(sd_s, bd_s)
      k = inv if g_s is None else inv * g_s
      c1 = -(k * r1) if sd_s is None else sd_s - k * r1
      e = -0.5 * inv * inv * eps_dot  # x̂'s tangent through ε, per statistic
      c1 = c1 + (e if g_s is None else e * g_s)
      parts = [c1]
      if center or bd_s is not None:
        c0 = -(k * r0) if center else jnp.zeros_like(c1)
        parts = [c0 if bd_s is None else c0 + bd_s, c1]
      # The per-statistic coefficients that meet the device-varying data (they carry the
      # replicated bias/scale tangents) are made varying in ONE stacked cast: its transpose
      # is the backward pass's only psum, and the bias/scale gradients are its rows.
      c = collectives.to_varying_stacked(parts, vary)
      terms = [bs(k) * xdt, xh_b * bs(c[-1])]
      if len(c) == 2:
        terms.append(bs(c[0]))
    else:  # parameters along axes the statistics reduce over (layer and RMS norm)
      a1 = inv * r1 + 0.5 * inv * inv * eps_dot  # x̂'s tangent through ε joins r1's term
      a = [a1] if not center else [inv * r0, a1]
      a = collectives.to_varying_stacked(a, vary)
      base = bs(inv) * xdt - xh_b * bs(a[-1])
      if center:
        base = base - bs(a[0])
      terms = [base if g is None else base * bp(g)]
      p = [v for v in (sd_eff, bd_eff) if v is not None]
      p = collectives.to_varying_stacked(p, vary) if p else []
      if sd_eff is not None:
        terms.append(xh_b * bp(p[0]))
      if bd_eff is not None:
        terms.append(bp(p[-1]))
    if jnp.finfo(out_dtype).bits < jnp.finfo(acc).bits and mom.large(x):
      # bf16/fp16 output: the cotangent reaches each term through its own alias, up-cast
      # inside that term's fused loop (no shared float32 copy of dy).
      terms = mom.barrier(*(t.astype(out_dtype) for t in terms))
    y_dot = functools.reduce(lambda u, v: u + v, terms)
    return y_dot.astype(out_dtype), mean_dot.astype(mean.dtype), var_dot.astype(var.dtype)

  # Rematerialized: only x and per-statistic vectors are kept for the backward pass. On
  # XLA:CPU with jax.checkpoint's barrier against CSE (without it XLA:CPU merges the
  # recomputation with the forward pass and keeps a float32 copy of a bf16 x); elsewhere
  # without (the CUDA and TPU programs hold no optimization barrier).
  remat = functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  args = (x, mean, inv, g, mask, count, xd, sd_eff, bd_eff,
          jnp.asarray(eps_dot, acc).real.astype(inv.dtype))
  y_dot, mean_dot, var_dot = lax.platform_dependent(
      *args, cpu=remat(tangent, prevent_cse=True), default=remat(tangent, prevent_cse=False))
  return (y, mean, var, count), (y_dot, mean_dot, var_dot, jnp.zeros_like(count))


def standardize(fn: str, x, scale, bias, *, red, param_axes, mask, epsilon, dtype, axis_name,
                axis_index_groups, use_fast_variance, center=True, correction=None,
                grouping=None, shift=None):
  """Validates the shared arguments and runs the engine: returns ``(y, mean, var, count)``.

  ``mean``/``var``/``count`` have the statistics' shape (the axes of ``x`` not in ``red``).
  ``shift`` (block-shaped) is the statistics' offset ``K`` (e.g. a running mean); None is 0.
  Complex input differentiates the same forward pass with plain autodiff.
  """
  checks.epsilon_value(fn, epsilon)
  checks.mask_broadcasts(fn, mask, x.shape)
  checks.axis_name_bound(fn, axis_name, axis_index_groups)
  out_dtype = normalize.output_dtype(x, scale, bias, dtype)
  rdt = jnp.finfo(accumulation_dtype(x.dtype)).dtype
  pshape = tuple(x.shape[a] for a in param_axes)
  scale = None if scale is None else jnp.asarray(scale).reshape(pshape)
  bias = None if bias is None else jnp.asarray(bias).reshape(pshape)
  plan = mom.Plan(red=tuple(red), axis_name=axis_name,
                  groups=collectives.groups_tuple(axis_index_groups), center=bool(center),
                  grouping=None if grouping is None else tuple(int(g) for g in grouping))
  cfg = Config(plan, tuple(param_axes), out_dtype)
  eps = jnp.asarray(epsilon, rdt)  # differentiable: a learned epsilon gets its gradient
  mask = None if mask is None else jnp.asarray(mask)
  shift = None if shift is None else lax.stop_gradient(jnp.asarray(shift))
  impl = standardize_train.fun if jnp.iscomplexobj(x) else standardize_train
  return impl(cfg, x, scale, bias, mask, eps, correction, shift)


def affine(x, feat, mean, inv, scale, bias, out_dtype):
  """``(x − mean)·(inv·scale) + bias`` with feature-shaped vectors along ``feat``: one pass."""
  return normalize.affine(x, mean, inv, scale, bias, out_dtype, mom.broadcaster(x, feat))
