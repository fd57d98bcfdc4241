"""``jaxbn.linen.BatchNorm`` (flax.linen's BatchNorm interface over :func:`jaxbn.batch_norm`),
its fields as a base, and the BN-family layers built on them alone."""

from __future__ import annotations

from typing import Optional

import jax
from flax import linen as nn
from flax.typing import Axes

import jaxbn
from jaxbn._layers.docs import bn_doc
from jaxbn.linen._common import BatchStatsFields, GroupFields, bn_call


class BatchNormFields(BatchStatsFields):
  """``flax.linen.BatchNorm``'s fields, in its order and with its defaults, and jaxbn's extras
  (the shared base of the BN-family layers; see :class:`BatchNorm` for their meaning)."""

  axis: Axes = -1
  momentum: Optional[float] = 0.99
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  # jaxbn extras (flax has no such fields).
  unbiased_running_var: bool = False
  debias: bool = False
  skip_nonfinite: bool = True


@bn_doc("linen")
class BatchNorm(BatchNormFields):
  r"""Batch normalization for Linen, a drop-in replacement for ``flax.linen.BatchNorm``.

  {bn_math}

  flax's fields, defaults, call and variables (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``: same shapes and dtypes), so swapping the import
  changes no other line and no checkpoint; during ``init`` nothing is updated and no
  collective is issued, as in flax. The computation is :func:`jaxbn.batch_norm` (its docstring
  has the numerics: fused backward, float32 accumulation, one collective per pass, masks
  weighted by their counts across devices, the guarded fast variance).

  Differences from flax: the arithmetic is always in at least float32 (also with
  ``force_float32_reductions=False``, which only selects ``param_dtype`` for the stored
  statistics); updated real statistics keep their dtype (as in flax, complex input turns the
  running mean complex); {bad_data} (not during ``init``, where a one-row dummy batch
  creates flax's variables, and never in eval).

  Attributes:
    use_running_average: True: normalize with the stored statistics (eval); False: with the
      batch statistics, updating the stored ones. Here or at call time, not both.
    axis: the feature axis or axes (default -1).
    {bn_args}
    force_float32_reductions: store the running statistics in float32 (default) or, if
      False, in ``param_dtype``.
    {bn_extras}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (4,), 'var': (4,)}, 'params': {'bias': (4,), 'scale': (4,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)
  """

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    {call_args}

    {call_end}
    """
    return bn_call(self, jaxbn.batch_norm, "jaxbn.linen.BatchNorm", x, use_running_average, mask)


@bn_doc("linen")
class BatchChannelNorm(GroupFields, BatchNormFields):
  r"""Batch-channel normalization (Qiao et al., 2019) for Linen: BN, then GroupNorm.

  {bcn}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.BatchChannelNorm(num_groups=2, use_running_average=False)
    >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 6))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> y, updates = layer.apply(variables, x, mutable=['batch_stats'])
    >>> updates['batch_stats']['var'].shape
    (6,)
  """

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """As :meth:`BatchNorm.__call__`, then the group norm."""
    return bn_call(self, jaxbn.batch_channel_norm, "jaxbn.linen.BatchChannelNorm", x,
                   use_running_average, mask, num_groups=self.num_groups,
                   group_size=self.group_size)


__all__ = ["BatchNorm", "BatchChannelNorm"]
