"""Batch-norm statistics for several domains: test-time adaptation (:func:`adapt_batch_norm`:
source statistics mixed with the target batch's, Schneider et al. 2020) and split (per-domain)
BN (:func:`split_batch_norm`: one set of statistics per domain, selected per batch or per
example). Pure arithmetic on :class:`jaxbn.BatchStats` and :class:`jaxbn.Moments`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.moments import moments
from jaxbn._core.normalize import normalize
from jaxbn._core.types import BatchStats, Moments


def source_weight(prior: ArrayLike, n: ArrayLike) -> jax.Array:
  r"""The weight of the source statistics, ``N / (N + n)`` (Schneider et al., 2020).

  Args:
    prior: the prior strength ``N >= 0`` (a pseudo sample size of the source statistics):
      0 uses the target batch only, a large ``N`` keeps the source statistics.
    n: the number of target examples.

  Returns:
    ``N / (N + n)`` in at least float32 (1 where ``N + n = 0`` and where ``N = inf``: the
    source statistics only, so ``prior=inf`` is evaluation with the running statistics).

  Example:
    >>> import jaxbn
    >>> [float(jaxbn.source_weight(p, 4)) for p in (0.0, 4.0, float("inf"))]
    [0.0, 0.5, 1.0]
  """
  dtype = jnp.promote_types(jnp.result_type(prior, n), jnp.float32)
  prior = jnp.asarray(prior, dtype)
  n = jnp.asarray(n, dtype)
  total = prior + n
  finite = (total > 0) & jnp.isfinite(prior)
  return jnp.where(finite, prior / jnp.where(finite, total, 1.0), 1.0)


def mix_stats(source: BatchStats, target: Moments, weight: ArrayLike) -> BatchStats:
  r"""Mixes running (source) statistics with a target batch's moments.

  .. math::
     \bar\mu = w\,\mu_s + (1 - w)\,\mu_t, \qquad \bar\sigma^2 = w\,\sigma^2_s + (1-w)\,\sigma^2_t

  as Schneider et al. (2020), with ``w = N / (N + n)`` (:func:`source_weight`). The variances
  are mixed as they are (no between-means term), as in the paper. Features without a valid
  target entry (``target.count == 0``) keep the source values. ``count`` is unchanged.

  Args:
    source: the running statistics.
    target: the target batch's :class:`jaxbn.Moments` (e.g. :func:`jaxbn.moments`).
    weight: ``w`` in ``[0, 1]``, scalar or per feature (may be traced).

  Returns:
    A :class:`jaxbn.BatchStats` with the dtypes of ``source``.
  """
  if not isinstance(source, BatchStats):
    raise TypeError(f"mix_stats: `source` must be a jaxbn.BatchStats, got "
                    f"{type(source).__name__}.")
  if jnp.shape(target.mean) != jnp.shape(source.mean):
    raise ValueError(f"mix_stats: `target` has feature shape {jnp.shape(target.mean)} but "
                     f"`source` has {jnp.shape(source.mean)}; compute the moments over the "
                     f"same feature axis.")
  def mix(s, t):
    work = jnp.promote_types(jnp.promote_types(s.dtype, t.dtype), jnp.float32)
    w = jnp.where(jnp.asarray(target.count) > 0, jnp.asarray(weight, work), 1.0).astype(work)
    return (w * s.astype(work) + (1.0 - w) * t.astype(work)).astype(s.dtype)

  return BatchStats(mix(source.mean, target.mean), mix(source.var, target.var), source.count)


def adapt_batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    prior: ArrayLike,
    axis=-1,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
) -> tuple[jax.Array, BatchStats]:
  r"""Test-time BN adaptation: normalize with source statistics mixed with the batch's.

  The batch's moments (over every axis but ``axis``, masked, synchronized over
  ``axis_name``: :func:`jaxbn.moments`) are mixed with ``stats`` by :func:`mix_stats` with
  weight ``N / (N + n)``, ``N = prior`` and ``n`` the number of target examples: the valid
  entries per feature divided by the entries per example per feature (``x.shape[0]`` — over
  all devices with ``axis_name`` — when unmasked). ``prior=0`` is batch norm in training mode
  without the update ("BN adapt" with target statistics only); ``prior=inf`` is evaluation
  with the running statistics. ``stats`` is not updated (adaptation is per batch). The
  gradient flows through the batch statistics (as in training).

  Args:
    x: input, float, batch axis 0.
    stats: the source (running) statistics.
    prior: ``N >= 0`` (Schneider et al. found ``N`` of 8–32 good for batch sizes up to ~64).

  Returns:
    ``(y, mixed)``: the normalized input and the mixed statistics that normalized it.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[2.0], [4.0]])               # target batch: mean 3, var 1, n = 2
    >>> y, mixed = jaxbn.adapt_batch_norm(x, jaxbn.init_stats(1), prior=2.0)
    >>> mixed.mean.tolist(), mixed.var.tolist()     # w = 2 / (2 + 2)
    ([1.5], [1.0])

  References:
    Schneider, Rusak, Eck, Bringmann, Brendel & Bethge, "Improving robustness against common
    corruptions by covariate shift adaptation", NeurIPS 2020 (arXiv:2006.16971).
  """
  fn = "adapt_batch_norm"
  x = jnp.asarray(x)
  if isinstance(prior, (int, float)) and not prior >= 0:
    raise ValueError(f"{fn}: `prior` (N) must be >= 0, got {prior!r}.")
  batch = moments(x, axis=axis, mask=mask, axis_name=axis_name,
                  axis_index_groups=axis_index_groups)
  per_example = max(x.size // max(x.shape[0], 1) // max(batch.mean.size, 1), 1)
  mixed = mix_stats(stats, batch, source_weight(prior, batch.count / per_example))
  y = normalize(x, mixed.mean, mixed.var, scale, bias, axis=axis, epsilon=epsilon, dtype=dtype)
  return y, mixed


def split_batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    domain: ArrayLike,
    training: bool,
    axis=-1,
    momentum: Optional[ArrayLike] = 0.99,
    epsilon: ArrayLike = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    dtype: Optional[DTypeLike] = None,
    use_fast_variance: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[jax.Array, BatchStats]:
  r"""Split (per-domain) batch norm: one set of statistics per domain.

  ``stats`` holds ``D`` :class:`jaxbn.BatchStats` stacked on a leading axis. With a scalar
  ``domain`` the whole batch is domain ``domain`` (may be traced): exactly
  :func:`jaxbn.batch_norm` with ``stats[domain]``, whose update is written back to that row
  only. With one domain per example (``domain`` of shape ``(N,)``, axis 0 of ``x``), each
  domain's examples are normalized with their own batch statistics (masked moments: the
  statistics of that domain only, as if each domain were a separate batch; AdvProp's
  clean/adversarial split) and every domain present updates its row; absent domains keep
  theirs. ``scale``/``bias`` are shared (shape ``(C,)``) or per domain (``(D, C)``).

  Args:
    x: input, float, batch axis 0.
    stats: stacked statistics, leaves of shape ``(D, *features)`` and count ``(D,)``.
    scale: ``γ``, ``(C,)`` or ``(D, C)``, or None.
    bias: ``β``, same shapes, or None.
    domain: int scalar or int array of shape ``(N,)`` with values in ``[0, D)``.
    skip_nonfinite: as :func:`jaxbn.batch_norm` (each domain's statistics follow its bad-data
      contract: non-finite features keep their running values; one value per feature in
      training raises).

  Returns:
    ``(y, new_stats)`` with ``new_stats`` stacked like ``stats``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> stats = jax.tree.map(lambda a: jnp.stack([a, a]), jaxbn.init_stats(1))
    >>> x = jnp.array([[0.0], [2.0], [10.0], [30.0]])
    >>> y, new = jaxbn.split_batch_norm(x, stats, domain=jnp.array([0, 0, 1, 1]),
    ...                                 training=True, momentum=0.0)
    >>> new.mean[:, 0].tolist(), y[:, 0].round(3).tolist()
    ([1.0, 20.0], [-1.0, 1.0, -1.0, 1.0])

  References:
    Chang, You, Seo, Kwak & Han, "Domain-Specific Batch Normalization for Unsupervised Domain
    Adaptation", CVPR 2019. Xie, Tan, Gong, Wang, Yuille & Le, "Adversarial Examples Improve
    Image Recognition", CVPR 2020 (AdvProp).
  """
  fn = "split_batch_norm"
  x = jnp.asarray(x)
  d = stats.mean.shape[0] if stats.mean.ndim else 0
  if not isinstance(stats, BatchStats) or stats.mean.ndim < 1 or stats.count.shape != (d,):
    raise ValueError(
        f"{fn}: `stats` must be a jaxbn.BatchStats stacked over a leading domain axis (mean "
        f"(D, C), count (D,)), e.g. jax.tree.map(lambda a: jnp.stack([a] * D), "
        f"jaxbn.init_stats(C)).")
  domain = jnp.asarray(domain)
  if not jnp.issubdtype(domain.dtype, jnp.integer) or domain.ndim not in (0, 1) or (
      domain.ndim == 1 and domain.shape[0] != x.shape[0]):
    raise ValueError(f"{fn}: `domain` must be an int scalar (the whole batch) or an int array "
                     f"of shape ({x.shape[0]},) (one domain per example on axis 0), got "
                     f"{domain.dtype} of shape {domain.shape}.")

  def pick(v, i):
    if v is None:
      return None
    v = jnp.asarray(v)
    return v[i] if v.ndim == stats.mean.ndim else v

  kw = dict(training=training, axis=axis, momentum=momentum, epsilon=epsilon,
            axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
            use_fast_variance=use_fast_variance, skip_nonfinite=skip_nonfinite)
  if domain.ndim == 0:
    row = jax.tree.map(lambda a: a[domain], stats)
    y, new = batch_norm(x, row, pick(scale, domain), pick(bias, domain), mask=mask, **kw)
    return y, jax.tree.map(lambda a, r: a.at[domain].set(r), stats, new)
  y, rows = None, []
  select = domain.reshape((-1,) + (1,) * (x.ndim - 1))
  for i in range(d):
    m = jnp.broadcast_to(select == i, x.shape)
    if mask is not None:
      m = m & jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    row = jax.tree.map(lambda a: a[i], stats)
    y_i, new_i = batch_norm(x, row, pick(scale, i), pick(bias, i), mask=m, **kw)
    y = y_i if y is None else jnp.where(select == i, y_i, y)
    rows.append(new_i)
  return y, jax.tree.map(lambda *r: jnp.stack(r), *rows)


fill_args(batch_norm, adapt_batch_norm, split_batch_norm)
