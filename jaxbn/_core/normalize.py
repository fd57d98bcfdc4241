"""Normalization with given statistics: ``(x - mean) / sqrt(var + epsilon) * scale + bias``."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.moments import accumulation_dtype


def keepdims_shape(x_shape, feat):
  return tuple(d if i in feat else 1 for i, d in enumerate(x_shape))


def to_keepdims(v, x_shape, feat, dtype=None):
  """Reshapes a feature-shaped vector so that it broadcasts against ``x``."""
  if v is None:
    return None
  v = jnp.asarray(v)
  if dtype is not None:
    v = v.astype(dtype)
  return v.reshape(keepdims_shape(x_shape, feat))


def affine(x, mean, inv, scale, bias, out_dtype, broadcast=lambda v: v):
  """``(x - mean) * (inv * scale) + bias`` in the accumulation dtype, one fused pass.

  All of ``mean``, ``inv``, ``scale``, ``bias`` are per-feature, in keepdims shapes or
  broadcast against ``x`` by ``broadcast``: the per-feature coefficient ``inv * scale`` is
  formed once, so the elementwise loop is a subtract, a multiply and an add per entry.
  """
  acc = accumulation_dtype(x.dtype)
  k = inv if scale is None else inv * scale.astype(acc)
  y = (x.astype(acc) - broadcast(mean.astype(acc))) * broadcast(k)
  if bias is not None:
    y = y + broadcast(bias.astype(acc))
  return y.astype(out_dtype)


def output_dtype(x, scale, bias, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(x)


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    axis: checks.Axes = -1,
    epsilon: float = 1e-5,
    dtype: Optional[DTypeLike] = None,
) -> jax.Array:
  r"""Normalizes ``x`` with the given per-feature statistics.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \gamma + \beta

  This is batch norm's inference step (with running statistics) and the last step of its
  training step. It is a plain differentiable function (one fused elementwise pass); use
  :func:`jaxbn.batch_norm` in training, which also differentiates through the statistics.

  Args:
    x: input, any float dtype.
    mean: per-feature mean, the shape of ``x`` along ``axis``.
    var: per-feature (biased) variance, same shape.
    scale: optional per-feature scale ``γ`` (None: 1).
    bias: optional per-feature offset ``β`` (None: 0).
    axis: feature axis or axes of ``x`` (default -1).
    epsilon: added to the variance, > 0 (default 1e-5, as flax and PyTorch).
    dtype: output dtype (default ``x.dtype``); arithmetic runs in at least float32.

  Returns:
    The normalized array, shaped like ``x``.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]), jnp.array([1.0]),
    ...                 epsilon=1e-12).tolist()
    [[-1.0], [1.0]]
  """
  fn = "normalize"
  x = jnp.asarray(x)
  checks.float_input(fn, x)
  checks.epsilon_value(fn, epsilon)
  feat = checks.feature_axes(fn, x.ndim, axis)
  fshape = tuple(x.shape[a] for a in feat)
  checks.feature_vectors(fn, fshape, scale=scale, bias=bias, mean=mean, var=var)
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  m = to_keepdims(mean, x.shape, feat, acc)
  inv = lax.rsqrt(to_keepdims(var, x.shape, feat, rdt) + jnp.asarray(epsilon, rdt))
  return affine(x, m, inv, to_keepdims(scale, x.shape, feat), to_keepdims(bias, x.shape, feat),
                output_dtype(x, scale, bias, dtype))
