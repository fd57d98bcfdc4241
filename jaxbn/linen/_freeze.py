"""Freezing a Linen model's batch norms (as :class:`FrozenBatchNorm`) and unfreezing them."""

from __future__ import annotations

from flax import linen as nn

from jaxbn.linen._common import View, treatment
from jaxbn.linen._frozen import frozen_apply


def eval_call(next_fun, mdl: nn.Module, args: tuple, kwargs: dict):
  """Calls ``mdl`` in eval mode (``use_running_average=True``) whichever way it takes its mode."""
  args = tuple(args[:1]) + tuple(args[2:])  # without a positional use_running_average
  kwargs = {k: v for k, v in kwargs.items() if k != "use_running_average"}
  if mdl.use_running_average is None:
    return next_fun(*args, use_running_average=True, **kwargs)
  if mdl.use_running_average:
    return next_fun(*args, **kwargs)
  return mdl.clone(use_running_average=True, parent=mdl.scope)(*args, **kwargs)


class _FrozenBatchNormView(View):
  """``module`` with every BatchNorm-family layer frozen."""

  freeze_affine: bool = True

  def interceptor(self):
    freeze_affine = self.freeze_affine

    def intercept(next_fun, args, kwargs, context):
      mdl = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      how = treatment("jaxbn.linen.freeze_batch_norm", mdl).freeze
      if how == "eval":
        return eval_call(next_fun, mdl, args, kwargs)
      if how != "frozen":
        return next_fun(*args, **kwargs)
      x = args[0] if args else kwargs["x"]
      return frozen_apply(mdl, x, freeze_affine, f"frozen {type(mdl).__name__}")

    return intercept


def freeze_batch_norm(module: nn.Module, *, freeze_affine: bool = True) -> nn.Module:
  """Returns ``module`` with every batch-norm layer acting as :class:`FrozenBatchNorm`.

  Every layer that trains on batch statistics (kind ``trains`` of ``jaxbn._layers.registry``:
  ``jaxbn.linen.BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``flax.linen.BatchNorm``...,
  and :func:`register_batch_norm`'s) and every ``TestTimeBatchNorm`` called inside
  ``module.__call__`` — a field of the model or created inline — normalizes with its stored
  running statistics, updates nothing and (``freeze_affine=True``) gets no gradient for its
  ``scale``/``bias``. A ``FrozenBatchNorm`` is left as it is. A layer of kind ``running``
  (``SplitBatchNorm``, ``EvoNormB0``, ``BatchChannelNorm``: running statistics but another
  eval function) runs in eval mode — its own running statistics, never updated — and its
  parameters still train (``freeze_affine`` does not apply to it).
  The returned module has exactly the variables of ``module`` (same tree, names, shapes), so
  ``frozen.apply(variables, ...)`` takes the original checkpoint, and
  :func:`unfreeze_batch_norm` gives back ``module``. ``use_running_average``/``train`` flags
  still reach the other layers (e.g. dropout) unchanged.

  Only ``__call__`` is wrapped (not other methods passed with ``method=``). A module with
  batch statistics that is not registered raises ``TypeError`` when called.

  Args:
    module: a Linen module (unbound).
    freeze_affine: stop the gradients of the layers' ``scale`` and ``bias`` (default True).

  Returns:
    A Linen module with the variables of ``module``.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     x = nn.Dense(4)(x)
    ...     return jaxbn.linen.BatchNorm(use_running_average=not train)(x)
    >>> x = jnp.ones((2, 3))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> frozen = jaxbn.linen.freeze_batch_norm(Net())
    >>> y, mutated = frozen.apply(variables, x, train=True, mutable=['batch_stats'])
    >>> updates = mutated['batch_stats']
    >>> bool(jnp.allclose(y, Net().apply(variables, x, train=False)))   # eval behaviour
    True
    >>> jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), updates, variables['batch_stats'])
    {'BatchNorm_0': {'mean': True, 'var': True}}
    >>> type(jaxbn.linen.unfreeze_batch_norm(frozen)).__name__
    'Net'
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"freeze_batch_norm: `module` must be a flax.linen.Module, got "
                    f"{type(module).__name__}.")
  if isinstance(module, _FrozenBatchNormView):
    return module
  return _FrozenBatchNormView(module, freeze_affine=freeze_affine)


def unfreeze_batch_norm(module: nn.Module) -> nn.Module:
  """Undoes :func:`freeze_batch_norm`: returns the original module (same variables).

  Args:
    module: a module returned by :func:`freeze_batch_norm` (any other module is returned
      unchanged).

  Returns:
    The module whose batch-norm layers train normally again.
  """
  return module.module if isinstance(module, _FrozenBatchNormView) else module
