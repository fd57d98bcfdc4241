"""Folding at the layer level, for ``jaxbn.linen`` and ``jaxbn.nnx``: the jaxpr tags that find
Conv/Dense -> BN pairs in a traced model (``find_conv_bn_pairs``), and one pair's checks and
folding (``fold_batch_norm_layers``, whose arithmetic is :func:`jaxbn.fold_batch_norm`).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxbn._core import checks
from jaxbn._core.fold import eval_affine, fold_batch_norm
from jaxbn._core.normalize import to_keepdims
from jaxbn._core.types import BatchStats
from jaxbn._layers.common import flax_axes


class FoldPair(NamedTuple):
  """A Conv/Dense layer and the batch norm it feeds, as found by ``find_conv_bn_pairs``.

  Attributes:
    layer: path of the Conv/Dense layer: a Linen module path, e.g.
      ``('ResNetBlock_0', 'Conv_0')``, or an NNX graph path, e.g. ``('blocks', 0, 'conv')``.
    bn: path of the batch norm.
    epsilon: the batch norm's epsilon (None: Linen, the ``epsilon`` given to
      ``fold_batch_norm_layers``; NNX, the layer's own).
    kernel_axes: the kernel's output-feature axes (``(-1,)`` for flax Conv/Dense; None: the
      trailing axes, as many as the batch norm has feature axes).
  """

  layer: tuple
  bn: tuple
  epsilon: Optional[float] = None
  kernel_axes: Optional[tuple[int, ...]] = None


def found_pairs(closed_jaxpr: Any, srcs: list, dsts: list) -> list[FoldPair]:
  """The foldable pairs of a traced model whose layer outputs (``srcs``: ``(path, kind)``,
  kind ``"trailing"`` or the kernel's axes) and BN inputs (``dsts``: ``(path, epsilon,
  trailing_axes)``) were tagged by :func:`mark_layer_output` and :func:`mark_bn_input` in
  call order: a layer's output feeding only a BN, each called once, the BN normalizing
  trailing axes."""
  calls = collections.Counter([("src", e[0]) for e in srcs] + [("dst", e[0]) for e in dsts])
  pairs = []
  for s, d in marked_pairs(closed_jaxpr):
    layer, kind = srcs[s]
    bn, eps, bn_axes = dsts[d]
    if (calls[("src", layer)] != 1 or calls[("dst", bn)] != 1 or bn_axes is None
        or kind != "trailing" and len(bn_axes) != 1):
      continue
    pairs.append(FoldPair(tuple(layer), tuple(bn), eps,
                          tuple(bn_axes if kind == "trailing" else kind)))
  return pairs


MARK = "jaxbn_fold:"  # the tags: identity ``name`` equations (free at run time)
# Call-like primitives whose body runs once per call: pairs inside them are still foldable.
# Loops (scan, while) and branches (cond) are not entered: their layers hold stacked or
# alternative weights.
_CALLS = ("pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2")


def mark_layer_output(srcs: list, path: tuple, kind: Any, y: Any) -> Any:
  """Logs a Conv/Dense layer's call in ``srcs`` and tags its output ``y``; returns ``y`` as it is
  if it is not an array, or if ``kind`` (from :func:`kernel_axes`) is None: not such a layer."""
  if kind is None or not isinstance(y, jax.Array):
    return y
  srcs.append((path, kind))
  return checkpoint_name(y, f"{MARK}src:{len(srcs) - 1}")


def mark_bn_input(fn: str, dsts: list, path: tuple, bn: Any, x: jax.Array) -> jax.Array:
  """Logs a flax-style batch norm's call in ``dsts`` (its trailing feature axes as negative
  kernel axes, or None if they are not the trailing axes of ``x``) and tags its input ``x``."""
  feat = checks.feature_axes(fn, x.ndim, flax_axes(bn.axis, x.ndim))
  k = len(feat)
  trailing = tuple(range(-k, 0)) if feat == tuple(range(x.ndim - k, x.ndim)) else None
  dsts.append((path, float(bn.epsilon), trailing))
  return checkpoint_name(x, f"{MARK}dst:{len(dsts) - 1}")


def kernel_axes(layer: Any, transpose: type, plain: tuple) -> Any:
  """'trailing' for layers whose kernel ends with the output features, (-2,) or None."""
  if isinstance(layer, transpose):
    return (-2,) if layer.transpose_kernel else "trailing"
  return "trailing" if isinstance(layer, plain) else None


def marked_pairs(closed_jaxpr: Any) -> list[tuple[int, int]]:
  """``(src, dst)`` index pairs where the output marked ``src`` feeds only the input ``dst``.

  A layer's output can be folded into the BN it feeds only if nothing else reads it: the
  marked variable must have exactly one use (the BN's input mark) in its own jaxpr, and must
  not be an output of that jaxpr.
  """
  pairs: list[tuple[int, int]] = []

  def visit(jaxpr):
    producers, inputs = {}, []
    read = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    uses = collections.Counter(v for v in read if not hasattr(v, "val"))  # Vars, not Literals
    for eqn in jaxpr.eqns:
      name = eqn.params.get("name") if eqn.primitive.name == "name" else None
      if isinstance(name, str) and name.startswith(MARK):
        role, index = name[len(MARK):].split(":")
        if role == "src":
          producers[eqn.outvars[0]] = int(index)
        else:
          inputs.append((eqn.invars[0], int(index)))
      if eqn.primitive.name in _CALLS:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          visit(sub)
    for v, dst in inputs:
      if not hasattr(v, "val") and v in producers and uses[v] == 1:
        pairs.append((producers[v], dst))

  visit(closed_jaxpr.jaxpr)
  return sorted(pairs, key=lambda p: p[1])


def unpack_pairs(fn: str, pairs: Iterable, as_path: Callable, form: str,
                 name: Callable = str) -> Iterator[tuple]:
  """``(layer, bn, epsilon or None, kernel_axes or None)`` of each FoldPair or ``form`` tuple;
  refuses a pair whose layer or batch norm an earlier pair folded (``name``: a path's name)."""
  seen: set = set()
  for pair in pairs:
    if isinstance(pair, FoldPair):
      layer, bn, eps = pair.layer, pair.bn, pair.epsilon
      kaxes = None if pair.kernel_axes is None else tuple(pair.kernel_axes)
    else:
      try:
        layer, bn = pair
      except (TypeError, ValueError):
        raise TypeError(f"{fn}: each pair must be a FoldPair or a {form} tuple, got "
                        f"{pair!r}.") from None
      eps = kaxes = None
    layer, bn = as_path(layer), as_path(bn)
    if ("l", layer) in seen or ("b", bn) in seen:
      raise ValueError(f"{fn}: the pair ({name(layer)}, {name(bn)}) reuses a layer or batch "
                       f"norm of an earlier pair; each layer and each batch norm folds once.")
    seen.update({("l", layer), ("b", bn)})
    yield layer, bn, eps, kaxes


def fold_pair(fn: str, names: tuple, kernel: Any, layer_bias: Any, mean: Any, var: Any,
              scale: Any, beta: Any, *, epsilon: float, kernel_axes: Any) -> tuple:
  """``(kernel·k, layer_bias·k or None, β - μ·k)``: the batch norm folded into the layer."""
  stats = BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.zeros((), jnp.int32))
  if kernel_axes is None:
    kernel_axes = tuple(range(-stats.mean.ndim, 0))
  k, c = eval_affine(stats, scale, beta, epsilon=epsilon)
  try:
    kernel, _ = fold_batch_norm(jnp.asarray(kernel), None, stats, scale, None, epsilon=epsilon,
                                axis=kernel_axes)
  except ValueError as e:
    raise ValueError(f"{fn}: cannot fold {names[1]} into {names[0]}: {e}") from None
  if layer_bias is not None:
    b = jnp.asarray(layer_bias)
    layer_bias = (b.astype(k.dtype) * k).astype(b.dtype)
  return kernel, layer_bias, c.astype(jnp.float32 if beta is None else jnp.result_type(beta))


def add_folded_bias(fn: str, x: jax.Array, bias: jax.Array, axis: Any, out_dtype: Any):
  """A folded batch norm: ``x + bias``, ``bias`` along the feature axes ``axis`` (flax's)."""
  feat = checks.feature_axes(fn, x.ndim, flax_axes(axis, x.ndim))
  return (x + to_keepdims(bias, x.shape, feat)).astype(out_dtype)
