"""``jaxbn.linen.BatchRenorm``: batch renormalization over :func:`jaxbn.batch_renorm`."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_call, resolve_mode


class BatchRenorm(BatchNormFields):
  r"""Batch renormalization (Ioffe, 2017) for Linen, with BatchNorm's fields and variables.

  .. math::
     y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta,
     \quad r = \operatorname{clip}\Big(\frac{\sigma_B}{\sigma}\Big),
     \ d = \operatorname{clip}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

  with ``r``, ``d`` held constant in the gradient (see :func:`jaxbn.batch_renorm` for the
  math, the running-statistics rule and when to use it). Same fields as
  :class:`jaxbn.linen.BatchNorm` plus the clipping bounds, and the *same variables*
  (``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``), so a batch
  norm checkpoint loads into it unchanged and inference is identical to batch norm's.

  ``r_max`` and ``d_max`` can be given at call time as (traced) arrays, which overrides the
  fields without recompiling — this is how to ramp them with :func:`jaxbn.renorm_schedule`.

  The other fields (use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
  use_scale, bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
  force_float32_reductions, unbiased_running_var, debias, skip_nonfinite) are as
  :class:`jaxbn.linen.BatchNorm`, except ``use_fast_variance`` defaults to False (jaxbn's
  stable variance).

  Attributes:
    r_max: upper clip of ``r`` (default 3). Call-time ``r_max`` overrides it.
    d_max: clip of ``|d|`` (default 5). Call-time ``d_max`` overrides it.
    r_min: lower clip of ``r`` (default ``1 / r_max``).
    running_std: average ``sqrt(var_B + ε)`` (paper, Keras) instead of the variance.

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

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: True: eval; False: training (``batch_stats`` must be mutable).
      mask: optional bool array broadcastable to ``x``: which entries count.
      r_max: optional (traced) override of the field ``r_max``.
      d_max: optional (traced) override of the field ``d_max``.

    Returns:
      The normalized input, shaped like ``x``.
    """
    use_running_average = resolve_mode("jaxbn.linen.BatchRenorm", self.use_running_average,
                                       use_running_average)
    return bn_call(self, jaxbn.batch_renorm, "jaxbn.linen.BatchRenorm", x, use_running_average,
                   mask, r_max=self.r_max if r_max is None else r_max,
                   d_max=self.d_max if d_max is None else d_max, r_min=self.r_min,
                   running_std=self.running_std)
