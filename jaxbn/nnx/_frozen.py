"""``jaxbn.nnx.FrozenBatchNorm``: batch norm with frozen statistics over :func:`jaxbn.frozen_batch_norm`."""

from __future__ import annotations

from typing import Any, Optional

import jax

import jaxbn
from jaxbn.nnx._batch_norm import BatchNormFields
from jaxbn.nnx._common import bn_inputs, layer_fields


@layer_fields
class FrozenBatchNorm(BatchNormFields):
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

  The other constructor arguments are :class:`jaxbn.nnx.BatchNorm`'s but ``skip_nonfinite``;
  ``use_running_average``, ``momentum``, ``axis_name``, ``axis_index_groups``,
  ``use_fast_variance`` and ``unbiased_running_var`` are accepted and unused (no statistics
  are computed).

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

  _fn = "jaxbn.nnx.FrozenBatchNorm"
  freeze_affine: bool = True

  def __post_init__(self, *init_vars: Any):
    super().__post_init__(*init_vars)
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
    x, axis, stats, scale, bias, out = bn_inputs(self, x, self._fn)
    return jaxbn.frozen_batch_norm(x, stats, scale, bias, axis=axis, epsilon=self.epsilon,
                             dtype=out, freeze_affine=self.freeze_affine)
