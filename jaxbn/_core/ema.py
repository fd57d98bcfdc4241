"""Running-statistics updates: exponential moving average or cumulative average."""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._core import checks
from jaxbn._core.types import BatchStats, Moments


def momentum_from_torch(torch_momentum: Optional[float]) -> Optional[float]:
  """Converts a PyTorch ``momentum`` (weight of the *new* value) to jaxbn's (weight of the old).

  PyTorch updates ``running = (1 - p) * running + p * batch`` (default ``p = 0.1``); jaxbn,
  flax, Keras and haiku update ``running = m * running + (1 - m) * batch``. So ``m = 1 - p``.
  ``None`` (PyTorch's cumulative average) stays ``None``.

  Example:
    >>> import jaxbn
    >>> jaxbn.momentum_from_torch(0.1)
    0.9
  """
  if torch_momentum is None:
    return None
  p = float(torch_momentum)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"momentum_from_torch: `torch_momentum` must be in [0, 1], got {p}.")
  return round(1.0 - p, 12)


def select(pred: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.where(pred, a, b)`` for feature vectors that may be sharded differently.

  Under ``jax.jit`` with explicit mesh axes a select refuses operands of different shardings
  (e.g. replicated running statistics and batch moments sharded along the feature axis);
  adding zeros of the combined sharding first (exact) makes them agree.
  """
  z = jnp.zeros_like(a) + jnp.zeros_like(b) + jnp.zeros_like(pred, jnp.result_type(a, b))
  return jnp.where(pred | (z != 0), a + z, b + z)


def updated_features(batch: Moments, *, skip_nonfinite: bool = True) -> jax.Array:
  """Which features a batch updates (bool, feature shape): more than one valid entry and,
  with ``skip_nonfinite``, a finite mean and variance (see :func:`update_stats`)."""
  valid = jnp.asarray(batch.count) > 1
  if skip_nonfinite:
    valid = valid & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
  return valid


def update_stats(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: Optional[ArrayLike] = 0.99,
    unbiased_running_var: bool = False,
    debias: bool = False,
    skip_nonfinite: bool = True,
) -> BatchStats:
  r"""Folds one batch's moments into the running statistics.

  .. math::
     \text{new} = m \cdot \text{old} + (1 - m) \cdot \text{batch}

  ``momentum`` is the weight of the *old* value (flax, Keras, haiku); PyTorch's is the weight
  of the new value (use :func:`momentum_from_torch`). ``momentum=None`` gives the cumulative
  average over all updates, ``m = count / (count + 1)`` (PyTorch's ``momentum=None``).

  Bad batches never corrupt the statistics. A feature keeps its running mean and variance
  (bit for bit) when its batch

  * had at most one valid entry (``batch.count <= 1``: an empty or fully masked batch, or a
    mask that leaves a single value, whose variance 0 says nothing about the data), or
  * has a non-finite mean or variance (a NaN or Inf in the data, or an overflow), with
    ``skip_nonfinite=True`` (the default).

  The other features update as usual. ``count`` is a scalar: it advances by 1 when *any*
  feature updated (so with ``momentum=None`` or ``debias`` a feature that skipped a batch
  uses the weights of the common count afterwards). The decision is a ``jnp.where`` on the
  feature-sized vectors: no host check, no conditional, the same under ``jit``; with
  moments synchronized over devices it is the same on every device.

  Args:
    stats: the current :class:`BatchStats`.
    batch: the batch :class:`Moments` (feature shape matching ``stats``).
    momentum: weight of the old value in [0, 1] (flax convention; may be traced), or None
      for a cumulative average; 1 keeps the running values (only ``count`` advances).
    unbiased_running_var: fold in ``var * n / (n - 1)`` (PyTorch's running variance) instead
      of the biased batch variance (flax's).
    debias: zero-debiased average (as Adam and haiku): the stored value is
      ``h_t / (1 - m^t)`` for the hidden average ``h_t = m h_{t-1} + (1 - m) b_t`` started at
      zero, so early statistics are not pulled toward the initial values (mean 0, var 1). It
      is applied as a weight of the old value ``m (1 - m^{t-1}) / (1 - m^t)``, which is 0 at
      the first update: the first batch replaces the initial values, mean and variance alike.
      Ignored with ``momentum=None`` (a cumulative average is unbiased already).
    skip_nonfinite: True (default): a feature whose batch mean or variance is not finite
      keeps its running values. False: flax's behaviour, the NaN/Inf enters the running
      statistics (and stays there).

  Returns:
    New :class:`BatchStats` with the structure, shapes and dtypes of ``stats``.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> stats = jaxbn.init_stats(1)
    >>> batch = jaxbn.Moments(jnp.array([2.0]), jnp.array([3.0]), jnp.array([4.0]))
    >>> new = jaxbn.update_stats(stats, batch, momentum=0.9)
    >>> new.mean.tolist(), new.var.tolist(), int(new.count)
    ([0.2...], [1.2...], 1)
  """
  fn = "update_stats"
  checks.momentum_value(fn, momentum)
  if not isinstance(stats, BatchStats):
    raise TypeError(f"{fn}: `stats` must be a jaxbn.BatchStats (see jaxbn.init_stats), got "
                    f"{type(stats).__name__}.")
  if jnp.shape(batch.mean) != jnp.shape(stats.mean):
    raise ValueError(
        f"{fn}: batch moments have feature shape {jnp.shape(batch.mean)} but `stats.mean` has "
        f"shape {jnp.shape(stats.mean)}; create the stats with init_stats of the feature shape.")
  dtype = stats.mean.dtype
  # The weights in the statistics' precision (at least float32): float64 statistics get
  # float64 weights (momentum 0.9 is not rounded to float32's 0.8999999762).
  wdt = jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)
  n = jnp.asarray(batch.count, wdt)
  valid = updated_features(batch, skip_nonfinite=skip_nonfinite)
  var = batch.var
  if unbiased_running_var:
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  if momentum is None:
    w_new = 1.0 / (stats.count.astype(wdt) + 1.0)
  elif debias:
    w_old = jnp.asarray(momentum, wdt)
    t = stats.count.astype(wdt) + 1.0
    debiased = w_old * (1.0 - w_old ** (t - 1.0)) / jnp.maximum(1.0 - w_old ** t, 1e-30)
    w_new = 1.0 - jnp.where(w_old >= 1.0, 1.0, debiased)  # momentum 1: frozen
  elif isinstance(momentum, numbers.Number):
    # 1 − m in double precision on the host, as flax does: float32(1 − 0.99) is 0.01 to
    # 6e-8, where 1 − float32(0.99) is 0.00999999 (1e-6 off).
    w_new = jnp.asarray(1.0 - float(momentum), wdt)
  else:
    w_new = 1.0 - jnp.asarray(momentum, wdt)

  def blend(old, new):
    if jnp.iscomplexobj(new) and not jnp.iscomplexobj(old):
      raise TypeError(
          f"{fn}: the batch statistics are complex but `stats` are {old.dtype}; create them "
          f"with init_stats(..., dtype=jnp.complex64) for complex input.")
    work = jnp.promote_types(old.dtype, jnp.float32)
    # A feature that does not update gets weight 0 for the new value (arithmetic, so that
    # operands sharded differently still combine); skipping a non-finite value also needs a
    # select, as 0 * NaN is NaN (skip_nonfinite=False lets it through, as flax does).
    # (1 − w)·old + w·new, as flax: exact at both ends (momentum 0 stores the batch value;
    # old + w·(new − old) rounds new − old, e.g. 2.4e-4 off for a variance of 1e-4 from 1).
    w = jnp.where(valid, w_new, 0.0).astype(work)
    out = (1.0 - w) * old.astype(work) + w * new.astype(work)
    if skip_nonfinite:
      out = select(valid, out, old.astype(work))
    return out.astype(old.dtype)

  return BatchStats(
      mean=blend(stats.mean, batch.mean),
      var=blend(stats.var, var),
      count=(stats.count + jnp.any(valid).astype(stats.count.dtype)).astype(stats.count.dtype),
  )
