"""Counting the collectives that a compiled (or lowered) JAX program really issues."""

from __future__ import annotations

import re
from typing import Any

# HLO opcodes of cross-device communication, and their StableHLO spelling.
_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
          "collective-broadcast", "ragged-all-to-all")
_HLO_OP = re.compile(r"[\s)}](" + "|".join(re.escape(k) for k in _KINDS) + r")(-start)?\(")
_MLIR_OP = re.compile(r"stablehlo\.(" + "|".join(k.replace("-", "_") for k in _KINDS) + r")\b")


def _operand_count(text: str, start: int) -> int:
  """Number of comma-separated operands of the call whose '(' is at ``text[start]``."""
  depth, count, empty = 0, 1, True
  for ch in text[start:]:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        return 0 if empty else count
    elif ch == "," and depth == 1:
      count += 1
    elif not ch.isspace() and depth >= 1:
      empty = False
  return count


def collective_counts(program: Any, *, operands: bool = False) -> dict[str, int]:
  """Counts the cross-device collectives in a compiled or lowered JAX program.

  Give it what ``jax.jit(f).lower(*args)`` returns (a ``Lowered``: the StableHLO that JAX
  emitted, before XLA optimizes it) or ``.compile()`` of that (a ``Compiled``: the HLO that
  runs), or the text of either. Each op is counted once: an asynchronous pair
  ``all-reduce-start``/``all-reduce-done`` is one all-reduce.

  XLA's all-reduce combiner merges independent all-reduces into one op with a tuple of
  operands. ``operands=True`` counts the arrays reduced instead of the ops, so that a program
  that asks for three reductions shows 3 even after they were combined into one op.

  Args:
    program: a ``jax.stages.Lowered``, a ``jax.stages.Compiled``, or HLO/StableHLO text.
    operands: count reduced arrays (operands) instead of ops.

  Returns:
    A dict from the HLO op name (``'all-reduce'``, ``'all-gather'``, ``'reduce-scatter'``,
    ``'all-to-all'``, ``'collective-permute'``, ...) to its count; kinds that do not occur
    are left out (an empty dict: no communication).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from jax.sharding import PartitionSpec as P
    >>> from jaxbn.parallel import collective_counts, data_mesh
    >>> mesh = data_mesh()
    >>> def bn(x):
    ...   return jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True, axis_name='data')[0]
    >>> f = jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=P('data'), out_specs=P('data')))
    >>> x = jax.ShapeDtypeStruct((16, 3), jnp.float32,
    ...                          sharding=jax.NamedSharding(mesh, P('data')))
    >>> collective_counts(f.lower(x).compile())
    {'all-reduce': 1}
  """
  text = program if isinstance(program, str) else program.as_text()
  counts: dict[str, int] = {}
  if "stablehlo." in text or "mhlo." in text:
    for m in _MLIR_OP.finditer(text):
      kind = m.group(1).replace("_", "-")
      n = 1
      if operands:
        paren = text.find("(", m.end())
        n = _operand_count(text, paren) if paren >= 0 else 1
      counts[kind] = counts.get(kind, 0) + n
    return counts
  for line in text.splitlines():
    code = line.split(", metadata=")[0]
    for m in _HLO_OP.finditer(code):
      n = _operand_count(code, m.end() - 1) if operands else 1
      counts[m.group(1)] = counts.get(m.group(1), 0) + n
  return counts
