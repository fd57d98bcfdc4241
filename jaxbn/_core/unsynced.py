"""A hint for the commonest synchronization mistake: BN in ``jax.shard_map`` without ``axis_name``.

Inside ``jax.shard_map`` (with its default ``check_vma=True``) every value's type records the
mesh axes it *varies* over: a batch passed with ``in_specs=P('data')`` varies over ``'data'``,
replicated state passed with ``P()`` does not. A BN-family call in training with
``axis_name=None`` reduces over this device's shard only, so the running statistics it returns
vary over the batch's axes; returning them with ``out_specs=P()`` then fails in JAX with
"out_specs which require replication which can't be statically inferred", which does not
mention batch norm. That situation is visible at trace time, before JAX's check: a varying
``x``, statistics that do not vary over the same axes, and no ``axis_name``.

Per-device statistics are a legitimate choice (then average them, or keep one set per
device), so this is a warning, not an error, and it has an explicit way out: pass statistics
that already vary (``jax.lax.pcast(stats, 'data', to='varying')``), which says "per device"
in the program itself. Under ``jax.pmap``, ``jax.vmap``, plain ``jax.jit`` and
``shard_map(check_vma=False)`` nothing varies and nothing is reported.
"""

from __future__ import annotations

import warnings
from typing import Any

from jaxbn._core.collectives import varying_axes


class UnsyncedStatisticsWarning(UserWarning):
  """A BN-family call under ``jax.shard_map`` computed per-device statistics (no ``axis_name``)."""


def warn_if_unsynced(fn: str, x: Any, stats: Any, axis_name: Any, training: bool) -> None:
  """Warns (at ``fn``'s caller) if ``fn`` would return statistics varying over shard_map axes.

  Args:
    fn: the public function's name, for the message.
    x: the input (its traced type says which mesh axes split it).
    stats: the running statistics (``jaxbn.BatchStats``) given to ``fn``.
    axis_name: ``fn``'s ``axis_name``; nothing is checked when it is set.
    training: nothing is checked in evaluation (the statistics are returned unchanged).
  """
  if not training or axis_name is not None:
    return
  replicated = tuple(sorted(varying_axes(x) - varying_axes(stats.var)))
  if not replicated:
    return  # x not split, or statistics already per device (intended)
  name = replicated[0] if len(replicated) == 1 else replicated
  warnings.warn(UnsyncedStatisticsWarning(
      f"{fn}: `x` is split over the jax.shard_map mesh axes {replicated} but no `axis_name` "
      f"was given, so the batch statistics are this device's shard only and the returned "
      f"running statistics differ across {replicated}. Returning them with out_specs=P() "
      f"then fails with JAX's \"out_specs which require replication\" error. For the "
      f"statistics of the global batch pass axis_name={name!r}. If per-device statistics are "
      f"intended, pass stats that already vary, jax.lax.pcast(stats, {name!r}, "
      f"to='varying'), and average or keep them per device (jaxbn.parallel.average_stats).")
      , stacklevel=3)
