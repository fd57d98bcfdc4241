"""What the Linen layers share: input dtype promotion, BN-family variables and the call."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes

from jaxbn._core import checks
from jaxbn._core.types import BatchStats, init_stats


def input_dtype(x: jax.Array) -> Any:
  """Integer/bool input is normalized in float32 (as flax promotes it)."""
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return x.dtype
  return jnp.promote_types(jnp.float32, x.dtype)


def as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """``x`` as an array, integer/bool input promoted as flax does (see :func:`input_dtype`)."""
  x = jnp.asarray(x)
  return x.astype(input_dtype(x))


def affine_params(mdl: nn.Module, x: jax.Array, shape, use_scale: bool, use_bias: bool):
  """Creates or reads ``params/scale`` and ``params/bias``; returns ``(scale, bias, dtype)``.

  ``dtype`` is the output dtype flax.linen infers from ``x``, the parameters and ``mdl.dtype``.
  """
  scale = bias = None
  if use_scale:
    scale = mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype)
  if use_bias:
    bias = mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype)
  return scale, bias, dtypes.canonicalize_dtype(x, scale, bias, dtype=mdl.dtype)


def bn_variables(mdl: nn.Module, x: jax.typing.ArrayLike, fn: str):
  """Creates or reads a BN-family layer's variables, exactly as ``jaxbn.linen.BatchNorm``.

  ``batch_stats/mean``, ``batch_stats/var`` (float32, or ``param_dtype`` with
  ``force_float32_reductions=False``), ``batch_stats/count`` when ``momentum`` is None or
  ``debias`` is set, then ``params/scale`` and ``params/bias`` — flax's names, shapes, dtypes
  and creation order. Works for any module with flax ``BatchNorm``'s fields.

  Returns:
    ``(x, feature_shape, mean_var, var_var, count_var_or_None, scale, bias, out_dtype)``.
  """
  x = as_float(x)
  feat = checks.feature_axes(fn, x.ndim, mdl.axis)
  feature_shape = [x.shape[a] for a in feat]
  stats_dtype = (jnp.float32 if getattr(mdl, "force_float32_reductions", True)
                 else mdl.param_dtype)
  ra_mean = mdl.variable("batch_stats", "mean",
                         lambda s: init_stats(s, stats_dtype).mean, feature_shape)
  ra_var = mdl.variable("batch_stats", "var",
                        lambda s: init_stats(s, stats_dtype).var, feature_shape)
  ra_count = None
  if getattr(mdl, "momentum", 0.99) is None or getattr(mdl, "debias", False):
    ra_count = mdl.variable("batch_stats", "count", lambda: init_stats(1).count)
  if tuple(ra_mean.value.shape) != tuple(feature_shape):
    raise ValueError(
        f"{fn}: `x` has features of shape {tuple(feature_shape)} on axis {mdl.axis!r} but "
        f"this layer's variables have shape {tuple(ra_mean.value.shape)}; pass inputs with "
        f"the features the layer was initialized with, or the right `axis`.")
  scale, bias, out_dtype = affine_params(mdl, x, feature_shape, mdl.use_scale, mdl.use_bias)
  return x, feature_shape, ra_mean, ra_var, ra_count, scale, bias, out_dtype


def bn_call(mdl: nn.Module, core: Callable[..., Any], fn: str, x: jax.typing.ArrayLike,
            use_running_average: bool, mask: Optional[jax.Array], **extra: Any) -> jax.Array:
  """A BN-family layer's call: its variables, ``core``, and the write-back of the statistics.

  ``core`` is a functional op with :func:`jaxbn.batch_norm`'s signature (plus ``extra``
  keyword arguments). ``use_running_average`` is the mode already resolved with
  ``nn.merge_param``. During ``init`` the statistics are not updated and no collective is
  issued (``axis_name`` need not be bound), as in flax.
  """
  x, _, ra_mean, ra_var, ra_count, scale, bias, out_dtype = bn_variables(mdl, x, fn)
  # The count is only read with momentum=None or debias; otherwise a placeholder.
  count = init_stats(1).count if ra_count is None else ra_count.value
  initializing = mdl.is_initializing()
  y, new = core(
      x, BatchStats(ra_mean.value, ra_var.value, count), scale, bias,
      training=not use_running_average,
      axis=mdl.axis,
      momentum=mdl.momentum,
      epsilon=mdl.epsilon,
      axis_name=None if initializing else mdl.axis_name,
      axis_index_groups=None if initializing else mdl.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
      use_fast_variance=mdl.use_fast_variance,
      unbiased_running_var=mdl.unbiased_running_var,
      debias=mdl.debias,
      **extra,
  )
  if not use_running_average and not initializing:
    ra_mean.value = new.mean
    ra_var.value = new.var
    if ra_count is not None:
      ra_count.value = new.count
  return y
