"""Testing tools: count and size the collectives that a compiled (or lowered) JAX program issues.

These read program text, not devices: compile (or lower) a step for any number of simulated
CPU devices, or for an accelerator with ``jax.export``, and check what it communicates:

* :func:`collective_counts`: how many all-reduces, all-gathers, ... a program issues, on the
  path every call takes or only inside conditional branches;
* :func:`collective_bytes`: how many bytes each kind moves per device (compiled HLO).

jaxbn's own tests use them to check "one all-reduce forward, one backward, O(C) bytes" per
BN call; ``tests/test_oracle_collectives.py`` checks them against two parsers written
independently, on programs whose counts are known by construction.

A collective runs *conditionally* when it sits in a branch of a conditional (HLO
``conditional``, StableHLO ``case``/``if``) or in a computation that is reachable only
through such a branch (HLO ``call``/``fusion``/``async`` called computations, a reducer, a
``while`` body, a nested conditional; StableHLO ``func.call``). A computation that the
program also reaches without passing through a branch runs on every call.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

__all__ = ["collective_bytes", "collective_counts"]

# HLO opcodes of cross-device communication, and their StableHLO spelling.
_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
          "collective-broadcast", "ragged-all-to-all")
_HLO_OP = re.compile(r"[\s)}](" + "|".join(re.escape(k) for k in _KINDS) + r")(-start)?\(")
_MLIR_OP = re.compile(r"stablehlo\.(" + "|".join(k.replace("-", "_") for k in _KINDS) + r")\b")

_NAME = r"%?([\w.\-]+)"
_HLO_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Attributes that name called computations: one name, or a {list} of names.
_HLO_CALL_ONE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|"
                           r"false_computation)=" + _NAME)
_HLO_CALL_LIST = re.compile(r"\b(calls|called_computations|branch_computations)=\{([^}]*)\}")
_HLO_BRANCH_ATTRS = ("true_computation", "false_computation", "branch_computations")

_MLIR_FUNC = re.compile(r"func\.func\s+(public\s+|private\s+)?@([\w.\-$]+)")
_MLIR_CALL = re.compile(r"\bcall\s+@([\w.\-$]+)")
_MLIR_BRANCHING = re.compile(r"stablehlo\.(case|if)\b")
# lax.platform_dependent lowers to cases indexed by a constant (or by such a case's result):
# XLA folds them away, so they are not conditionals at run time.
_MLIR_CONSTANT = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = stablehlo\.constant\b")
_MLIR_CASE = re.compile(r'^\s*(%[\w#]+)(?::\d+)? = "stablehlo\.case"\((%[\w#]+)')


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


def _reachable(roots: Iterable[str], edges: Dict[str, Set[str]]) -> Set[str]:
  seen: Set[str] = set()
  todo = list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(edges.get(name, ()))
  return seen


def _split_graph(entries: Set[str], every: Dict[str, Set[str]],
                 branch: Dict[str, Set[str]]) -> Set[str]:
  """The computations that run only conditionally.

  ``every[c]``: what ``c`` calls on each of its runs; ``branch[c]``: what it calls from a
  conditional branch. With no known entry (a text fragment), every computation that is not
  reachable through a branch counts as running on every call.
  """
  conditional = _reachable({n for names in branch.values() for n in names},
                           {c: every.get(c, set()) | branch.get(c, set())
                            for c in set(every) | set(branch)})
  if not entries:
    entries = (set(every) | set(branch)) - conditional
  return conditional - _reachable(entries, every)


def _hlo_lines(text: str) -> Iterator[Tuple[str, bool]]:
  """Yields ``(instruction line, runs only conditionally)`` for an HLO module."""
  comps: Dict[str, List[str]] = {}
  entries: Set[str] = set()
  current = None
  for line in text.splitlines():
    m = _HLO_HEADER.match(line)
    if m and not line.startswith(" "):
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entries.add(current)
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line.split(", metadata=")[0])
  every: Dict[str, Set[str]] = {c: set() for c in comps}
  branch: Dict[str, Set[str]] = {c: set() for c in comps}
  for c, lines in comps.items():
    for line in lines:
      for m in _HLO_CALL_ONE.finditer(line):
        (branch if m.group(1) in _HLO_BRANCH_ATTRS else every)[c].add(m.group(2))
      for m in _HLO_CALL_LIST.finditer(line):
        names = {n.strip().lstrip("%") for n in m.group(2).split(",") if n.strip()}
        (branch if m.group(1) in _HLO_BRANCH_ATTRS else every)[c].update(names)
  conditional = _split_graph(entries, every, branch)
  for c, lines in comps.items():
    for line in lines:
      yield line, c in conditional


def _mlir_lines(text: str) -> Iterator[Tuple[str, bool]]:
  """Yields ``(line, runs only conditionally)`` for a StableHLO module."""
  funcs: Dict[str, List[Tuple[str, bool]]] = {}
  entries: Set[str] = set()
  every: Dict[str, Set[str]] = {}
  branch: Dict[str, Set[str]] = {}
  current, depth, case_depths, static = "", 0, [], set()
  for line in text.splitlines():
    m = _MLIR_FUNC.search(line)
    if m:
      current = m.group(2)
      case_depths, static = [], set()
      if (m.group(1) or "").strip() == "public":
        entries.add(current)
    in_region = bool(case_depths)
    funcs.setdefault(current, []).append((line, in_region))
    for c in _MLIR_CALL.findall(line):
      (branch if in_region else every).setdefault(current, set()).add(c)
    const, case = _MLIR_CONSTANT.match(line), _MLIR_CASE.match(line)
    if const:
      static.add(const.group(1))
    if case and case.group(2) in static:
      static.add(case.group(1))  # a case on a constant index: no run-time branch
    elif _MLIR_BRANCHING.search(line):
      case_depths.append(depth)
    depth += line.count("{") - line.count("}")
    while case_depths and depth <= case_depths[-1]:
      case_depths.pop()
  for f in funcs:
    every.setdefault(f, set())
  conditional = _split_graph(entries, every, branch)
  for f, lines in funcs.items():
    for line, in_region in lines:
      yield line, in_region or f in conditional


def _text(program: Any) -> str:
  return program if isinstance(program, str) else program.as_text()


def _is_mlir(text: str) -> bool:
  return "stablehlo." in text or "mhlo." in text


def _ops(text: str, conditional: Optional[bool]) -> Iterator[Tuple[str, str, re.Match]]:
  """Yields ``(kind, line, match)`` for each collective op that ``conditional`` selects."""
  mlir = _is_mlir(text)
  for line, in_branch in (_mlir_lines(text) if mlir else _hlo_lines(text)):
    if conditional is None or in_branch == conditional:
      for m in (_MLIR_OP if mlir else _HLO_OP).finditer(line):
        yield m.group(1).replace("_", "-"), line, m


def collective_counts(program: Any, *, operands: bool = False,
                      conditional: Optional[bool] = None) -> Dict[str, int]:
  """Counts the cross-device collectives in a compiled or lowered JAX program.

  Give it what ``jax.jit(f).lower(*args)`` returns (a ``Lowered``: the StableHLO that JAX
  emitted, before XLA optimizes it) or ``.compile()`` of that (a ``Compiled``: the HLO that
  runs), or the text of either. Each op is counted once: an asynchronous pair
  ``all-reduce-start``/``all-reduce-done`` is one all-reduce.

  XLA's all-reduce combiner merges independent all-reduces into one op with a tuple of
  operands. ``operands=True`` counts the arrays reduced instead of the ops, so that a program
  that asks for three reductions shows 3 even after they were combined into one op.

  Ops inside the branches of a ``lax.cond``/``lax.switch`` (HLO ``conditional``, StableHLO
  ``case``/``if``), and in what only those branches call, run only when their branch is
  taken. ``conditional=False`` counts only the ops outside any branch (the path every call
  takes), ``conditional=True`` only those inside; the default counts all.

  Args:
    program: a ``jax.stages.Lowered``, a ``jax.stages.Compiled``, or HLO/StableHLO text.
    operands: count reduced arrays (operands) instead of ops.
    conditional: None (all ops), False (outside conditional branches) or True (inside).

  Returns:
    A dict from the HLO op name (``'all-reduce'``, ``'all-gather'``, ``'reduce-scatter'``,
    ``'all-to-all'``, ``'collective-permute'``, ...) to its count; kinds that do not occur
    are left out (an empty dict: no communication).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax import lax
    >>> from jax.sharding import PartitionSpec as P
    >>> from jaxbn.parallel import data_mesh
    >>> from jaxbn.testing import collective_counts
    >>> mesh = data_mesh()
    >>> def f(x):
    ...   s = lax.psum(x.sum(0), 'data')  # every call
    ...   return lax.cond(s[0] > 0, lambda s: lax.psum(s * s, 'data'), lambda s: s, s)
    >>> g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P('data'), out_specs=P()))
    >>> x = jax.ShapeDtypeStruct((16, 3), jnp.float32,
    ...                          sharding=jax.NamedSharding(mesh, P('data')))
    >>> compiled = g.lower(x).compile()
    >>> collective_counts(compiled, conditional=False), collective_counts(compiled)
    ({'all-reduce': 1}, {'all-reduce': 2})
  """
  counts: Dict[str, int] = {}
  for kind, line, m in _ops(_text(program), conditional):
    paren = line.find("(", m.end() - 1)  # HLO's match ends with it; StableHLO's just before
    n = _operand_count(line, paren) if operands and paren >= 0 else 1
    counts[kind] = counts.get(kind, 0) + n
  return counts


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def collective_bytes(program: Any, *, conditional: Optional[bool] = None) -> Dict[str, int]:
  """Bytes each kind of collective reduces or moves in a compiled program (result shapes).

  Reads the compiled HLO (a ``jax.stages.Compiled`` or its text): for every collective op,
  the size of its result (all operands of a combined op), per device. ``conditional`` selects
  ops as in :func:`collective_counts`. Use it to check that a program's communication does
  not grow with the number of devices (compile at several ``jax_num_cpu_devices`` values).

  Returns:
    A dict from the HLO op name (e.g. ``'all-reduce'``) to the total bytes of its results.

  Raises:
    ValueError: for StableHLO (a ``Lowered``): its shapes are not what XLA communicates.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax import lax
    >>> from jax.sharding import PartitionSpec as P
    >>> from jaxbn.parallel import data_mesh
    >>> from jaxbn.testing import collective_bytes
    >>> mesh = data_mesh()
    >>> f = jax.jit(jax.shard_map(lambda x: lax.psum(x.sum(0), 'data'), mesh=mesh,
    ...                           in_specs=P('data'), out_specs=P()))
    >>> x = jax.ShapeDtypeStruct((16, 256), jnp.float32,
    ...                          sharding=jax.NamedSharding(mesh, P('data')))
    >>> collective_bytes(f.lower(x).compile())  # 256 float32 sums
    {'all-reduce': 1024}
  """
  text = _text(program)
  if _is_mlir(text):
    raise ValueError("collective_bytes: give it the compiled program (`.compile()`), whose "
                     "HLO has the shapes XLA really communicates, not the lowered StableHLO.")
  out: Dict[str, int] = {}
  for kind, line, m in _ops(text, conditional):
    if "=" not in line[:m.start()]:
      continue
    result = line[line.index("=") + 1:m.start()]
    size = sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dt, 4)
               for dt, dims in _SHAPE.findall(result))
    if m.group(2):  # an async start returns (operands, results): count the results once
      size //= 2
    out[kind] = out.get(kind, 0) + size
  return out
