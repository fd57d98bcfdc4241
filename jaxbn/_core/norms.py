"""Normalizations that do not use the batch: layer, RMS, group and instance normalization.

They share one computation — per-example statistics over some axes, then an affine map —
and differ only in which axes are reduced and which carry ``scale``/``bias``. None has
running state, so training and inference are the same function. Argument names follow
flax's layers (``reduction_axes``, ``feature_axes``, ``num_groups``, ``group_size``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.moments import _abs2, accumulation_dtype, moments_keepdims
from jaxbn._core.normalize import affine, output_dtype, to_keepdims

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


def _mean_square(x, red, mask, axis_name, groups):
  """Count and mean of ``|x|²`` over ``red`` (keepdims), float32-accumulated, synchronized."""
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  if mask is None:
    n = float(np.prod([x.shape[a] for a in red]))
    s2 = jnp.sum(_abs2(x.astype(acc)), axis=red, keepdims=True)
    count = jnp.full(s2.shape, n, rdt)
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axis=red, keepdims=True, dtype=rdt)
    s2 = jnp.sum(jnp.where(mask, _abs2(x.astype(acc)), 0), axis=red, keepdims=True)
  if axis_name is not None:
    both = collectives.psum(jnp.stack([count, s2.astype(rdt)]), axis_name, groups)
    count, s2 = both[0], both[1]
  return s2 / jnp.maximum(count, 1.0)


def _standardize(fn, x, scale, bias, *, red, param_axes, mask, epsilon, dtype, axis_name,
                 axis_index_groups, use_fast_variance, center=True):
  """``(x − μ) / sqrt(σ² + ε) · scale + bias`` with statistics over ``red`` (keepdims)."""
  checks.epsilon_value(fn, epsilon)
  checks.mask_broadcasts(fn, mask, x.shape)
  checks.axis_name_bound(fn, axis_name, axis_index_groups)
  groups = None if axis_index_groups is None else [list(g) for g in axis_index_groups]
  out_dtype = output_dtype(x, scale, bias, dtype)
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  mask = None if mask is None else jnp.asarray(mask)
  eps = jnp.asarray(epsilon, rdt)
  scale_k = to_keepdims(scale, x.shape, param_axes)
  bias_k = to_keepdims(bias, x.shape, param_axes)
  if center:
    _, mean, var = moments_keepdims(x, red, mask, axis_name, groups, bool(use_fast_variance))
  else:
    mean, var = None, _mean_square(x, red, mask, axis_name, groups)
  inv = lax.rsqrt(var + eps)
  if mask is not None:  # masked entries holding NaN/Inf must not leak into the output
    x = jnp.where(mask | jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  if mean is None:
    k = inv if scale_k is None else inv * scale_k.astype(acc)
    y = x.astype(acc) * k
    if bias_k is not None:
      y = y + bias_k.astype(acc)
    return y.astype(out_dtype)
  return affine(x, mean, inv, scale_k, bias_k, out_dtype)


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
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  red = _axes(fn, "reduction_axes", x.ndim, reduction_axes)
  feat = _axes(fn, "feature_axes", x.ndim, feature_axes)
  fshape = tuple(x.shape[a] for a in feat)
  _check_param(fn, "scale", scale, fshape, f"`feature_axes`={feature_axes!r}")
  _check_param(fn, "bias", bias, fshape, f"`feature_axes`={feature_axes!r}")
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
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  red = _axes(fn, "reduction_axes", x.ndim, reduction_axes)
  feat = _axes(fn, "feature_axes", x.ndim, feature_axes)
  fshape = tuple(x.shape[a] for a in feat)
  _check_param(fn, "scale", scale, fshape, f"`feature_axes`={feature_axes!r}")
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
  fshape = tuple(x.shape[a] for a in feat)
  _check_param(fn, "scale", scale, fshape, f"`feature_axes`={feature_axes!r}")
  _check_param(fn, "bias", bias, fshape, f"`feature_axes`={feature_axes!r}")
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
  size = channels // num_groups
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
  if mask is not None:
    checks.mask_broadcasts(fn, mask, x.shape)
  # (..., C) -> (..., G, C/G): reduce over the group's channels, keep the group axis.
  xg = x.reshape(x.shape[:-1] + (num_groups, size))
  red_g = tuple(a for a in red if a != x.ndim - 1) + (x.ndim,)
  mask_g = None
  if mask is not None:
    m = jnp.asarray(mask)
    m = m.reshape((1,) * (x.ndim - m.ndim) + m.shape)
    m = m.reshape(m.shape[:-1] + ((num_groups, size) if m.shape[-1] == channels else (1, 1)))
    mask_g = m
  gshape = (num_groups, size)
  y = _standardize(fn, xg,
                   None if scale is None else jnp.asarray(scale).reshape(gshape),
                   None if bias is None else jnp.asarray(bias).reshape(gshape),
                   red=red_g, param_axes=(x.ndim - 1, x.ndim), mask=mask_g, epsilon=epsilon,
                   dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
                   use_fast_variance=use_fast_variance)
  return y.reshape(x.shape)
