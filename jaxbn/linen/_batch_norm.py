"""``jaxbn.linen.BatchNorm`` (flax.linen's BatchNorm interface over :func:`jaxbn.batch_norm`),
its fields as a base, and the BN-family layers built on them alone."""

from __future__ import annotations

from typing import Optional

import jax
from flax import linen as nn
from flax.typing import Axes

import jaxbn
from jaxbn.linen._common import BatchStatsFields, GroupFields, bn_call, resolve_mode


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


class BatchNorm(BatchNormFields):
  r"""Batch normalization for Linen, a drop-in replacement for ``flax.linen.BatchNorm``.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  flax's fields, defaults, call and variables (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``: same shapes and dtypes), so swapping the import
  changes no other line and no checkpoint; during ``init`` nothing is updated and no
  collective is issued, as in flax. The computation is :func:`jaxbn.batch_norm` (its docstring
  has the numerics: fused backward, float32 accumulation, one collective per pass, masks
  weighted by their counts across devices, the guarded fast variance).

  Differences from flax: the arithmetic is always in at least float32 (also with
  ``force_float32_reductions=False``, which only selects ``param_dtype`` for the stored
  statistics); updated real statistics keep their dtype (as in flax, complex input turns the
  running mean complex); ``momentum`` outside ``[0, 1]`` is refused; bad data (see
  :func:`jaxbn.batch_norm`): a feature whose batch statistics are not finite keeps its
  running statistics (``skip_nonfinite``), and a training call with one value per feature
  raises a ``ValueError`` (not during ``init``, where a one-row dummy batch creates flax's
  variables, and never in eval).

  Attributes:
    use_running_average: True: normalize with the stored statistics (eval); False: with the
      batch statistics, updating the stored ones. Here or at call time, not both.
    axis: the feature axis or axes (default -1).
    momentum: weight of the old value in the running averages (flax convention, PyTorch's
      is ``1 - momentum``); 1 keeps them as they are; None (jaxbn) a cumulative average,
      which adds an int32 ``batch_stats/count``.
    epsilon: added to the variance (default 1e-5).
    dtype: output dtype (default: inferred from the input and parameters, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: add the learned ``bias``.
    use_scale: multiply by the learned ``scale``.
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis name(s) to synchronize the statistics over (``shard_map``,
      ``pmap``, ``vmap``); not needed under ``jax.jit`` on sharded arrays.
    axis_index_groups: synchronize within these groups of axis indices only.
    use_fast_variance: flax's one-pass ``E[x²] − E[x]²`` (default), guarded by an exact
      fallback; False: jaxbn's stable variance.
    force_float32_reductions: store the running statistics in float32 (default) or, if
      False, in ``param_dtype``.
    unbiased_running_var: (jaxbn) store PyTorch's unbiased running variance.
    debias: (jaxbn) zero-debiased running averages; adds ``batch_stats/count``.
    skip_nonfinite: (jaxbn) True (default): a feature whose batch statistics are not finite
      (a NaN/Inf in the batch) keeps its running statistics, the others update; False:
      flax's behaviour (the NaN enters them).

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

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: if True, use the stored statistics (eval); if False, the batch
        statistics, updating the stored ones (the ``batch_stats`` collection must be
        mutable). Give it here or to the constructor, not both.
      mask: optional bool array broadcastable to ``x``: which entries count in the batch
        statistics.

    Returns:
      The normalized input, shaped like ``x``.

    Raises:
      ValueError: ``use_running_average`` given neither or both times (flax's message
        first), features that do not match the variables, or an invalid argument.
    """
    mode = resolve_mode("jaxbn.linen.BatchNorm", self.use_running_average, use_running_average)
    return bn_call(self, jaxbn.batch_norm, "jaxbn.linen.BatchNorm", x, mode, mask)


class BatchChannelNorm(GroupFields, BatchNormFields):
  r"""Batch-channel normalization (Qiao et al., 2019) for Linen: BN, then GroupNorm.

  .. math::
     y = \gamma\,\mathrm{GN}\Big(\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\Big) + \beta

  :func:`jaxbn.batch_channel_norm`: the batch norm (running statistics as
  :class:`BatchNorm`'s, no affine) then a group norm per example over ``num_groups`` channel
  groups with ``scale``/``bias``. :class:`BatchNorm`'s fields, call and variables
  (``batch_stats/mean``, ``var``; ``params/scale``, ``bias``), plus the groups; channels last.
  Its eval is not an affine map: the tools run it in eval mode (freeze), leave its statistics
  (recompute) and do not fold it (kind ``running``).

  Attributes:
    num_groups: channel groups (default 32); None with ``group_size``.
    group_size: channels per group instead of ``num_groups``.

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
    fn = "jaxbn.linen.BatchChannelNorm"
    mode = resolve_mode(fn, self.use_running_average, use_running_average)
    return bn_call(self, jaxbn.batch_channel_norm, fn, x, mode, mask,
                   num_groups=self.num_groups, group_size=self.group_size)


__all__ = ["BatchNorm", "BatchChannelNorm"]
