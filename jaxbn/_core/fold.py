"""Folding an inference-mode BN into the linear layer (Conv/Dense) that feeds it.

In eval mode BN is a per-feature affine map, ``y = x·k + c`` with ``k = γ/√(σ²+ε)`` and
``c = β - μ·k``. When ``x = W∗u + b`` comes straight from a convolution or a dense layer, the
map can be moved into that layer's weights: ``W' = W·k`` (per output feature) and
``b' = b·k + c``, which removes the normalization pass from the inference step.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn._core import checks


def _stats_arrays(fn: str, stats: Any):
  try:
    return jnp.asarray(stats.mean), jnp.asarray(stats.var)
  except AttributeError:
    raise TypeError(
        f"{fn}: `stats` must have `mean` and `var` (a jaxbn.BatchStats, e.g. "
        f"jaxbn.BatchStats(mean, var, count)), got {type(stats).__name__}.") from None


def eval_affine(
    stats: Any,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  r"""Eval-mode batch norm as a per-feature affine map ``y = x * multiplier + offset``.

  .. math::
     k = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad c = \beta - \mu k

  Computed in float32 (or wider).

  Args:
    stats: the running statistics (:class:`~jaxbn.BatchStats`: ``mean``, ``var``).
    scale: optional per-feature ``γ`` (None: 1).
    bias: optional per-feature ``β`` (None: 0).
    epsilon: the layer's epsilon (flax/PyTorch default 1e-5, Keras 1e-3).

  Returns:
    ``(multiplier, offset)``, both of the feature shape.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> stats = jaxbn.BatchStats(jnp.array([1.0]), jnp.array([4.0]), jnp.array(0))
    >>> k, c = jaxbn.eval_affine(stats, bias=jnp.array([0.5]), epsilon=1e-12)
    >>> k.tolist(), c.tolist()
    ([0.5], [0.0])
  """
  fn = "eval_affine"
  mean, var = _stats_arrays(fn, stats)
  checks.epsilon_value(fn, epsilon)
  fshape = jnp.shape(mean)
  for name, v in (("var", var), ("scale", scale), ("bias", bias)):
    if v is not None and jnp.shape(v) != fshape:
      raise ValueError(f"{fn}: `{name}` has shape {jnp.shape(v)} but `stats.mean` has shape "
                       f"{fshape}; all must have the layer's feature shape.")
  work = jnp.promote_types(jnp.result_type(mean), jnp.float32)
  k = lax.rsqrt(var.astype(work) + jnp.asarray(epsilon, work))
  if scale is not None:
    k = k * jnp.asarray(scale).astype(work)
  c = -mean.astype(work) * k
  if bias is not None:
    c = c + jnp.asarray(bias).astype(work)
  return k, c


def fold_batch_norm(
    kernel: ArrayLike,
    bias: Optional[ArrayLike],
    stats: Any,
    scale: Optional[ArrayLike] = None,
    bn_bias: Optional[ArrayLike] = None,
    *,
    epsilon: float = 1e-5,
    axis: checks.Axes = -1,
) -> tuple[jax.Array, jax.Array]:
  r"""Folds an eval-mode BN into the kernel and bias of the Conv/Dense layer feeding it.

  .. math::
     \mathrm{BN}(W * u + b) = (W k) * u + (b - \mu) k + \beta, \qquad
     k = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

  ``k`` scales the kernel along its output-feature ``axis``: the last axis for flax kernels
  (``HWIO`` convolutions, ``(in, out)`` dense layers, including grouped and depthwise
  convolutions, whose kernel is ``(H, W, in/groups, out)``), axis 0 for PyTorch's ``OIHW``
  and ``(out, in)``. The folded layer computes the same function up to rounding; the
  arithmetic is float32 (or wider) and the kernel keeps its dtype.

  Args:
    kernel: the layer's kernel.
    bias: the layer's bias (feature shape), or None for a layer without bias.
    stats: the BN's running statistics (:class:`~jaxbn.BatchStats`).
    scale: the BN's ``γ`` (None if ``use_scale=False``).
    bn_bias: the BN's ``β`` (None if ``use_bias=False``).
    epsilon: the BN's epsilon.
    axis: the kernel's output-feature axis (or axes, matching the BN's feature shape).

  Returns:
    ``(folded_kernel, folded_bias)``: the kernel (its dtype) and the bias the folded layer
    must add (the bias's dtype, or float32 when ``bias`` is None).

  Raises:
    ValueError: the kernel's features along ``axis`` do not match the statistics, or an
      invalid ``axis``/``epsilon``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))   # HWIO
    >>> u = jax.random.normal(jax.random.key(1), (1, 5, 5, 2))
    >>> stats = jaxbn.BatchStats(jnp.arange(4.0), jnp.arange(1.0, 5.0), jnp.array(1))
    >>> conv = lambda w, u: jax.lax.conv_general_dilated(
    ...     u, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> y_ref = jaxbn.normalize(conv(w, u), stats.mean, stats.var)
    >>> w2, b2 = jaxbn.fold_batch_norm(w, None, stats)
    >>> bool(jnp.allclose(conv(w2, u) + b2, y_ref, atol=1e-5))
    True
  """
  fn = "fold_batch_norm"
  kernel = jnp.asarray(kernel)
  checks.float_input(fn, kernel, "kernel")
  feat = checks.feature_axes(fn, kernel.ndim, axis)
  kshape = tuple(kernel.shape[a] for a in feat)
  mean, _ = _stats_arrays(fn, stats)
  if tuple(jnp.shape(mean)) != kshape:
    raise ValueError(
        f"{fn}: the kernel has {kshape} output features along axis {axis!r} but the BN "
        f"statistics have shape {tuple(jnp.shape(mean))}; pass the kernel's output-feature "
        f"axis (-1 for flax HWIO/(in, out) kernels, 0 for PyTorch OIHW/(out, in)).")
  if bias is not None and tuple(jnp.shape(bias)) != kshape:
    raise ValueError(f"{fn}: `bias` has shape {tuple(jnp.shape(bias))} but the kernel has "
                     f"{kshape} output features.")
  k, c = eval_affine(stats, scale, bn_bias, epsilon=epsilon)
  work = jnp.promote_types(k.dtype, kernel.dtype)
  kb = k.reshape(tuple(d if i in feat else 1 for i, d in enumerate(kernel.shape)))
  new_kernel = (kernel.astype(work) * kb.astype(work)).astype(kernel.dtype)
  if bias is None:
    new_bias = c
  else:
    bias = jnp.asarray(bias)
    new_bias = (bias.astype(k.dtype) * k + c).astype(bias.dtype)
  return new_kernel, new_bias
