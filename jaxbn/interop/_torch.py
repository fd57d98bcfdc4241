"""PyTorch interop: ``torch.nn.BatchNorm*d`` state dicts to jaxbn statistics and back.

This module never imports torch. It reads anything array-like: numpy arrays, JAX arrays and
torch tensors (converted with ``.detach().cpu().numpy()``), and writes numpy arrays, which
``torch.from_numpy`` or ``module.load_state_dict`` accept.

Conventions (PyTorch -> jaxbn):

============================  ======================================  =========================
PyTorch                       meaning                                 jaxbn
============================  ======================================  =========================
``weight``, ``bias``          ``γ``, ``β``                            ``scale``, ``bias``
``running_mean``              EMA of batch means                      ``BatchStats.mean``
``running_var``               EMA of *unbiased* batch variances       ``BatchStats.var`` (as is,
                                                                      or ``batch_count=`` to
                                                                      convert)
``num_batches_tracked``       int64 number of updates                 ``BatchStats.count`` int32
``momentum=p`` (0.1)          weight of the *new* value               ``momentum=1-p`` (0.9)
``momentum=None``             cumulative average                      ``momentum=None``
``eps`` (1e-5)                                                        ``epsilon``
input ``NCHW``                channels on axis 1                      ``axis=1`` (or transpose
                                                                      to NHWC, ``axis=-1``)
conv ``weight`` ``OIHW``                                              kernel ``HWIO``
============================  ======================================  =========================
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core.types import BatchStats


class BatchNormVariables(NamedTuple):
  """The statistics and affine parameters of one BN layer.

  Attributes:
    stats: the running statistics (:class:`~jaxbn.BatchStats`).
    scale: ``γ`` (feature shape), or None for a layer without affine parameters.
    bias: ``β`` (feature shape), or None.
  """

  stats: BatchStats
  scale: Optional[jax.Array]
  bias: Optional[jax.Array]


def _numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/JAX array or a torch tensor (duck-typed, no torch import)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _state_dict(fn: str, source: Any) -> Mapping[str, Any]:
  if hasattr(source, "state_dict") and callable(source.state_dict):
    return source.state_dict()
  if isinstance(source, Mapping):
    return source
  raise TypeError(f"{fn}: `source` must be a state dict (a mapping of names to tensors or "
                  f"arrays) or a torch module, got {type(source).__name__}.")


def _prefix(prefix: str) -> str:
  return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _check_count(fn: str, batch_count: Optional[float]) -> None:
  if batch_count is not None and not float(batch_count) > 1:
    raise ValueError(
        f"{fn}: `batch_count` is the number of entries per feature in a training batch (N for "
        f"BatchNorm1d on (N, C), N*H*W for BatchNorm2d) and must be > 1, got {batch_count!r}.")


def from_torch_batch_norm(
    source: Any,
    prefix: str = "",
    *,
    batch_count: Optional[float] = None,
    dtype: DTypeLike = jnp.float32,
) -> BatchNormVariables:
  r"""Imports a ``torch.nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) state dict.

  PyTorch's ``running_var`` averages *unbiased* batch variances ``σ²_B·n/(n-1)`` while flax
  and jaxbn (by default) average biased ones. By default the stored value is copied as is,
  so that eval outputs equal PyTorch's; to continue training in jaxbn with PyTorch's exact
  update rule use ``unbiased_running_var=True`` and ``momentum=1 - p``. With
  ``batch_count=n`` (entries per feature in a training batch) the variance is converted to
  the biased convention, ``var·(n-1)/n``.

  Args:
    source: a state dict (mapping of names to torch tensors or arrays) or the torch module.
    prefix: the layer's name in the state dict (e.g. ``"layer1.0.bn1"``), "" for the layer's
      own state dict.
    batch_count: optional entries per feature per training batch, to convert the variance.
    dtype: dtype of the statistics and parameters (default float32).

  Returns:
    :class:`BatchNormVariables` ``(stats, scale, bias)``; ``scale``/``bias`` are None for a
    layer built with ``affine=False``.

  Raises:
    ValueError: the state dict lacks ``running_mean``/``running_var`` (a layer built with
      ``track_running_stats=False``), or a bad ``batch_count``.

  Example:
    >>> import numpy as np, jaxbn
    >>> sd = {"running_mean": np.array([1.0, 2.0]), "running_var": np.array([4.0, 9.0]),
    ...       "weight": np.ones(2), "bias": np.zeros(2), "num_batches_tracked": np.array(7)}
    >>> stats, scale, bias = jaxbn.interop.from_torch_batch_norm(sd)
    >>> stats.var.tolist(), int(stats.count)
    ([4.0, 9.0], 7)
  """
  fn = "from_torch_batch_norm"
  _check_count(fn, batch_count)
  sd = _state_dict(fn, source)
  p = _prefix(prefix)
  if p + "running_mean" not in sd or p + "running_var" not in sd:
    found = sorted(k for k in sd if k.startswith(p))[:8]
    raise ValueError(
        f"{fn}: no '{p}running_mean'/'{p}running_var' in the state dict (keys with that "
        f"prefix: {found}). Check `prefix`; a PyTorch layer built with "
        f"track_running_stats=False has no running statistics (it always normalizes with "
        f"batch statistics).")
  mean = _numpy(sd[p + "running_mean"]).astype(np.float64)
  var = _numpy(sd[p + "running_var"]).astype(np.float64)
  if batch_count is not None:
    n = float(batch_count)
    var = var * (n - 1.0) / n
  count = _numpy(sd.get(p + "num_batches_tracked", np.array(0))).astype(np.int64)
  as_jax = lambda v: None if v is None else jnp.asarray(_numpy(v).astype(np.float64), dtype)
  stats = BatchStats(jnp.asarray(mean, dtype), jnp.asarray(var, dtype),
                     jnp.asarray(np.clip(count, 0, np.iinfo(np.int32).max), jnp.int32))
  return BatchNormVariables(stats, as_jax(sd.get(p + "weight")), as_jax(sd.get(p + "bias")))


def to_torch_batch_norm(
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    prefix: str = "",
    batch_count: Optional[float] = None,
) -> dict[str, np.ndarray]:
  """Exports jaxbn statistics and parameters as a ``torch.nn.BatchNorm*d`` state dict.

  The inverse of :func:`from_torch_batch_norm`: the variance is written as is by default
  (eval outputs match), or converted from the biased to PyTorch's unbiased convention,
  ``var·n/(n-1)``, with ``batch_count=n``.

  Args:
    stats: the running statistics.
    scale: ``γ``, or None (then no ``weight`` entry: load into ``affine=False``).
    bias: ``β``, or None (then no ``bias`` entry).
    prefix: prepended to every key (e.g. ``"layer1.0.bn1"``).
    batch_count: optional entries per feature per training batch, to convert the variance.

  Returns:
    A dict of numpy arrays: ``running_mean``, ``running_var`` (float32),
    ``num_batches_tracked`` (int64 scalar), and ``weight``/``bias`` when given. Load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

  Example:
    >>> import jaxbn
    >>> sd = jaxbn.interop.to_torch_batch_norm(jaxbn.init_stats(2), prefix="bn1")
    >>> sorted(sd), sd["bn1.num_batches_tracked"].dtype
    (['bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var'], dtype('int64'))
  """
  fn = "to_torch_batch_norm"
  _check_count(fn, batch_count)
  if not isinstance(stats, BatchStats):
    raise TypeError(f"{fn}: `stats` must be a jaxbn.BatchStats, got {type(stats).__name__}.")
  p = _prefix(prefix)
  var = np.asarray(stats.var, np.float64)
  if batch_count is not None:
    n = float(batch_count)
    var = var * n / (n - 1.0)
  # Fresh, writable arrays: torch.from_numpy warns about read-only views of JAX arrays.
  out = {
      p + "running_mean": np.array(stats.mean, np.float32),
      p + "running_var": var.astype(np.float32),
      p + "num_batches_tracked": np.array(stats.count, np.int64).reshape(()),
  }
  for key, v in (("weight", scale), ("bias", bias)):
    if v is not None:
      out[p + key] = np.array(v, np.float32)
  return out


def torch_batch_norm_config(module: Any, *, functional: bool = False) -> dict[str, Any]:
  """jaxbn keyword arguments that reproduce a ``torch.nn.BatchNorm*d`` module's behaviour.

  Two forms, for the two places the options go:

  * ``functional=False`` (default): the Flax layers' fields,
    ``jaxbn.linen.BatchNorm(**torch_batch_norm_config(m))`` (``jaxbn.nnx.BatchNorm`` too).
  * ``functional=True``: the keyword arguments of the functional core,
    ``jaxbn.batch_norm(x, stats, scale, bias, training=..., **torch_batch_norm_config(m,
    functional=True))`` (also :func:`jaxbn.batch_renorm`, :func:`jaxbn.ghost_batch_norm`).
    There the affine parameters are arguments, not options: pass the ``scale``/``bias``
    that :func:`from_torch_batch_norm` returns (None for ``affine=False``).

  Args:
    module: a torch BatchNorm module (read through its ``momentum``, ``eps``, ``affine`` and
      ``track_running_stats`` attributes).
    functional: return the functional core's keyword arguments instead of the layers'.

  Returns:
    ``{"momentum": 1 - p (None stays None), "epsilon": eps, "axis": 1,
    "unbiased_running_var": True, "use_scale": affine, "use_bias": affine}``; without
    ``use_scale``/``use_bias`` when ``functional=True``. ``axis=1`` is PyTorch's
    channels-first layout; use ``axis=-1`` after transposing the input to channels-last.

  Raises:
    ValueError: the module was built with ``track_running_stats=False``.

  Example:
    >>> import types, jax.numpy as jnp, jaxbn
    >>> bn = types.SimpleNamespace(momentum=0.1, eps=1e-5, affine=True,
    ...                            track_running_stats=True)
    >>> jaxbn.interop.torch_batch_norm_config(bn)["momentum"]
    0.9
    >>> options = jaxbn.interop.torch_batch_norm_config(bn, functional=True)
    >>> sorted(options)
    ['axis', 'epsilon', 'momentum', 'unbiased_running_var']
    >>> y, stats = jaxbn.batch_norm(jnp.ones((2, 3, 4, 4)), jaxbn.init_stats(3),
    ...                             training=True, **options)
  """
  fn = "torch_batch_norm_config"
  if not getattr(module, "track_running_stats", True):
    raise ValueError(
        f"{fn}: the module was built with track_running_stats=False: it normalizes with batch "
        f"statistics in eval mode too; call jaxbn.batch_norm(..., training=True) instead.")
  p = module.momentum
  config = {
      "momentum": None if p is None else round(1.0 - float(p), 12),
      "epsilon": float(module.eps),
      "axis": 1,
      "unbiased_running_var": True,
  }
  if not functional:
    affine = bool(getattr(module, "affine", True))
    config.update(use_scale=affine, use_bias=affine)
  return config


def _rank2(fn: str, value: Any, what: str, layout: str) -> np.ndarray:
  a = _numpy(value)
  if a.ndim < 2:
    raise ValueError(f"{fn}: expected a {what} of rank >= 2 ({layout}), got shape {a.shape}.")
  return a


def kernel_from_torch(weight: Any) -> np.ndarray:
  """A PyTorch conv/linear weight in flax's layout: ``(O, I, *k)`` -> ``(*k, I, O)``.

  ``Conv2d`` ``OIHW`` becomes ``HWIO`` (grouped and depthwise convolutions too: ``I`` is
  ``in/groups`` in both), ``Conv1d``/``Conv3d`` likewise, and ``Linear`` ``(out, in)``
  becomes ``(in, out)``.

  Example:
    >>> import numpy as np, jaxbn
    >>> jaxbn.interop.kernel_from_torch(np.zeros((8, 3, 5, 7))).shape
    (5, 7, 3, 8)
  """
  w = _rank2("kernel_from_torch", weight, "weight", "(out, in, *kernel)")
  return np.ascontiguousarray(np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)))


def kernel_to_torch(kernel: Any) -> np.ndarray:
  """A flax conv/dense kernel in PyTorch's layout: ``(*k, I, O)`` -> ``(O, I, *k)``.

  Example:
    >>> import numpy as np, jaxbn
    >>> jaxbn.interop.kernel_to_torch(np.zeros((5, 7, 3, 8))).shape
    (8, 3, 5, 7)
  """
  k = _rank2("kernel_to_torch", kernel, "kernel", "(*kernel, in, out)")
  nd = k.ndim
  return np.ascontiguousarray(np.transpose(k, (nd - 1, nd - 2) + tuple(range(nd - 2))))


__all__ = [
    "BatchNormVariables", "from_torch_batch_norm", "to_torch_batch_norm",
    "torch_batch_norm_config", "kernel_from_torch", "kernel_to_torch",
]
