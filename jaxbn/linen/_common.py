"""What the Linen layers share: dtypes, axes, flax's errors, BN-family variables and the call,
and the Linen side of the one layer registry (``jaxbn._layers.registry``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer
from jax.nn import initializers

import jaxbn
# The core's argument checks, so that the layers (which validate before creating variables)
# and the functions give the same messages.
from jaxbn._core.checks import feature_axes, momentum_value, one_value_per_feature_ok
from jaxbn._layers import registry
from jaxbn._layers.common import flax_axes, flax_error


# --------------------------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------------------------


def as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """``x`` as an array; integer/bool input promoted to (at least) float32, as flax does."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return x.astype(jnp.promote_types(jnp.float32, x.dtype))


def result_dtype(*arrays: Any, dtype: Optional[Any] = None) -> Any:
  """The output dtype flax.linen infers: ``dtype``, else the promoted dtype of ``arrays``."""
  if dtype is not None:
    return jnp.dtype(dtype)
  out = jnp.result_type(*(a for a in arrays if a is not None))
  if not jnp.issubdtype(out, jnp.inexact):
    out = jnp.promote_types(jnp.float32, out)
  return out


# --------------------------------------------------------------------------------------------
# Errors that flax also raises: flax's type and sentence first, jaxbn's explanation after.
# --------------------------------------------------------------------------------------------


MODE_HOWTO = (
    "{layer}: give `use_running_average` (True: normalize with the stored statistics, "
    "eval; False: with the batch statistics, updating the stored ones, training) either "
    "to the constructor or to the call, e.g. "
    "`functools.partial({layer}, use_running_average=not train)`.")


def resolve_mode(layer: str, field: Optional[bool], call: Optional[bool]) -> bool:
  """``use_running_average`` given exactly once, at construction or call (flax's rule)."""
  if field is None and call is None:
    raise flax_error('Parameter "use_running_average" must be passed to the constructor or at '
                     'call time.', MODE_HOWTO.format(layer=layer))
  if field is not None and call is not None:
    raise flax_error('Parameter "use_running_average" was passed to the constructor and at '
                     'call time. Should be passed just once.', MODE_HOWTO.format(layer=layer))
  return field if call is None else call


# --------------------------------------------------------------------------------------------
# Field groups, in flax's order. A layer's fields are its bases' (the last base's first), then
# its own; a field declared again keeps its place and takes the new default.
# --------------------------------------------------------------------------------------------


class ModeFields(nn.Module):
  """flax ``BatchNorm``'s first fields (``BatchNormFields`` widens ``axis``, ``momentum``)."""

  use_running_average: Optional[bool] = None
  axis: int = -1
  momentum: float = 0.99


class AffineFields(nn.Module):
  """``epsilon`` and the learned affine map's fields, as every flax normalization has them."""

  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones


class BatchStatsFields(AffineFields, ModeFields):
  """flax ``BatchNorm``'s fields up to ``axis_index_groups``."""

  axis_name: Any = None
  axis_index_groups: Any = None


class GroupFields(nn.Module):
  """flax ``GroupNorm``'s channel groups."""

  num_groups: Optional[int] = 32
  group_size: Optional[int] = None


# --------------------------------------------------------------------------------------------
# BN-family variables and call.
# --------------------------------------------------------------------------------------------


def affine_params(mdl: nn.Module, x: jax.Array, shape, use_scale: bool, use_bias: bool):
  """Creates or reads ``params/scale`` and ``params/bias``; returns ``(scale, bias, dtype)``.

  ``dtype`` is the output dtype flax.linen infers from ``x``, the parameters and ``mdl.dtype``.
  """
  scale = bias = None
  if use_scale:
    scale = mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype)
  if use_bias:
    bias = mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype)
  return scale, bias, result_dtype(x, scale, bias, dtype=mdl.dtype)


def bn_variables(mdl: nn.Module, x: jax.typing.ArrayLike, fn: str):
  """Creates or reads a BN-family layer's variables: flax BatchNorm's names, shapes, dtypes.

  ``batch_stats/mean``, ``batch_stats/var`` (float32, or ``param_dtype`` with
  ``force_float32_reductions=False``), ``batch_stats/count`` (int32, only when ``momentum`` is
  None or ``debias`` is set), then ``params/scale`` and ``params/bias``, in flax's creation
  order. Works for any module with flax ``BatchNorm``'s fields.

  Returns:
    ``(x, axis, stats, scale, bias, out_dtype, (mean_var, var_var, count_var_or_None))``,
    ``axis`` canonicalized as flax does.
  """
  x = as_float(x)
  axis = flax_axes(mdl.axis, x.ndim)
  feat = feature_axes(fn, x.ndim, axis)
  shape = tuple(x.shape[a] for a in feat)
  stats_dtype = (jnp.float32 if getattr(mdl, "force_float32_reductions", True)
                 else mdl.param_dtype)
  ra_mean = mdl.variable("batch_stats", "mean", lambda: jaxbn.init_stats(shape, stats_dtype).mean)
  ra_var = mdl.variable("batch_stats", "var", lambda: jaxbn.init_stats(shape, stats_dtype).var)
  ra_count = None
  if getattr(mdl, "momentum", 0.99) is None or getattr(mdl, "debias", False):
    ra_count = mdl.variable("batch_stats", "count", lambda: jaxbn.init_stats(1).count)
  if tuple(ra_mean.value.shape) != shape:
    raise ValueError(
        f"{fn}: `x` has features of shape {shape} on axis {mdl.axis!r} but this layer's "
        f"variables have shape {tuple(ra_mean.value.shape)}; pass inputs with the features "
        f"the layer was initialized with, or the right `axis`.")
  scale, bias, out_dtype = affine_params(mdl, x, shape, mdl.use_scale, mdl.use_bias)
  count = jaxbn.init_stats(1).count if ra_count is None else ra_count.value
  stats = jaxbn.BatchStats(ra_mean.value, ra_var.value, count)
  return x, axis, stats, scale, bias, out_dtype, (ra_mean, ra_var, ra_count)


# The settings a BN-family layer gives its functional op, under the same names.
_CORE_SETTINGS = ("momentum", "epsilon", "use_fast_variance", "unbiased_running_var", "debias",
                  "skip_nonfinite")


def bn_call(mdl: nn.Module, core: Callable[..., Any], fn: str, x: jax.typing.ArrayLike,
            use_running_average: Optional[bool], mask: Optional[jax.Array], **extra: Any
            ) -> jax.Array:
  """A BN-family layer's call: its variables, ``core``, and the write-back of the statistics.

  ``core`` is a functional op with :func:`jaxbn.batch_norm`'s signature (plus ``extra``
  keyword arguments); ``use_running_average`` is the call's (:func:`resolve_mode`). As in
  flax: during ``init`` nothing is updated and no collective is issued, and complex input
  turns the running mean complex after the first update.
  """
  use_running_average = resolve_mode(fn, mdl.use_running_average, use_running_average)
  momentum_value(fn, mdl.momentum)
  x, axis, stats, scale, bias, out_dtype, (ra_mean, ra_var, ra_count) = bn_variables(mdl, x, fn)
  if jnp.iscomplexobj(x) and not jnp.iscomplexobj(stats.mean):
    stats = stats._replace(mean=stats.mean.astype(jnp.promote_types(stats.mean.dtype,
                                                                    jnp.complex64)))
  initializing = mdl.is_initializing()
  # During init a one-row dummy batch is the usual way to create the variables (nothing is
  # updated): one value per feature raises in training calls only.
  with one_value_per_feature_ok(initializing):
    y, new = core(x, stats, scale, bias, training=not use_running_average, axis=axis, mask=mask,
                  dtype=out_dtype, axis_name=None if initializing else mdl.axis_name,
                  axis_index_groups=None if initializing else mdl.axis_index_groups,
                  **{name: getattr(mdl, name) for name in _CORE_SETTINGS}, **extra)
  if not use_running_average and not initializing:
    ra_mean.value = new.mean
    ra_var.value = new.var
    if ra_count is not None:
      ra_count.value = new.count
  return y


# --------------------------------------------------------------------------------------------
# The registry, for Linen modules.
# --------------------------------------------------------------------------------------------


class View(nn.Module):
  """``module`` with its layers' calls intercepted; its variables (shared scope).

  A subclass (frozen BN, surgery) defines ``interceptor(self)``, which returns the function
  given to ``nn.intercept_methods`` around every call.
  """

  module: nn.Module

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(self.interceptor()):
      return self.module(*args, **kwargs)


def treatment(fn: str, module: Any) -> registry.Treatment:
  """What the tool ``fn`` does with the bound ``module`` (see ``jaxbn._layers.registry``).

  Raises:
    TypeError: ``module`` is not registered but holds ``batch_stats/mean`` and ``var``.
  """
  def holds_stats():
    return (isinstance(module, nn.Module) and module.scope is not None
            and module.has_variable("batch_stats", "mean")
            and module.has_variable("batch_stats", "var"))

  where = "/".join(module.path) if isinstance(module, nn.Module) and module.scope else "?"
  return registry.treatment(fn, module, holds_stats, where, "batch_stats 'mean' and 'var'",
                            "linen")


def register_batch_norm(cls: type, *, kind: str = "trains") -> type:
  """Registers a class with the freeze, recompute, fold, surgery and TENT tools.

  ``kind`` (``jaxbn._layers.registry``) says what each tool does with it; a ``"trains"`` class
  has flax ``BatchNorm``'s fields and variables, normalizes at inference with its running
  statistics and takes the input first. Subclasses of a registered class or of a jaxbn layer
  need no registration.

  Args:
    cls: a ``flax.linen.Module`` subclass.
    kind: ``"trains"`` (default), ``"frozen"``, ``"adaptive"`` or ``"running"``.

  Returns:
    ``cls`` (so this can decorate a class definition).

  Raises:
    TypeError: ``cls`` is not a module class of this framework.
    ValueError: an unknown ``kind``.

  Example:
    >>> import jaxbn.linen
    >>> @jaxbn.linen.register_batch_norm
    ... class MyBatchNorm(jaxbn.linen.BatchNorm):   # (a subclass would not need it)
    ...   pass
  """
  return registry.register("jaxbn.linen.register_batch_norm", cls, kind, nn.Module)
