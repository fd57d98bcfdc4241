"""Freezing an NNX model's batch norms (as :class:`FrozenBatchNorm`) and unfreezing them."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxbn.nnx._batch_norm import BatchNorm
from jaxbn.nnx._common import BN_CONFIG
from jaxbn.nnx._frozen import FrozenBatchNorm
from jaxbn.nnx._registry import kind_of

_VARIABLES = ("mean", "var", "count", "scale", "bias")


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
  config = {k: getattr(frozen, k) for k in BN_CONFIG}
  bn = BatchNorm(frozen.num_features, **config, rngs=nnx.Rngs(0))
  for name in _VARIABLES:
    value = getattr(frozen, name, None)
    setattr(bn, name, nnx.data(None) if value is None else value)
  return bn


def freeze_batch_norm(model: Any, *, freeze_affine: bool = True) -> Any:
  """Returns a view of ``model`` whose batch-norm layers are :class:`FrozenBatchNorm`.

  Every batch-norm layer of the registry (``jaxbn.nnx.BatchNorm``, ``BatchRenorm``,
  ``GhostBatchNorm``, ``flax.nnx.BatchNorm``, see :func:`register_batch_norm`) in the graph of
  ``model`` (attributes, lists, nested modules) is replaced by a
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

  Raises:
    TypeError: a module with batch statistics that is not registered.

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
  def convert(path, node):
    if kind_of("jaxbn.nnx.freeze_batch_norm", node, path) == "trains":
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
