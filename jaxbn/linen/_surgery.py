"""Model surgery for Linen: run a model you do not own with another batch norm, unedited.

:func:`replace_batch_norm` wraps a model so that every batch-norm layer it calls —
``flax.linen.BatchNorm`` or any class in ``types`` — computes with another layer (jaxbn's
BatchNorm, a synchronized, frozen, renormalized or ghost variant, GroupNorm...) on the
*same* variables: same paths, same names, so the model's checkpoints load unchanged.
Mechanism: ``flax.linen.intercept_methods`` around the model's call; an intercepted layer's
``__call__`` is replaced by the new layer's, bound to the intercepted layer's own scope.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from typing import Any, Callable, Optional, Sequence, Union

from flax import linen as nn

from jaxbn.linen._batch_norm import BatchNorm
from jaxbn.linen._common import View, treatment

# Fields that mean the same thing in every normalization layer (copied to any replacement);
# batch-norm-family replacements (they have ``use_running_average``) get every shared field.
_COMMON = ("epsilon", "dtype", "param_dtype", "use_bias", "use_scale", "bias_init",
           "scale_init")
_ACTIVE = threading.local()


def _fields(cls_or_module) -> set:
  return {f.name for f in dataclasses.fields(cls_or_module)} - {"parent", "name"}


def _construct(layer: Any, old: nn.Module, overrides: dict) -> nn.Module:
  """The replacement of ``old``: ``layer`` built from ``old``'s settings and ``overrides``."""
  if isinstance(layer, type) and issubclass(layer, nn.Module):
    target = _fields(layer)
    shared = target if "use_running_average" in target else set(_COMMON)
    kw = {k: getattr(old, k) for k in _fields(old) & shared}
    unknown = set(overrides) - target
    if unknown:
      raise TypeError(f"replace_batch_norm: {layer.__name__} has no field(s) "
                      f"{sorted(unknown)}; its fields are {sorted(target)}.")
    return layer(**{**kw, **overrides})
  new = layer(old)
  if not isinstance(new, nn.Module):
    raise TypeError(f"replace_batch_norm: `layer` must be a Linen module class or a function "
                    f"old_layer -> new (unbound) Linen module; it returned "
                    f"{type(new).__name__}.")
  return new


def _call_args(new: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Keeps the arguments that the replacement's ``__call__`` accepts."""
  params = inspect.signature(type(new).__call__).parameters
  if any(p.kind is p.VAR_KEYWORD for p in params.values()):
    return args, kwargs
  positional = [n for n, p in params.items()
                if n != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return args[:len(positional)], {k: v for k, v in kwargs.items() if k in params}


class _Replaced(View):
  """``module`` with its batch-norm layers replaced."""

  layer: Any
  types: Optional[tuple]
  overrides: tuple

  def interceptor(self):
    layer, types, overrides = self.layer, self.types, dict(self.overrides)

    def intercept(next_fun, args, kwargs, context):
      mdl = context.module
      active = getattr(_ACTIVE, "modules", ())
      if (context.method_name != "__call__" or any(mdl is m for m in active)
          or not (treatment("jaxbn.linen.replace_batch_norm", mdl).replace if types is None
                  else isinstance(mdl, types))):
        return next_fun(*args, **kwargs)
      new = _construct(layer, mdl, overrides).clone(parent=mdl.scope)
      a, kw = _call_args(new, args, kwargs)
      _ACTIVE.modules = active + (new,)
      try:
        return new(*a, **kw)
      finally:
        _ACTIVE.modules = active

    return intercept


def replace_batch_norm(module: nn.Module, layer: Union[type, Callable[[nn.Module], nn.Module],
                                                       None] = None, *,
                       types: Optional[Sequence[type]] = None, **overrides: Any) -> nn.Module:
  """Returns ``module`` with every batch-norm layer it calls computed by ``layer`` instead.

  Each call of a layer of ``types`` (default: every layer with BatchNorm's variables and eval,
  the kinds ``trains``, ``frozen`` and ``adaptive`` of ``jaxbn._layers.registry`` —
  ``flax.linen.BatchNorm``, jaxbn's ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``,
  ``FrozenBatchNorm``, ``TestTimeBatchNorm`` and registered classes; not the ``running`` kind,
  e.g. ``SplitBatchNorm``, whose statistics have another shape) inside ``module`` — a field,
  created in ``setup``, or inline in an ``@nn.compact`` method — runs ``layer`` built from the
  layer's own settings (every field the two share for a batch-norm-family ``layer``; only
  ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale`` and the initializers
  otherwise, so e.g. a BatchNorm's ``axis_name`` is not given to a GroupNorm) with ``overrides``
  applied, on the replaced layer's own variables. So:

  * ``replace_batch_norm(model)``: jaxbn's BatchNorm, same numbers as flax's (same
    variables, checkpoints and updates);
  * ``replace_batch_norm(model, axis_name='batch')``: synchronized BN under
    ``shard_map``/``pmap`` for a model that has no ``axis_name`` field;
  * ``layer=jaxbn.linen.FrozenBatchNorm``, ``BatchRenorm``, ``GhostBatchNorm`` (with
    ``virtual_batch_size=...``): the variants, on the same checkpoint;
  * ``layer=jaxbn.linen.GroupNorm, num_groups=8``: BN → GroupNorm (Opacus-style, for
    per-example gradients); GroupNorm uses ``params/scale``/``bias`` of the replaced layer
    and no ``batch_stats``.

  ``layer`` may also be a function ``old_layer -> new unbound module`` for full control.
  The call's ``use_running_average``/``mask`` arguments are passed on when the new layer's
  ``__call__`` accepts them. :func:`restore_batch_norm` returns the original ``module``.

  Limits: only ``__call__`` of the replaced layers is intercepted (not other methods), the
  new layer must read its variables under the names the old one created (or create its own
  at ``init``), and a layer class outside ``types`` (given ``types``: a subclass that is not
  listed; by default: a model's own unregistered BN implementation) is left alone.

  Args:
    module: a Linen module (unbound), e.g. a model from another code base.
    layer: a Linen module class (default :class:`jaxbn.linen.BatchNorm`) or a function
      ``old_layer -> new layer``.
    types: the layer classes to replace (default: see above).
    **overrides: fields set on every new layer (e.g. ``axis_name='batch'``).

  Returns:
    A Linen module with the variables of ``module``.

  Raises:
    TypeError: ``module`` is not a Linen module, an override is not a field of ``layer``, or
      (default ``types``) a called module holds ``batch_stats/mean``/``var`` but is not
      registered (:func:`register_batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> class Net(nn.Module):                     # someone else's model
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> model = jaxbn.linen.replace_batch_norm(Net(), momentum=0.9)
    >>> y, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    >>> jax.tree.map(jnp.shape, updates)
    {'batch_stats': {'BatchNorm_0': {'mean': (4,), 'var': (4,)}}}
    >>> type(jaxbn.linen.restore_batch_norm(model)).__name__
    'Net'
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"replace_batch_norm: `module` must be a flax.linen.Module, got "
                    f"{type(module).__name__}.")
  layer = BatchNorm if layer is None else layer
  types = None if types is None else tuple(types)
  return _Replaced(restore_batch_norm(module), layer, types, tuple(sorted(overrides.items())))


def restore_batch_norm(module: nn.Module) -> nn.Module:
  """Undoes :func:`replace_batch_norm`: the original module (same variables).

  Args:
    module: a module returned by :func:`replace_batch_norm` (others are returned as they are).

  Returns:
    The unwrapped module.
  """
  return module.module if isinstance(module, _Replaced) else module
