"""``jaxbn.linen.BatchRenorm``: batch renormalization over :func:`jaxbn.batch_renorm`."""

from __future__ import annotations

from typing import Optional

import jax
from flax import linen as nn

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_call


@bn_doc("linen")
class BatchRenorm(BatchNormFields):
  r"""Batch renormalization (Ioffe, 2017) for Linen, with BatchNorm's fields and variables.

  {renorm}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn, jaxbn.linen
    >>> layer = jaxbn.linen.BatchRenorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (4, 3)) * 2 + 1
    >>> variables = layer.init(jax.random.key(1), x, use_running_average=False)
    >>> step = jnp.array(20_000)            # e.g. the optimizer's step, traced under jit
    >>> r_max, d_max = jaxbn.renorm_schedule(step)
    >>> y, updates = layer.apply(variables, x, use_running_average=False, r_max=r_max,
    ...                          d_max=d_max, mutable=['batch_stats'])
    >>> y.shape, sorted(updates['batch_stats'])
    ((4, 3), ['mean', 'var'])
  """

  use_fast_variance: bool = False  # (jaxbn's stable variance by default)
  r_max: float = 3.0
  d_max: float = 5.0
  r_min: Optional[float] = None
  running_std: bool = False

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, r_max: Optional[jax.typing.ArrayLike] = None,
               d_max: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
    """Renormalizes ``x`` (training) or normalizes it with the running statistics (eval).

    {call_args}
      r_max: optional (traced) override of the field ``r_max``.
      d_max: optional (traced) override of the field ``d_max``.

    {call_end}
    """
    return bn_call(self, jaxbn.batch_renorm, "jaxbn.linen.BatchRenorm", x, use_running_average,
                   mask, r_max=self.r_max if r_max is None else r_max,
                   d_max=self.d_max if d_max is None else d_max, r_min=self.r_min,
                   running_std=self.running_std)
