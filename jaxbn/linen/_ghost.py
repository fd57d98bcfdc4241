"""``jaxbn.linen.GhostBatchNorm``: ghost (virtual) batch norm over :func:`jaxbn.ghost_batch_norm`."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn.linen._batch_norm import BatchNormFields
from jaxbn.linen._common import bn_call, resolve_mode


class _VirtualBatchSize(nn.Module):
  """GhostBatchNorm's first field (required, so it precedes BatchNorm's)."""

  virtual_batch_size: int


class GhostBatchNorm(BatchNormFields, _VirtualBatchSize):
  r"""Ghost batch normalization (Hoffer et al., 2017) for Linen, with BatchNorm's variables.

  Each consecutive slice of ``virtual_batch_size`` examples (along ``batch_axis`` of the
  per-device batch) is normalized with its own statistics in training; evaluation uses the
  running statistics like batch norm, whatever the batch size. See
  :func:`jaxbn.ghost_batch_norm` for the running-statistics rule (``stats_update``) and when
  to use it. Same fields as :class:`jaxbn.linen.BatchNorm` plus ``virtual_batch_size``,
  ``batch_axis`` and ``stats_update``, and the same variables (a batch norm checkpoint loads
  unchanged).

  The other fields (use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
  use_scale, bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
  force_float32_reductions, unbiased_running_var, debias, skip_nonfinite) are as
  :class:`jaxbn.linen.BatchNorm`, except ``use_fast_variance`` defaults to False (jaxbn's
  stable variance) and ``axis_name`` synchronizes only the running-statistics update.

  Attributes:
    virtual_batch_size: examples per virtual batch (must divide the per-device batch).
    batch_axis: the axis cut into virtual batches (default 0).
    stats_update: ``"average"`` (one update per call) or ``"sequential"`` (one per virtual
      batch, the paper's rule).

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

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: True: eval; False: training (``batch_stats`` must be mutable).
      mask: optional bool array broadcastable to ``x``: which entries count.

    Returns:
      The normalized input, shaped like ``x``.
    """
    use_running_average = resolve_mode("jaxbn.linen.GhostBatchNorm", self.use_running_average,
                                       use_running_average)
    vbs = self.virtual_batch_size
    if (self.is_initializing() and not use_running_average
        and -jnp.ndim(x) <= self.batch_axis < jnp.ndim(x)):
      vbs = max(jnp.shape(x)[self.batch_axis], 1)  # any init batch works, as for BatchNorm
    return bn_call(self, jaxbn.ghost_batch_norm, "jaxbn.linen.GhostBatchNorm", x,
                   use_running_average, mask, virtual_batch_size=vbs,
                   batch_axis=self.batch_axis, stats_update=self.stats_update)
