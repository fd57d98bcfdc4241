"""Linen layers for the batch-independent norms: drop-ins for flax's LayerNorm, RMSNorm,
GroupNorm and InstanceNorm over :func:`jaxbn.layer_norm` and its relatives."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxbn import group_norm, instance_norm, layer_norm, rms_norm
from jaxbn._core.checks import named_axes
from jaxbn._core.group_norm import channel_groups
from jaxbn._layers.common import check_instance_axes, flax_error
from jaxbn._layers.docs import FLAX_SETTINGS, NORM_CALL
from jaxbn.linen._common import AffineFields, GroupFields, affine_params, as_float

_COMPAT = """
  Same fields, defaults, call signature and variables (``params/scale``, ``params/bias``) as
  flax's layer, so swapping the import changes no other line and no checkpoint; outputs match
  flax's to float32 rounding. The statistics are always reduced in at least float32
  (``force_float32_reductions=False`` is accepted and changes nothing but is the more accurate
  for it), with ``mask`` and ``axis_name`` weighted by the true counts, and masked entries
  holding NaN/Inf do not leak into the output.

  """ + FLAX_SETTINGS + ".\n"


def _normalize(mdl: nn.Module, fn: str, core: Callable[..., jax.Array],
               x: jax.typing.ArrayLike, mask: Optional[jax.Array], *names: str) -> jax.Array:
  """``core`` on ``x`` (as a float) with ``mdl``'s ``scale``/``bias``, shaped as ``x`` along
  ``feature_axes`` (GroupNorm: the last axis), and its settings ``names``, ``epsilon``,
  ``axis_name``, ``axis_index_groups`` (and, but for RMSNorm, ``use_fast_variance``)."""
  x = as_float(x)
  feat = named_axes(fn, "feature_axes", x.ndim, getattr(mdl, "feature_axes", -1))
  has_bias = hasattr(mdl, "use_bias")  # RMSNorm: no bias, and no mean to subtract
  scale, bias, out = affine_params(mdl, x, [x.shape[a] for a in feat], mdl.use_scale,
                                   has_bias and mdl.use_bias)
  options = dict(bias=bias, use_fast_variance=mdl.use_fast_variance) if has_bias else {}
  settings = {n: getattr(mdl, n) for n in names + ("epsilon", "axis_name", "axis_index_groups")}
  return core(x, scale, mask=mask, dtype=out, **settings, **options)


class LayerNorm(AffineFields):
  __doc__ = r"""Layer normalization for Linen, a drop-in replacement for ``flax.linen.LayerNorm``.

  Statistics per example over ``reduction_axes`` (default the last axis); ``scale``/``bias``
  follow ``feature_axes``. See :func:`jaxbn.layer_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Attributes:
    reduction_axes: axes for the statistics (default -1).
    feature_axes: axes of the learned ``scale``/``bias`` (default -1).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    >>> layer = jaxbn.linen.LayerNorm()
    >>> variables = layer.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
    >>> bool(jnp.allclose(layer.apply(variables, x).std(-1), 1, atol=1e-3))
    True
  """

  epsilon: float = 1e-6
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    return _normalize(self, "jaxbn.linen.LayerNorm", layer_norm, x, mask, "reduction_axes",
                      "feature_axes")

  __call__.__doc__ = NORM_CALL.format("layer", "")


class RMSNorm(nn.Module):
  __doc__ = r"""RMS normalization for Linen, a drop-in replacement for ``flax.linen.RMSNorm``.

  Divides by the root mean square over ``reduction_axes`` (no centering, no bias). See
  :func:`jaxbn.rms_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Attributes:
    reduction_axes: axes for the statistics (default -1).
    feature_axes: axes of the learned ``scale`` (default -1).
    use_fast_variance: accepted for compatibility (unused: there is no mean to subtract).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> x = jax.random.normal(jax.random.key(0), (2, 6))
    >>> variables = jaxbn.linen.RMSNorm().init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'scale': (6,)}}
  """

  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    return _normalize(self, "jaxbn.linen.RMSNorm", rms_norm, x, mask, "reduction_axes",
                      "feature_axes")

  __call__.__doc__ = NORM_CALL.format("RMS", "")


class GroupNorm(AffineFields, GroupFields):
  __doc__ = r"""Group normalization for Linen, a drop-in replacement for ``flax.linen.GroupNorm``.

  Statistics per example over groups of channels (last axis) and ``reduction_axes``. See
  :func:`jaxbn.group_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Attributes:
    num_groups: number of channel groups (default 32).
    group_size: channels per group (pass ``num_groups=None`` with it).
    reduction_axes: axes for the statistics, including the last (default: all but axis 0).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    >>> layer = jaxbn.linen.GroupNorm(num_groups=4)
    >>> variables = layer.init(jax.random.key(1), x)
    >>> layer.apply(variables, x).shape
    (2, 4, 4, 8)
  """

  epsilon: float = 1e-6
  reduction_axes: Optional[Axes] = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    fn = "jaxbn.linen.GroupNorm"
    x = as_float(x)
    if x.ndim < 1:
      raise ValueError(f"{fn}: `x` must have a channel axis (rank >= 1).")
    if self.reduction_axes is not None:
      red = named_axes(fn, "reduction_axes", x.ndim, self.reduction_axes)
      if red[-1] != x.ndim - 1:
        raise flax_error(
            "The reduction axes must include the final dimension as this is assumed to be the "
            "feature axis.", f"{fn}: `reduction_axes`={self.reduction_axes!r} must include the "
            f"last axis (the channels, within each group), e.g. {tuple(range(1, x.ndim))}.")
    channel_groups(fn, x.shape[-1], self.num_groups, self.group_size, "last axis",
                   flax_word="channels")
    return _normalize(self, fn, group_norm, x, mask, "num_groups", "group_size",
                      "reduction_axes")

  __call__.__doc__ = NORM_CALL.format("group", ", channels last")


class InstanceNorm(AffineFields):
  __doc__ = r"""Instance normalization for Linen, a drop-in for ``flax.linen.InstanceNorm``.

  Statistics per example and per feature over every axis but the leading (batch) axis and
  ``feature_axes``. See :func:`jaxbn.instance_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Attributes:
    feature_axes: the channel axes (default -1); not axis 0.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> layer = jaxbn.linen.InstanceNorm()
    >>> variables = layer.init(jax.random.key(1), x)
    >>> bool(jnp.allclose(layer.apply(variables, x).mean((1, 2)), 0, atol=1e-5))
    True
  """

  epsilon: float = 1e-6
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    fn = "jaxbn.linen.InstanceNorm"
    check_instance_axes(fn, jnp.ndim(x), self.feature_axes)
    return _normalize(self, fn, instance_norm, x, mask, "feature_axes")

  __call__.__doc__ = NORM_CALL.format("instance", ", batch axis first")
