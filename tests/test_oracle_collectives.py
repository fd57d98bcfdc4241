"""Collectives counted a second way: independent parsers of StableHLO and compiled HLO text.

The claim "one collective forward, one backward per BN call" was checked with jaxbn's own
``collective_counts``. Here two small parsers written for this test (not jaxbn's) count the
all-reduces of a program, one from what JAX emitted (``lower().as_text()``, StableHLO) and one
from what XLA compiled (``compile().as_text()``, HLO). Each parser is first validated on a
table of programs whose counts are known by construction (0–3 collectives, XLA's combined
tuple all-reduce, asynchronous ``-start``/``-done`` pairs, collectives inside a ``lax.cond``
branch), then jaxbn's ``collective_counts`` must agree with them on the same table, and BN
under ``shard_map`` must show 1 unconditional all-reduce forward and 2 forward+backward.
"""

from __future__ import annotations

import re
from typing import Dict, List, Set, Tuple

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import parallel, testing

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# ------------------------------------------------------------------ parser 1: compiled HLO
_HLO_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s("
                        + "|".join(re.escape(k) for k in KINDS)
                        + r")(-start|-done)?\(")
_HLO_BRANCH_REF = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|"
    r"false_computation=%?([\w.\-]+))")
_HLO_ANY_REF = re.compile(r"(?:calls|to_apply|body|condition|true_computation|"
                          r"false_computation)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")


def _args_count(line: str, open_paren: int) -> int:
  """Number of top-level comma-separated arguments in the parentheses at ``open_paren``."""
  depth, n, empty = 0, 1, True
  for ch in line[open_paren:]:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        break
    elif ch == "," and depth == 1:
      n += 1
    elif depth == 1 and not ch.isspace():
      empty = False
  return 0 if empty and n == 1 else n


def hlo_counts(text: str) -> Dict[Tuple[str, bool], Tuple[int, int]]:
  """{(kind, in_branch): (ops, arrays)} from compiled HLO text."""
  comps: Dict[str, List[str]] = {}
  current = None
  for line in text.splitlines():
    m = _HLO_HEADER.match(line)
    if m and current is None:
      current = m.group(1)
      comps[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  calls: Dict[str, Set[str]] = {c: set() for c in comps}
  roots: Set[str] = set()
  for c, lines in comps.items():
    for line in lines:
      for m in _HLO_ANY_REF.finditer(line):
        for name in (m.group(1) or "", *(m.group(2) or "").split(",")):
          if name.strip():
            calls[c].add(name.strip().lstrip("%"))
      for m in _HLO_BRANCH_REF.finditer(line):
        for name in ((m.group(1) or "").split(",") + [m.group(2) or "", m.group(3) or ""]):
          if name.strip():
            roots.add(name.strip().lstrip("%"))
  in_branch, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c in in_branch or c not in comps:
      continue
    in_branch.add(c)
    todo.extend(calls[c])
  out: Dict[Tuple[str, bool], Tuple[int, int]] = {}
  for c, lines in comps.items():
    for line in lines:
      m = _HLO_INSTR.match(line)
      if not m or m.group(2) == "-done":  # an async pair is one op: count its start
        continue
      key = (m.group(1), c in in_branch)
      ops, arrays = out.get(key, (0, 0))
      out[key] = (ops + 1, arrays + _args_count(line, m.end() - 1))
  return out


# ------------------------------------------------------------------ parser 2: StableHLO
_MLIR_FUNC = re.compile(r"func\.func\s+(?:public|private)?\s*@([\w.\-$]+)")
_MLIR_OP = re.compile(r'"?stablehlo\.(' + "|".join(k.replace("-", "_") for k in KINDS)
                      + r')"?\s*\(')
_MLIR_BRANCH = re.compile(r'"?stablehlo\.(?:case|if)"?\s*\(')
_MLIR_CALL = re.compile(r"\bcall\s+@([\w.\-$]+)")


def stablehlo_counts(text: str) -> Dict[Tuple[str, bool], Tuple[int, int]]:
  """{(kind, in_branch): (ops, arrays)} from StableHLO text (``Lowered.as_text()``)."""
  per_func: Dict[str, List[Tuple[str, int, bool]]] = {}
  calls: Dict[str, List[Tuple[str, bool]]] = {}
  func, depth, branch_stack = None, 0, []
  constants = set()  # SSA names known at lowering: a case on one is lax.platform_dependent's
  for line in text.splitlines():
    m = _MLIR_FUNC.search(line)
    if m:
      func = m.group(1)
      per_func[func], calls[func] = [], []
      branch_stack, constants = [], set()
    defined = re.match(r'\s*(%[\w#]+)(?::\d+)? = ("?[\w.]+"?)(?:\((%[\w#]+))?', line)
    in_branch = bool(branch_stack)
    if func is not None:
      for op in _MLIR_OP.finditer(line):
        per_func[func].append((op.group(1).replace("_", "-"), _args_count(line, op.end() - 1),
                               in_branch))
      for c in _MLIR_CALL.finditer(line):
        calls[func].append((c.group(1), in_branch))
    static = False
    if defined and defined.group(2) == "stablehlo.constant":
      constants.add(defined.group(1))
    elif defined and defined.group(2) == '"stablehlo.case"' and defined.group(3) in constants:
      constants.add(defined.group(1))  # folded by XLA: not a run-time branch
      static = True
    if _MLIR_BRANCH.search(line) and not static:
      branch_stack.append(depth)
    depth += line.count("{") - line.count("}")
    while branch_stack and depth <= branch_stack[-1]:
      branch_stack.pop()
  # A function called (directly or not) from a branch runs conditionally.
  branch_funcs, todo = set(), [f for fs in calls.values() for f, b in fs if b]
  while todo:
    f = todo.pop()
    if f in branch_funcs:
      continue
    branch_funcs.add(f)
    todo.extend(g for g, _ in calls.get(f, []))
  out: Dict[Tuple[str, bool], Tuple[int, int]] = {}
  for f, ops in per_func.items():
    for kind, n, in_branch in ops:
      key = (kind, in_branch or f in branch_funcs)
      o, a = out.get(key, (0, 0))
      out[key] = (o + 1, a + n)
  return out


def summarize(counts, *, arrays=False, conditional=None) -> Dict[str, int]:
  """Same shape as jaxbn's result: {kind: n}, over all ops or only (un)conditional ones."""
  out: Dict[str, int] = {}
  for (kind, in_branch), (ops, arr) in counts.items():
    if conditional is not None and in_branch != conditional:
      continue
    out[kind] = out.get(kind, 0) + (arr if arrays else ops)
  return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------ programs with known counts
def _mesh():
  return parallel.data_mesh()


def _x(mesh, shape=(16, 4)):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("data")))


def _p0(x):
  return x.sum(0)


def _p1(x):
  return lax.psum(x.sum(0), "data")


def _p2_independent(x):  # two independent psums: XLA's combiner makes one tuple all-reduce
  return lax.psum(x.sum(0), "data") + lax.psum((x * x).sum(0), "data")


def _p3_chain(x):  # each psum needs the previous result: nothing to combine
  a = lax.psum(x.sum(0), "data")
  b = lax.psum(jnp.sin(a) * x.sum(0), "data")
  return lax.psum(jnp.cos(b) * x.sum(0), "data")


def _p_cond(x):  # one psum on every path, one more only in the taken branch
  s = lax.psum(x.sum(0), "data")
  return lax.cond(s[0] > 0, lambda s: lax.psum(s * x.sum(0), "data"), lambda s: s, s)


@jax.jit
def _psum_sin(s):  # a function of its own: StableHLO calls it (`func.call @_psum_sin`)
  return lax.psum(jnp.sin(s), "data")


def _p_cond_call(x):  # one psum on every path, one in a function called from a branch
  s = lax.psum(x.sum(0), "data")
  return lax.cond(s[0] > 0, lambda s: 2 * _psum_sin(s), lambda s: s, s)


def _p_gather(x):
  return lax.all_gather(x.sum(0), "data").sum(0)


# name: (function, out_specs, lowered {kind: (ops, arrays)} per (uncond, cond), compiled ...)
# Known counts: each lax.psum/all_gather call lowers to one op; XLA combines independent
# all-reduces (p2) into one op with a tuple of 2 arrays.
PROGRAMS = {
    "0 collectives": (_p0, P("data"), {}, {}, {}, {}),
    "1 psum": (_p1, P(), {"all-reduce": (1, 1)}, {}, {"all-reduce": (1, 1)}, {}),
    "2 independent psums (combined)": (_p2_independent, P(), {"all-reduce": (2, 2)}, {},
                                       {"all-reduce": (1, 2)}, {}),
    "3 chained psums": (_p3_chain, P(), {"all-reduce": (3, 3)}, {}, {"all-reduce": (3, 3)}, {}),
    "psum + psum in a cond branch": (_p_cond, P(), {"all-reduce": (1, 1)},
                                     {"all-reduce": (1, 1)}, {"all-reduce": (1, 1)},
                                     {"all-reduce": (1, 1)}),
    "psum + psum in a function called from a cond branch": (
        _p_cond_call, P(), {"all-reduce": (1, 1)}, {"all-reduce": (1, 1)},
        {"all-reduce": (1, 1)}, {"all-reduce": (1, 1)}),
    "1 all_gather": (_p_gather, P(), {"all-gather": (1, 1)}, {}, None, None),
}


@pytest.fixture(scope="module")
def compiled_programs():
  mesh = _mesh()
  out = {}
  for name, (fn, out_specs, *_rest) in PROGRAMS.items():
    lowered = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=out_specs,
                                    check_vma=False)).lower(_x(mesh))
    out[name] = (lowered, lowered.compile())
  return out


def _expect(table, arrays):
  return {k: v[1 if arrays else 0] for k, v in table.items()}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_independent_parsers_count_known_programs(name, compiled_programs):
  _, _, lo_u, lo_c, co_u, co_c = PROGRAMS[name]
  lowered, compiled = compiled_programs[name]
  lo = stablehlo_counts(lowered.as_text())
  for arrays in (False, True):
    assert summarize(lo, arrays=arrays, conditional=False) == _expect(lo_u, arrays)
    assert summarize(lo, arrays=arrays, conditional=True) == _expect(lo_c, arrays)
  if co_u is None:  # XLA:CPU may rewrite an all-gather: only the lowered count is known
    return
  co = hlo_counts(compiled.as_text())
  for arrays in (False, True):
    assert summarize(co, arrays=arrays, conditional=False) == _expect(co_u, arrays)
    assert summarize(co, arrays=arrays, conditional=True) == _expect(co_c, arrays)


# Hand-written HLO/StableHLO for what XLA:CPU does not emit here (async pairs, as on GPU/TPU).
HLO_ASYNC = """HloModule m, num_partitions=8
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
ENTRY %main (p: f32[4], q: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %q = f32[4]{0} parameter(1)
  %ars = f32[4]{0} all-reduce-start(f32[4]{0} %p), channel_id=1, replica_groups={}, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(f32[4]{0} %ars)
  %art = (f32[4]{0}, f32[4]{0}, f32[]) all-reduce-start(%ard, %q, %c), channel_id=2, to_apply=%add
  %artd = (f32[4]{0}, f32[4]{0}, f32[]) all-reduce-done(%art)
  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(f32[4]{0} %p), dimensions={0}
  %agd = f32[32]{0} all-gather-done((f32[4]{0}, f32[32]{0}) %ags)
  ROOT %r = f32[4]{0} get-tuple-element(%artd), index=0
}
"""

MLIR_VARIADIC = """module @m {
  func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<4xf32>) -> tensor<4xf32> {
    %0:2 = "stablehlo.all_reduce"(%arg0, %arg1) <{replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>}> ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %s = stablehlo.add %a, %b : tensor<f32>
      stablehlo.return %s : tensor<f32>
    }) : (tensor<4xf32>, tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>)
    %1 = call @helper(%0#0) : (tensor<4xf32>) -> tensor<4xf32>
    return %1 : tensor<4xf32>
  }
  func.func private @helper(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.all_gather"(%arg0) <{all_gather_dim = 0 : i64}> : (tensor<4xf32>) -> tensor<8xf32>
    %1 = stablehlo.slice %0 [0:4] : (tensor<8xf32>) -> tensor<4xf32>
    return %1 : tensor<4xf32>
  }
}
"""


def test_independent_parsers_on_async_pairs_and_variadic_ops():
  c = hlo_counts(HLO_ASYNC)
  assert summarize(c) == {"all-reduce": 2, "all-gather": 1}  # start/done pairs count once
  assert summarize(c, arrays=True) == {"all-reduce": 4, "all-gather": 1}  # 1 + tuple of 3
  m = stablehlo_counts(MLIR_VARIADIC)
  assert summarize(m) == {"all-reduce": 1, "all-gather": 1}
  assert summarize(m, arrays=True) == {"all-reduce": 2, "all-gather": 1}
  assert summarize(hlo_counts("ROOT %x = f32[] add(%a, %b)")) == {}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_jaxbn_collective_counts_agrees_with_independent_parsers(name, compiled_programs):
  lowered, compiled = compiled_programs[name]
  for program, counts in ((lowered, stablehlo_counts(lowered.as_text())),
                          (compiled, hlo_counts(compiled.as_text()))):
    for arrays in (False, True):
      for cond in (None, False, True):
        assert testing.collective_counts(program, operands=arrays, conditional=cond) == \
            summarize(counts, arrays=arrays, conditional=cond), (name, arrays, cond)


# Collectives reached from a branch only through called computations (as XLA:GPU/TPU keep
# them: `call`, an async wrapper, a nested conditional), and one computation (%shared) that
# the entry also calls: it runs on every call. Known counts by construction.
HLO_CALLED_FROM_BRANCH = """HloModule m, num_partitions=8
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
%inner (p.1: f32[4]) -> f32[4] {
  %p.1 = f32[4]{0} parameter(0)
  ROOT %ar.1 = f32[4]{0} all-reduce(%p.1), channel_id=2, replica_groups={}, to_apply=%add
}
%wrapped_all_gather (p.2: f32[4]) -> f32[32] {
  %p.2 = f32[4]{0} parameter(0)
  ROOT %ag = f32[32]{0} all-gather(%p.2), channel_id=3, dimensions={0}
}
%b0 (p.3: f32[4]) -> f32[4] {
  ROOT %p.3 = f32[4]{0} parameter(0)
}
%b1 (p.4: f32[4]) -> f32[4] {
  %p.4 = f32[4]{0} parameter(0)
  ROOT %cp = f32[4]{0} collective-permute(%p.4), channel_id=4, source_target_pairs={{0,1}}
}
%shared (p.5: f32[8]) -> f32[1] {
  %p.5 = f32[8]{0} parameter(0)
  ROOT %rs = f32[1]{0} reduce-scatter(%p.5), channel_id=5, dimensions={0}, to_apply=%add
}
%then (t: f32[4]) -> f32[4] {
  %t = f32[4]{0} parameter(0)
  %called = f32[4]{0} call(%t), to_apply=%inner
  %w = f32[8]{0} concatenate(%called, %called), dimensions={0}
  %again = f32[1]{0} call(%w), to_apply=%shared
  ROOT %r.1 = f32[4]{0} add(%called, %t)
}
%else (e: f32[4]) -> f32[4] {
  %e = f32[4]{0} parameter(0)
  %st = ((f32[4]{0}), f32[32]{0}) async-start(%e), calls=%wrapped_all_gather
  %dn = f32[32]{0} async-done(%st), calls=%wrapped_all_gather
  %i = s32[] constant(1)
  ROOT %nested = f32[4]{0} conditional(%i, %e, %e), branch_computations={%b0, %b1}
}
ENTRY %main (x: f32[4], q: pred[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %q = pred[] parameter(1)
  %ar.0 = f32[4]{0} all-reduce(%x), channel_id=1, replica_groups={}, to_apply=%add
  %v = f32[8]{0} concatenate(%ar.0, %ar.0), dimensions={0}
  %every = f32[1]{0} call(%v), to_apply=%shared
  ROOT %c = f32[4]{0} conditional(%q, %ar.0, %ar.0), true_computation=%then, false_computation=%else
}
"""

MLIR_CALLED_FROM_BRANCH = """module @m {
  func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<i1>) -> tensor<4xf32> {
    %0 = "stablehlo.all_reduce"(%arg0) ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %s = stablehlo.add %a, %b : tensor<f32>
      stablehlo.return %s : tensor<f32>
    }) : (tensor<4xf32>) -> tensor<4xf32>
    %1 = func.call @shared(%0) : (tensor<4xf32>) -> tensor<4xf32>
    %2 = "stablehlo.if"(%arg1) ({
      %3 = func.call @outer(%1) : (tensor<4xf32>) -> tensor<4xf32>
      %4 = func.call @shared(%3) : (tensor<4xf32>) -> tensor<4xf32>
      stablehlo.return %4 : tensor<4xf32>
    }, {
      stablehlo.return %1 : tensor<4xf32>
    }) : (tensor<i1>) -> tensor<4xf32>
    return %2 : tensor<4xf32>
  }
  func.func private @outer(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = call @leaf(%arg0) : (tensor<4xf32>) -> tensor<4xf32>
    return %0 : tensor<4xf32>
  }
  func.func private @leaf(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.all_gather"(%arg0) <{all_gather_dim = 0 : i64}> : (tensor<4xf32>) -> tensor<32xf32>
    %1 = stablehlo.slice %0 [0:4] : (tensor<32xf32>) -> tensor<4xf32>
    return %1 : tensor<4xf32>
  }
  func.func private @shared(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.collective_permute"(%arg0) <{source_target_pairs = dense<[[0, 1]]> : tensor<1x2xi64>}> : (tensor<4xf32>) -> tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
"""


def _without_shared(text):
  """The same program without the computation that the entry and a branch both call."""
  out, skip = [], None
  for line in text.splitlines():
    if skip is not None:
      if line == skip:
        skip = None
      continue
    if "shared" in line:
      if line.rstrip().endswith("{"):  # its definition: drop it up to its closing brace
        skip = line[:len(line) - len(line.lstrip())] + "}"
      continue
    out.append(line)
  return "\n".join(out) + "\n"


def test_collectives_called_from_a_branch_count_as_conditional():
  """A collective reached from a branch only through a call, an async wrapper or a nested
  conditional runs only when the branch is taken; one that the entry also calls runs on
  every call. jaxbn's counter agrees with the known counts and with the independent
  parsers (which do not model the shared computation: compared without it)."""
  hlo, mlir = HLO_CALLED_FROM_BRANCH, MLIR_CALLED_FROM_BRANCH
  assert testing.collective_counts(hlo, conditional=False) == {
      "all-reduce": 1, "reduce-scatter": 1}
  assert testing.collective_counts(hlo, conditional=True) == {
      "all-reduce": 1, "all-gather": 1, "collective-permute": 1}
  assert testing.collective_bytes(hlo, conditional=True) == {
      "all-reduce": 16, "all-gather": 128, "collective-permute": 16}
  assert testing.collective_bytes(hlo, conditional=False) == {
      "all-reduce": 16, "reduce-scatter": 4}
  assert testing.collective_counts(mlir, conditional=False) == {
      "all-reduce": 1, "collective-permute": 1}
  assert testing.collective_counts(mlir, conditional=True) == {"all-gather": 1}
  for text, parse in ((hlo, hlo_counts), (mlir, stablehlo_counts)):
    text = _without_shared(text)
    for cond in (None, False, True):
      assert testing.collective_counts(text, conditional=cond) == \
          summarize(parse(text), conditional=cond), cond
  assert summarize(hlo_counts(_without_shared(hlo)), conditional=True) == {
      "all-reduce": 1, "all-gather": 1, "collective-permute": 1}
  assert summarize(stablehlo_counts(_without_shared(mlir)), conditional=True) == {
      "all-gather": 1}


def test_jaxbn_collective_counts_agrees_on_async_and_variadic_text():
  for text, parse in ((HLO_ASYNC, hlo_counts), (MLIR_VARIADIC, stablehlo_counts)):
    for arrays in (False, True):
      assert testing.collective_counts(text, operands=arrays) == \
          summarize(parse(text), arrays=arrays)


# ------------------------------------------------------------------ the BN claim, re-counted
@pytest.mark.parametrize("use_fast_variance", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_bn_two_all_reduces_forward_and_one_backward_counted_independently(use_fast_variance,
                                                                            masked):
  """Forward: the common shift, then the moments; backward: (Σdy, Σdy·x̂). No conditional."""
  mesh = _mesh()
  c = 8
  x = _x(mesh, (16, 3, c))
  m = jax.ShapeDtypeStruct((16, 1, 1), jnp.bool_, sharding=NamedSharding(mesh, P("data")))
  v = jax.ShapeDtypeStruct((c,), jnp.float32, sharding=NamedSharding(mesh, P()))

  def fwd(x, mask, s, b):
    return jaxbn.batch_norm(x, jaxbn.init_stats(c), s, b, training=True, axis_name="data",
                            use_fast_variance=use_fast_variance,
                            mask=mask if masked else None)[0]

  def fwd_bwd(x, mask, s, b, w):
    return jax.grad(lambda x, s, b: jnp.sum(fwd(x, mask, s, b) * w), argnums=(0, 1, 2))(x, s, b)

  for fn, args, outs, expected in (
      (fwd, (x, m, v, v), P("data"), 2),
      (fwd_bwd, (x, m, v, v, x), (P("data"), P(), P()), 3)):
    specs = tuple(P("data") if a is x or a is m else P() for a in args)
    lowered = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=outs)).lower(*args)
    lo = stablehlo_counts(lowered.as_text())
    co = hlo_counts(lowered.compile().as_text())
    # Exactly `expected` all-reduces and nothing else, as JAX emitted them and as XLA
    # compiled them, and nothing inside a conditional branch.
    assert summarize(lo, conditional=False) == {"all-reduce": expected}, fn.__name__
    assert summarize(co, conditional=False) == {"all-reduce": expected}, fn.__name__
    assert summarize(lo) == summarize(lo, conditional=False), fn.__name__
    assert set(summarize(co)) <= {"all-reduce"}  # no all-gather of the batch anywhere
    assert testing.collective_counts(lowered, conditional=False) == summarize(
        lo, conditional=False)


def test_parallel_collective_counters_are_deprecated_aliases_of_jaxbn_testing():
  for name in ("collective_counts", "collective_bytes"):
    with pytest.warns(DeprecationWarning, match=rf"jaxbn\.parallel\.{name} moved to "
                                                rf"jaxbn\.testing\.{name}"):
      old = getattr(parallel, name)
    assert old is getattr(testing, name)
    assert name not in parallel.__all__ and name in testing.__all__
