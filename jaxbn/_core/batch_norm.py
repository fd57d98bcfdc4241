"""Batch normalization: the functional core, with a fused closed-form derivative."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.ema import update_stats
from jaxbn._core import moments as moments_lib
from jaxbn._core.moments import accumulation_dtype, bcast, feature_moments
from jaxbn._core.normalize import output_dtype
from jaxbn._core.types import BatchStats, Moments


def _sum(v, red):
  return jnp.sum(v, axis=red)


def _affine(x, feat, mean, inv, scale, bias, out_dtype):
  """``(x − mean)·(inv·scale) + bias`` with feature-shaped vectors: one fused pass."""
  acc = accumulation_dtype(x.dtype)
  k = inv if scale is None else inv * scale.astype(acc)
  y = (x.astype(acc) - bcast(mean, x.shape, feat)) * bcast(k, x.shape, feat)
  if bias is not None:
    y = y + bcast(bias.astype(acc), x.shape, feat)
  return y.astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _bn_train(cfg, x, scale, bias, mask, epsilon):
  """Training-mode BN on keepdims-shaped parameters: returns (y, mean, var, count)."""
  red, axis_name, groups, fast, out_dtype = cfg
  feat = tuple(i for i in range(x.ndim) if i not in red)
  count, mean, var = feature_moments(x, red, mask, axis_name, groups, fast)
  inv = lax.rsqrt(var + epsilon)
  if mask is not None:
    # Masked entries that hold NaN/Inf must not leak into outputs or gradients.
    x = jnp.where(mask | jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  return _affine(x, feat, mean, inv, scale, bias, out_dtype), mean, var, count


@_bn_train.defjvp
def _bn_train_jvp(cfg, primals, tangents):
  r"""The closed-form derivative of BN, linear in the tangents.

  With :math:`\hat x = (x-\mu)\,s` and :math:`s = (\sigma^2+\epsilon)^{-1/2}`,

  .. math::
     \dot y = \gamma s\,\dot x - \gamma s\,(r_0 + \hat x\, r_1) + \hat x\,\dot\gamma + \dot\beta,
     \quad r_0 = \overline{\dot x},\ r_1 = \overline{\dot x \hat x}

  (means over the valid entries of the global batch, one collective for both). Reverse mode
  is JAX's transpose of this map, which is the fused closed-form backward: one pass reduces
  ``Σdy`` and ``Σdy·x̂`` (shared with the ``bias``/``scale`` gradients), one collective sums
  both, and one pass forms ``dx = dy·γs + c0 + x̂·c1``. The body is rematerialized
  (``jax.checkpoint``), so only ``x`` and per-feature vectors are kept for the backward pass;
  ``x̂`` is recomputed inside the fused loops. Transposing (rather than hand-writing a
  ``custom_vjp``) keeps gradients of replicated parameters right under ``pmap``,
  ``shard_map`` and ``vmap`` alike, and gives forward mode (``jvp``, ``jacfwd``) and higher
  orders the same closed form.
  """
  red, axis_name, groups, fast, out_dtype = cfg
  feat = tuple(i for i in range(primals[0].ndim) if i not in red)
  x, scale, bias, mask, epsilon = primals
  xd, sd, bd, _, _ = tangents
  y, mean, var, count = _bn_train(cfg, x, scale, bias, mask, epsilon)
  inv = lax.rsqrt(var + epsilon)
  acc = accumulation_dtype(x.dtype)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def tangent(x, mean, inv, scale, mask, count, xd, sd, bd):
    # Two aliases of x: one for the statistics' tangents (whose transpose is elementwise,
    # part of dx), one for y's tangent (whose transpose holds the reductions Σdy, Σdy·x̂).
    # Distinct aliases keep XLA from sharing one materialized x̂ between the passes, so each
    # pass is a single fused loop that recomputes x̂ from x.
    B = functools.partial(bcast, shape=x.shape, feat=feat,
                          sharding=collectives.explicit_sharding(x))
    xa, xb = moments_lib._aliases(x, 2)
    mean_a, mean_b, inv_a, inv_b = moments_lib._aliases(mean, 2) + moments_lib._aliases(inv, 2)
    xa, xb = xa.astype(acc), xb.astype(acc)
    xdt = xd.astype(acc)
    if mask is not None:
      # As in the forward pass, non-finite masked entries are replaced by 0. Every output
      # (masked or not) depends on the statistics, which only the valid entries enter.
      keep = mask | jnp.isfinite(xa)
      xa = jnp.where(keep, xa, 0)
      xb = jnp.where(keep, xb, 0)
      xdt = jnp.where(keep, xdt, 0)
      xc_s = jnp.where(mask, (xa - B(mean_a)) * B(inv_a), 0)
      xdm = jnp.where(mask, xdt, 0)
    else:
      xc_s = (xa - B(mean_a)) * B(inv_a)
      xdm = xdt
    r = collectives.psum_stacked((_sum(xdm, red), _sum(xdm * xc_s, red)), axis_name, groups)
    r = [v / jnp.maximum(count, 1.0) for v in r]
    mean_dot, var_dot = r[0], 2.0 * r[1] / inv
    k = inv if scale is None else inv * scale.astype(acc)
    c0 = -(k * r[0]) if bd is None else bd.astype(acc) - k * r[0]
    c1 = -(k * r[1]) if sd is None else sd.astype(acc) - k * r[1]
    # The per-feature coefficients that meet the device-varying data (they carry the
    # replicated bias/scale tangents) are made varying in ONE stacked `to_varying`: its
    # transpose is the backward pass's only psum, and the bias/scale gradients are its rows.
    c = collectives.to_varying_stacked((c0, c1), axis_name)
    terms = (B(k) * xdt, B(c[0]), ((xb - B(mean_b)) * B(inv_b)) * B(c[1]))
    if jnp.finfo(out_dtype).bits < jnp.finfo(acc).bits:
      # bf16/fp16 output: the cotangent dy reaches the three terms (dx's elementwise pass and
      # the two reductions) through three aliases, each up-cast inside its own fused loop
      # instead of one shared float32 copy of dy.
      terms = lax.optimization_barrier(tuple(t.astype(out_dtype) for t in terms))
    y_dot = terms[0] + terms[1] + terms[2]
    return y_dot.astype(out_dtype), mean_dot.astype(mean.dtype), var_dot.astype(var.dtype)

  y_dot, mean_dot, var_dot = tangent(x, mean, inv, scale, mask, count, xd, sd, bd)
  return (y, mean, var, count), (y_dot, mean_dot, var_dot, jnp.zeros_like(count))


def batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    training: bool,
    axis: checks.Axes = -1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    unbiased_running_var: bool = False,
    debias: bool = False,
) -> tuple[jax.Array, BatchStats]:
  r"""Batch normalization (Ioffe & Szegedy, 2015) as a pure function of explicit state.

  .. math::
     y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  In training mode (``training=True``) the statistics ``μ_B, σ²_B`` are those of the batch —
  over every axis but ``axis``, over the valid entries of ``mask``, and over all devices of
  ``axis_name`` — and the running statistics are updated. In eval mode the running statistics
  normalize ``x`` and ``stats`` is returned unchanged (the same object).

  Numerics:
    * statistics are accumulated in float32 (or wider) for bf16/fp16 input without writing
      an up-cast copy of ``x``; the output has ``x``'s dtype (or ``dtype``);
    * the variance is stable for any offset of the data (see :func:`jaxbn.moments`);
      ``use_fast_variance=True`` selects flax's ``E[x²] − E[x]²``;
    * ``momentum`` is the weight of the *old* running value (flax/Keras/haiku). PyTorch's
      ``momentum=p`` is ``1 - p`` here (:func:`jaxbn.momentum_from_torch`); ``momentum=None``
      is a cumulative average (PyTorch's ``momentum=None``);
    * the stored running variance is biased (flax); ``unbiased_running_var=True`` stores
      PyTorch's unbiased estimate ``var·n/(n−1)``.

  Gradients: training mode differentiates through the batch statistics with a closed-form
  derivative that keeps only ``x`` and per-feature vectors for the backward pass and reduces
  ``Σdy`` and ``Σdy·x̂`` in one pass (one collective with ``axis_name``). It is defined as a
  ``jax.custom_jvp``, so ``grad``, ``jacrev``, ``jvp``, ``jacfwd`` and higher orders all use
  it. Complex input uses plain autodiff. The returned statistics are differentiable too.

  Masks: entries where ``mask`` is False do not enter the statistics, even if they hold NaN
  or Inf; their outputs are normalized with the batch statistics like the others (as flax),
  except non-finite masked entries, which output ``bias``. A batch with no valid entry gives
  finite outputs and leaves the running statistics unchanged.

  Args:
    x: input, float dtype, any rank >= 1.
    stats: :class:`BatchStats` with the feature shape (:func:`jaxbn.init_stats`).
    scale: optional per-feature scale ``γ`` (None: 1).
    bias: optional per-feature offset ``β`` (None: 0).
    training: Python bool, static. True: batch statistics and updated running statistics.
    axis: feature axis or axes (default -1 for NHWC; 1 for NCHW).
    momentum: running-average momentum in [0, 1) (flax convention), or None (cumulative).
    epsilon: added to the variance, > 0 (default 1e-5).
    axis_name: mapped axis name(s) to synchronize statistics over (``shard_map``, ``pmap``,
      ``vmap``); not needed under plain ``jax.jit`` on sharded arrays.
    axis_index_groups: synchronize within these groups of device indices only (``pmap``).
    mask: optional bool array broadcastable to ``x``: which entries count in the statistics.
    dtype: output dtype (default ``x.dtype``).
    use_fast_variance: flax's fast (unstable for large means) variance.
    unbiased_running_var: store the unbiased variance in the running statistics (PyTorch).
    debias: zero-debiased running averages (see :func:`jaxbn.update_stats`).

  Returns:
    ``(y, new_stats)``: the normalized array (shape of ``x``) and the updated statistics
    (structure, shapes and dtypes of ``stats``).

  Raises:
    ValueError / TypeError: a non-float ``x``, an out-of-range ``axis``, ``stats``/``scale``/
      ``bias`` that do not match the features, a ``mask`` that does not broadcast, a momentum
      outside [0, 1), ``epsilon <= 0`` or an unbound ``axis_name`` — each naming the fix.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> stats = jaxbn.init_stats(4)
    >>> y, stats = jaxbn.batch_norm(x, stats, training=True, momentum=0.9)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), int(stats.count)
    (True, 1)
    >>> y_eval, same = jaxbn.batch_norm(x, stats, training=False)
    >>> same is stats
    True

  References:
    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.
  """
  fn = "batch_norm"
  training = checks.static_bool(fn, "training", training)
  x = jnp.asarray(x)
  feat, fshape = checks.validate_bn_args(fn, x, stats, scale, bias, axis)
  checks.epsilon_value(fn, epsilon)
  checks.momentum_value(fn, momentum)
  out_dtype = output_dtype(x, scale, bias, dtype)
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  scale_v = None if scale is None else jnp.asarray(scale).reshape(fshape)
  bias_v = None if bias is None else jnp.asarray(bias).reshape(fshape)

  if not training:
    mean = jnp.asarray(stats.mean).astype(acc)
    inv = lax.rsqrt(jnp.asarray(stats.var).astype(rdt) + jnp.asarray(epsilon, rdt))
    return _affine(x, feat, mean, inv, scale_v, bias_v, out_dtype), stats

  checks.mask_broadcasts(fn, mask, x.shape)
  checks.axis_name_bound(fn, axis_name, axis_index_groups)
  red = checks.reduction_axes(x.ndim, feat)
  cfg = (red, axis_name, None if axis_index_groups is None else
         tuple(tuple(int(i) for i in g) for g in axis_index_groups),
         bool(use_fast_variance), out_dtype)
  mask_a = None if mask is None else jnp.asarray(mask)
  eps = lax.stop_gradient(jnp.asarray(epsilon, rdt))
  # Complex input differentiates the same forward with plain autodiff.
  impl = _bn_train.fun if jnp.iscomplexobj(x) else _bn_train
  y, mean, var, count = impl(cfg, x, scale_v, bias_v, mask_a, eps)
  batch = Moments(mean, var, count)
  new_stats = update_stats(stats, batch, momentum=momentum,
                           unbiased_running_var=unbiased_running_var, debias=debias)
  return y, new_stats
