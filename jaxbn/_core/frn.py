"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, 2019).

Batch-independent: each example and channel is divided by the root mean square of its own
spatial positions, so training and inference are the same function and per-example gradients
need no special care. No centering (hence the learned threshold ``tau`` of the TLU).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import collectives
from jaxbn._core.engine import standardize
from jaxbn._core.moments import accumulation_dtype
from jaxbn._core.normalize import keepdims_shape


def _axes(fn: str, ndim: int, axis) -> tuple[int, ...]:
  """Normalizes the channel ``axis`` (int or tuple) of a rank-``ndim`` input; not axis 0."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not all(isinstance(a, int) and -ndim <= a < ndim for a in axes):
    raise ValueError(f"{fn}: `axis`={axis!r} is out of range for an input of rank {ndim}; "
                     f"pass the channel axis (e.g. -1 for NHWC).")
  out = tuple(sorted({a % ndim for a in axes}))
  if 0 in out:
    raise ValueError(f"{fn}: `axis`={axis!r} includes axis 0, the batch axis; the statistics "
                     f"are per example, so put the batch first and pass the channel axis.")
  return out


def _float(fn: str, name: str, v) -> jax.Array:
  v = jnp.asarray(v)
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(f"{fn}: `{name}` must be a real floating array, got dtype {v.dtype}; "
                    f"cast it, e.g. `{name}.astype(jnp.float32)`.")
  return v


def _per_channel(fn: str, name: str, v, x: jax.Array, feat: tuple[int, ...]):
  """``v`` (shape of ``x`` along ``feat``, or None) broadcast to ``x``'s rank."""
  if v is None:
    return None
  v = _float(fn, name, v)
  fshape = tuple(x.shape[a] for a in feat)
  if v.shape != fshape:
    raise ValueError(f"{fn}: `{name}` has shape {v.shape} but `x` has {fshape} channels on "
                     f"`axis`; pass one value per channel.")
  return v.reshape(keepdims_shape(x.shape, feat))


def filter_response_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    tau: Optional[ArrayLike] = None,
    *,
    axis=-1,
    epsilon: ArrayLike = 1e-6,
    learned_epsilon: Optional[ArrayLike] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    feature_axes=None,
) -> jax.Array:
  r"""Filter Response Normalization, optionally followed by the TLU (Singh & Krishnan, 2019).

  .. math::
     \nu^2 = \frac{1}{|S|}\sum_{s \in S} x_s^2, \qquad
     y = \gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta, \qquad z = \max(y, \tau)

  with ``S`` every axis but the batch axis 0 and the channel ``axis`` (for NHWC, H and W),
  per example and channel. ``ε = epsilon + |learned_epsilon|``: pass a trainable scalar as
  ``learned_epsilon`` for the paper's learned-ε variant (``epsilon`` is then its floor). For
  an input without spatial axes (``(N, C)``) ``ν² = x²``, so ``y ≈ γ·sign(x) + β``: use it on
  feature maps. It runs on jaxbn's engine (the uncentered statistics of RMS norm over ``S``):
  the mean square is accumulated in at least float32 in one pass, and the derivative is the
  engine's closed-form one (also for ``learned_epsilon``).

  Args:
    x: input, real float, batch axis 0.
    scale: optional ``γ``, one per channel (shape of ``x`` along ``axis``).
    bias: optional ``β``, same shape.
    tau: optional TLU threshold ``τ``, same shape; None: no TLU (FRN alone).
    axis: channel axis or axes (default -1); must not include 0. The layers
      (:class:`jaxbn.linen.FilterResponseNorm`, :class:`jaxbn.nnx.FilterResponseNorm`) call
      it ``feature_axes``, flax's name; that spelling is accepted here too.
    epsilon: constant added to ``ν²`` (default 1e-6, the paper's), ``> 0``.
    learned_epsilon: optional scalar (a parameter); ``|learned_epsilon|`` is added to ``ε``.
    mask: optional bool array broadcastable to ``x``: which positions count in ``ν²``
      (padding excluded); an example/channel without a valid position gets ``ν² = 0``.
    dtype: output dtype (default ``x``'s).
    feature_axes: the layers' name for ``axis`` (give one of the two).

  Returns:
    ``z`` (with ``tau``) or ``y``, shaped like ``x``.

  Raises:
    ValueError: bad ``axis``, parameter shapes or ``epsilon <= 0``. TypeError: non-float
      input, or both ``axis`` and ``feature_axes``.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[[3.0], [-4.0]]])          # one example, 2 positions, 1 channel
    >>> jaxbn.filter_response_norm(x, epsilon=1e-12).round(4).tolist()
    [[[0.8485], [-1.1314]]]
    >>> jaxbn.filter_response_norm(x, tau=jnp.zeros(1), epsilon=1e-12).round(4).tolist()
    [[[0.8485], [0.0]]]

  References:
    Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence in
    the Training of Deep Neural Networks", CVPR 2020 (arXiv:1911.09737).
  """
  fn = "filter_response_norm"
  x = _float(fn, "x", x)
  if isinstance(epsilon, (int, float)) and not epsilon > 0:
    raise ValueError(f"{fn}: `epsilon` must be > 0, got {epsilon!r}.")
  if feature_axes is not None:  # the layers' spelling of `axis`
    if axis != -1:
      raise TypeError(f"{fn}: give the channel axis once, as `axis` (the functional name) or "
                      f"`feature_axes` (the layers' name), got axis={axis!r} and "
                      f"feature_axes={feature_axes!r}.")
    axis = feature_axes
  feat = _axes(fn, x.ndim, axis)
  red = tuple(a for a in range(1, x.ndim) if a not in feat)
  fshape = tuple(x.shape[a] for a in feat)
  scale, bias, tau = (None if v is None else _per_channel(fn, name, v, x, feat).reshape(fshape)
                      for name, v in (("scale", scale), ("bias", bias), ("tau", tau)))
  acc = accumulation_dtype(x.dtype)
  eps = jnp.asarray(epsilon, acc)
  if learned_epsilon is not None:
    eps = eps + jnp.abs(_float(fn, "learned_epsilon", learned_epsilon).astype(eps.dtype))
  # The engine's uncentered statistics (the mean square over S, per example and channel) and
  # its closed-form derivative; the TLU follows in the accumulation dtype.
  out = jnp.dtype(dtype) if dtype is not None else x.dtype
  y = standardize(fn, x, scale, bias, red=red, param_axes=feat, mask=mask, epsilon=eps,
                  dtype=acc if tau is not None else out, axis_name=None,
                  axis_index_groups=None, use_fast_variance=False, center=False)[0]
  if tau is not None:
    # tau is made device-varying at its own shape before it meets the data (shard_map), so
    # its gradient is a C-sized psum, not an activation-sized one.
    tau = collectives.to_varying(tau.astype(y.dtype), tuple(collectives.varying_axes(x)))
    y = jnp.maximum(y, lax.broadcast_in_dim(tau, x.shape, feat,
                                            out_sharding=collectives.explicit_sharding(x)))
  return y.astype(out)
