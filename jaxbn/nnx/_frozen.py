"""Frozen batch norm for NNX, and the conversion of a model's BatchNorms to it and back."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxbn._core.frozen import frozen_batch_norm
from jaxbn.nnx._common import BN_CONFIG, bn_inputs, init_bn_layer


class FrozenBatchNorm(nnx.Module):
  r"""Batch norm with frozen statistics for NNX (detectron2's ``FrozenBatchNorm2d``).

  .. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  Always normalizes with the stored ``mean``/``var``, never updates them, and (with
  ``freeze_affine=True``, the default) stops the gradient of ``scale`` and ``bias``: a fixed
  affine map of ``x`` in ``train()`` and ``eval()`` alike. Same constructor, attributes and
  state as :class:`jaxbn.nnx.BatchNorm` (``use_running_average`` and the call's ``mask``
  are accepted and ignored). See :func:`jaxbn.frozen_batch_norm` for when to use it and
  :func:`freeze_batch_norm` to convert a whole model. ``scale``/``bias`` stay ``nnx.Param``
  (same state), so exclude them from weight decay if they must not move at all.

  Args:
    num_features: number of features.
    use_running_average: accepted for compatibility, ignored.
    axis: the feature axis of the input (default -1).
    momentum: unused; None creates the ``count`` statistic as BatchNorm does.
    epsilon: small float added to the variance (default 1e-5).
    dtype: dtype of the result (default: inferred by ``promote_dtype``, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: whether there is a ``bias``.
    use_scale: whether there is a ``scale``.
    bias_init: initializer for ``bias`` (default zeros).
    scale_init: initializer for ``scale`` (default ones).
    axis_name: unused (kept so that BatchNorm's arguments are accepted).
    axis_index_groups: unused.
    use_fast_variance: unused.
    promote_dtype: flax's dtype-promotion function; decides the output dtype.
    rngs: ``nnx.Rngs`` for the initializers.
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    unbiased_running_var: unused.
    debias: unused; True creates the ``count`` statistic as BatchNorm does.
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.FrozenBatchNorm(2, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> bool(jnp.allclose(layer(x), x / jnp.sqrt(1 + 1e-5)))
    True
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']
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
      freeze_affine: bool = True,
  ):
    init_bn_layer(self, "jaxbn.nnx.FrozenBatchNorm", locals(), check_momentum=False)
    self.freeze_affine = freeze_affine
    self.unfrozen = None  # graphdef of the layer this one was converted from, if any

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the stored statistics (``use_running_average``, ``mask`` ignored).

    Args:
      x: the input, feature axis ``self.axis``.
      use_running_average: ignored (accepted so that BatchNorm call sites work unchanged).
      mask: ignored (no statistics are computed).

    Returns:
      The normalized input, shaped like ``x``.
    """
    del use_running_average, mask
    x, stats, scale, bias, out = bn_inputs(self, x, "jaxbn.nnx.FrozenBatchNorm")
    return frozen_batch_norm(x, stats, scale, bias, axis=self.axis, epsilon=self.epsilon,
                             dtype=out, freeze_affine=self.freeze_affine)

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by ``nnx.view``: accepts ``use_running_average`` (it changes nothing here).

    Args:
      use_running_average: stored for compatibility; the layer always uses its statistics.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


_VARIABLES = ("mean", "var", "count", "scale", "bias")


def _batch_norm_types() -> tuple:
  from jaxbn.nnx._batch_norm import BatchNorm
  from jaxbn.nnx._ghost import GhostBatchNorm
  from jaxbn.nnx._renorm import BatchRenorm
  return (BatchNorm, BatchRenorm, GhostBatchNorm, nnx.BatchNorm)


def _freeze_one(bn: nnx.Module, freeze_affine: bool) -> FrozenBatchNorm:
  config = {k: getattr(bn, k) for k in BN_CONFIG if hasattr(bn, k)}
  frozen = FrozenBatchNorm(bn.num_features, **config, freeze_affine=freeze_affine,
                           rngs=nnx.Rngs(0))
  for name in _VARIABLES:  # share the very same Variables: same state, same paths
    value = getattr(bn, name, None)
    setattr(frozen, name, nnx.data(None) if value is None else value)
  frozen.unfrozen = nnx.graphdef(bn)
  return frozen


def _unfreeze_one(frozen: FrozenBatchNorm) -> nnx.Module:
  if frozen.unfrozen is not None:
    return nnx.merge(frozen.unfrozen, nnx.state(frozen))
  from jaxbn.nnx._batch_norm import BatchNorm
  config = {k: getattr(frozen, k) for k in BN_CONFIG}
  bn = BatchNorm(frozen.num_features, **config, rngs=nnx.Rngs(0))
  for name in _VARIABLES:
    value = getattr(frozen, name, None)
    setattr(bn, name, nnx.data(None) if value is None else value)
  return bn


def freeze_batch_norm(model: Any, *, freeze_affine: bool = True) -> Any:
  """Returns a view of ``model`` whose batch-norm layers are :class:`FrozenBatchNorm`.

  Every ``jaxbn.nnx.BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm`` and ``flax.nnx.BatchNorm``
  in the graph of ``model`` (attributes, lists, nested modules) is replaced by a
  :class:`FrozenBatchNorm` with the same settings that holds the *same* ``nnx.Variable``
  objects, so ``nnx.state`` of the result has exactly the paths, types and values of
  ``model``'s and the two share their state (like ``nnx.view``): a checkpoint of one loads
  into the other, and fine-tuning the frozen view trains ``model``'s other parameters.
  ``model`` itself is not modified. :func:`unfreeze_batch_norm` converts back.

  Args:
    model: an NNX module (or graph of modules).
    freeze_affine: stop the gradients of the layers' ``scale`` and ``bias`` (default True).

  Returns:
    The frozen view of ``model``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> frozen = jaxbn.nnx.freeze_batch_norm(model)
    >>> type(frozen.layers[1]).__name__, frozen.layers[1].mean is model.layers[1].mean
    ('FrozenBatchNorm', True)
    >>> y = frozen(jnp.ones((2, 3)))            # train mode, yet statistics unchanged
    >>> model.layers[1].mean[...].tolist()
    [0.0, 0.0, 0.0, 0.0]
    >>> type(jaxbn.nnx.unfreeze_batch_norm(frozen).layers[1]).__name__
    'BatchNorm'
  """
  types = _batch_norm_types()

  def convert(path, node):
    if isinstance(node, types) and not isinstance(node, FrozenBatchNorm):
      return _freeze_one(node, freeze_affine)
    return node

  return nnx.recursive_map(convert, model)


def unfreeze_batch_norm(model: Any) -> Any:
  """Undoes :func:`freeze_batch_norm`: every :class:`FrozenBatchNorm` becomes a batch norm.

  A layer made by :func:`freeze_batch_norm` gets back its original class and settings (a
  ``FrozenBatchNorm`` built directly becomes a :class:`jaxbn.nnx.BatchNorm` with its
  settings); the ``nnx.Variable`` objects are kept, so the state is unchanged and shared.

  Args:
    model: an NNX module (or graph of modules).

  Returns:
    A view of ``model`` whose batch-norm layers train normally again.
  """

  def convert(path, node):
    if isinstance(node, FrozenBatchNorm):
      return _unfreeze_one(node)
    return node

  return nnx.recursive_map(convert, model)
