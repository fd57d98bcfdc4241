"""After training, for NNX models: recomputed population statistics and BN folding.

Both return a new model and leave the given one untouched. The batch-norm layers of the registry
(``jaxbn._layers.registry``) that each tool handles, in a private copy, are given a recording
``__call__`` (a subclass made for the occasion), so the model's own code runs unchanged.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn._layers import fold_tags as _fold
from jaxbn._layers import recompute
from jaxbn._layers.fold_tags import FoldPair
from jaxbn._layers.docs import FOUND_PAIRS, RECOMPUTED, RUN_ARGS, fill_doc
from jaxbn.nnx._common import Layer, output_dtype, promote_dtype, treatment

Path = tuple


_kernel_axes = functools.partial(_fold.kernel_axes, transpose=nnx.ConvTranspose,
                                 plain=(nnx.Conv, nnx.Linear, nnx.LinearGeneral))


def _get(root: Any, path: Path) -> Any:
  node = root
  for key in path:
    node = getattr(node, key) if isinstance(key, str) and hasattr(node, key) else node[key]
  return node


def _set(root: Any, path: Path, value: Any) -> None:
  parent, key = _get(root, path[:-1]), path[-1]
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
    return rec.flax_call(path, self, x, scale, bias, mask, out_dtype)

  return {"__call__": __call__}


@fill_doc(recomputed=RECOMPUTED, run_args=RUN_ARGS, fw="nnx")
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

  Runs the model in eval mode (dropout off), with frozen weights, over ``batches`` and
  {recomputed}

  Args:
    model: the trained model. Not modified.
    batches: an iterable of batches (re-iterable for ``mode="sequential"``).
    forward: ``forward(model, batch)`` running the model, e.g.
      ``lambda m, b: m(b["image"])``; default ``model(batch)``.
    {run_args}

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
  if forward is not None and not callable(forward):
    raise TypeError(f"{fn}: `forward` must be a function (model, batch) -> output, got "
                    f"{type(forward).__name__}.")
  run_forward = (lambda m, batch: m(batch)) if forward is None else forward
  work = nnx.clone(model)
  work.eval()
  _swap_classes(work, _recording_methods)
  graphdef, state = nnx.split(work)

  def trace(state, batch, rec):
    return run_forward(nnx.merge(graphdef, state), batch)

  def check_layers(layers):
    for key, info in layers.items():
      recompute.check_stats_shape(fn, f"at {key}", info.feature_shape,
                                  tuple(_get(model, key).mean.shape), "nnx")

  layers, accs = recompute.run(fn, trace, state, batches, mode=mode, num_batches=num_batches,
                             progress=progress, mesh=mesh, batch_spec=batch_spec,
                             check_layers=check_layers)
  out = nnx.clone(model)
  for key, info in layers.items():
    bn = _get(out, key)
    bn.mean[...], bn.var[...], _ = recompute.result(accs, info, (bn.mean[...], bn.var[...]))
  return out


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
    return _fold.add_folded_bias("jaxbn.nnx.FoldedBatchNorm", x, bias, self.axis,
                                   self.dtype or jnp.result_type(x, bias))


def _marking_methods(srcs: list, dsts: list, path: Path, node: Any) -> Optional[dict]:
  cls = type(node)
  def bn_call(self, x, *args, **kwargs):  # tags the BatchNorm's input
    x = _fold.mark_bn_input("jaxbn.nnx.find_conv_bn_pairs", dsts, path, self, jnp.asarray(x))
    return cls.__call__(self, x, *args, **kwargs)

  def layer_call(self, *args, **kwargs):  # tags the Conv/Linear output
    return _fold.mark_layer_output(srcs, path, kind, cls.__call__(self, *args, **kwargs))

  if treatment("jaxbn.nnx.find_conv_bn_pairs", node, path).fold:
    return {"__call__": bn_call}
  kind = _kernel_axes(node)
  return None if kind is None else {"__call__": layer_call}


@fill_doc(found_pairs=FOUND_PAIRS)
def find_conv_bn_pairs(model: nnx.Module, *args: Any,
                       forward: Optional[Callable[..., Any]] = None) -> list[FoldPair]:
  """Finds the Conv/Linear -> batch norm pairs of an NNX model that can be folded.

  Traces the model once (``jax.make_jaxpr``, nothing runs) with every ``nnx.Conv``,
  ``nnx.ConvTranspose``, ``nnx.Linear`` and ``nnx.LinearGeneral`` output and
  {found_pairs}
  Pairs inside loops or branches (``nnx.scan``, ``cond``) are not reported.

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
  srcs: list = []
  dsts: list = []
  _swap_classes(work, functools.partial(_marking_methods, srcs, dsts))
  graphdef, state = nnx.split(work)
  jaxpr = jax.make_jaxpr(lambda s: run_forward(nnx.merge(graphdef, s), *args))(state)
  return _fold.found_pairs(jaxpr, srcs, dsts)


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
  out = nnx.clone(model)
  as_path = functools.partial(_as_path, fn, model)
  for layer, bn, eps, kaxes in _fold.unpack_pairs(fn, pairs, as_path, "(layer, bn)"):
    try:
      lin, norm = _get(out, layer), _get(out, bn)
    except (AttributeError, KeyError, IndexError, TypeError):
      raise ValueError(f"{fn}: no module at {layer} or {bn} in `model`.") from None
    if not treatment(fn, norm, bn).fold:
      raise ValueError(f"{fn}: the module at {bn} is a {type(norm).__name__}, not a batch norm "
                       f"whose eval is an affine map (already folded?).")
    if getattr(lin, "kernel", None) is None:
      raise ValueError(f"{fn}: the module at {layer} ({type(lin).__name__}) has no `kernel`.")
    scale = None if norm.scale is None else norm.scale[...]
    beta = None if norm.bias is None else norm.bias[...]
    has_bias = getattr(lin, "bias", None) is not None
    if kaxes is None and _kernel_axes(lin) == (-2,):
      kaxes = (-2,)
    lin.kernel[...], layer_bias, c = _fold.fold_pair(
        fn, (layer, bn), lin.kernel[...], lin.bias[...] if has_bias else None, norm.mean[...],
        norm.var[...], scale, beta, epsilon=norm.epsilon if eps is None else eps,
        kernel_axes=kaxes)
    if has_bias:
      lin.bias[...] = layer_bias
    _set(out, bn, FoldedBatchNorm(c, axis=norm.axis, dtype=norm.dtype))
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
