"""Running-statistics updates: exponential moving average or cumulative average."""

from __future__ import annotations

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
    raise ValueError(
        f"momentum_from_torch: `torch_momentum` must be in [0, 1], got {p}.")
  return round(1.0 - p, 12)


def update_stats(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: Optional[ArrayLike] = 0.99,
    unbiased_running_var: bool = False,
    debias: bool = False,
) -> BatchStats:
  r"""Folds one batch's moments into the running statistics.

  .. math::
     \text{new} = m \cdot \text{old} + (1 - m) \cdot \text{batch}

  ``momentum`` is the weight of the *old* value (flax, Keras, haiku); PyTorch's is the weight
  of the new value (use :func:`momentum_from_torch`). ``momentum=None`` gives the cumulative
  average over all updates, ``m = count / (count + 1)`` (PyTorch's ``momentum=None``).

  Features whose batch had no valid entry (``batch.count == 0``) keep their running values,
  and ``count`` only advances when some feature had a valid entry, so empty or fully masked
  batches never corrupt the statistics.

  Args:
    stats: the current :class:`BatchStats`.
    batch: the batch :class:`Moments` (feature shape matching ``stats``).
    momentum: float in [0, 1] (may be traced), or None for a cumulative average; 1 keeps
      the running values (only ``count`` advances).
    unbiased_running_var: fold in ``var * n / (n - 1)`` (PyTorch's running variance) instead
      of the biased batch variance (flax's).
    debias: zero-debiased average (as Adam and haiku): the stored value is
      ``h_t / (1 - m^t)`` for the hidden average ``h_t = m h_{t-1} + (1 - m) b_t`` started at
      zero, so early statistics are not pulled toward the initial values (mean 0, var 1). It
      is applied as a weight of the old value ``m (1 - m^{t-1}) / (1 - m^t)``, which is 0 at
      the first update: the first batch replaces the initial values, mean and variance alike.
      Ignored with ``momentum=None`` (a cumulative average is unbiased already).

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
  valid = n > 0
  var = batch.var
  if unbiased_running_var:
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  if momentum is None:
    k = stats.count.astype(wdt)
    w_new = 1.0 / (k + 1.0)
  elif debias:
    w_old = jnp.asarray(momentum, wdt)
    t = stats.count.astype(wdt) + 1.0
    debiased = w_old * (1.0 - w_old ** (t - 1.0)) / jnp.maximum(1.0 - w_old ** t, 1e-30)
    w_new = 1.0 - jnp.where(w_old >= 1.0, 1.0, debiased)  # momentum 1: frozen
  elif checks.is_number(momentum):
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
    # A feature without valid entries keeps its old value: its weight of the new value is 0
    # (arithmetic rather than a select, so that operands sharded differently still combine).
    w = jnp.where(valid, w_new, 0.0).astype(work)
    return (old.astype(work) + w * (new.astype(work) - old.astype(work))).astype(old.dtype)

  return BatchStats(
      mean=blend(stats.mean, batch.mean),
      var=blend(stats.var, var),
      count=(stats.count + jnp.any(valid).astype(stats.count.dtype)).astype(stats.count.dtype),
  )
