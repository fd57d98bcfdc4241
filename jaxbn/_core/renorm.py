"""Batch renormalization (Ioffe, 2017): batch statistics corrected toward the running ones."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.ema import select, update_stats, updated_features
from jaxbn._core.moments import accumulation_dtype
from jaxbn._core.engine import standardize
from jaxbn._core.types import BatchStats, Moments
from jaxbn._core.unsynced import warn_if_unsynced


def _concrete(v: Any) -> Optional[float]:
  return None if v is None or isinstance(v, jax.core.Tracer) else float(v)


def _check_clipping(fn: str, r_max: Any, d_max: Any, r_min: Any) -> None:
  """Validates concrete clipping bounds (traced values are accepted unchecked)."""
  for name, v in (("r_max", r_max), ("d_max", d_max), ("r_min", r_min)):
    if v is None or isinstance(v, jax.core.Tracer):
      continue
    if jnp.ndim(v) != 0 or np.asarray(v).dtype.kind not in "iuf":
      raise ValueError(f"{fn}: `{name}` must be a scalar (a float or a 0-d array), got "
                       f"{np.asarray(v).dtype} of shape {jnp.shape(v)}.")
  rmax, dmax, rmin = _concrete(r_max), _concrete(d_max), _concrete(r_min)
  if rmax is not None and not rmax >= 1.0:
    raise ValueError(
        f"{fn}: `r_max` must be >= 1 (r is clipped to [1/r_max, r_max]; r_max=1 gives plain "
        f"batch norm's r = 1), got {rmax}.")
  if dmax is not None and not dmax >= 0.0:
    raise ValueError(
        f"{fn}: `d_max` must be >= 0 (d is clipped to [-d_max, d_max]; d_max=0 gives plain "
        f"batch norm's d = 0), got {dmax}.")
  if rmin is not None and not (0.0 <= rmin and (rmax is None or rmin <= rmax)):
    raise ValueError(
        f"{fn}: `r_min` must be in [0, r_max] (r_max={r_max!r}), got {rmin}; leave it None "
        f"for the paper's 1/r_max.")


def _update_running_std(stats: BatchStats, batch: Moments, *, epsilon, momentum,
                        unbiased_running_var: bool, debias: bool,
                        skip_nonfinite: bool) -> BatchStats:
  r"""The paper's (and Keras's) rule: a moving average of ``σ_B = sqrt(var_B + ε)``.

  The average ``σ`` is stored as the variance ``max(σ² − ε, 0)``, so that inference with
  ``sqrt(var + ε)`` divides by exactly ``σ`` and the stats stay a :class:`BatchStats`.
  """
  work = jnp.promote_types(stats.var.dtype, jnp.float32)
  eps = jnp.asarray(epsilon, work)
  n = jnp.asarray(batch.count, work)
  var_b = batch.var.astype(work)
  if unbiased_running_var:
    var_b = var_b * n / jnp.maximum(n - 1.0, 1.0)
  std_stats = BatchStats(stats.mean, jnp.sqrt(stats.var.astype(work) + eps), stats.count)
  upd = update_stats(std_stats, Moments(batch.mean, jnp.sqrt(var_b + eps), batch.count),
                     momentum=momentum, debias=debias, skip_nonfinite=skip_nonfinite)
  new_var = jnp.maximum(jnp.square(upd.var) - eps, 0.0)
  # Features that did not update keep their variance bit for bit (not σ² − ε rounded).
  keep = ~updated_features(batch, skip_nonfinite=skip_nonfinite)
  new_var = select(keep, stats.var.astype(work), new_var).astype(stats.var.dtype)
  return BatchStats(upd.mean, new_var, upd.count)


def batch_renorm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    training: bool,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    r_min: Optional[ArrayLike] = None,
    axis: checks.Axes = -1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    running_std: bool = False,
    unbiased_running_var: bool = False,
    debias: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[jax.Array, BatchStats]:
  r"""Batch renormalization (Ioffe, 2017) as a pure function of explicit state.

  .. math::
     \sigma = \sqrt{\sigma^2_{run} + \epsilon}, \quad
     r = \operatorname{clip}_{[r_{min}, r_{max}]}\Big(\frac{\sqrt{\sigma_B^2 + \epsilon}}
         {\sigma}\Big), \quad
     d = \operatorname{clip}_{[-d_{max}, d_{max}]}\Big(\frac{\mu_B - \mu_{run}}{\sigma}\Big)

  .. math::
     y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta

  with ``r`` and ``d`` held constant in the gradient (``stop_gradient``), and the gradient
  flowing through the batch statistics as in batch norm. Without clipping, ``y`` equals the
  inference output ``γ (x − μ_run)/σ + β``: training sees the normalization inference will
  use, while the gradient still comes from the batch. With ``r_max=1, d_max=0`` it is
  exactly :func:`jaxbn.batch_norm`. ``training=False`` is batch norm's inference with the
  running statistics.

  When to use: batches too small or not i.i.d. for batch norm's statistics (a few examples
  per device, detection/segmentation, correlated samples, RL), when you want to keep batch
  norm's inference cost and checkpoint layout (the state is a plain :class:`BatchStats`, so a
  BN checkpoint loads as is). Start with ``r_max=1, d_max=0`` and relax them
  (:func:`jaxbn.renorm_schedule`), as in the paper. If batches are tiny *and* you do not
  need running statistics, :func:`jaxbn.group_norm` avoids the batch altogether.

  Running statistics: the mean and variance are updated as in :func:`jaxbn.batch_norm` (the
  same options, masks, empty batches and bad-data contract), and the *same* running
  statistics give ``r``, ``d`` and the inference output (the paper uses one set).
  ``running_std=True`` averages the standard deviation ``sqrt(var_B + ε)`` instead of the
  variance, as the paper's algorithm and Keras do, storing ``var = σ² − ε``.

  ``r_max``, ``d_max`` and ``r_min`` may be traced values (e.g. ``jnp`` scalars passed through
  ``jax.jit``), so a schedule ramps them without recompiling.

  Differences from Keras 3 ``BatchNormalization(renorm=True)``: Keras keeps a second pair of
  averages for ``r`` and ``d`` with its own ``renorm_momentum``; with
  ``renorm_momentum == momentum`` both pairs coincide and ``running_std=True`` reproduces
  Keras (its ``moving_stddev`` starts at ``sqrt(1)``, i.e. ``var = 1 − ε`` here). Keras's
  missing clipping keys mean no clipping (``r_max=inf``, ``r_min=0``, ``d_max=inf`` here);
  jaxbn's default ``r_min`` is the paper's ``1/r_max``.

  Args:
    x: input, float dtype (not complex), any rank >= 1.
    training: Python bool, static. True: renormalized batch statistics and updated running
      statistics; False: running statistics, ``stats`` returned unchanged.
    r_max: upper clip of ``r``, >= 1 (default 3, the paper's final value). May be traced.
    d_max: clip of ``|d|``, >= 0 (default 5, the paper's final value). May be traced.
    r_min: lower clip of ``r`` (default ``1 / r_max``). May be traced.
    running_std: average ``sqrt(var_B + ε)`` (paper, Keras) instead of ``var_B`` (BN).

  Returns:
    ``(y, new_stats)``: the output (shape of ``x``, dtype ``dtype`` or ``x.dtype``) and the
    updated statistics (structure, shapes and dtypes of ``stats``).

  Raises:
    ValueError / TypeError: as :func:`jaxbn.batch_norm`; also ``r_max < 1``, ``d_max < 0``,
      ``r_min`` outside ``[0, r_max]``, non-scalar bounds, or complex input.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 1
    >>> stats = jaxbn.init_stats(3)
    >>> y, stats = jaxbn.batch_renorm(x, stats, training=True, r_max=1.0, d_max=0.0)
    >>> y_bn, _ = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True)
    >>> bool(jnp.allclose(y, y_bn, atol=1e-5))       # r_max=1, d_max=0: plain BN
    True
    >>> r_max, d_max = jaxbn.renorm_schedule(30_000)  # the paper's ramp, as traced arrays
    >>> round(float(r_max), 3), round(float(d_max), 3)
    (2.429, 5.0)
    >>> y, stats = jaxbn.batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max)

  References:
    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017.
  """
  fn = "batch_renorm"
  training = checks.static_bool(fn, "training", training)
  x, feat, fshape = checks.validate_bn_args(fn, x, stats, scale, bias, axis, epsilon, momentum)
  warn_if_unsynced(fn, x, stats, axis_name, training)
  if jnp.iscomplexobj(x):
    raise TypeError(f"{fn}: complex input is not supported (r and d are real ratios); use "
                    f"jaxbn.batch_norm for complex data.")
  _check_clipping(fn, r_max, d_max, r_min)
  if not training:
    return batch_norm(x, stats, scale, bias, training=False, axis=axis, epsilon=epsilon,
                      dtype=dtype)

  checks.mask_broadcasts(fn, mask, x.shape)
  red = checks.reduction_axes(x.ndim, feat)
  checks.more_than_one_value(fn, x.shape, red, axis_name, axis_index_groups)
  acc = accumulation_dtype(x.dtype)
  sg = lax.stop_gradient
  r_hi = sg(jnp.asarray(r_max, acc))
  correction = (sg(stats.mean.astype(acc)).reshape(fshape),
                sg(stats.var.astype(acc)).reshape(fshape),
                sg(1.0 / r_hi if r_min is None else jnp.asarray(r_min, acc)), r_hi,
                sg(jnp.asarray(d_max, acc)))
  y, mean, var, count = standardize(
      fn, x, scale, bias, red=red, param_axes=feat,
      mask=mask, epsilon=epsilon, dtype=dtype, axis_name=axis_name,
      axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
      correction=correction, shift=None if use_fast_variance else correction[0])
  update = (functools.partial(_update_running_std, epsilon=jnp.asarray(epsilon, jnp.float32))
            if running_std else update_stats)
  return y, update(stats, Moments(sg(mean), sg(var), count), momentum=momentum,
                   unbiased_running_var=unbiased_running_var, debias=debias,
                   skip_nonfinite=skip_nonfinite)


def renorm_schedule(
    step: ArrayLike,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5_000,
    r_max_steps: int = 40_000,
    d_max_steps: int = 25_000,
) -> tuple[jax.Array, jax.Array]:
  r"""The paper's warm-up schedule for batch renorm's clipping bounds, as traced values.

  Plain batch norm (``r_max = 1``, ``d_max = 0``) for the first ``warmup_steps``, then linear
  ramps that reach ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps`` and stay
  there:

  .. math::
     r_{max}(t) = 1 + (r_{max} - 1)\,\operatorname{clip}\Big(\frac{t - t_0}{t_r - t_0}, 0,
     1\Big), \qquad
     d_{max}(t) = d_{max}\,\operatorname{clip}\Big(\frac{t - t_0}{t_d - t_0}, 0, 1\Big)

  The defaults are Ioffe (2017)'s ImageNet values (5k steps of BN, ``r_max = 3`` at 40k,
  ``d_max = 5`` at 25k); scale them to your run length. ``step`` may be traced (e.g. an
  optimizer step counter inside ``jax.jit``): pass the results as ``r_max``/``d_max`` to
  :func:`jaxbn.batch_renorm` and nothing recompiles as they change.

  Args:
    step: current training step (int or scalar array, may be traced).
    r_max: final ``r_max`` (>= 1).
    d_max: final ``d_max`` (>= 0).
    warmup_steps: steps of plain batch norm before the ramps start.
    r_max_steps: step at which ``r_max`` is reached (> ``warmup_steps``).
    d_max_steps: step at which ``d_max`` is reached (> ``warmup_steps``).

  Returns:
    ``(r_max_t, d_max_t)``, float32 scalars.

  Raises:
    ValueError: final bounds out of range, or a ramp that ends before it starts.

  Example:
    >>> import jaxbn
    >>> [tuple(round(float(v), 2) for v in jaxbn.renorm_schedule(t))
    ...  for t in (0, 5_000, 15_000, 25_000, 40_000, 90_000)]
    [(1.0, 0.0), (1.0, 0.0), (1.57, 2.5), (2.14, 5.0), (3.0, 5.0), (3.0, 5.0)]
  """
  fn = "renorm_schedule"
  _check_clipping(fn, r_max, d_max, None)
  for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
    if not end > warmup_steps:
      raise ValueError(
          f"{fn}: `{name}`={end} must be greater than `warmup_steps`={warmup_steps} (the "
          f"ramp starts after the warm-up and ends at `{name}`).")
  t = jnp.asarray(step, jnp.float32)

  def ramp(end):
    return jnp.clip((t - warmup_steps) / float(end - warmup_steps), 0.0, 1.0)

  return (1.0 + (float(r_max) - 1.0) * ramp(r_max_steps),
          float(d_max) * ramp(d_max_steps))


fill_args(batch_norm, batch_renorm)
