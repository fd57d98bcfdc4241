"""Per-example normalizations over feature axes: layer normalization and RMS normalization.

Both are the engine (:mod:`jaxbn._core.engine`) with statistics over ``reduction_axes`` of
each example and ``scale``/``bias`` along ``feature_axes``; no running state, so training
and inference are the same function. Argument names follow flax's layers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.docstrings import fill_args
from jaxbn._core.engine import standardize

Axes = checks.Axes


def layer_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    use_fast_variance: bool = False,
) -> jax.Array:
  r"""Layer normalization (Ba et al., 2016): statistics per example over ``reduction_axes``.

  .. math::
     y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\, \gamma + \beta

  with mean and (biased) variance over ``reduction_axes`` (default: the last axis), separately
  for every index of the other axes. ``scale``/``bias`` are shaped like ``x`` along
  ``feature_axes``. As flax's ``LayerNorm(reduction_axes, feature_axes)``.

  When to use: sequence models and transformers, RNNs, any batch size (including 1) and
  inference identical to training; no cross-example communication.

  Numerics (all the per-example norms): statistics accumulated in float32 for bf16/fp16 input
  without an up-cast copy of ``x``, in one pass about a shift sampled from ``x`` (exact for
  any offset of the data, with or without ``use_fast_variance``); output dtype ``dtype`` or
  ``x.dtype``. Masked statistics use only the valid entries (a group with none gives finite
  output); ``axis_name`` averages the statistics over devices, weighted by their counts — for
  model parallelism, when the reduced axes are sharded across devices. Gradients are the
  engine's closed-form derivative.

  Args:
    x: input, float dtype.
    scale: optional ``γ``, shaped like ``x`` along ``feature_axes`` (or flattened).
    bias: optional ``β``, same shape.
    reduction_axes: axes the statistics are computed over (default -1).
    feature_axes: axes ``scale``/``bias`` follow (default -1).
    epsilon: added to the variance, > 0 (default 1e-6, as flax).
    mask: optional bool array broadcastable to ``x``: which entries count in the statistics.
    dtype: output dtype (default ``x.dtype``).
    axis_name: mapped axis name(s) across which the reduced axes are sharded.
    axis_index_groups: synchronize within these groups of device indices only.
    use_fast_variance: accepted for flax compatibility: both modes compute the same exact
      one-pass statistics (flax's fast ``E[x²] − E[x]²`` loses the variance far from zero).

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: non-float ``x``, out-of-range axes, ``scale``/``bias`` of the wrong
      shape, a ``mask`` that does not broadcast, ``epsilon <= 0``, unbound ``axis_name``.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> y = jaxbn.layer_norm(jnp.array([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]), epsilon=1e-12)
    >>> y.round(3).tolist()
    [[-1.225, 0.0, 1.225], [-0.707, -0.707, 1.414]]

  References:
    Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
  """
  fn = "layer_norm"
  x, red, feat = checks.per_example_args(fn, x, reduction_axes, feature_axes, scale, bias)
  return standardize(fn, x, scale, bias, red=red, param_axes=feat, mask=mask, epsilon=epsilon,
                     dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
                     use_fast_variance=use_fast_variance)[0]


def rms_norm(
    x: ArrayLike,
    scale: Optional[ArrayLike] = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: ArrayLike = 1e-6,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
) -> jax.Array:
  r"""RMS normalization (Zhang & Sennrich, 2019): divide by the root mean square, no centering.

  .. math::
     y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}\, \gamma

  with the mean of squares over ``reduction_axes`` (default: the last axis). As flax's
  ``RMSNorm`` (no bias).

  When to use: as layer norm in transformers (LLaMA, T5 and most recent LLMs), one reduction
  instead of two and no mean to subtract. Same numerics, masks and ``axis_name`` as
  :func:`jaxbn.layer_norm`.

  Args:
    reduction_axes: axes the mean square is computed over (default -1).
    feature_axes: axes ``scale`` follows (default -1).
    epsilon: added to the mean square, > 0 (default 1e-6).

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.layer_norm`.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=1e-12).round(4).tolist()
    [[0.8485, 1.1314]]

  References:
    Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
  """
  fn = "rms_norm"
  x, red, feat = checks.per_example_args(fn, x, reduction_axes, feature_axes, scale, None)
  return standardize(fn, x, scale, None, red=red, param_axes=feat, mask=mask, epsilon=epsilon,
                     dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
                     use_fast_variance=False, center=False)[0]


fill_args(layer_norm, rms_norm)
