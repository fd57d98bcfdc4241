"""Batch-channel normalization (Qiao et al., 2019): batch norm, then group norm over channels."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.group_norm import group_norm
from jaxbn._core.types import BatchStats


def batch_channel_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    training: bool,
    num_groups: Optional[int] = 32,
    group_size: Optional[int] = None,
    axis: checks.Axes = -1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    **batch_norm_options: Any,
) -> tuple[jax.Array, BatchStats]:
  r"""Batch-channel normalization: :func:`jaxbn.batch_norm` then :func:`jaxbn.group_norm`.

  .. math::
     y = \gamma\,\mathrm{GN}\Big(\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\Big) + \beta

  The batch norm (no affine) uses the batch statistics in training — synchronized over
  ``axis_name``, masked, updating ``stats`` as :func:`jaxbn.batch_norm` does (flax momentum
  convention, biased stored variance) — and the running ``stats`` in evaluation; the group
  norm then normalizes each example over groups of channels (and its other non-batch axes)
  and applies ``scale``/``bias``. The BN part keeps the micro-batch model tied to the
  population statistics, the GN part keeps each example's channel groups well conditioned
  ("batch-channel normalization", with weight standardization, for micro-batch training).
  Reductions in at least float32; the output dtype follows ``x`` (or ``dtype``). Unlike
  batch norm, the eval-mode function is not a per-feature affine map: it cannot be folded.

  Args:
    x: input, batch axis 0, channels on the last axis.
    stats: running statistics of the channels (:func:`jaxbn.init_stats`).
    scale: ``γ`` per channel, or None.
    bias: ``β`` per channel, or None.
    num_groups: channel groups of the group norm (default 32); None with ``group_size``.
    group_size: channels per group instead of ``num_groups``.
    axis: the channel axis; must be the last axis (default -1).
    epsilon: added to the variances of both norms, > 0 (default 1e-5).
    mask: optional bool array broadcastable to ``x``: which entries count in both statistics.
    **batch_norm_options: further keyword arguments of :func:`jaxbn.batch_norm` (e.g.
      ``unbiased_running_var``, ``debias``).

  Returns:
    ``(y, new_stats)``; in evaluation ``new_stats`` is ``stats``.

  Raises:
    ValueError: channels not on the last axis, or an invalid argument of either norm.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 6)) * 3 + 1
    >>> y, stats = jaxbn.batch_channel_norm(x, jaxbn.init_stats(6), training=True,
    ...                                     num_groups=2, momentum=0.9)
    >>> y.shape, bool(jnp.allclose(y[0, ..., :3].mean(), 0, atol=1e-5))
    ((8, 4, 4, 6), True)

  References:
    Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization", arXiv:1903.10520, 2019.
  """
  fn = "batch_channel_norm"
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  if checks.feature_axes(fn, x.ndim, axis) != (x.ndim - 1,):
    raise ValueError(f"{fn}: `axis`={axis!r}: the channels must be the last axis of `x` "
                     f"(the group norm groups them there); move them with jnp.moveaxis.")
  work = jnp.promote_types(x.dtype, jnp.float32)
  z, new = batch_norm(x, stats, training=training, axis=axis, momentum=momentum,
                      epsilon=epsilon, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, mask=mask, dtype=work,
                      use_fast_variance=use_fast_variance, **batch_norm_options)
  y = group_norm(z, scale, bias, num_groups=num_groups, group_size=group_size,
                 epsilon=epsilon, mask=mask, dtype=x.dtype if dtype is None else dtype)
  return y, new


fill_args(batch_norm, batch_channel_norm)
