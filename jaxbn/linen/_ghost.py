"""``jaxbn.linen.GhostBatchNorm``: ghost (virtual) batch norm (:func:`jaxbn.ghost_batch_norm`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_call, resolve_mode


class _VirtualBatchSize(nn.Module):
  """GhostBatchNorm's first field (required, so it precedes BatchNorm's)."""

  virtual_batch_size: int


@bn_doc("linen")
class GhostBatchNorm(BatchNormFields, _VirtualBatchSize):
  r"""Ghost batch normalization (Hoffer et al., 2017) for Linen, with BatchNorm's variables.

  {ghost}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.GhostBatchNorm(virtual_batch_size=4)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> variables = layer.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = layer.apply(variables, x, use_running_average=False,
    ...                          mutable=['batch_stats'])
    >>> bool(jnp.allclose(y[:4].mean(0), 0, atol=1e-5))   # each virtual batch centered
    True
  """

  use_fast_variance: bool = False
  batch_axis: int = 0
  stats_update: str = "average"

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` per virtual batch (training) or with the running statistics (eval).

    During ``init`` nothing is updated, no collective is issued, and the batch need not be
    a multiple of ``virtual_batch_size`` (the init input is normalized as one batch).

    {call_args}

    {call_end}
    """
    fn = "jaxbn.linen.GhostBatchNorm"
    vbs = self.virtual_batch_size
    training = not resolve_mode(fn, self.use_running_average, use_running_average)
    if self.is_initializing() and training and -jnp.ndim(x) <= self.batch_axis < jnp.ndim(x):
      vbs = max(jnp.shape(x)[self.batch_axis], 1)  # any init batch works, as for BatchNorm
    return bn_call(self, jaxbn.ghost_batch_norm, fn, x, use_running_average, mask,
                   virtual_batch_size=vbs, batch_axis=self.batch_axis,
                   stats_update=self.stats_update)
