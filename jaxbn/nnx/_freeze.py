"""Freezing an NNX model's batch norms (as :class:`FrozenBatchNorm`) and unfreezing them."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxbn.nnx._batch_norm import BatchNorm
from jaxbn.nnx._common import rebuild, treatment
from jaxbn.nnx._frozen import FrozenBatchNorm


def freeze_batch_norm(model: Any, *, freeze_affine: bool = True) -> Any:
  """Returns a view of ``model`` whose batch-norm layers are :class:`FrozenBatchNorm`.

  Every layer that trains on batch statistics (kind ``trains`` of ``jaxbn._layers.registry``:
  ``jaxbn.nnx.BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``flax.nnx.BatchNorm``..., and
  :func:`register_batch_norm`'s) and every ``TestTimeBatchNorm`` in the graph of ``model``
  (attributes, lists, nested modules) is replaced by a :class:`FrozenBatchNorm` with the same
  settings that holds the *same* ``nnx.Variable`` objects, so ``nnx.state`` of the result has
  exactly the paths, types and values of ``model``'s and the two share their state (like
  ``nnx.view``): a checkpoint of one loads into the other, and fine-tuning the frozen view
  trains ``model``'s other parameters. ``model`` itself is not modified.
  :func:`unfreeze_batch_norm` converts back. A ``FrozenBatchNorm`` is left as it is. jaxbn's
  layers of kind ``running`` (``SplitBatchNorm``, ``EvoNormB0``, ``BatchChannelNorm``: running
  statistics, another eval function) become a copy of themselves holding the same Variables that
  always runs in eval mode (its running statistics, never updated, also after
  ``model.train()``); their parameters still train (``freeze_affine`` does not apply to them).

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
    how = treatment("jaxbn.nnx.freeze_batch_norm", node, path).freeze
    if how == "keep":
      return node
    # The very same Variables in the new layer: same state, same paths, shared. "eval": the
    # layer itself, held in eval mode (see `mode` in _common).
    frozen = (rebuild(FrozenBatchNorm, node, {"freeze_affine": freeze_affine}) if how == "frozen"
              else rebuild(type(node), node, {}))
    frozen.unfrozen = nnx.graphdef(node)
    return frozen

  return nnx.recursive_map(convert, model)


def unfreeze_batch_norm(model: Any) -> Any:
  """Undoes :func:`freeze_batch_norm`: every :class:`FrozenBatchNorm` becomes a batch norm.

  A layer made by :func:`freeze_batch_norm` gets back its original class and settings (a
  ``FrozenBatchNorm`` built directly becomes a :class:`jaxbn.nnx.BatchNorm` with its settings; a
  ``running`` layer held in eval mode gets its own mode back); the ``nnx.Variable`` objects are
  kept, so the state is unchanged and shared.

  Args:
    model: an NNX module (or graph of modules).

  Returns:
    A view of ``model`` whose batch-norm layers train normally again.
  """

  def convert(path, node):
    if getattr(node, "unfrozen", None) is not None:
      return nnx.merge(node.unfrozen, nnx.state(node))
    return rebuild(BatchNorm, node, {}) if isinstance(node, FrozenBatchNorm) else node

  return nnx.recursive_map(convert, model)
