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
from jaxbn._layers.docs import bn_doc
from jaxbn.nnx._common import Layer, bn_call, init_bn_state, layer_fields, promote_dtype


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


@bn_doc("nnx")
@layer_fields
class BatchNorm(BatchNormFields):
  r"""Batch normalization for NNX, a drop-in replacement for ``flax.nnx.BatchNorm``.

  {bn_math}

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
  {bad_data} like the function (NNX has no init pass; eval never raises).

  Args:
    num_features: number of features (size of ``x`` along ``axis``).
    use_running_average: True: normalize with the stored statistics (eval); False
      (default): with the batch statistics, updating the stored ones.
    axis: the feature axis (default -1).
    {bn_args}
    promote_dtype: flax's dtype-promotion function; decides the output dtype.
    rngs: ``nnx.Rngs`` for the initializers.
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    {bn_extras}

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

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    {call_args}

    {call_end}
    """
    return bn_call(self, jaxbn.batch_norm, self._fn, x, use_running_average, mask)


@bn_doc("nnx")
@layer_fields
class BatchChannelNorm(BatchNormFields):
  r"""Batch-channel normalization (Qiao et al., 2019) for NNX: BN, then GroupNorm.

  {bcn}

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
    return bn_call(self, jaxbn.batch_channel_norm, self._fn, x, use_running_average, mask,
                   num_groups=self.num_groups, group_size=self.group_size)


__all__ = ["BatchNorm", "BatchChannelNorm"]
