"""``jaxbn.nnx.FrozenBatchNorm``: batch norm with frozen statistics over :func:`jaxbn.frozen_batch_norm`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn
from jax.nn import initializers

import jaxbn
from jaxbn.nnx._common import Layer, bn_inputs, init_bn_layer, promote_dtype


class FrozenBatchNorm(Layer):
  r"""Batch norm with frozen statistics for NNX (detectron2's ``FrozenBatchNorm2d``).

  .. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  Always normalizes with the stored ``mean``/``var``, never updates them, and (with
  ``freeze_affine=True``, the default) stops the gradient of ``scale`` and ``bias``: a fixed
  affine map of ``x`` in ``train()`` and ``eval()`` alike. Same constructor, attributes and
  state as :class:`jaxbn.nnx.BatchNorm` (``use_running_average`` and the call's ``mask``
  are accepted and ignored). See :func:`jaxbn.frozen_batch_norm` for when to use it and
  :func:`freeze_batch_norm` to convert a whole model. ``scale``/``bias`` stay ``nnx.Param``
  (same state), so exclude them from weight decay if they must not move at all.

  The other constructor arguments (num_features, use_running_average, axis, momentum, epsilon,
  dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name, axis_index_groups,
  use_fast_variance, promote_dtype, rngs, bias_metadata, scale_metadata, unbiased_running_var,
  debias) are as :class:`jaxbn.nnx.BatchNorm`; ``use_running_average``, ``momentum``,
  ``axis_name``, ``axis_index_groups``, ``use_fast_variance`` and ``unbiased_running_var`` are
  accepted and unused (no statistics are computed).

  Args:
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.FrozenBatchNorm(2, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> bool(jnp.allclose(layer(x), x / jnp.sqrt(1 + 1e-5)))
    True
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: Optional[bool] = False,
      axis: Axes = -1,
      momentum: Optional[float] = 0.99,
      epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      unbiased_running_var: bool = False,
      debias: bool = False,
      freeze_affine: bool = True,
  ):
    init_bn_layer(self, "jaxbn.nnx.FrozenBatchNorm", locals())
    self.unfrozen = None  # graphdef of the layer this one was converted from, if any

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, **ignored: Any) -> jax.Array:
    """Normalizes ``x`` with the stored statistics (the other arguments are ignored).

    Args:
      x: the input, feature axis ``self.axis``.
      use_running_average: ignored (accepted so that BatchNorm call sites work unchanged).
      mask: ignored (no statistics are computed).
      **ignored: other call arguments of the layer this one replaces (e.g. BatchRenorm's
        ``r_max``/``d_max``), ignored.

    Returns:
      The normalized input, shaped like ``x``.
    """
    del use_running_average, mask, ignored
    x, axis, stats, scale, bias, out = bn_inputs(self, x, "jaxbn.nnx.FrozenBatchNorm")
    return jaxbn.frozen_batch_norm(x, stats, scale, bias, axis=axis, epsilon=self.epsilon,
                             dtype=out, freeze_affine=self.freeze_affine)
