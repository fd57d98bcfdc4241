"""After training, for Linen models: recomputed population statistics and BN folding.

Both work on an unchanged model definition by intercepting, with ``nn.intercept_methods``, the
layers that the one registry (``jaxbn._layers.registry``) says each tool handles.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict, freeze, unfreeze

from jaxbn._layers import fold_tags as _fold
from jaxbn._layers import recompute
from jaxbn._layers.fold_tags import FoldPair
from jaxbn._layers.docs import FOUND_PAIRS, RECOMPUTED, RUN_ARGS, fill_doc
from jaxbn.linen._common import result_dtype, treatment

Path = tuple[str, ...]
PathLike = Union[str, Sequence[str]]


def _apply(fn: str, apply_fn: Any) -> Callable:
  if isinstance(apply_fn, nn.Module):
    return apply_fn.apply
  if not callable(apply_fn):
    raise TypeError(f"{fn}: `apply_fn` must be a function of (variables, ...) such as "
                    f"`lambda v, x: model.apply(v, x, train=False)`, or a linen Module, got "
                    f"{type(apply_fn).__name__}.")
  return apply_fn


def _as_path(fn: str, path: PathLike) -> Path:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  if isinstance(path, (tuple, list)) and all(isinstance(p, str) for p in path):
    return tuple(path)
  raise TypeError(f"{fn}: a module path must be a tuple of names such as ('Block_0', 'Conv_0') "
                  f"or a string 'Block_0/Conv_0', got {path!r}.")


def _get(tree: Any, path: Path) -> Any:
  for p in path:
    if not isinstance(tree, (dict, FrozenDict)) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _pop(tree: dict, path: Path) -> None:
  """Removes ``tree[path]`` and the dicts it leaves empty (not the root)."""
  if len(path) > 1:
    _pop(tree[path[0]], path[1:])
  if len(path) == 1 or not tree[path[0]]:
    del tree[path[0]]


@fill_doc(recomputed=RECOMPUTED, run_args=RUN_ARGS, fw="linen")
def recompute_batch_stats(
    apply_fn: Any,
    variables: Any,
    batches: Iterable,
    *,
    mode: str = "train",
    num_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    mesh: Any = None,
    batch_spec: Any = None,
) -> Any:
  """Recomputes the ``batch_stats`` of every BatchNorm layer as exact population statistics.

  Runs the unchanged model (its layers intercepted) with frozen weights over ``batches`` and
  {recomputed}

  Args:
    apply_fn: ``apply_fn(variables, batch)`` running the model in inference mode (dropout
      off), e.g. ``lambda v, b: model.apply(v, b["image"], train=False)``; or the Module
      itself (then ``model.apply(variables, batch)``).
    variables: the model's variables with ``params`` and ``batch_stats``. Not modified.
    batches: an iterable of batches (re-iterable for ``mode="sequential"``), e.g. a few
      hundred training batches without augmentation, at the training batch size.
    {run_args}

  Returns:
    New variables (a dict, or a FrozenDict if given one) with the recomputed ``mean`` and
    ``var`` of every BatchNorm layer the forward pass called (dtypes kept; other variables,
    such as a jaxbn ``count``, unchanged).

  Raises:
    ValueError: no batch, no BatchNorm layer, ``variables`` without those layers'
      ``batch_stats``, or an ``axis_name`` that needs ``mesh``.
    TypeError: a module with batch statistics that is not registered.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(3)(x)
    ...     return jaxbn.linen.BatchNorm(use_running_average=not train)(x)
    >>> net = Net()
    >>> variables = net.init(jax.random.key(0), jnp.ones((4, 2)), train=False)
    >>> batches = [jax.random.normal(jax.random.key(i), (16, 2)) for i in range(3)]
    >>> new = jaxbn.linen.recompute_batch_stats(
    ...     lambda v, x: net.apply(v, x, train=False), variables, batches, progress=False)
    >>> dense = variables["params"]["Dense_0"]   # the BN input, over all the data:
    >>> h = jnp.concatenate([b @ dense["kernel"] + dense["bias"] for b in batches])
    >>> stats = new["batch_stats"]["BatchNorm_0"]
    >>> bool(jnp.allclose(stats["mean"], h.mean(0), atol=1e-5)), bool(
    ...     jnp.allclose(stats["var"], h.var(0), rtol=1e-4))
    (True, True)
  """
  fn = "jaxbn.linen.recompute_batch_stats"
  apply = _apply(fn, apply_fn)
  if not isinstance(variables, (dict, FrozenDict)) or "batch_stats" not in variables:
    raise ValueError(f"{fn}: `variables` must be the model's variables dict with a "
                     f"'batch_stats' collection (e.g. {{'params': ..., 'batch_stats': ...}}).")

  def trace(variables, batch, rec):
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__"
          or treatment(fn, module).recompute != "population"):
        return next_fun(*args, **kwargs)
      x = jnp.asarray(args[0])
      scale = module.get_variable("params", "scale") if module.use_scale else None
      bias = module.get_variable("params", "bias") if module.use_bias else None
      return rec.flax_call(module.path, module, x, scale, bias, kwargs.get("mask"),
                           result_dtype(x, scale, bias, dtype=module.dtype))

    with nn.intercept_methods(interceptor):
      return apply(variables, batch)

  def check_layers(layers):
    for key in layers:
      node = _get(variables["batch_stats"], key)
      if node is None or "mean" not in node or "var" not in node:
        raise ValueError(f"{fn}: the BatchNorm layer {'/'.join(key)} has no 'mean'/'var' in "
                         f"variables['batch_stats']; pass the variables the model was "
                         f"initialized with.")
      recompute.check_stats_shape(fn, "/".join(key), layers[key].feature_shape,
                                  tuple(jnp.shape(node["mean"])), "nn")

  layers, accs = recompute.run(fn, trace, variables, batches, mode=mode, num_batches=num_batches,
                             progress=progress, mesh=mesh, batch_spec=batch_spec,
                             check_layers=check_layers)
  new = unfreeze(variables)
  for key, info in layers.items():
    node = _get(new["batch_stats"], key)
    node["mean"], node["var"], _ = recompute.result(accs, info, (node["mean"], node["var"]))
  return freeze(new) if isinstance(variables, FrozenDict) else new


@fill_doc(found_pairs=FOUND_PAIRS)
def find_conv_bn_pairs(apply_fn: Any, variables: Any, *args: Any, **kwargs: Any) -> list[FoldPair]:
  """Finds the Conv/Dense -> batch norm pairs of a linen model that can be folded.

  Traces ``apply_fn(variables, *args, **kwargs)`` once (``jax.make_jaxpr``, nothing runs)
  with every ``nn.Conv``, ``nn.ConvLocal``, ``nn.ConvTranspose``, ``nn.Dense`` and
  ``nn.DenseGeneral`` output and
  {found_pairs}
  Pairs inside ``nn.scan``, loops or branches are not reported; ``nn.remat`` and ``jit`` bodies
  are searched.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs)``, e.g. ``model.apply``, or the Module.
    variables: the model's variables.
    *args: an example input, e.g. ``x`` (shapes matter, values don't).
    **kwargs: keyword arguments of ``apply_fn``, e.g. ``train=False``.

  Returns:
    A list of :class:`FoldPair` in the order of the batch norm calls.

  Raises:
    TypeError: a module with batch statistics that is not registered.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
    ...     return nn.BatchNorm(use_running_average=True)(x + 1.0)   # not foldable
    >>> x = jnp.ones((1, 8, 8, 3))
    >>> variables = Net().init(jax.random.key(0), x)
    >>> jaxbn.linen.find_conv_bn_pairs(Net().apply, variables, x)
    [FoldPair(layer=('Conv_0',), bn=('BatchNorm_0',), epsilon=1e-05, kernel_axes=(-1,))]
  """
  fn = "jaxbn.linen.find_conv_bn_pairs"
  apply = _apply(fn, apply_fn)
  srcs: list = []
  dsts: list = []

  def interceptor(next_fun, a, kw, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*a, **kw)
    if treatment(fn, module).fold:
      x = _fold.mark_bn_input(fn, dsts, module.path, module, jnp.asarray(a[0]))
      return next_fun(x, *a[1:], **kw)
    kind = _fold.kernel_axes(module, nn.ConvTranspose,
                             (nn.Conv, nn.ConvLocal, nn.Dense, nn.DenseGeneral))
    return _fold.mark_layer_output(srcs, module.path, kind, next_fun(*a, **kw))

  with nn.intercept_methods(interceptor):
    jaxpr = jax.make_jaxpr(lambda v: apply(v, *args, **kwargs))(variables)
  return _fold.found_pairs(jaxpr, srcs, dsts)


def fold_batch_norm_layers(variables: Any, pairs: Sequence[Union[FoldPair, tuple]], *,
                           epsilon: float = 1e-5) -> Any:
  r"""Folds eval-mode batch norms into the Conv/Dense layers feeding them.

  For each pair, with ``k = γ/√(σ²+ε)`` (see :func:`jaxbn.fold_batch_norm`, which folds one
  kernel): the layer's ``kernel`` (and ``bias``, if it has one) is multiplied by ``k`` along
  its output features, and the batch norm's variables are replaced by a single
  ``params/bias = β - μ·k`` (its ``scale`` and ``batch_stats`` are removed). Run the result
  with :func:`folded`, which turns each folded batch norm into ``x + bias``.

  Args:
    variables: the model's variables (``params``, ``batch_stats``). Not modified.
    pairs: :class:`FoldPair` from :func:`find_conv_bn_pairs`, or ``(layer_path, bn_path)``
      tuples (paths as tuples of names or ``"a/b"`` strings).
    epsilon: the batch norms' epsilon where a pair does not give it (flax's default 1e-5).

  Returns:
    The folded variables (a dict, or a FrozenDict if given one).

  Raises:
    ValueError: a path not found, a batch norm already folded or listed twice, a layer
      without ``kernel``, or features that do not match.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    >>> variables = Net().init(jax.random.key(0), x)
    >>> pairs = jaxbn.linen.find_conv_bn_pairs(Net().apply, variables, x)
    >>> folded_vars = jaxbn.linen.fold_batch_norm_layers(variables, pairs)
    >>> y = jaxbn.linen.folded(Net().apply)(folded_vars, x)
    >>> bool(jnp.allclose(y, Net().apply(variables, x), atol=1e-5))
    True
  """
  fn = "jaxbn.linen.fold_batch_norm_layers"
  if not isinstance(variables, (dict, FrozenDict)) or "params" not in variables:
    raise ValueError(f"{fn}: `variables` must be the model's variables with 'params' and "
                     f"'batch_stats'.")
  new = unfreeze(variables)
  params = new["params"]
  stats_tree = new.get("batch_stats", {})
  for layer, bn, eps, kaxes in _fold.unpack_pairs(fn, pairs, functools.partial(_as_path, fn),
                                                  "(layer_path, bn_path)", "/".join):
    name_l, name_b = "/".join(layer), "/".join(bn)
    lp = _get(params, layer)
    if lp is None or "kernel" not in lp:
      raise ValueError(f"{fn}: no params['{name_l}']['kernel'] in `variables`; pass the path "
                       f"of the Conv/Dense layer that feeds the batch norm.")
    bs = _get(stats_tree, bn)
    if bs is None or "mean" not in bs:
      raise ValueError(f"{fn}: no batch_stats['{name_b}'] in `variables`: not a batch norm "
                       f"path, or already folded.")
    bp = _get(params, bn) or {}
    kernel, layer_bias, c = _fold.fold_pair(
        fn, (name_l, name_b), lp["kernel"], lp.get("bias"), bs["mean"], bs["var"],
        bp.get("scale"), bp.get("bias"), epsilon=epsilon if eps is None else eps,
        kernel_axes=kaxes)
    lp["kernel"] = kernel
    if layer_bias is not None:
      lp["bias"] = layer_bias
    _set_dict(params, bn, {"bias": c})
    _pop(stats_tree, bn)
  return freeze(new) if isinstance(variables, FrozenDict) else new


def fold_batch_norm(variables: Any, pairs: Sequence[Union[FoldPair, tuple]], *,
                    epsilon: float = 1e-5) -> Any:
  """Deprecated name of :func:`fold_batch_norm_layers` (``jaxbn.fold_batch_norm`` folds arrays).

  Args:
    variables: see :func:`fold_batch_norm_layers`.
    pairs: see :func:`fold_batch_norm_layers`.
    epsilon: see :func:`fold_batch_norm_layers`.

  Returns:
    The folded variables.
  """
  warnings.warn("jaxbn.linen.fold_batch_norm is deprecated and will be removed in the next "
                "release; use jaxbn.linen.fold_batch_norm_layers (same arguments).",
                DeprecationWarning, stacklevel=2)
  return fold_batch_norm_layers(variables, pairs, epsilon=epsilon)


def _set_dict(tree: dict, path: Path, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _folded_interceptor(next_fun, args, kwargs, context):
  fn = "jaxbn.linen.folded"
  module = context.module
  if (context.method_name != "__call__" or not treatment(fn, module).fold
      or module.has_variable("batch_stats", "mean")):
    return next_fun(*args, **kwargs)
  bias = module.get_variable("params", "bias")
  if bias is None:
    raise ValueError(
        f"{fn}: the batch norm {'/'.join(module.path)} has neither running statistics nor a "
        f"folded bias in `variables`; pass the output of jaxbn.linen.fold_batch_norm_layers "
        f"(or the original variables).")
  x = jnp.asarray(args[0])
  return _fold.add_folded_bias(fn, x, bias, module.axis, result_dtype(x, bias, dtype=module.dtype))


def folded(apply_fn: Any) -> Callable:
  """Wraps ``apply_fn`` so that it runs a model with folded variables.

  Inside the returned function every batch norm whose ``batch_stats`` were removed by
  :func:`fold_batch_norm_layers` computes ``x + bias`` (its folded offset); the other layers
  run unchanged, so the compiled eval step is a convolution followed by a bias add. Jit the
  returned function as usual.

  Args:
    apply_fn: ``model.apply`` (or any function of ``(variables, *args, **kwargs)`` that calls
      it), or the Module.

  Returns:
    A function with the same signature.

  Example:
    >>> import jax, jaxbn.linen, flax.linen as nn
    >>> eval_fn = jax.jit(jaxbn.linen.folded(nn.Dense(2).apply))
  """
  apply = _apply("jaxbn.linen.folded", apply_fn)

  @functools.wraps(apply)
  def folded_apply(variables, *args, **kwargs):
    with nn.intercept_methods(_folded_interceptor):
      return apply(variables, *args, **kwargs)

  return folded_apply


__all__ = ["FoldPair", "find_conv_bn_pairs", "fold_batch_norm", "fold_batch_norm_layers",
           "folded", "recompute_batch_stats"]
