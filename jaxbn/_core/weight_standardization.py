"""Weight standardization (Qiao et al., 2019) and its scaled form from NF-Nets (Brock et al., 2021).

Applied to a kernel before the convolution: per output channel, the kernel is centered and
divided by its standard deviation over the fan-in (all other axes). The scaled form divides
once more by ``sqrt(fan_in)`` and multiplies by a learned per-output ``gain``, which keeps
activations' variance near 1 without any activation normalization.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._core.moments import moments
from jaxbn._core.normalize import keepdims_shape
from jaxbn._core.frn import _float


def standardize_weight(
    kernel: ArrayLike,
    gain: Optional[ArrayLike] = None,
    *,
    axis: int = -1,
    epsilon: ArrayLike = 1e-6,
    fan_in_scaling: bool = False,
) -> jax.Array:
  r"""Standardizes a kernel per output channel (weight standardization, optionally scaled).

  .. math::
     \hat W = \frac{W - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot
     \frac{g}{\sqrt{N}^{[\text{fan\_in\_scaling}]}}

  ``μ``, ``σ²``: mean and biased variance of ``W`` over every axis but ``axis`` (the output
  channels; -1 for flax's ``HWIO`` conv and ``(in, out)`` dense kernels); ``N`` the number
  of entries per output channel (the fan-in). ``ε`` sits inside the square root (timm's
  ``StdConv2d``/``ScaledStdConv2d``). Differentiable (the gradient flows through ``μ`` and
  ``σ``, as in the papers).

  Args:
    kernel: the kernel, real float.
    gain: optional per-output gain ``g`` (shape ``(kernel.shape[axis],)``); NF-Nets' learned
      gain (init 1), times the activation's gain constant if used.
    axis: the output-channel axis (default -1).
    epsilon: added to the variance (default 1e-6).
    fan_in_scaling: also divide by ``sqrt(fan_in)`` (NF-Nets' scaled WS).

  Returns:
    The standardized kernel, same shape and dtype.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) * 2 + 1
    >>> ws = jaxbn.standardize_weight(w)
    >>> bool(jnp.allclose(ws.mean((0, 1, 2)), 0, atol=1e-5))
    True
    >>> bool(jnp.allclose(ws.var((0, 1, 2)), 1, atol=1e-4))
    True

  References:
    Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization", arXiv:1903.10520, 2019. Brock, De & Smith, "Characterizing
    signal propagation to close the performance gap in unnormalized ResNets", ICLR 2021;
    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021.
  """
  fn = "standardize_weight"
  w = _float(fn, "kernel", kernel)
  if not isinstance(axis, int) or not -w.ndim <= axis < w.ndim:
    raise ValueError(f"{fn}: `axis`={axis!r} is out of range for a kernel of rank {w.ndim}; "
                     f"pass the output-channel axis (-1 for flax kernels).")
  axis %= w.ndim
  if w.ndim < 2:
    raise ValueError(f"{fn}: `kernel` must have an output axis and at least one fan-in axis, "
                     f"got shape {w.shape}.")
  m = moments(w, axis=axis)
  acc = m.var.dtype
  shape = keepdims_shape(w.shape, (axis,))
  inv = jax.lax.rsqrt(m.var + jnp.asarray(epsilon, acc))
  if fan_in_scaling:
    inv = inv / math.sqrt(w.size // w.shape[axis])
  if gain is not None:
    g = _float(fn, "gain", gain)
    if g.shape != (w.shape[axis],):
      raise ValueError(f"{fn}: `gain` has shape {g.shape}, expected ({w.shape[axis]},) (one "
                       f"per output channel on `axis`).")
    inv = inv * g.astype(acc)
  out = (w.astype(acc) - m.mean.reshape(shape)) * inv.reshape(shape)
  return out.astype(w.dtype)
