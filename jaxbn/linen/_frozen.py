"""``jaxbn.linen.FrozenBatchNorm``: frozen-statistics BN (:func:`jaxbn.frozen_batch_norm`)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_variables


def frozen_apply(mdl: nn.Module, x: jax.typing.ArrayLike, freeze_affine: bool,
                 fn: str) -> jax.Array:
  """The frozen computation on a BN-family module's own variables (creates them at init)."""
  x, axis, stats, scale, bias, out_dtype, _ = bn_variables(mdl, x, fn)
  return jaxbn.frozen_batch_norm(x, stats, scale, bias, axis=axis, epsilon=mdl.epsilon,
                                 dtype=out_dtype, freeze_affine=freeze_affine)


@bn_doc("linen")
class FrozenBatchNorm(BatchNormFields):
  r"""Batch norm with frozen statistics for Linen (detectron2's ``FrozenBatchNorm2d``).

  {frozen}

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

    {frozen_call}
    """
    del use_running_average, mask, ignored
    return frozen_apply(self, x, self.freeze_affine, "jaxbn.linen.FrozenBatchNorm")
