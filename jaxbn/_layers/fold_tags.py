"""The jaxpr tags that find Conv/Dense -> BN pairs in a traced model (``find_conv_bn_pairs`` of
``jaxbn.linen`` and ``jaxbn.nnx``): the layer-level half of folding, whose arithmetic is
:func:`jaxbn.fold_batch_norm`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.extend.core

from jaxbn._core import checks

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
  trailing_axes)``) were tagged by :func:`mark` in call order: a layer's output feeding only
  a BN, each called once, the BN normalizing trailing axes."""
  calls: dict = {}
  for role, log in (("src", srcs), ("dst", dsts)):
    for entry in log:
      calls[(role, entry[0])] = calls.get((role, entry[0]), 0) + 1
  pairs = []
  for s, d in marked_pairs(closed_jaxpr):
    layer, kind = srcs[s]
    bn, eps, bn_axes = dsts[d]
    if calls[("src", layer)] != 1 or calls[("dst", bn)] != 1 or bn_axes is None:
      continue
    if kind != "trailing":
      if len(bn_axes) != 1:
        continue
      bn_axes = kind
    pairs.append(FoldPair(tuple(layer), tuple(bn), eps, tuple(bn_axes)))
  return pairs


MARK = "jaxbn_fold:"
# Call-like primitives whose body runs once per call: pairs inside them are still foldable.
# Loops (scan, while) and branches (cond) are not entered: their layers hold stacked or
# alternative weights.
_CALLS = ("pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2")


def mark(x: jax.Array, role: str, index: int) -> jax.Array:
  """Tags ``x`` in the traced program (an identity ``name`` equation, free at run time)."""
  from jax.ad_checkpoint import checkpoint_name
  return checkpoint_name(x, f"{MARK}{role}:{index}")


def marked_pairs(closed_jaxpr: Any) -> list[tuple[int, int]]:
  """``(src, dst)`` index pairs where the output marked ``src`` feeds only the input ``dst``.

  A layer's output can be folded into the BN it feeds only if nothing else reads it: the
  marked variable must have exactly one use (the BN's input mark) in its own jaxpr, and must
  not be an output of that jaxpr.
  """
  pairs: list[tuple[int, int]] = []

  def parse(eqn):
    if eqn.primitive.name != "name":
      return None
    name = eqn.params.get("name", "")
    if not isinstance(name, str) or not name.startswith(MARK):
      return None
    role, index = name[len(MARK):].split(":")
    return role, int(index)

  def visit(jaxpr):
    producers, uses, inputs = {}, {}, []

    def use(v):
      if not hasattr(v, "val"):  # a Var, not a Literal
        uses[v] = uses.get(v, 0) + 1

    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        use(v)
      tag = parse(eqn)
      if tag is not None and tag[0] == "src":
        producers[eqn.outvars[0]] = tag[1]
      elif tag is not None and tag[0] == "dst":
        inputs.append((eqn.invars[0], tag[1]))
      if eqn.primitive.name in _CALLS:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          visit(sub)
    for v in jaxpr.outvars:
      use(v)
    for v, dst in inputs:
      if not hasattr(v, "val") and v in producers and uses.get(v, 0) == 1:
        pairs.append((producers[v], dst))

  visit(closed_jaxpr.jaxpr)
  return sorted(pairs, key=lambda p: p[1])


def trailing_axes(fn: str, ndim: int, axis: checks.Axes) -> Optional[tuple[int, ...]]:
  """The BN's feature axes as negative kernel axes if they are the trailing axes of ``x``."""
  feat = checks.feature_axes(fn, ndim, axis)
  k = len(feat)
  if feat != tuple(range(ndim - k, ndim)):
    return None
  return tuple(range(-k, 0))
