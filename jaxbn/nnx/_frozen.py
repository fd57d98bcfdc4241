"""``jaxbn.nnx.FrozenBatchNorm``: frozen-statistics batch norm (:func:`jaxbn.frozen_batch_norm`)."""

from __future__ import annotations

from typing import Any, Optional

import jax

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.nnx._batch_norm import BatchNormFields
from jaxbn.nnx._common import bn_inputs, layer_fields


@bn_doc("nnx")
@layer_fields
class FrozenBatchNorm(BatchNormFields):
  r"""Batch norm with frozen statistics for NNX (detectron2's ``FrozenBatchNorm2d``).

  {frozen}

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

    {frozen_call}
    """
    del use_running_average, mask, ignored
    x, axis, stats, scale, bias, out = bn_inputs(self, x, self._fn)
    return jaxbn.frozen_batch_norm(x, stats, scale, bias, axis=axis, epsilon=self.epsilon,
                                 dtype=out, freeze_affine=self.freeze_affine)
