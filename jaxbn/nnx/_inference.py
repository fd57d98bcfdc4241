"""After training, for NNX models: recomputed population statistics and BN folding.

Both return a new model and leave the given one untouched. The batch-norm layers of the registry
(``jaxbn._layers.registry``) that each tool handles, in a private copy, are given a recording
``__call__`` (a subclass made for the occasion), so the model's own code runs unchanged.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

import jaxbn
# The layer level's tools: the recomputation driver (`run`,
# `current_recorder`), the jaxpr tags that find Conv/Dense -> BN pairs (`mark`,
# `marked_pairs`, `trailing_axes`); the core's axis check and feature reshape.
from jaxbn._layers import fold_tags as _fold
from jaxbn._layers.fold_tags import FoldPair
from jaxbn._layers import recompute
from jaxbn._core.checks import feature_axes
from jaxbn._core.normalize import to_keepdims
from jaxbn.nnx._common import Layer, flax_axes, output_dtype, promote_dtype, treatment

Path = tuple
PathLike = Union[str, Sequence[Any]]


def _kernel_axes(node: Any):
  """'trailing' for layers whose kernel ends with the output features, (-2,) or None."""
  if isinstance(node, nnx.ConvTranspose):
    return (-2,) if node.transpose_kernel else "trailing"
  if isinstance(node, (nnx.Conv, nnx.Linear, nnx.LinearGeneral)):
    return "trailing"
  return None


def _get(root: Any, path: Path) -> Any:
  node = root
  for key in path:
    if isinstance(key, str) and hasattr(node, key):
      node = getattr(node, key)
    else:
      node = node[key]
  return node


def _set(root: Any, path: Path, value: Any) -> None:
  parent = _get(root, path[:-1])
  key = path[-1]
  if isinstance(key, str) and hasattr(parent, key):
    setattr(parent, key, value)
  else:
    parent[key] = value


def _as_path(fn: str, model: Any, path: Any) -> Path:
  if isinstance(path, nnx.Module):
    for p, node in nnx.iter_graph(model):
      if node is path:
        return tuple(p)
    raise ValueError(f"{fn}: the module {type(path).__name__} given in `pairs` is not part of "
                     f"`model`.")
  if isinstance(path, str):
    return tuple(int(p) if p.isdigit() else p for p in path.split("/") if p)
  if isinstance(path, (tuple, list)):
    return tuple(path)
  raise TypeError(f"{fn}: a module path must be a tuple such as ('blocks', 0, 'conv'), a "
                  f"string 'blocks/0/conv' or the module itself, got {path!r}.")


def _swap_classes(model: Any, choose: Callable[[Path, Any], Optional[dict]]) -> None:
  """Gives every module ``m`` of ``model`` with ``choose(path, m)`` a subclass with those
  methods. Used on private copies only; ``object.__setattr__`` keeps NNX's bookkeeping out."""
  for path, node in list(nnx.iter_graph(model)):
    methods = choose(tuple(path), node)
    if methods is None:
      continue
    cls = type(node)
    sub = type(cls)(f"{cls.__name__}", (cls,), dict(methods, __module__=cls.__module__,
                                                      __qualname__=cls.__qualname__))
    object.__setattr__(node, "__class__", sub)


def _forward(fn: str, forward: Optional[Callable]) -> Callable:
  if forward is None:
    return lambda model, batch: model(batch)
  if not callable(forward):
    raise TypeError(f"{fn}: `forward` must be a function (model, batch) -> output, got "
                    f"{type(forward).__name__}.")
  return forward


# --------------------------------------------------------------------------------------------
# Recomputed statistics.
# --------------------------------------------------------------------------------------------


def _recording_methods(path: Path, node: Any) -> Optional[dict]:
  if treatment("jaxbn.nnx.recompute_batch_stats", node, path).recompute != "population":
    return None
  cls = type(node)

  def __call__(self, x, use_running_average=None, *, mask=None, **layer_kwargs):
    rec = recompute.current_recorder()
    if rec is None:  # used outside a recomputation: behave as the layer itself
      return cls.__call__(self, x, use_running_average, mask=mask, **layer_kwargs)
    # A renorm layer's r_max/d_max do not apply: the recorder normalizes as batch norm.
    x = jnp.asarray(x)
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    out_dtype = output_dtype(getattr(self, "promote_dtype", promote_dtype),
                             (x, self.mean[...], self.var[...], scale, bias), self.dtype)
    return rec(path, x, axis=flax_axes(self.axis, x.ndim), epsilon=self.epsilon, scale=scale,
               bias=bias, mask=mask, axis_name=self.axis_name,
               axis_index_groups=self.axis_index_groups,
               out_dtype=out_dtype, unbiased=getattr(self, "unbiased_running_var", False))

  return {"__call__": __call__}


def recompute_batch_stats(
    model: nnx.Module,
    batches: Iterable,
    *,
    forward: Optional[Callable[[nnx.Module, Any], Any]] = None,
    mode: str = "train",
    num_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    mesh: Any = None,
    batch_spec: Any = None,
) -> nnx.Module:
  """A copy of ``model`` whose BatchNorm layers hold exact population statistics.

  Runs the model with frozen weights (in eval mode: dropout off) over ``batches`` and sets
  each BatchNorm layer's ``mean`` and ``var`` to the exact mean and biased variance of its
  input over all the data — count-weighted across batches of different sizes and masks,
  and over all devices of ``mesh``. See :func:`jaxbn.recompute_stats` for the two modes
  (``"train"``: layer inputs as in training, one pass; ``"sequential"``: layer inputs as at
  inference, one pass per layer). The layers that train on batch statistics (kind ``trains``
  of ``jaxbn._layers.registry``: ``jaxbn.nnx.BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``,
  ``flax.nnx.BatchNorm``...; see :func:`register_batch_norm`) and ``TestTimeBatchNorm`` (its
  source statistics) normalize with the statistics of the whole batch (so also renorm and
  ghost layers, without their corrections); ``mask=`` and ``unbiased_running_var`` are
  honoured. A ``FrozenBatchNorm``, and the layers whose eval is not batch norm's (kind
  ``running``: ``SplitBatchNorm``, ``EvoNormB0``, ``BatchChannelNorm``), keep their statistics
  and run as themselves (in eval mode).

  Args:
    model: the trained model. Not modified.
    batches: an iterable of batches (re-iterable for ``mode="sequential"``).
    forward: ``forward(model, batch)`` running the model, e.g.
      ``lambda m, b: m(b["image"])``; default ``model(batch)``.
    mode: ``"train"`` (default) or ``"sequential"``.
    num_batches: use at most this many batches.
    progress: tqdm progress bar: None (default) on a terminal only, True, False.
    mesh: a ``jax.sharding.Mesh`` to run under ``jax.shard_map`` (needed when the layers use
      ``axis_name``).
    batch_spec: ``PartitionSpec`` of the batch arrays (default: leading axis over all mesh
      axes).

  Returns:
    A new model (same class and structure, in the train/eval mode ``model`` was in) with the
    recomputed statistics; features that never had a valid entry keep their values.

  Raises:
    ValueError: no batch, no BatchNorm layer, or an ``axis_name`` that needs ``mesh``.
    TypeError: a module with batch statistics that is not registered.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> batches = [jax.random.normal(jax.random.key(i), (16, 2)) for i in range(3)]
    >>> new = jaxbn.nnx.recompute_batch_stats(model, batches, progress=False)
    >>> h = jnp.concatenate([model.layers[0](b) for b in batches])
    >>> bool(jnp.allclose(new.layers[1].mean[...], h.mean(0), atol=1e-5))
    True
    >>> float(model.layers[1].mean[...].sum())   # the input model is unchanged
    0.0
  """
  fn = "jaxbn.nnx.recompute_batch_stats"
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{fn}: `model` must be an nnx.Module, got {type(model).__name__}.")
  run_forward = _forward(fn, forward)
  work = nnx.clone(model)
  work.eval()
  _swap_classes(work, _recording_methods)
  graphdef, state = nnx.split(work)

  def trace(state, batch, rec):
    return run_forward(nnx.merge(graphdef, state), batch)

  def check_layers(layers):
    for key, info in layers.items():
      shape = tuple(_get(model, key).mean.shape)
      if shape != info.feature_shape:
        raise ValueError(
            f"{fn}: the BatchNorm layer at {key} normalizes features of shape "
            f"{info.feature_shape} but stores statistics of shape {shape}: layers inside "
            f"nnx.scan/nnx.vmap (stacked statistics) are not supported.")

  layers, accs = recompute.run(fn, trace, state, batches, mode=mode, num_batches=num_batches,
                             progress=progress, mesh=mesh, batch_spec=batch_spec,
                             check_layers=check_layers)
  out = nnx.clone(model)
  for key, info in layers.items():
    bn = _get(out, key)
    bn.mean[...], bn.var[...], _ = recompute.result(accs, info, (bn.mean[...], bn.var[...]))
  return out


# --------------------------------------------------------------------------------------------
# Folding.
# --------------------------------------------------------------------------------------------


class FoldedBatchNorm(Layer):
  """What remains of a BatchNorm folded into the layer before it: ``y = x + bias``.

  Created by :func:`fold_batch_norm_layers`. It takes BatchNorm's call arguments (and ignores
  ``use_running_average`` and ``mask``) and answers ``model.eval()``/``nnx.view`` like one.

  Args:
    bias: the folded offset ``β - μ·k``, feature shape.
    axis: the feature axis or axes of the input (the BatchNorm's ``axis``).
    dtype: output dtype (default: promoted from ``x`` and ``bias``, as BatchNorm's).

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> jaxbn.nnx.FoldedBatchNorm(jnp.array([1.0, 2.0]))(jnp.zeros((1, 2))).tolist()
    [[1.0, 2.0]]
  """

  def __init__(self, bias: jax.typing.ArrayLike, *, axis: Any = -1,
               dtype: Optional[Any] = None):
    self.bias = nnx.Param(jnp.asarray(bias))
    self.axis = axis
    self.dtype = dtype
    self.use_running_average = True

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None, **ignored: Any) -> jax.Array:
    """Returns ``x + bias`` (``bias`` broadcast along the feature axes; the other arguments,
    those of the batch norm this replaces, are ignored)."""
    del use_running_average, mask, ignored
    x = jnp.asarray(x)
    bias = self.bias[...]
    feat = feature_axes("jaxbn.nnx.FoldedBatchNorm", x.ndim, flax_axes(self.axis, x.ndim))
    out_dtype = self.dtype or jnp.result_type(x, bias)
    return (x + to_keepdims(bias, x.shape, feat)).astype(out_dtype)



_FINDING = threading.local()


def _marking_methods(path: Path, node: Any) -> Optional[dict]:
  cls = type(node)
  def bn_call(self, x, *args, **kwargs):  # tags the BatchNorm's input
    log = _FINDING.log
    x = jnp.asarray(x)
    log["dst"].append((path, float(self.epsilon),
                       _fold.trailing_axes("jaxbn.nnx.find_conv_bn_pairs", x.ndim,
                                           flax_axes(self.axis, x.ndim))))
    return cls.__call__(self, _fold.mark(x, "dst", len(log["dst"]) - 1), *args, **kwargs)

  def layer_call(self, *args, **kwargs):  # tags the Conv/Linear output
    log = _FINDING.log
    y = cls.__call__(self, *args, **kwargs)
    if not isinstance(y, jax.Array):
      return y
    log["src"].append((path, kind))
    return _fold.mark(y, "src", len(log["src"]) - 1)

  if treatment("jaxbn.nnx.find_conv_bn_pairs", node, path).fold:
    return {"__call__": bn_call}
  kind = _kernel_axes(node)
  return None if kind is None else {"__call__": layer_call}


def find_conv_bn_pairs(model: nnx.Module, *args: Any,
                       forward: Optional[Callable[..., Any]] = None) -> list[FoldPair]:
  """Finds the Conv/Linear -> batch norm pairs of an NNX model that can be folded.

  Traces the model once (``jax.make_jaxpr``, nothing runs) with every ``nnx.Conv``,
  ``nnx.ConvTranspose``, ``nnx.Linear`` and ``nnx.LinearGeneral`` output and the input of every
  batch norm whose eval is a per-feature affine map tagged (kinds ``trains`` and ``frozen`` of
  ``jaxbn._layers.registry``; not ``TestTimeBatchNorm``, whose statistics depend on the batch,
  nor the ``running`` kind, e.g. ``SplitBatchNorm``), and keeps the pairs where a layer's output
  goes straight into a BatchNorm and nowhere else, each module is called once, and the BatchNorm
  normalizes the trailing (channel) axes. Pairs inside loops or branches (``nnx.scan``,
  ``cond``) are not reported.

  Args:
    model: the model (not modified; it is traced in eval mode).
    *args: an example input (shapes matter, values don't).
    forward: ``forward(model, *args)``; default ``model(*args)``.

  Returns:
    A list of :class:`FoldPair` (graph paths) in the order of the BatchNorm calls.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> jaxbn.nnx.find_conv_bn_pairs(model, jnp.ones((1, 8, 8, 3)))
    [FoldPair(layer=('layers', 0), bn=('layers', 1), epsilon=1e-05, kernel_axes=(-1,))]
  """
  fn = "jaxbn.nnx.find_conv_bn_pairs"
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{fn}: `model` must be an nnx.Module, got {type(model).__name__}.")
  run_forward = (lambda m, *a: m(*a)) if forward is None else forward
  work = nnx.clone(model)
  work.eval()
  _swap_classes(work, _marking_methods)
  graphdef, state = nnx.split(work)
  log = {"src": [], "dst": []}
  _FINDING.log = log
  try:
    jaxpr = jax.make_jaxpr(lambda s: run_forward(nnx.merge(graphdef, s), *args))(state)
  finally:
    _FINDING.log = None
  return _fold.found_pairs(jaxpr, log["src"], log["dst"])


def fold_batch_norm_layers(model: nnx.Module,
                           pairs: Sequence[Union[FoldPair, tuple]]) -> nnx.Module:
  r"""A copy of ``model`` with eval-mode batch norms folded into the layers feeding them.

  For each pair, with ``k = γ/√(σ²+ε)`` (see :func:`jaxbn.fold_batch_norm`, which folds one
  kernel), the layer's ``kernel`` (and ``bias``, if any) is multiplied by ``k`` along its
  output features and the batch norm is replaced by a :class:`FoldedBatchNorm` adding
  ``β - μ·k``. The result computes the same eval-mode function with one normalization pass
  less per pair; it is an inference model (folded layers ignore ``use_running_average``).

  Args:
    model: the model (not modified).
    pairs: :class:`FoldPair` from :func:`find_conv_bn_pairs`, or ``(layer, bn)`` tuples
      of graph paths (``('blocks', 0, 'conv')`` or ``'blocks/0/conv'``) or of the modules
      themselves.

  Returns:
    The folded model.

  Raises:
    ValueError: a path that is not a batch norm / a layer with a ``kernel``, a layer or
      batch norm listed twice, or features that do not match.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)))
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    >>> pairs = jaxbn.nnx.find_conv_bn_pairs(model, x)
    >>> fast = jaxbn.nnx.fold_batch_norm_layers(model, pairs)
    >>> type(fast.layers[1]).__name__, bool(jnp.allclose(fast(x), model(x), atol=1e-5))
    ('FoldedBatchNorm', True)
  """
  fn = "jaxbn.nnx.fold_batch_norm_layers"
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{fn}: `model` must be an nnx.Module, got {type(model).__name__}.")
  resolved = []
  for pair in pairs:
    if isinstance(pair, FoldPair):
      layer, bn, eps = pair.layer, pair.bn, pair.epsilon
      kaxes = None if pair.kernel_axes is None else tuple(pair.kernel_axes)
    else:
      try:
        layer, bn = pair
      except (TypeError, ValueError):
        raise TypeError(f"{fn}: each pair must be a FoldPair or a (layer, bn) tuple, got "
                        f"{pair!r}.") from None
      eps = kaxes = None
    resolved.append((_as_path(fn, model, layer), _as_path(fn, model, bn), eps, kaxes))
  out = nnx.clone(model)
  seen = set()
  for layer, bn, eps, kaxes in resolved:
    if ("l", layer) in seen or ("b", bn) in seen:
      raise ValueError(f"{fn}: the pair ({layer}, {bn}) reuses a layer or batch norm of an "
                       f"earlier pair; each layer and each batch norm folds once.")
    seen.update({("l", layer), ("b", bn)})
    try:
      lin, norm = _get(out, layer), _get(out, bn)
    except (AttributeError, KeyError, IndexError, TypeError):
      raise ValueError(f"{fn}: no module at {layer} or {bn} in `model`.") from None
    if not treatment(fn, norm, bn).fold:
      raise ValueError(f"{fn}: the module at {bn} is a {type(norm).__name__}, not a batch norm "
                       f"whose eval is an affine map (already folded?).")
    if getattr(lin, "kernel", None) is None:
      raise ValueError(f"{fn}: the module at {layer} ({type(lin).__name__}) has no `kernel`.")
    eps = norm.epsilon if eps is None else eps
    stats = jaxbn.BatchStats(norm.mean[...], norm.var[...], jnp.zeros((), jnp.int32))
    scale = None if norm.scale is None else norm.scale[...]
    beta = None if norm.bias is None else norm.bias[...]
    if kaxes is None:
      kind = _kernel_axes(lin)
      kaxes = (-2,) if kind == (-2,) else tuple(range(-stats.mean.ndim, 0))
    k, c = jaxbn.eval_affine(stats, scale, beta, epsilon=eps)
    try:
      lin.kernel[...], _ = jaxbn.fold_batch_norm(lin.kernel[...], None, stats, scale, None,
                                                 epsilon=eps, axis=kaxes)
    except ValueError as e:
      raise ValueError(f"{fn}: cannot fold {bn} into {layer}: {e}") from None
    if getattr(lin, "bias", None) is not None:
      b = lin.bias[...]
      lin.bias[...] = (b.astype(k.dtype) * k).astype(b.dtype)
    bias_dtype = jnp.float32 if beta is None else beta.dtype
    _set(out, bn, FoldedBatchNorm(c.astype(bias_dtype), axis=norm.axis, dtype=norm.dtype))
  return out


def fold_batch_norm(model: nnx.Module,
                    pairs: Optional[Sequence[Union[FoldPair, tuple]]] = None,
                    *example_args: Any) -> nnx.Module:
  """Deprecated name of :func:`fold_batch_norm_layers` (``jaxbn.fold_batch_norm`` folds arrays).

  Args:
    model: see :func:`fold_batch_norm_layers`.
    pairs: see :func:`fold_batch_norm_layers`; None: found with :func:`find_conv_bn_pairs`
      on ``example_args``.
    *example_args: an example input, when ``pairs`` is None.

  Returns:
    The folded model.
  """
  warnings.warn("jaxbn.nnx.fold_batch_norm is deprecated and will be removed in the next "
                "release; use jaxbn.nnx.fold_batch_norm_layers(model, "
                "jaxbn.nnx.find_conv_bn_pairs(model, x)).", DeprecationWarning, stacklevel=2)
  if pairs is None:
    if not example_args:
      raise ValueError("jaxbn.nnx.fold_batch_norm: pass `pairs`, or an example input after "
                       "it (fold_batch_norm(model, None, x)) to find them.")
    pairs = find_conv_bn_pairs(model, *example_args)
  return fold_batch_norm_layers(model, pairs)


__all__ = ["FoldPair", "FoldedBatchNorm", "find_conv_bn_pairs", "fold_batch_norm",
           "fold_batch_norm_layers", "recompute_batch_stats"]
