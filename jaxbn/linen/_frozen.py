"""Frozen batch norm for Linen, and the conversion of a model's BatchNorms to it and back."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxbn._core.frozen import frozen_batch_norm
from jaxbn._core.types import BatchStats, init_stats
from jaxbn.linen._common import bn_variables


def frozen_apply(mdl: nn.Module, x: jax.typing.ArrayLike, freeze_affine: bool,
                 fn: str) -> jax.Array:
  """The frozen computation on a BN-family module's own variables (creates them at init)."""
  x, _, ra_mean, ra_var, ra_count, scale, bias, out_dtype = bn_variables(mdl, x, fn)
  count = init_stats(1).count if ra_count is None else ra_count.value
  return frozen_batch_norm(x, BatchStats(ra_mean.value, ra_var.value, count), scale, bias,
                           axis=mdl.axis, epsilon=mdl.epsilon, dtype=out_dtype,
                           freeze_affine=freeze_affine)


class FrozenBatchNorm(nn.Module):
  r"""Batch norm with frozen statistics for Linen (detectron2's ``FrozenBatchNorm2d``).

  .. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  Always normalizes with the stored running statistics, never updates them, and (with
  ``freeze_affine=True``, the default) stops the gradient of ``scale`` and ``bias`` too, so
  the layer is a fixed affine map of ``x`` in training and in evaluation. Same fields and
  variables as :class:`jaxbn.linen.BatchNorm` (and ``flax.linen.BatchNorm``), so it loads
  their checkpoints; ``use_running_average`` and ``mask`` are accepted and ignored, so call
  sites need not change. See :func:`jaxbn.frozen_batch_norm` for when to use it, and
  :func:`freeze_batch_norm` to convert a whole model.

  Attributes:
    use_running_average: accepted for compatibility, ignored (always the running stats).
    axis: the feature axis (or axes) of the input (default -1).
    momentum: unused (no update); None creates ``batch_stats/count`` as BatchNorm does.
    epsilon: small float added to the variance (default 1e-5).
    dtype: dtype of the result (default: inferred from the input and parameters, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: whether there is a ``bias``.
    use_scale: whether there is a ``scale``.
    bias_init: initializer for ``bias`` (default zeros).
    scale_init: initializer for ``scale`` (default ones).
    axis_name: unused (no statistics are computed); kept for drop-in compatibility.
    axis_index_groups: unused.
    use_fast_variance: unused.
    force_float32_reductions: True: running statistics stored in float32; False: in
      ``param_dtype`` (as flax).
    unbiased_running_var: unused.
    debias: unused; True creates ``batch_stats/count`` as BatchNorm does.
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.FrozenBatchNorm()
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
    >>> y = layer.apply(variables, x, use_running_average=False)   # still the running stats
    >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5)))
    True
  """

  use_running_average: Optional[bool] = None
  axis: Axes = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False
  debias: bool = False
  freeze_affine: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the stored statistics (``use_running_average``, ``mask`` ignored).

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: ignored (accepted so that BatchNorm call sites work unchanged).
      mask: ignored (no statistics are computed).

    Returns:
      The normalized input, shaped like ``x``.
    """
    del use_running_average, mask
    return frozen_apply(self, x, self.freeze_affine, "jaxbn.linen.FrozenBatchNorm")


def _batch_norm_types() -> tuple:
  from jaxbn.linen._batch_norm import BatchNorm
  from jaxbn.linen._ghost import GhostBatchNorm
  from jaxbn.linen._renorm import BatchRenorm
  return (BatchNorm, BatchRenorm, GhostBatchNorm, nn.BatchNorm)


def _interceptor(freeze_affine: bool):
  types = _batch_norm_types()

  def intercept(next_fun, args, kwargs, context):
    mdl = context.module
    if context.method_name != "__call__" or not isinstance(mdl, types):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    return frozen_apply(mdl, x, freeze_affine, f"frozen {type(mdl).__name__}")

  return intercept


class _FrozenBatchNormView(nn.Module):
  """``module`` with every BatchNorm-family layer frozen; the same variables (shared scope)."""

  module: nn.Module
  freeze_affine: bool = True

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(_interceptor(self.freeze_affine)):
      return self.module(*args, **kwargs)


def freeze_batch_norm(module: nn.Module, *, freeze_affine: bool = True) -> nn.Module:
  """Returns ``module`` with every batch-norm layer acting as :class:`FrozenBatchNorm`.

  Every ``jaxbn.linen.BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm`` and
  ``flax.linen.BatchNorm`` called inside ``module.__call__`` — whether a field of the model or
  created inline in a ``@nn.compact`` method — normalizes with its stored running statistics,
  updates nothing and (``freeze_affine=True``) gets no gradient for its ``scale``/``bias``.
  The returned module has exactly the variables of ``module`` (same tree, names, shapes), so
  ``frozen.apply(variables, ...)`` takes the original checkpoint, and
  :func:`unfreeze_batch_norm` gives back ``module``. ``use_running_average``/``train`` flags
  still reach the other layers (e.g. dropout) unchanged.

  Only ``__call__`` is wrapped (not other methods passed with ``method=``).

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
  if isinstance(module, _FrozenBatchNormView):
    return module.module
  return module
