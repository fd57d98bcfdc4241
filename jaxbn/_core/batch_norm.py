"""Batch normalization: the functional core, with a fused closed-form derivative."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.docstrings import fill_args
from jaxbn._core.ema import update_stats
from jaxbn._core.engine import affine, standardize
from jaxbn._core.moments import accumulation_dtype, moments
from jaxbn._core.normalize import normalize, output_dtype
from jaxbn._core.types import BatchStats, Moments
from jaxbn._core.unsynced import warn_if_unsynced


def batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    training: bool,
    axis: checks.Axes = -1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    unbiased_running_var: bool = False,
    debias: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[jax.Array, BatchStats]:
  r"""Batch normalization (Ioffe & Szegedy, 2015) as a pure function of explicit state.

  .. math::
     y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  In training mode (``training=True``) the statistics ``μ_B, σ²_B`` are those of the batch —
  over every axis but ``axis``, over the valid entries of ``mask``, and over all devices of
  ``axis_name`` — and the running statistics are updated. In eval mode the running statistics
  normalize ``x`` and ``stats`` is returned unchanged (the same object).

  Numerics:
    * the statistics are :func:`jaxbn.moments`'s: accumulated in float32 (or wider) for
      bf16/fp16 input in one fused pass over ``x`` (no up-cast copy, no conditional, no
      second pass), exact for any offset of the data in both variance modes, synchronized or
      not (with ``axis_name``: one ``psum`` of ``features`` and one of ``2–3 × features``
      numbers); the output has ``x``'s dtype (or ``dtype``);
    * ``momentum`` is the weight of the *old* running value (flax/Keras/haiku). PyTorch's
      ``momentum=p`` is ``1 - p`` here (:func:`jaxbn.momentum_from_torch`); ``momentum=None``
      is a cumulative average (PyTorch's ``momentum=None``).

  Gradients: training mode differentiates through the batch statistics with a closed-form
  derivative that keeps only ``x`` and per-feature vectors for the backward pass and reduces
  ``Σdy`` and ``Σdy·x̂`` in one pass (one collective with ``axis_name``). It is defined as a
  ``jax.custom_jvp``, so ``grad``, ``jacrev``, ``jvp``, ``jacfwd`` and higher orders all use
  it. Complex input uses plain autodiff. The returned statistics are differentiable too.

  Masks: entries where ``mask`` is False are normalized with the batch statistics like the
  others (as flax), except non-finite ones, which output ``bias``. A batch with no valid
  entry gives finite outputs and leaves the running statistics unchanged; so does a feature
  that the mask leaves with a single valid entry (its variance 0 says nothing about the data).

  Bad data (the contract): where a feature's batch mean or variance is not finite (a NaN or
  Inf in ``x``, an overflow), its running statistics keep their previous values bit for bit
  and the other features update as usual (``count`` advances if any feature updated); the
  output is what the formula gives, so the NaN stays visible in ``y`` and the loss. The
  decision is a ``jnp.where`` on feature-sized vectors (no host check, no conditional, no
  extra pass over ``x``); synchronized, it uses the global statistics and is the same on
  every device. One value per feature in training (e.g. a ``(1, C)`` batch without
  ``axis_name``) raises a ``ValueError`` before anything is computed: its variance is 0.

  Differences from flax: the non-finite skip above (flax's running statistics turn NaN for
  good); the one-value error (flax returns ``bias`` and pulls the running variance to 0,
  PyTorch raises "Expected more than 1 value per channel when training").

  Args:
    x: input, float dtype, any rank >= 1.
    stats: :class:`BatchStats` with the feature shape (:func:`jaxbn.init_stats`).
    training: Python bool, static. True: batch statistics and updated running statistics.

  Returns:
    ``(y, new_stats)``: the normalized array (shape of ``x``) and the updated statistics
    (structure, shapes and dtypes of ``stats``).

  Raises:
    ValueError / TypeError: a non-float ``x``, an out-of-range ``axis``, ``stats``/``scale``/
      ``bias`` that do not match the features, a ``mask`` that does not broadcast, a momentum
      outside [0, 1], ``epsilon <= 0`` or an unbound ``axis_name`` — each naming the fix;
      ``ValueError`` for one value per feature in training (the static count over the
      reduced axes times the synchronized devices is 1).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> stats = jaxbn.init_stats(4)
    >>> y, stats = jaxbn.batch_norm(x, stats, training=True, momentum=0.9)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), int(stats.count)
    (True, 1)
    >>> y_eval, same = jaxbn.batch_norm(x, stats, training=False)
    >>> same is stats
    True

  References:
    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.
  """
  fn = "batch_norm"
  training = checks.static_bool(fn, "training", training)
  x, feat, fshape = checks.validate_bn_args(fn, x, stats, scale, bias, axis, epsilon, momentum)
  warn_if_unsynced(fn, x, stats, axis_name, training)
  out_dtype = output_dtype(x, scale, bias, dtype)
  acc = accumulation_dtype(x.dtype)
  rdt = jnp.finfo(acc).dtype
  scale_v, bias_v = (None if v is None else jnp.asarray(v).reshape(fshape) for v in (scale, bias))

  if not training:
    mean = jnp.asarray(stats.mean).astype(acc)
    inv = lax.rsqrt(jnp.asarray(stats.var).astype(rdt) + jnp.asarray(epsilon, rdt))
    return affine(x, feat, mean, inv, scale_v, bias_v, out_dtype), stats

  red = checks.reduction_axes(x.ndim, feat)
  checks.more_than_one_value(fn, x.shape, red, axis_name, axis_index_groups)
  # The running mean is the statistics' fallback shift (for a fully masked sample).
  shift = jnp.asarray(stats.mean).reshape(fshape)
  y, mean, var, count = standardize(
      fn, x, scale_v, bias_v, red=red, param_axes=feat,
      mask=mask, epsilon=epsilon, dtype=dtype, axis_name=axis_name,
      axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance, shift=shift)
  return y, update_stats(stats, Moments(mean, var, count), momentum=momentum,
                         unbiased_running_var=unbiased_running_var, debias=debias,
                         skip_nonfinite=skip_nonfinite)


fill_args((moments, normalize, update_stats), batch_norm)
