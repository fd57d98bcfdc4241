"""``jaxbn.nnx.BatchNorm``: flax.nnx's BatchNorm interface over :func:`jaxbn.batch_norm`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxbn._core.batch_norm import batch_norm
from jaxbn.nnx._common import bn_call, init_bn_layer

_MISSING_MODE = (
    "No `use_running_average` argument was provided to BatchNorm. Consider one of the "
    "following options:\n\n"
    "1. Pass `use_running_average` to the BatchNorm constructor:\n\n"
    "  self.bn = jaxbn.nnx.BatchNorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to the BatchNorm __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Use `nnx.view` to create a view of the model with a specific `use_running_average` "
    "value:\n\n"
    "  model_view = nnx.view(model, use_running_average=True/False)\n"
)

_SHARED_UNDER_VMAP = (
    "jaxbn.nnx.BatchNorm: cannot write the running statistics `mean`/`var` in training mode: "
    "the layer belongs to an outer trace of a transformation that calls it. Usually the "
    "layer is shared by a map over the batch (e.g. `nnx.vmap(model, in_axes=1)`), so each "
    "mapped slice has its own batch statistics and they cannot be stored in the one layer. "
    "Either synchronize the statistics over the mapped axis, `nnx.vmap(..., "
    "axis_name='batch')` with `BatchNorm(..., axis_name='batch')` (statistics of the whole "
    "batch, as without vmap); or give every slice its own layer (an ensemble: create it "
    "under `nnx.vmap` and map it with in_axes=0); or call `model.eval()` to use the running "
    "statistics. With plain `jax` transformations, call `nnx.merge` inside the transformed "
    "function, or use the `nnx` version of the transformation (`nnx.grad`, `nnx.vmap`)."
)


class BatchNorm(nnx.Module):
  r"""Batch normalization for NNX, a drop-in replacement for ``flax.nnx.BatchNorm``.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  Same constructor, attributes (``scale``, ``bias``: ``nnx.Param``; ``mean``, ``var``:
  ``nnx.BatchStat``; ``use_running_average``) and state as ``flax.nnx.BatchNorm``, so
  replacing the class changes no other line and no checkpoint; ``model.train()``,
  ``model.eval()`` and ``nnx.view(model, use_running_average=...)`` switch the mode. The
  computation is :func:`jaxbn.batch_norm` (fused closed-form backward that keeps only ``x``
  and per-feature vectors; float32 accumulation without an up-cast copy of bf16 input; one
  collective per pass with ``axis_name``; masked batches weighted by their true counts).

  Variance: ``use_fast_variance`` keeps flax's default ``True`` and meaning: the one-pass
  ``E[x²] − E[x]²`` in float32 (clamped at 0), so swapping the import reproduces flax's
  numbers on ordinary data. Where that formula loses its digits (some feature with
  ``mean² > 1000·var``, e.g. float32 data ``1e4 ± 1e-2``, where flax returns variance 0) jaxbn
  falls back to the exact two-pass variance (a ``lax.cond``; with ``axis_name`` the
  cross-device merge of fast mode stays one-pass, as in flax). ``use_fast_variance=False``
  selects jaxbn's stable variance everywhere (two passes fused with the float32 up-cast,
  and with ``axis_name`` an exact merge of the per-device moments): the better choice when
  inputs are not centered and statistics are synchronized. ``benchmarks/bench_model.py``
  reports what it costs in a ResNet train step.
  The output dtype follows ``promote_dtype`` exactly as in flax, but the arithmetic always
  runs in at least float32 with float32 statistics and parameters (flax casts the running
  statistics and parameters to ``dtype`` first, e.g. to bf16): at least as accurate.

  Transformations: the layer is an ordinary NNX module; it works under ``nnx.jit``,
  ``nnx.grad``, ``nnx.scan``, ``nnx.split``/``nnx.merge`` and ``nnx.eval_shape``. Under
  ``nnx.vmap`` over a batch of models (an ensemble), map the state axis with
  ``in_axes=(0, 0)`` / ``out_axes=0`` (created with ``nnx.vmap(..., in_axes=0)`` on a split
  rng); to synchronize the statistics of one model over a vmapped batch axis, give the same
  name as ``nnx.vmap(..., axis_name='batch')`` and ``BatchNorm(..., axis_name='batch')``
  with ``in_axes=(None, 0)``.

  Args:
    num_features: number of features (size of ``x`` along ``axis``).
    use_running_average: True: normalize with the stored statistics (eval); False
      (default): with the batch statistics, updating the stored ones.
    axis: the feature axis of the input (default -1).
    momentum: weight of the old value in the running averages (flax convention; PyTorch's
      ``p`` is ``1 - p``). ``None`` (jaxbn extra): cumulative average; adds an int32
      ``count`` ``nnx.BatchStat``.
    epsilon: small float added to the variance (default 1e-5).
    dtype: dtype of the result (default: inferred by ``promote_dtype``, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: if True, add the learned ``bias``.
    use_scale: if True, multiply by the learned ``scale``.
    bias_init: initializer for ``bias`` (default zeros).
    scale_init: initializer for ``scale`` (default ones).
    axis_name: name(s) of mapped axes to synchronize the batch statistics over.
    axis_index_groups: synchronize within these groups of axis indices only.
    use_fast_variance: flax's fast variance (default True, as flax); False: jaxbn's stable
      variance.
    promote_dtype: flax's dtype-promotion function; here it decides the output dtype.
    rngs: ``nnx.Rngs`` for the initializers (drawn exactly as flax does).
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    unbiased_running_var: (jaxbn extra) store PyTorch's unbiased running variance.
    debias: (jaxbn extra) zero-debiased running averages; adds an int32 ``count``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import errors, nnx
    >>> layer = jaxbn.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> y = layer(x)                       # training mode: batch statistics
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> layer.eval()
    >>> y_eval = layer(x)                  # running statistics, left unchanged
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']

    An ensemble of 3 layers under ``nnx.vmap``, each with its own statistics:

    >>> @nnx.vmap(in_axes=0, out_axes=0)
    ... def make(rngs):
    ...   return jaxbn.nnx.BatchNorm(4, rngs=rngs)
    >>> ensemble = make(nnx.Rngs(0).split(3))
    >>> @nnx.vmap(in_axes=(0, None), out_axes=0)
    ... def forward(bn, x):
    ...   return bn(x)
    >>> forward(ensemble, x).shape, ensemble.mean[...].shape
    ((3, 8, 4), (3, 4))
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: Optional[bool] = False,
      axis: Axes = -1,
      momentum: Optional[float] = 0.99,
      epsilon: float = 1e-5,
      dtype: Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      unbiased_running_var: bool = False,
      debias: bool = False,
  ):
    init_bn_layer(self, "jaxbn.nnx.BatchNorm", locals())

  def __call__(
      self,
      x: jax.typing.ArrayLike,
      use_running_average: Optional[bool] = None,
      *,
      mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    Args:
      x: the input, feature axis ``self.axis`` of size ``num_features``.
      use_running_average: overrides the attribute of the same name for this call.
      mask: optional bool array broadcastable to ``x``: which entries count in the batch
        statistics.

    Returns:
      The normalized input, shaped like ``x``.

    Raises:
      ValueError: no mode is set (flax's message), ``x`` has the wrong number of features,
        or an invalid ``axis``/``mask``/unbound ``axis_name``.
    """
    use_running_average = first_from(use_running_average, self.use_running_average,
                                     error_msg=_MISSING_MODE)
    return bn_call(self, batch_norm, "jaxbn.nnx.BatchNorm", x, use_running_average, mask,
                   shared_error=_SHARED_UNDER_VMAP)

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by ``nnx.view``: sets ``use_running_average`` when given.

    Args:
      use_running_average: if True, the stored batch statistics will be used instead of
        computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
