"""NNX layers for the batch-independent norms: drop-ins for flax.nnx's LayerNorm, RMSNorm,
GroupNorm and InstanceNorm over :func:`jaxbn.layer_norm` and its relatives."""

from __future__ import annotations

from dataclasses import InitVar, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn
from jax.nn import initializers

from jaxbn import group_norm, instance_norm, layer_norm, rms_norm
from jaxbn._core.group_norm import channel_groups
from jaxbn._layers.common import check_instance_axes
from jaxbn._layers.docs import FLAX_SETTINGS, NORM_CALL
from jaxbn.nnx._common import (Layer, init_affine, layer_fields, output_dtype, param,
                               promote_dtype, value)

_COMPAT = """
  Same constructor, defaults, attributes and state (``scale``, ``bias`` as ``nnx.Param``) as
  flax's layer, so swapping the class changes no other line and no checkpoint. The arithmetic
  runs in at least float32 with float32 statistics (flax first casts ``x`` to the promoted
  dtype), ``mask`` and ``axis_name`` are weighted by the true counts, and masked entries
  holding NaN/Inf do not leak into the output.

  """ + FLAX_SETTINGS + """,
  ``promote_dtype`` (flax's dtype promotion; decides the output dtype), ``rngs`` (for the
  initializers), ``bias_metadata``/``scale_metadata`` (of the ``nnx.Param``).
"""


def _apply(mdl: Layer, core: Callable[..., jax.Array], x: jax.typing.ArrayLike,
           mask: Optional[jax.Array], *names: str) -> jax.Array:
  """``core`` on ``x`` (cast as flax's ``promote_dtype`` does) with the layer's parameters and
  its settings ``names``, ``epsilon``, ``axis_name``, ``axis_index_groups`` (and, but for
  RMSNorm, ``use_fast_variance``)."""
  x = jnp.asarray(x)
  scale, bias = value(mdl.scale), value(getattr(mdl, "bias", None))
  out = output_dtype(mdl.promote_dtype, (x, scale, bias), mdl.dtype)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(out)
  own = dict(bias=bias, use_fast_variance=mdl.use_fast_variance) if hasattr(mdl, "use_bias") else {}
  settings = {n: getattr(mdl, n) for n in names + ("epsilon", "axis_name", "axis_index_groups")}
  return core(x, scale, mask=mask, dtype=out, **settings, **own)


@layer_fields
class _AffineNorm(Layer):
  """The arguments LayerNorm, GroupNorm and InstanceNorm begin with (flax's order and
  defaults; each adds its own, then ``axis_name``...), and their ``scale`` and ``bias``."""

  num_features: int = field(kw_only=False)
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: InitVar[Initializer] = initializers.zeros
  scale_init: InitVar[Initializer] = initializers.ones

  def __post_init__(self, bias_init, scale_init, rngs, bias_metadata, scale_metadata):
    init_affine(self, self.num_features, self.use_scale, self.use_bias, scale_init, bias_init,
                self.param_dtype, rngs, scale_metadata, bias_metadata)


@layer_fields
class LayerNorm(_AffineNorm):
  __doc__ = r"""Layer normalization for NNX, a drop-in replacement for ``flax.nnx.LayerNorm``.

  Statistics per example over ``reduction_axes`` (default the last axis); ``scale``/``bias`` follow
  ``feature_axes``. See :func:`jaxbn.layer_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Args:
    num_features: number of features (entries of ``scale``/``bias``).
    reduction_axes: axes for the statistics (default -1).
    feature_axes: axes of the learned ``scale``/``bias`` (default -1).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.LayerNorm(6, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    >>> bool(jnp.allclose(layer(x).std(-1), 1, atol=1e-3))
    True
  """

  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  promote_dtype: PromoteDtypeFn = promote_dtype
  rngs: InitVar[nnx.Rngs]
  bias_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})
  scale_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})

  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    return _apply(self, layer_norm, x, mask, "reduction_axes", "feature_axes")

  __call__.__doc__ = NORM_CALL.format("layer", "")


@layer_fields
class RMSNorm(Layer):
  __doc__ = r"""RMS normalization for NNX, a drop-in replacement for ``flax.nnx.RMSNorm``.

  Divides by the root mean square over ``reduction_axes`` (no centering, no bias). See
  :func:`jaxbn.rms_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Args:
    num_features: number of features (entries of ``scale``).
    reduction_axes: axes for the statistics (default -1).
    feature_axes: axes of the learned ``scale`` (default -1).
    use_fast_variance: accepted for compatibility (unused: there is no mean to subtract).

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.RMSNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[3.0, 4.0]])).round(4).tolist()
    [[0.8485, 1.1314]]
  """

  num_features: int = field(kw_only=False)
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: InitVar[Initializer] = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  promote_dtype: PromoteDtypeFn = promote_dtype
  rngs: InitVar[nnx.Rngs]
  scale_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})

  def __post_init__(self, scale_init, rngs, scale_metadata):
    self.scale = param(self.use_scale, scale_init, rngs, (self.num_features,),
                       self.param_dtype, scale_metadata)

  def __call__(self, x: jax.typing.ArrayLike, mask: Optional[jax.Array] = None) -> jax.Array:
    return _apply(self, rms_norm, x, mask, "reduction_axes", "feature_axes")

  __call__.__doc__ = NORM_CALL.format("RMS", "")


@layer_fields
class GroupNorm(_AffineNorm):
  __doc__ = r"""Group normalization for NNX, a drop-in replacement for ``flax.nnx.GroupNorm``.

  Statistics per example over groups of channels (last axis) and ``reduction_axes``. See
  :func:`jaxbn.group_norm` for the math and when to use it. Unlike ``flax.nnx.GroupNorm`` 0.12,
  ``reduction_axes`` that keep more than the batch axis are handled correctly (as in
  ``flax.linen.GroupNorm``).
""" + _COMPAT + r"""
  Args:
    num_features: number of channels (last axis).
    num_groups: number of channel groups (default 32).
    group_size: channels per group (pass ``num_groups=None`` with it).
    reduction_axes: axes for the statistics, including the last (default: all but axis 0).

  Raises:
    ValueError: both or neither of ``num_groups``/``group_size``, or groups that do not
      divide ``num_features``.

  Example:
    >>> import jax, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
    >>> layer(jax.random.normal(jax.random.key(0), (2, 4, 4, 8))).shape
    (2, 4, 4, 8)
  """

  num_groups: Optional[int] = field(default=32, kw_only=False)
  group_size: Optional[int] = field(default=None, kw_only=False)
  reduction_axes: Optional[Axes] = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  promote_dtype: PromoteDtypeFn = promote_dtype
  rngs: InitVar[nnx.Rngs]
  bias_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})
  scale_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})

  def __post_init__(self, *init_vars: Any):
    n = self.num_features
    self.num_groups = channel_groups("jaxbn.nnx.GroupNorm", n, self.num_groups, self.group_size,
                                     "last axis", flax_word="features", of=f"num_features={n}")
    super().__post_init__(*init_vars)
    self.feature_axis = -1
    self.group_size = n // self.num_groups

  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    return _apply(self, group_norm, x, mask, "num_groups", "reduction_axes")

  __call__.__doc__ = NORM_CALL.format("group", ", channels last")


@layer_fields
class InstanceNorm(_AffineNorm):
  __doc__ = r"""Instance normalization for NNX, a drop-in for ``flax.nnx.InstanceNorm``.

  Statistics per example and per feature over every axis but the leading (batch) axis and
  ``feature_axes``. See :func:`jaxbn.instance_norm` for the math and when to use it.
""" + _COMPAT + r"""
  Args:
    num_features: number of features (entries of ``scale``/``bias``).
    feature_axes: the channel axes (default -1); not axis 0.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.InstanceNorm(3, rngs=nnx.Rngs(0))
    >>> y = layer(jax.random.normal(jax.random.key(0), (2, 4, 4, 3)))
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True
  """

  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  promote_dtype: PromoteDtypeFn = promote_dtype
  rngs: InitVar[nnx.Rngs]
  bias_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})
  scale_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})

  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None) -> jax.Array:
    check_instance_axes("jaxbn.nnx.InstanceNorm", jnp.ndim(x), self.feature_axes)
    return _apply(self, instance_norm, x, mask, "feature_axes")

  __call__.__doc__ = NORM_CALL.format("instance", ", batch axis first")
