"""Counting the collectives that a compiled (or lowered) JAX program really issues."""

from __future__ import annotations

import re
from typing import Any, Optional

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


_HLO_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_HLO_BRANCHES = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|"
    r"false_computation=%?([\w.\-]+))")
_HLO_REF = re.compile(r"%([\w.\-]+)")
_MLIR_FUNC = re.compile(r"func\.func\s+(?:public|private)?\s*@([\w.\-]+)")
_MLIR_CALL = re.compile(r"call\s+@([\w.\-]+)")
_MLIR_BRANCHING = re.compile(r"stablehlo\.(case|if)\b")


def _hlo_computations(text: str) -> dict[str, list[str]]:
  """The lines of each computation of an HLO module, by name."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    m = _HLO_HEADER.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      comps[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line.split(", metadata=")[0])
  return comps


def _reachable(roots, edges) -> set:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(edges.get(name, ()))
  return seen


def _hlo_lines(text: str):
  """Yields ``(line, in_branch)`` for every instruction line of an HLO module."""
  comps = _hlo_computations(text)
  edges = {c: {r for line in lines for r in _HLO_REF.findall(line) if r in comps}
           for c, lines in comps.items()}
  roots = set()
  for lines in comps.values():
    for line in lines:
      for m in _HLO_BRANCHES.finditer(line):
        roots.update(r.strip().lstrip("%") for g in m.groups() if g for r in g.split(","))
  branch = _reachable(roots, edges)
  for c, lines in comps.items():
    for line in lines:
      yield line, c in branch


def _mlir_lines(text: str):
  """Yields ``(line, in_branch)`` for every line of a StableHLO module."""
  funcs: dict[str, list[tuple[str, bool]]] = {}
  current, depth, case_depths = "", 0, []
  for line in text.splitlines():
    m = _MLIR_FUNC.search(line)
    if m:
      current = m.group(1)
    funcs.setdefault(current, []).append((line, bool(case_depths)))
    if _MLIR_BRANCHING.search(line):
      case_depths.append(depth)
    depth += line.count("{") - line.count("}")
    while case_depths and depth <= case_depths[-1]:
      case_depths.pop()
  calls = {f: {c for line, _ in lines for c in _MLIR_CALL.findall(line)}
           for f, lines in funcs.items()}
  branch_calls = {c for lines in funcs.values() for line, b in lines if b
                  for c in _MLIR_CALL.findall(line)}
  branch = _reachable(branch_calls, calls)
  for f, lines in funcs.items():
    for line, b in lines:
      yield line, b or f in branch


def collective_counts(program: Any, *, operands: bool = False,
                      conditional: Optional[bool] = None) -> dict[str, int]:
  """Counts the cross-device collectives in a compiled or lowered JAX program.

  Give it what ``jax.jit(f).lower(*args)`` returns (a ``Lowered``: the StableHLO that JAX
  emitted, before XLA optimizes it) or ``.compile()`` of that (a ``Compiled``: the HLO that
  runs), or the text of either. Each op is counted once: an asynchronous pair
  ``all-reduce-start``/``all-reduce-done`` is one all-reduce.

  XLA's all-reduce combiner merges independent all-reduces into one op with a tuple of
  operands. ``operands=True`` counts the arrays reduced instead of the ops, so that a program
  that asks for three reductions shows 3 even after they were combined into one op.

  Ops inside the branches of a ``lax.cond`` (HLO ``conditional``, StableHLO
  ``case``/``if``, and what those branches call) run only when their branch is taken, e.g.
  jaxbn's exact-statistics correction. ``conditional=False`` counts only the ops outside
  any branch (the path every call takes), ``conditional=True`` only those inside; the
  default counts all.

  Args:
    program: a ``jax.stages.Lowered``, a ``jax.stages.Compiled``, or HLO/StableHLO text.
    operands: count reduced arrays (operands) instead of ops.
    conditional: None (all ops), False (outside conditional branches) or True (inside).

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
    >>> compiled = f.lower(x).compile()
    >>> collective_counts(compiled, conditional=False), collective_counts(compiled)
    ({'all-reduce': 1}, {'all-reduce': 2})
  """
  text = program if isinstance(program, str) else program.as_text()
  counts: dict[str, int] = {}
  mlir = "stablehlo." in text or "mhlo." in text
  for line, in_branch in (_mlir_lines(text) if mlir else _hlo_lines(text)):
    if conditional is not None and in_branch != conditional:
      continue
    if mlir:
      for m in _MLIR_OP.finditer(line):
        kind = m.group(1).replace("_", "-")
        n = 1
        if operands:
          paren = line.find("(", m.end())
          n = _operand_count(line, paren) if paren >= 0 else 1
        counts[kind] = counts.get(kind, 0) + n
    else:
      for m in _HLO_OP.finditer(line):
        n = _operand_count(line, m.end() - 1) if operands else 1
        counts[m.group(1)] = counts.get(m.group(1), 0) + n
  return counts


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def collective_bytes(program: Any, *, conditional: Optional[bool] = None) -> dict[str, int]:
  """Bytes each kind of collective reduces or moves in a compiled program (result shapes).

  Reads the compiled HLO (a ``jax.stages.Compiled`` or its text): for every collective op,
  the size of its result (all operands of a combined op), per device. ``conditional`` selects
  ops as in :func:`collective_counts`. Use it to check that a program's communication does
  not grow with the number of devices (compile at several ``jax_num_cpu_devices`` values).

  Returns:
    A dict from the HLO op name (e.g. ``'all-reduce'``) to the total bytes of its results.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from jax.sharding import PartitionSpec as P
    >>> from jaxbn.parallel import collective_bytes, data_mesh
    >>> mesh = data_mesh()
    >>> def bn(x):
    ...   return jaxbn.batch_norm(x, jaxbn.init_stats(256), training=True, axis_name='data')[0]
    >>> f = jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=P('data'), out_specs=P('data')))
    >>> x = jax.ShapeDtypeStruct((16, 256), jnp.float32,
    ...                          sharding=jax.NamedSharding(mesh, P('data')))
    >>> collective_bytes(f.lower(x).compile(), conditional=False)  # Σ(x−K), Σ(x−K)²: 2×256×4
    {'all-reduce': 2048}
  """
  text = program if isinstance(program, str) else program.as_text()
  if "stablehlo." in text or "mhlo." in text:
    raise ValueError("collective_bytes: give it the compiled program (`.compile()`), whose "
                     "HLO has the shapes XLA really communicates, not the lowered StableHLO.")
  out: dict[str, int] = {}
  for line, in_branch in _hlo_lines(text):
    if conditional is not None and in_branch != conditional:
      continue
    m = _HLO_OP.search(line)
    if not m or "=" not in line[:m.start()]:
      continue
    result = line[line.index("=") + 1:m.start()]
    size = 0
    for dt, dims in _SHAPE.findall(result):
      n = 1
      for d in dims.split(","):
        if d:
          n *= int(d)
      size += n * _DTYPE_BYTES.get(dt, 4)
    if m.group(2):  # an async start returns (operands, results): count the results once
      size //= 2
    out[m.group(1)] = out.get(m.group(1), 0) + size
  return out
