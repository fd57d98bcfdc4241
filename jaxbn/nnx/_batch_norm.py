"""``jaxbn.nnx.BatchNorm`` (flax.nnx's BatchNorm interface over :func:`jaxbn.batch_norm`),
its constructor arguments as a base, and the BN-family layers built on them alone."""

from __future__ import annotations

from dataclasses import InitVar, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn
from jax.nn import initializers

import jaxbn
from jaxbn.nnx._common import (Layer, bn_call, doc, init_bn_state, layer_fields, mode,
                               promote_dtype, resolve_mode)

# The docstring of the BN-family calls: a summary, then the layer's own arguments.
CALL_DOC = """{}

    Args:
      x: the input, feature axis ``self.axis`` of size ``num_features``.
      use_running_average: overrides the attribute of the same name for this call.
      mask: optional bool array broadcastable to ``x``: which entries count in the batch
        statistics.{}

    Returns:
      The normalized input, shaped like ``x``.

    Raises:
      ValueError: no mode is set (flax's message first), ``x`` has the wrong number of
        features, or an invalid argument.
    """


@layer_fields
class BatchNormFields(Layer):
  """``flax.nnx.BatchNorm``'s constructor arguments, in its order and with its defaults, and
  jaxbn's extras (the shared base of the BN-family layers; see :class:`BatchNorm` for their
  meaning): the settings are stored, then flax BatchNorm's state is created."""

  _fn = "jaxbn.nnx.BatchNormFields"  # the layer's name in error messages
  num_features: int = field(kw_only=False)
  use_running_average: Optional[bool] = False
  axis: Axes = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: InitVar[Initializer] = initializers.zeros
  scale_init: InitVar[Initializer] = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  promote_dtype: PromoteDtypeFn = promote_dtype
  rngs: InitVar[nnx.Rngs]
  bias_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})
  scale_metadata: InitVar[Mapping[str, Any]] = MappingProxyType({})
  # jaxbn extras (flax has no such arguments).
  unbiased_running_var: bool = False
  debias: bool = False

  def __post_init__(self, bias_init, scale_init, rngs, bias_metadata, scale_metadata):
    init_bn_state(self, self._fn, bias_init, scale_init, rngs, bias_metadata, scale_metadata)


@layer_fields
class BatchNorm(BatchNormFields):
  r"""Batch normalization for NNX, a drop-in replacement for ``flax.nnx.BatchNorm``.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  flax's constructor, attributes (``scale``, ``bias``: ``nnx.Param``; ``mean``, ``var``:
  ``nnx.BatchStat``; ``use_running_average``) and state, so swapping the class changes no
  other line and no checkpoint; ``model.train()``, ``model.eval()`` and ``nnx.view`` switch
  the mode. The computation is :func:`jaxbn.batch_norm` (its docstring has the numerics).
  It works under ``nnx.jit``, ``nnx.grad``, ``nnx.scan``, ``nnx.split``/``nnx.merge``, and
  ``nnx.vmap``: over an ensemble of layers (``in_axes=0``), or over the batch with the same
  ``axis_name`` given to ``nnx.vmap`` and to the layer.

  Differences from flax: the arithmetic is always in at least float32 with float32
  statistics (flax first casts them to the promoted dtype, e.g. bf16); complex input turns
  the running ``mean`` complex, as in ``flax.linen`` (``flax.nnx`` drops its imaginary part);
  ``momentum`` outside ``[0, 1]`` is refused; bad data (see :func:`jaxbn.batch_norm`): a
  feature whose batch statistics are not finite keeps its running statistics
  (``skip_nonfinite``), and a training call with one value per feature raises a
  ``ValueError`` like the function (NNX has no init pass; eval never raises).

  Args:
    num_features: number of features (size of ``x`` along ``axis``).
    use_running_average: True: normalize with the stored statistics (eval); False
      (default): with the batch statistics, updating the stored ones.
    axis: the feature axis (default -1).
    momentum: weight of the old value in the running averages (flax convention, PyTorch's
      is ``1 - momentum``); 1 keeps them as they are; None (jaxbn) a cumulative average,
      which adds an int32 ``count`` ``nnx.BatchStat``.
    epsilon: added to the variance (default 1e-5).
    dtype: output dtype (default: inferred by ``promote_dtype``, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: add the learned ``bias``.
    use_scale: multiply by the learned ``scale``.
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis name(s) to synchronize the statistics over.
    axis_index_groups: synchronize within these groups of axis indices only.
    use_fast_variance: flax's one-pass ``E[x²] − E[x]²`` (default), guarded by an exact
      fallback; False: jaxbn's stable variance.
    promote_dtype: flax's dtype-promotion function; decides the output dtype.
    rngs: ``nnx.Rngs`` for the initializers.
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    unbiased_running_var: (jaxbn) store PyTorch's unbiased running variance.
    debias: (jaxbn) zero-debiased running averages; adds an int32 ``count``.
    skip_nonfinite: (jaxbn) True (default): a feature whose batch statistics are not finite
      (a NaN/Inf in the batch) keeps its running statistics, the others update; False:
      flax's behaviour (the NaN enters them).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> y = layer(x)                       # training mode: batch statistics
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> layer.eval()
    >>> y_eval = layer(x)                  # running statistics, left unchanged
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']
  """

  _fn = "jaxbn.nnx.BatchNorm"
  skip_nonfinite: bool = True

  @doc(CALL_DOC, "Normalizes ``x`` with batch statistics (training) or running statistics "
       "(eval).", "")
  def __call__(
      self,
      x: jax.typing.ArrayLike,
      use_running_average: Optional[bool] = None,
      *,
      mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    use_running_average = resolve_mode(self._fn, use_running_average, self.use_running_average)
    return bn_call(self, jaxbn.batch_norm, self._fn, x, use_running_average, mask)


@layer_fields
class BatchChannelNorm(BatchNormFields):
  r"""Batch-channel normalization (Qiao et al., 2019) for NNX: BN, then GroupNorm.

  :func:`jaxbn.batch_channel_norm` (see :class:`jaxbn.linen.BatchChannelNorm`): the
  constructor, attributes and state of :class:`BatchNorm` (``mean``, ``var``, ``scale``,
  ``bias``) plus ``num_groups``/``group_size``; channels last. The other arguments are as
  :class:`BatchNorm`'s.

  Args:
    num_groups: channel groups (default 32); None with ``group_size``.
    group_size: channels per group instead of ``num_groups``.

  Example:
    >>> import jax, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.BatchChannelNorm(6, num_groups=2, rngs=nnx.Rngs(0))
    >>> y = layer(jax.random.normal(jax.random.key(0), (8, 4, 4, 6)))   # updates mean/var
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']
  """

  _fn = "jaxbn.nnx.BatchChannelNorm"
  skip_nonfinite: bool = True
  num_groups: Optional[int] = 32
  group_size: Optional[int] = None

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """As :meth:`BatchNorm.__call__`, then the group norm (held in eval mode when frozen)."""
    use_running_average = resolve_mode(self._fn, mode(self, use_running_average), None)
    return bn_call(self, jaxbn.batch_channel_norm, self._fn, x, use_running_average, mask,
                   num_groups=self.num_groups,
                   group_size=self.group_size)


__all__ = ["BatchNorm", "BatchChannelNorm"]
