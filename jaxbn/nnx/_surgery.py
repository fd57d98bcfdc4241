"""Model surgery for NNX: replace every batch-norm layer of a module graph, state moved over.

:func:`replace_batch_norm` rebuilds each ``flax.nnx.BatchNorm`` (or any class in ``types``)
of a model as another layer — jaxbn's BatchNorm, a synchronized, frozen, renormalized or
ghost variant, GroupNorm, or back to ``flax.nnx.BatchNorm`` — built from the old layer's
settings, holding the old layer's variables (``scale``, ``bias``, ``mean``, ``var``) under the
same names: ``nnx.state`` keeps its paths, so checkpoints load either way.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence, Union

from flax import nnx

from jaxbn.nnx._batch_norm import BatchNorm
from jaxbn.nnx._common import rebuild, treatment

# Settings with the same meaning in every normalization layer (given to any replacement);
# batch-norm-family replacements (with ``use_running_average``) get every setting they share.
_COMMON = ("epsilon", "dtype", "param_dtype", "use_bias", "use_scale")


def _construct(layer: Any, old: nnx.Module, overrides: dict) -> nnx.Module:
  if not isinstance(layer, type):
    new = layer(old)
    if not isinstance(new, nnx.Module):
      raise TypeError(f"replace_batch_norm: `layer` must be an NNX module class or a function "
                      f"old_layer -> new NNX module; it returned {type(new).__name__}.")
    return new
  params = inspect.signature(layer.__init__).parameters
  unknown = set(overrides) - set(params)
  if unknown:
    raise TypeError(f"replace_batch_norm: {layer.__name__} takes no argument(s) "
                    f"{sorted(unknown)}; its arguments are "
                    f"{sorted(n for n in params if n != 'self')}.")
  names = None if "use_running_average" in params else _COMMON
  return rebuild(layer, old, overrides, names=names)  # the old Variables, same names


def replace_batch_norm(model: Any, layer: Union[type, Callable[[nnx.Module], nnx.Module],
                                                None] = None, *,
                       types: Optional[Sequence[type]] = None, **overrides: Any) -> Any:
  """Returns a copy of ``model`` with every batch-norm layer rebuilt as ``layer``.

  Every layer of ``types`` (default: every layer with BatchNorm's variables and eval, the kinds
  ``trains``, ``frozen`` and ``adaptive`` of ``jaxbn._layers.registry`` —
  ``flax.nnx.BatchNorm``, jaxbn's ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``,
  ``FrozenBatchNorm``, ``TestTimeBatchNorm`` and registered classes; not the ``running`` kind,
  e.g. ``SplitBatchNorm``, whose statistics have another shape) anywhere in the graph
  (attributes, lists, nested modules) becomes ``layer(num_features, **settings, **overrides)``:
  for a batch-norm-family ``layer`` (one that takes ``use_running_average``) every constructor
  argument the old layer stores (``momentum``, ``epsilon``, ``axis_name``, mode...); otherwise
  only ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``. The new layer then
  takes each of the old layer's Variables (``scale``, ``bias``, ``mean``, ``var``, ``count``...)
  wherever it has a Variable of that name, so the state keeps its paths and values (a GroupNorm
  keeps ``scale``/``bias`` and drops the statistics). Convert back with
  ``replace_batch_norm(new, flax.nnx.BatchNorm)``.

  ``model`` is not modified: the result is an independent copy (``nnx.clone``); write its
  state back with ``nnx.update(model, nnx.state(new))`` if needed.

  Args:
    model: an NNX module (or graph of modules).
    layer: an NNX layer class (default :class:`jaxbn.nnx.BatchNorm`), or a function
      ``old_layer -> new layer`` (the state is then the function's business).
    types: the layer classes to replace (default: see above).
    **overrides: constructor arguments for every new layer (e.g. ``axis_name='batch'``).

  Returns:
    The new model.

  Raises:
    TypeError: an override that ``layer``'s constructor does not take, or (default
      ``types``) a module with ``mean``/``var`` ``nnx.BatchStat`` that is not registered.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> synced = jaxbn.nnx.replace_batch_norm(model, axis_name='batch')
    >>> type(synced.layers[1]) is jaxbn.nnx.BatchNorm, synced.layers[1].axis_name
    (True, 'batch')
    >>> back = jaxbn.nnx.replace_batch_norm(synced, nnx.BatchNorm, axis_name=None)
    >>> type(back.layers[1]) is nnx.BatchNorm
    True
  """
  layer = BatchNorm if layer is None else layer
  types = None if types is None else tuple(types)

  def convert(path, node):
    if (treatment("jaxbn.nnx.replace_batch_norm", node, path).replace if types is None
        else isinstance(node, types)):
      return _construct(layer, node, overrides)
    return node

  return nnx.recursive_map(convert, nnx.clone(model))
