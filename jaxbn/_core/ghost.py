"""Ghost (virtual) batch normalization (Hoffer et al., 2017): BN over slices of the batch."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.ema import update_stats
from jaxbn._core.engine import standardize
from jaxbn._core.moments import barrier, block_values
from jaxbn._core.types import BatchStats, Moments
from jaxbn._core.unsynced import warn_if_unsynced

_RULES = ("average", "sequential")


def _check_layout(fn: str, x: jax.Array, batch_axis: int, ghosts: int, size: int) -> None:
  """Under ``jax.jit`` on an explicitly sharded batch, virtual batches must not span devices."""
  sharding = collectives.explicit_sharding(x)
  if sharding is None:
    return
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  shards = int(np.prod([sharding.mesh.shape[n] for n in collectives.names(spec[batch_axis])]))
  if ghosts % shards:
    raise ValueError(
        f"{fn}: the batch axis is sharded over {shards} devices but cut into {ghosts} "
        f"virtual batches of {size}; virtual batches must not span devices. Use a "
        f"`virtual_batch_size` that divides the per-device batch of "
        f"{x.shape[batch_axis] // shards}.")


def _merge_ghost_moments(mean, var, count, axis_name, groups, unbiased):
  """Pools per-virtual-batch moments ``(G, *features)`` into one update (count-weighted).

  Mean: the mean of the valid entries of the virtual batches that have more than one;
  variance: the count-weighted mean of their variances (pooled within-batch variance;
  unbiased: ``Σ n_l v_l / Σ (n_l − 1)``). A virtual batch with at most one valid entry (a
  fully masked one, or a single value whose variance 0 says nothing) is left out, as an empty
  batch is in :func:`jaxbn.update_stats`. With ``axis_name`` the sums run over all devices
  (one psum).
  """
  used = count > 1
  n_l = jnp.where(used, count, 0.0)
  dof = jnp.where(used, count - 1.0, 0.0) if unbiased else n_l
  n, s1, s2, d = collectives.psum_stacked(
      [jnp.sum(n_l, 0), jnp.sum(jnp.where(used, count * mean, 0.0), 0),
       jnp.sum(jnp.where(used, count * var, 0.0), 0), jnp.sum(dof, 0)], axis_name, groups)
  return Moments(s1 / jnp.maximum(n, 1.0), s2 / jnp.maximum(d, 1.0), n)


def ghost_batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    training: bool,
    virtual_batch_size: int,
    batch_axis: int = 0,
    axis: checks.Axes = -1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    stats_update: str = "average",
    unbiased_running_var: bool = False,
    debias: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[jax.Array, BatchStats]:
  r"""Ghost batch normalization (Hoffer et al., 2017): BN statistics per virtual batch.

  The batch (axis ``batch_axis`` of the per-device ``x``) is cut into ``G = B /
  virtual_batch_size`` consecutive virtual batches, and each is normalized with its own
  statistics (over its examples and every other non-feature axis), exactly as
  :func:`jaxbn.batch_norm` would normalize it alone:

  .. math::
     y_i = \gamma\, \frac{x_i - \mu_{g(i)}}{\sqrt{\sigma^2_{g(i)} + \epsilon}} + \beta

  Gradients are batch norm's closed form within each virtual batch. Inference
  (``training=False``) normalizes with the running statistics, like batch norm, whatever the
  batch size.

  When to use: large-batch training where full-batch statistics regularize too little
  (Hoffer et al. recover small-batch generalization with virtual batches of 32–128), or to
  keep the statistics of a fixed, small batch size while the per-device batch grows (TabNet
  uses it for tabular data). Virtual batches never span devices — under ``jax.shard_map`` /
  ``jax.pmap`` they cut each device's batch, and under plain ``jax.jit`` on a batch sharded
  with explicit mesh axes ``virtual_batch_size`` must divide the per-device batch (checked);
  to normalize over *more* than one device's batch use :func:`jaxbn.batch_norm` with
  ``axis_name``.

  Running statistics, ``stats_update="average"`` (default): one update per call, with the
  mean of all valid entries and the count-weighted mean of the virtual-batch variances (the
  variance each example was normalized with). ``count`` advances by 1 and ``momentum`` has
  the same meaning per training step as in batch norm, so BN and ghost BN checkpoints are
  interchangeable. ``stats_update="sequential"``: the paper's rule (and TabNet's/fastai's),
  one update per virtual batch in order, as if they were consecutive batches; the running
  statistics then move ``G`` times per call (``count`` advances by ``G``).

  With ``axis_name`` only the running-statistics update is synchronized (all devices keep the
  same running statistics; for ``"sequential"`` the ``l``-th virtual batches of all devices
  are merged); the normalization itself stays per virtual batch and per device, so no
  collective is needed in the gradient.

  The batch size must be a multiple of ``virtual_batch_size`` (an error says otherwise):
  drop or pad the last batch of an epoch, or pass a padding ``mask`` (masked entries do not
  count in the statistics; a virtual batch with at most one valid entry is skipped in the
  update, as an empty batch is).

  Bad data: as :func:`jaxbn.batch_norm`, a feature whose pooled statistics (``"average"``)
  or whose virtual batch's statistics (``"sequential"``) are not finite keeps its running
  values unless ``skip_nonfinite=False``; training with one value per feature *per virtual
  batch* (``virtual_batch_size`` times the other reduced axes is 1) raises a ``ValueError``.

  Args:
    x: input, float dtype, rank >= 2.
    virtual_batch_size: examples per virtual batch (static int > 0 dividing the batch).
    batch_axis: the axis cut into virtual batches (default 0); not a feature axis.
    axis_name: mapped axis name(s) over which the running-statistics update is averaged.
    axis_index_groups: average within these groups of device indices only.
    stats_update: ``"average"`` (one update per call) or ``"sequential"`` (one per virtual
      batch, the paper's rule).
    unbiased_running_var: fold in unbiased variances (pooled ``Σ n_l v_l / Σ (n_l − 1)`` for
      ``"average"``; ``v_l n_l/(n_l − 1)`` per virtual batch for ``"sequential"``).

  Returns:
    ``(y, new_stats)`` as :func:`jaxbn.batch_norm`.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.batch_norm`; also a batch size that is not a
      multiple of ``virtual_batch_size``, a bad ``virtual_batch_size``/``batch_axis``, an
      unknown ``stats_update``, or one value per feature per virtual batch in training.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> y, stats = jaxbn.ghost_batch_norm(x, jaxbn.init_stats(3), training=True,
    ...                                   virtual_batch_size=4)
    >>> y_first, _ = jaxbn.batch_norm(x[:4], jaxbn.init_stats(3), training=True)
    >>> bool(jnp.allclose(y[:4], y_first, atol=1e-5))   # each half normalized alone
    True
    >>> y_eval, _ = jaxbn.ghost_batch_norm(x[:3], stats, training=False,
    ...                                    virtual_batch_size=4)   # any size at inference

  References:
    Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization
    gap in large batch training of neural networks", NeurIPS 2017.
  """
  fn = "ghost_batch_norm"
  training = checks.static_bool(fn, "training", training)
  x, feat, fshape = checks.validate_bn_args(fn, x, stats, scale, bias, axis, epsilon, momentum)
  warn_if_unsynced(fn, x, stats, axis_name, training)
  if stats_update not in _RULES:
    raise ValueError(f"{fn}: `stats_update` must be one of {_RULES}, got {stats_update!r}.")
  if (isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int)
      or virtual_batch_size <= 0):
    raise ValueError(f"{fn}: `virtual_batch_size` must be a positive Python int (it sets "
                     f"shapes), got {virtual_batch_size!r}.")
  if not isinstance(batch_axis, int) or not -x.ndim <= batch_axis < x.ndim:
    raise ValueError(f"{fn}: `batch_axis`={batch_axis!r} is out of range for `x` of rank "
                     f"{x.ndim}.")
  ba = batch_axis % x.ndim
  if ba in feat:
    raise ValueError(f"{fn}: `batch_axis`={batch_axis} is also a feature axis (`axis`="
                     f"{axis!r}); the virtual batches are cut along a non-feature axis.")
  if not training:
    return batch_norm(x, stats, scale, bias, training=False, axis=axis, epsilon=epsilon,
                      dtype=dtype)

  size = x.shape[ba]
  if size % virtual_batch_size:
    fits = max(d for d in range(1, min(size, virtual_batch_size) + 1) if size % d == 0)
    raise ValueError(
        f"{fn}: the batch axis {batch_axis} of `x` has {size} entries, not a multiple of "
        f"`virtual_batch_size`={virtual_batch_size}. Use a virtual_batch_size that divides "
        f"the per-device batch (e.g. {fits}), drop the last incomplete batch, or pad it and "
        f"pass a `mask` that excludes the padding.")
  checks.mask_broadcasts(fn, mask, x.shape)
  vshape = tuple(virtual_batch_size if a == ba else d for a, d in enumerate(x.shape))
  checks.more_than_one_value(fn, vshape, checks.reduction_axes(x.ndim, feat), axis_name,
                             axis_index_groups, virtual_batch=True)
  ghosts = size // virtual_batch_size

  _check_layout(fn, x, ba, ghosts, virtual_batch_size)
  # Statistics per virtual batch and feature: per example over the other non-feature axes,
  # then summed over each block of `virtual_batch_size` examples (on x's own layout).
  sfeat = tuple(sorted((ba,) + feat))
  grouping = (sfeat.index(ba), ghosts)
  # Shift: the running mean, for every virtual batch (block-shaped: `ghosts` on the batch axis).
  bshape = tuple(ghosts if a == ba else x.shape[a] for a in sfeat)
  shift = None if use_fast_variance else lax.broadcast_in_dim(
      jnp.asarray(stats.mean).reshape(fshape), bshape, tuple(sfeat.index(a) for a in feat))
  y, mean, var, count = standardize(
      fn, x, scale, bias, red=checks.reduction_axes(x.ndim, sfeat), param_axes=feat,
      mask=mask, epsilon=epsilon, dtype=dtype, axis_name=None, axis_index_groups=None,
      use_fast_variance=use_fast_variance, grouping=grouping, shift=shift)
  # Per-virtual-batch moments with the G axis first: (G, *features). The barrier keeps XLA
  # from fusing the pooling below back into the reductions over x.
  mean, var, count = barrier(*(
      lax.stop_gradient(jnp.moveaxis(block_values(v, grouping), grouping[0], 0))
      for v in (mean, var, count)))
  groups = None if axis_index_groups is None else [list(g) for g in axis_index_groups]

  if stats_update == "average":
    batch = _merge_ghost_moments(mean, var, count, axis_name, groups, unbiased_running_var)
    return y, update_stats(stats, batch, momentum=momentum, debias=debias,
                           skip_nonfinite=skip_nonfinite)

  if axis_name is not None:  # merge the l-th virtual batches of all devices
    sums = collectives.psum(jnp.stack([count, count * mean, count * var]), axis_name, groups)
    count = sums[0]
    mean, var = (sums[i] / jnp.maximum(count, 1.0) for i in (1, 2))

  def step(carry, moments):
    return update_stats(carry, Moments(*moments), momentum=momentum,
                        unbiased_running_var=unbiased_running_var, debias=debias,
                        skip_nonfinite=skip_nonfinite), None

  moments = (mean, var, count)
  if any(collectives.explicit_sharding(v) is not None for v in moments):
    # (plain jit on a sharded batch) the scan cannot split its axis: the (G, C) values whole
    moments = jax.sharding.reshard(moments, jax.P())
  new_stats, _ = lax.scan(step, stats, moments)
  return y, new_stats


fill_args(batch_norm, ghost_batch_norm)
