"""``jaxbn.nnx.BatchRenorm``: batch renormalization over :func:`jaxbn.batch_renorm`."""

from __future__ import annotations

from typing import Optional

import jax

import jaxbn
from jaxbn.nnx._batch_norm import CALL_DOC, BatchNormFields
from jaxbn.nnx._common import bn_call, doc, layer_fields, resolve_mode


@layer_fields
class BatchRenorm(BatchNormFields):
  r"""Batch renormalization (Ioffe, 2017) for NNX, with BatchNorm's constructor and state.

  .. math::
     y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta,
     \quad r = \operatorname{clip}\Big(\frac{\sigma_B}{\sigma}\Big),
     \ d = \operatorname{clip}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

  with ``r``, ``d`` held constant in the gradient (see :func:`jaxbn.batch_renorm` for the
  math, the running-statistics rule and when to use it). Same constructor and state as
  :class:`jaxbn.nnx.BatchNorm` (``scale``, ``bias``, ``mean``, ``var``) plus the clipping
  bounds, so a batch norm checkpoint loads unchanged; ``train()``/``eval()`` switch the mode.
  ``r_max``/``d_max`` given at call time (traced arrays) override the attributes without
  recompiling, e.g. from :func:`jaxbn.renorm_schedule`.

  The other constructor arguments are :class:`jaxbn.nnx.BatchNorm`'s, with their meaning,
  except that ``use_fast_variance`` defaults to False (jaxbn's stable variance).

  Args:
    r_max: upper clip of ``r`` (default 3).
    d_max: clip of ``|d|`` (default 5).
    r_min: lower clip of ``r`` (default ``1 / r_max``).
    running_std: average ``sqrt(var_B + ε)`` (paper, Keras) instead of the variance.

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

  @doc(CALL_DOC, "Renormalizes ``x`` (training) or normalizes it with the running statistics "
       "(eval).", "\n      r_max: optional (traced) override of ``self.r_max``."
       "\n      d_max: optional (traced) override of ``self.d_max``.")
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, r_max: Optional[jax.typing.ArrayLike] = None,
               d_max: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
    use_running_average = resolve_mode(self._fn, use_running_average, self.use_running_average)
    return bn_call(self, jaxbn.batch_renorm, self._fn, x, use_running_average, mask,
                   r_max=self.r_max if r_max is None else r_max,
                   d_max=self.d_max if d_max is None else d_max, r_min=self.r_min,
                   running_std=self.running_std)
