"""``jaxbn.nnx.BatchRenorm``: batch renormalization over :func:`jaxbn.batch_renorm`."""

from __future__ import annotations

from typing import Optional

import jax

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.nnx._batch_norm import BatchNormFields
from jaxbn.nnx._common import bn_call, layer_fields


@bn_doc("nnx")
@layer_fields
class BatchRenorm(BatchNormFields):
  r"""Batch renormalization (Ioffe, 2017) for NNX, with BatchNorm's constructor and state.

  {renorm}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.BatchRenorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (4, 3)) * 2 + 1
    >>> r_max, d_max = jaxbn.renorm_schedule(jnp.array(20_000))
    >>> y = layer(x, r_max=r_max, d_max=d_max)     # training: updates mean/var
    >>> layer.eval()
    >>> y_eval = layer(x)
  """

  _fn = "jaxbn.nnx.BatchRenorm"
  use_fast_variance: bool = False  # (jaxbn's stable variance by default)
  skip_nonfinite: bool = True
  r_max: float = 3.0
  d_max: float = 5.0
  r_min: Optional[float] = None
  running_std: bool = False

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, r_max: Optional[jax.typing.ArrayLike] = None,
               d_max: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
    """Renormalizes ``x`` (training) or normalizes it with the running statistics (eval).

    {call_args}
      r_max: optional (traced) override of ``self.r_max``.
      d_max: optional (traced) override of ``self.d_max``.

    {call_end}
    """
    return bn_call(self, jaxbn.batch_renorm, self._fn, x, use_running_average, mask,
                   r_max=self.r_max if r_max is None else r_max,
                   d_max=self.d_max if d_max is None else d_max, r_min=self.r_min,
                   running_std=self.running_std)
