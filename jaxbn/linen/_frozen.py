"""``jaxbn.linen.FrozenBatchNorm``: batch norm with frozen statistics over :func:`jaxbn.frozen_batch_norm`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_variables


def frozen_apply(mdl: nn.Module, x: jax.typing.ArrayLike, freeze_affine: bool,
                 fn: str) -> jax.Array:
  """The frozen computation on a BN-family module's own variables (creates them at init)."""
  x, axis, stats, scale, bias, out_dtype, _ = bn_variables(mdl, x, fn)
  return jaxbn.frozen_batch_norm(x, stats, scale, bias, axis=axis, epsilon=mdl.epsilon,
                                 dtype=out_dtype, freeze_affine=freeze_affine)


class FrozenBatchNorm(BatchNormFields):
  r"""Batch norm with frozen statistics for Linen (detectron2's ``FrozenBatchNorm2d``).

  .. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  Always normalizes with the stored running statistics, never updates them, and (with
  ``freeze_affine=True``, the default) stops the gradient of ``scale`` and ``bias`` too, so
  the layer is a fixed affine map of ``x`` in training and in evaluation. Same fields and
  variables as :class:`jaxbn.linen.BatchNorm` (and ``flax.linen.BatchNorm``), so it loads
  their checkpoints; ``use_running_average`` and ``mask`` are accepted and ignored, so call
  sites need not change. See :func:`jaxbn.frozen_batch_norm` for when to use it, and
  :func:`freeze_batch_norm` to convert a whole model.

  The other fields (use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
  use_scale, bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
  force_float32_reductions, unbiased_running_var, debias) are as
  :class:`jaxbn.linen.BatchNorm`; ``use_running_average``, ``momentum``, ``axis_name``,
  ``axis_index_groups``, ``use_fast_variance`` and ``unbiased_running_var`` are accepted and
  unused (no statistics are computed).

  Attributes:
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.FrozenBatchNorm()
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
    >>> y = layer.apply(variables, x, use_running_average=False)   # still the running stats
    >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5)))
    True
  """

  freeze_affine: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, **ignored: Any) -> jax.Array:
    """Normalizes ``x`` with the stored statistics (the other arguments are ignored).

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: ignored (accepted so that BatchNorm call sites work unchanged).
      mask: ignored (no statistics are computed).
      **ignored: other call arguments of the layer this one replaces (e.g. BatchRenorm's
        ``r_max``/``d_max``), ignored.

    Returns:
      The normalized input, shaped like ``x``.
    """
    del use_running_average, mask, ignored
    return frozen_apply(self, x, self.freeze_affine, "jaxbn.linen.FrozenBatchNorm")
