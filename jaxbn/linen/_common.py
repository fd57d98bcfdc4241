"""What the Linen layers share: dtypes, axes, flax's errors, BN-family variables and the call."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn


# --------------------------------------------------------------------------------------------
# Dtypes and axes.
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


def feature_axes(fn: str, ndim: int, axis: Any, name: str = "axis") -> tuple[int, ...]:
  """``axis`` (an int or a sequence of ints) as sorted non-negative axes of a rank-``ndim`` x."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes or not all(isinstance(a, int) and -ndim <= a < ndim for a in axes):
    raise ValueError(f"{fn}: `{name}`={axis!r} is not a valid axis (or tuple of axes) of an "
                     f"input of rank {ndim}; pass axes in [-{ndim}, {ndim}).")
  out = tuple(sorted({a % ndim for a in axes}))
  if len(out) != len(axes):
    raise ValueError(f"{fn}: `{name}`={axis!r} names an axis twice; pass each axis once.")
  return out


def keepdims(v: jax.Array, shape: Sequence[int], feat: Sequence[int]) -> jax.Array:
  """A feature-shaped ``v`` reshaped to broadcast against an input of ``shape``."""
  return jnp.reshape(v, [shape[a] if a in feat else 1 for a in range(len(shape))])


# --------------------------------------------------------------------------------------------
# Errors that flax also raises: flax's type and sentence first, jaxbn's explanation after.
# --------------------------------------------------------------------------------------------


def flax_error(flax_sentence: str, explanation: str) -> ValueError:
  """flax's ``ValueError`` for a refused input, with jaxbn's explanation appended."""
  return ValueError(f"{flax_sentence} {explanation}")


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


def check_momentum(fn: str, momentum: Any) -> None:
  """``momentum`` in ``[0, 1]`` or None (1: the running statistics stay as they are)."""
  if momentum is None or isinstance(momentum, jax.Array):
    return
  if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"{fn}: `momentum` must be in [0, 1] (flax convention: the weight of the old running "
        f"value; 1 keeps the running statistics as they are) or None (cumulative average), "
        f"got {momentum!r}. A PyTorch momentum p converts to 1 - p "
        f"(jaxbn.momentum_from_torch).")


def frozen_momentum(momentum: Any) -> bool:
  """True for a static ``momentum`` of 1: training keeps the running statistics unchanged."""
  return isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum == 1


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
    ``(x, stats, scale, bias, out_dtype, (mean_var, var_var, count_var_or_None))``.
  """
  x = as_float(x)
  feat = feature_axes(fn, x.ndim, mdl.axis)
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
  return x, stats, scale, bias, out_dtype, (ra_mean, ra_var, ra_count)


def bn_call(mdl: nn.Module, core: Callable[..., Any], fn: str, x: jax.typing.ArrayLike,
            use_running_average: bool, mask: Optional[jax.Array], **extra: Any) -> jax.Array:
  """A BN-family layer's call: its variables, ``core``, and the write-back of the statistics.

  ``core`` is a functional op with :func:`jaxbn.batch_norm`'s signature (plus ``extra``
  keyword arguments). As in flax: during ``init`` nothing is updated and no collective is
  issued; complex input turns the running mean complex after the first update; and
  ``momentum=1`` trains on batch statistics while the running ones stay as they are.
  """
  check_momentum(fn, mdl.momentum)
  x, stats, scale, bias, out_dtype, (ra_mean, ra_var, ra_count) = bn_variables(mdl, x, fn)
  if jnp.iscomplexobj(x) and not jnp.iscomplexobj(stats.mean):
    stats = stats._replace(mean=stats.mean.astype(jnp.promote_types(stats.mean.dtype,
                                                                    jnp.complex64)))
  keep = frozen_momentum(mdl.momentum)
  initializing = mdl.is_initializing()
  y, new = core(
      x, stats, scale, bias,
      training=not use_running_average,
      axis=mdl.axis,
      momentum=0.0 if keep else mdl.momentum,
      epsilon=mdl.epsilon,
      axis_name=None if initializing else mdl.axis_name,
      axis_index_groups=None if initializing else mdl.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
      use_fast_variance=mdl.use_fast_variance,
      unbiased_running_var=getattr(mdl, "unbiased_running_var", False),
      debias=getattr(mdl, "debias", False),
      **extra,
  )
  if not use_running_average and not initializing:
    if not keep:
      ra_mean.value = new.mean
      ra_var.value = new.var
    if ra_count is not None:
      ra_count.value = new.count
  return y
