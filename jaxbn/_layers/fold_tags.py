"""The jaxpr tags that find Conv/Dense -> BN pairs in a traced model (``find_conv_bn_pairs`` of
``jaxbn.linen`` and ``jaxbn.nnx``): the layer-level half of folding, whose arithmetic is
:func:`jaxbn.fold_batch_norm`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.extend.core

from jaxbn._core import checks

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
