"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020): normalization and activation in one.

Both are built on :func:`jaxbn.moments` (batch, instance and group variances alike), B0's
running variance on :func:`jaxbn.update_stats`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.ema import update_stats
from jaxbn._core.group_norm import channel_groups, group_norm
from jaxbn._core.moments import accumulation_dtype, moments
from jaxbn._core.normalize import keepdims_shape
from jaxbn._core.types import BatchStats
from jaxbn._core.frn import _axes, _float, _per_channel
from jaxbn._core.unsynced import warn_if_unsynced


def _affine(fn, y, x, feat, scale, bias, acc, out):
  g = _per_channel(fn, "scale", scale, x, feat)
  b = _per_channel(fn, "bias", bias, x, feat)
  if g is not None:
    y = y * g.astype(acc)
  if b is not None:
    y = y + b.astype(acc)
  return y.astype(out)


def evonorm_b0(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike],
    bias: Optional[ArrayLike],
    v: ArrayLike,
    *,
    training: bool,
    axis=-1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[jax.Array, BatchStats]:
  r"""EvoNorm-B0: batch-variance normalization fused with its activation (Liu et al., 2020).

  .. math::
     y = \frac{x}{\max\left(\sqrt{s^2_{b} + \epsilon},\; v\,x + \sqrt{s^2_{i}(x) + \epsilon}
     \right)}\,\gamma + \beta

  ``s²_b``: per-channel variance over the batch and spatial axes (all but ``axis``) in
  training — synchronized over ``axis_name``, masked, as :func:`jaxbn.moments` — and the
  running variance ``stats.var`` in evaluation; ``s²_i``: per-example, per-channel variance
  over the spatial axes (all but 0 and ``axis``). No centering: ``x`` itself is divided, and
  there is no separate activation.

  State: a running variance only, as in the paper (its inference mode replaces ``s²_b`` by a
  moving average of it) and the authors' reference code. ``stats`` is a
  :class:`jaxbn.BatchStats` so that the update is :func:`jaxbn.update_stats`'s (flax
  momentum convention, ``momentum=None`` the cumulative average over ``stats.count``
  updates, biased variance unless ``unbiased_running_var``): in training ``var`` and
  ``count`` are updated, ``mean`` is returned as passed (it is never read). The layers store
  the same: ``batch_stats/var`` (linen) / ``var`` (NNX), plus ``count`` when
  ``momentum=None``.

  Args:
    x: input, real float, batch axis 0, channels on ``axis``.
    stats: running statistics (:func:`jaxbn.init_stats` of the channel shape); only ``var``
      and ``count`` are used.
    scale: ``γ`` per channel, or None.
    bias: ``β`` per channel, or None.
    v: the per-channel ``v`` of the paper (the activation's slope; init 1).
    training: Python bool: batch variance and update (True), running variance (False).
    axis: channel axis or axes (default -1), not 0.
    momentum: weight of the old running value (flax convention; PyTorch's ``p`` is ``1-p``).
    epsilon: added to both variances (default 1e-5).
    unbiased_running_var: fold ``var·n/(n−1)`` into the running variance (timm's and
      PyTorch's convention) instead of the biased one.

  Returns:
    ``(y, new_stats)``; in evaluation ``new_stats`` is ``stats``; in training
    ``new_stats.mean`` is ``stats.mean``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    >>> y, stats = jaxbn.evonorm_b0(x, jaxbn.init_stats(2), None, None, jnp.ones(2),
    ...                             training=True, momentum=0.9)
    >>> y.shape, int(stats.count), stats.mean.tolist()      # no running mean
    ((4, 3, 3, 2), 1, [0.0, 0.0])

  References:
    Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS 2020
    (arXiv:2004.02967).
  """
  fn = "evonorm_b0"
  x = _float(fn, "x", x)
  feat = _axes(fn, x.ndim, axis)
  fshape = tuple(x.shape[a] for a in feat)
  got = tuple(stats.var.shape) if isinstance(stats, BatchStats) else type(stats).__name__
  if got != fshape:
    raise ValueError(f"{fn}: `stats` must be a jaxbn.BatchStats of the channel shape {fshape}, "
                     f"got {got}; create it with jaxbn.init_stats({fshape}).")
  training = checks.static_bool(fn, "training", training)
  warn_if_unsynced(fn, x, stats, axis_name, training)
  out = jnp.dtype(dtype) if dtype is not None else x.dtype
  acc = accumulation_dtype(x.dtype)
  if training:
    batch = moments(x, axis=feat, mask=mask, axis_name=axis_name,
                    axis_index_groups=axis_index_groups)
    var_b = batch.var
    new = update_stats(stats, jax.tree.map(jax.lax.stop_gradient, batch),
                             momentum=momentum, unbiased_running_var=unbiased_running_var,
                             skip_nonfinite=skip_nonfinite)
    new = new._replace(mean=stats.mean)  # B0 keeps a running variance only
  else:
    var_b, new = stats.var, stats
  inst = moments(x, axis=(0,) + feat, mask=mask).var  # per example and channel
  xf = x.astype(acc)
  eps = jnp.asarray(epsilon, acc)
  left = jnp.sqrt(var_b.astype(acc).reshape(keepdims_shape(x.shape, feat)) + eps)
  right = xf * _per_channel(fn, "v", v, x, feat).astype(acc) + jnp.sqrt(
      jnp.expand_dims(inst.astype(acc), [a for a in range(1, x.ndim) if a not in feat]) + eps)
  y = xf / jnp.maximum(left, right)
  return _affine(fn, y, x, feat, scale, bias, acc, out), new


def evonorm_s0(
    x: ArrayLike,
    scale: Optional[ArrayLike],
    bias: Optional[ArrayLike],
    v: ArrayLike,
    *,
    axis: int = -1,
    num_groups: Optional[int] = 32,
    group_size: Optional[int] = None,
    epsilon: ArrayLike = 1e-5,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
) -> jax.Array:
  r"""EvoNorm-S0: ``x·σ(v·x)`` over the group standard deviation (Liu et al., 2020).

  .. math::
     y = \frac{x\, \mathrm{sigmoid}(v\,x)}{\sqrt{s^2_{g}(x) + \epsilon}}\,\gamma + \beta

  ``s²_g``: per example, the (biased) variance over the spatial axes and the channels of
  each group — the channel ``axis`` holds the ``C`` channels, split into ``num_groups``
  consecutive groups (or groups of ``group_size``; give one of the two, as
  :func:`jaxbn.group_norm`). Batch-independent: training and inference are the same
  function.

  Args:
    x: input, real float, batch axis 0, rank >= 2.
    scale: ``γ`` of shape ``(C,)``, or None.
    bias: ``β`` of shape ``(C,)``, or None.
    v: ``v`` of shape ``(C,)`` (init 1).
    axis: the channel axis, one int, not 0 (default -1, channels last; 1 for NCHW).
    num_groups: number of channel groups (default 32); None with ``group_size``.
    epsilon: added to the variance (default 1e-5).

  Returns:
    ``y``, shaped like ``x``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    >>> y = jaxbn.evonorm_s0(x, None, None, jnp.ones(4), num_groups=2)
    >>> y.shape
    (2, 3, 3, 4)
    >>> nchw = jaxbn.evonorm_s0(x.transpose(0, 3, 1, 2), None, None, jnp.ones(4), axis=1,
    ...                         num_groups=2)
    >>> bool(jnp.allclose(nchw.transpose(0, 2, 3, 1), y))
    True

  References:
    Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS 2020.
  """
  fn = "evonorm_s0"
  x = _float(fn, "x", x)
  if x.ndim < 2:
    raise ValueError(f"{fn}: `x` must have a batch and a channel axis, got shape {x.shape}.")
  if not isinstance(axis, int):
    raise TypeError(f"{fn}: `axis` must be one int (the channel axis the groups split), got "
                    f"{axis!r}.")
  (ch,) = _axes(fn, x.ndim, axis)
  c = x.shape[ch]
  num_groups = channel_groups(fn, c, num_groups, group_size, f"axis {axis}")
  feat = (ch,)
  out = jnp.dtype(dtype) if dtype is not None else x.dtype
  acc = accumulation_dtype(x.dtype)
  # The channel axis is split into (groups, channels per group) in place.
  blocked = x.shape[:ch] + (num_groups, c // num_groups) + x.shape[ch + 1:]
  xg = x.reshape(blocked)
  mg = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).reshape(
      blocked)
  var = moments(xg, axis=(0, ch), mask=mg).var  # (N, G)
  inv = jax.lax.rsqrt(var.astype(acc) + jnp.asarray(epsilon, acc))
  inv = jnp.broadcast_to(inv.reshape(keepdims_shape(blocked, (0, ch))), blocked)
  inv = inv.reshape(x.shape)
  xf = x.astype(acc)
  vv = _per_channel(fn, "v", v, x, feat).astype(acc)
  y = xf * jax.nn.sigmoid(vv * xf) * inv
  return _affine(fn, y, x, feat, scale, bias, acc, out)


fill_args(batch_norm, evonorm_b0)
fill_args(group_norm, evonorm_s0)
