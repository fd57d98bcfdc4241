"""``jaxbn.nnx.GhostBatchNorm``: ghost (virtual) batch norm over :func:`jaxbn.ghost_batch_norm`."""

from __future__ import annotations

from dataclasses import field
from typing import Optional

import jax

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.nnx._batch_norm import BatchNormFields
from jaxbn.nnx._common import bn_call, layer_fields


@bn_doc("nnx")
@layer_fields
class GhostBatchNorm(BatchNormFields):
  r"""Ghost batch normalization (Hoffer et al., 2017) for NNX, with BatchNorm's state.

  {ghost}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.GhostBatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> y = layer(x)
    >>> bool(jnp.allclose(y[4:].mean(0), 0, atol=1e-5))   # each virtual batch centered
    True
  """

  _fn = "jaxbn.nnx.GhostBatchNorm"
  virtual_batch_size: int = field(kw_only=False)
  use_fast_variance: bool = False  # (jaxbn's stable variance by default)
  skip_nonfinite: bool = True
  batch_axis: int = 0
  stats_update: str = "average"

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` per virtual batch (training) or with the running statistics (eval).

    {call_args}

    {call_end}
    """
    return bn_call(self, jaxbn.ghost_batch_norm, self._fn, x, use_running_average, mask,
                   virtual_batch_size=self.virtual_batch_size,
                   batch_axis=self.batch_axis, stats_update=self.stats_update)
