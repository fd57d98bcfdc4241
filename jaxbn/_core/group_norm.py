"""Per-example normalizations over channels: group normalization and instance normalization.

Group norm is the engine (:mod:`jaxbn._core.engine`) with the channels cut into blocks that
share their statistics (``grouping``); instance norm is its ``group_size=1`` case with
flax's argument names. No running state: training and inference are the same function.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.docstrings import fill_args
from jaxbn._core.engine import standardize
from jaxbn._core.layer_norm import layer_norm

Axes = checks.Axes


def channel_groups(fn: str, channels: int, num_groups: Optional[int],
                   group_size: Optional[int], where: str, *, flax_word: Optional[str] = None,
                   of: Optional[str] = None) -> int:
  """The number of groups from exactly one of ``num_groups``/``group_size`` (flax's rule), a
  positive divisor of the ``channels`` (on the axis ``where`` of ``x``, or as ``of`` says).

  The GroupNorm layers pass ``flax_word``, what flax's layer calls the channels in its
  errors: its sentences come first, and only Python ints are taken (flax's layers refuse a
  NumPy ``num_groups``).
  """
  if (num_groups is None) == (group_size is None):
    got = f"got num_groups={num_groups!r} and group_size={group_size!r}"
    if flax_word:
      raise ValueError(
          "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
          "specified, pass `num_groups=None` as argument to override the default `num_groups` "
          f"value of 32. {fn}: {got}.")
    raise ValueError(f"{fn}: give exactly one of `num_groups` and `group_size`, {got}; to set "
                     f"group_size, also pass num_groups=None (its default is 32).")
  name, given = ("num_groups", num_groups) if group_size is None else ("group_size", group_size)
  if (not isinstance(given, int if flax_word else (int, np.integer)) or given <= 0
      or channels % given):
    of = of or f"the {channels} channels ({where} of `x`)"
    ours = f"{fn}: `{name}`={given!r} must be a positive divisor of {of}."
    flax = (f"Number of groups ({given}) does not divide the number of channels ({channels})."
            if group_size is None else
            f"Number of {flax_word} ({channels}) is not multiple of the group size ({given}).")
    raise ValueError(f"{flax} {ours}" if flax_word else ours)
  return int(num_groups) if group_size is None else channels // int(group_size)


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
    feature_axes: channel axis or axes (default -1); must not include axis 0.
    axis_name: mapped axis name(s) across which the reduced (spatial) axes are sharded.

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
  feat = checks.named_axes(fn, "feature_axes", x.ndim, feature_axes)
  if 0 in feat:
    raise ValueError(
        f"{fn}: `feature_axes`={feature_axes!r} includes axis 0, which instance norm treats "
        f"as the batch axis; put the batch first and pass the channel axis (e.g. -1 for "
        f"NHWC, 1 for NCHW).")
  checks.affine_params(fn, scale, bias, tuple(x.shape[a] for a in feat),
                       f"`feature_axes`={feature_axes!r}")
  red = tuple(a for a in range(1, x.ndim) if a not in feat)
  return standardize(fn, x, scale, bias, red=red, param_axes=feat, mask=mask, epsilon=epsilon,
                     dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
                     use_fast_variance=use_fast_variance)[0]


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
  num_groups = channel_groups(fn, channels, num_groups, group_size, "last axis")
  if reduction_axes is None:
    red = tuple(range(1, x.ndim))
  else:
    red = checks.named_axes(fn, "reduction_axes", x.ndim, reduction_axes)
    if x.ndim - 1 not in red:
      raise ValueError(
          f"{fn}: `reduction_axes`={reduction_axes!r} must include the last axis (the "
          f"channels, within each group), e.g. {tuple(sorted(set(red) | {x.ndim - 1}))}.")
  checks.affine_params(fn, scale, bias, (channels,), "its last (channel) axis")
  # Statistics per group: reduce over `red` without the channels on x's own layout, then
  # over each group's channels (no reshape of x: the channels stay the inner axis).
  red = tuple(a for a in red if a != x.ndim - 1)
  nstat = x.ndim - len(red)  # the channels are the last of the statistics' axes
  return standardize(fn, x, scale, bias, red=red, param_axes=(x.ndim - 1,), mask=mask,
                     epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                     axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
                     grouping=(nstat - 1, num_groups))[0]


fill_args(layer_norm, instance_norm, group_norm)
