"""What jaxbn's and flax's normalization layers ask of a GPU and a TPU, measured on a CPU machine.

Nothing here runs on an accelerator and nothing is timed. Two instruments read the programs
that the accelerator compilers would get:

**CUDA lowering counts** (``--part cuda``, runs anywhere). ``jax.export.export(jax.jit(step),
platforms=['cuda'])`` lowers a train step to the StableHLO that XLA:GPU compiles, with no GPU.
In it the script counts:

* ``stablehlo.case`` / ``stablehlo.if`` with two or more regions and a non-constant index (a
  conditional at run time; on XLA:GPU a ConditionalThunk copies the predicate to the host and
  blocks, i.e. one host synchronization per execution). A case on a constant index (one region,
  or ``lax.platform_dependent`` lowered for one platform) is folded by XLA and counted apart as
  "static"; ``stablehlo.while`` (a host round trip per iteration on XLA:GPU);
* ``stablehlo.optimization_barrier`` (blocks XLA's fusion; the CUDA and TPU lowerings must hold
  none);
* collectives (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``,
  ``collective_permute``, ``collective_broadcast``) and their bytes (operand tensor types, per
  device), on the path every step takes and inside branches apart;
* all ops (``func.call`` bodies counted once per call, structural ops left out).

Modes: ``single`` (one device), ``shard_map`` (``jax.shard_map`` over 8 CPU devices,
``axis_name='data'`` given to the layers that keep batch statistics; replicated parameters, so
their gradients are summed by shard_map's transpose) and ``jit`` (plain ``jax.jit`` with the
batch sharded by a ``NamedSharding``, no axis name). In ``jit`` mode the StableHLO is the
program *before* SPMD partitioning: it holds no collectives (XLA's partitioner inserts them at
compile time). So for that mode the step is also compiled for the 8 CPU devices and its
partitioned, optimized HLO is counted (conditionals, all-reduce ops and bytes): these are
**XLA:CPU-compiled counts**, a proxy for what the partitioner inserts on any backend (the TPU
part below is the real thing for TPU).

**TPU compile estimates** (``--part tpu``, needs libtpu: ``pip install -e ".[tpu-aot]"``).
``jax.experimental.topologies.get_topology_desc('v5e:2x2', 'tpu')`` gives compile-only TPU
devices; ``jit(step).lower(...).compile()`` runs the real XLA:TPU compiler with no TPU. From each
executable: conditionals, all-reduce count and bytes (per device), fusions,
``memory_analysis()`` temp bytes, ``cost_analysis()`` bytes accessed, and the sum of the
``estimated_cycles`` XLA:TPU writes into each top-level instruction's backend_config (on the
path every step takes, and inside conditional branches apart). These are XLA:TPU's cost model,
**not a measurement**: compare implementations within one run; the no-norm model is the floor.

Safety (TPU part): libtpu must reach for no network. The TPU part refuses to run unless the
caller set ``TPU_SKIP_MDS_QUERY=1`` (no metadata-server query) and ``JAX_PLATFORMS=cpu`` (the
default backend stays the CPU) in the environment, and unless the process sits in a network
namespace with no interface but loopback, i.e. was started under ``unshare --net``.

The train step: loss (squared error to a target for one layer, cross-entropy for ResNet-50),
gradient with respect to the parameters *and* the input, batch statistics updated (mutable
``batch_stats``), float32. One layer on ``(8, 56, 56, 256)`` per device; ResNet-50 (v1.5
bottlenecks [3, 4, 6, 3], 53 normalization layers, NHWC 224x224x3, 1000 classes) at batch 8
per device. ``none`` is the same model with the normalization replaced by the identity.

Usage::

    python benchmarks/bench_accel.py --part cuda               # every layer + ResNet-50, ~15 min
    python benchmarks/bench_accel.py --part cuda --quick       # one layer only
    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu unshare --net \\
        /path/to/venv-with-libtpu/bin/python benchmarks/bench_accel.py --part tpu
    # --part all: both (the TPU venv has everything the CUDA part needs)

Results: ``benchmarks/results/bench_accel_cuda.json`` and ``bench_accel_tpu.json``
(``benchmarks/out/`` with ``--quick``), rendered into RESULTS.md by ``render_results.py``.
"""

from __future__ import annotations

import os

# What the caller set, before this script sets anything (the TPU part checks it).
_CALLER_ENV = {k: os.environ.get(k) for k in ("TPU_SKIP_MDS_QUERY", "JAX_PLATFORMS")}
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu: no metadata-server look-up
os.environ.setdefault("JAX_PLATFORMS", "cpu")     # the default backend is the CPU

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Tuple  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import _results  # noqa: E402

import jaxbn.linen as jbl  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The layers under test: class, keyword arguments, and whether the layer keeps batch statistics
# (takes ``use_running_average`` and, under shard_map, ``axis_name='data'``).
# ---------------------------------------------------------------------------------------------

MOMENTUM, EPSILON = 0.9, 1e-5  # flax's ImageNet example


class _Layer:
  def __init__(self, cls, kw=None, stats=False, flax=None):
    self.cls, self.kw, self.stats, self.flax = cls, dict(kw or {}), stats, flax


LAYERS: Dict[str, _Layer] = {
    "flax.BatchNorm(fast)": _Layer(nn.BatchNorm, dict(use_fast_variance=True), True),
    "flax.BatchNorm(stable)": _Layer(nn.BatchNorm, dict(use_fast_variance=False), True),
    "jaxbn.BatchNorm(default)": _Layer(jbl.BatchNorm, {}, True, "flax.BatchNorm(fast)"),
    "jaxbn.BatchNorm(stable)": _Layer(jbl.BatchNorm, dict(use_fast_variance=False), True,
                                      "flax.BatchNorm(stable)"),
    "jaxbn.BatchRenorm": _Layer(jbl.BatchRenorm, {}, True),
    # virtual batch 4: two ghost batches per device at the per-device batch of 8
    "jaxbn.GhostBatchNorm(vbs=4)": _Layer(jbl.GhostBatchNorm, dict(virtual_batch_size=4), True),
    "jaxbn.EvoNormB0": _Layer(jbl.EvoNormB0, {}, True),
    "jaxbn.BatchChannelNorm(32)": _Layer(jbl.BatchChannelNorm, dict(num_groups=32), True),
    "flax.GroupNorm(32)": _Layer(nn.GroupNorm, dict(num_groups=32)),
    "jaxbn.GroupNorm(32)": _Layer(jbl.GroupNorm, dict(num_groups=32), flax="flax.GroupNorm(32)"),
    "flax.LayerNorm": _Layer(nn.LayerNorm),
    "jaxbn.LayerNorm": _Layer(jbl.LayerNorm, flax="flax.LayerNorm"),
    "flax.InstanceNorm": _Layer(nn.InstanceNorm),
    "jaxbn.InstanceNorm": _Layer(jbl.InstanceNorm, flax="flax.InstanceNorm"),
    "flax.RMSNorm": _Layer(nn.RMSNorm),
    "jaxbn.RMSNorm": _Layer(jbl.RMSNorm, flax="flax.RMSNorm"),
    "jaxbn.FilterResponseNorm": _Layer(jbl.FilterResponseNorm),
    "jaxbn.EvoNormS0(32)": _Layer(jbl.EvoNormS0, dict(num_groups=32)),
    "none": _Layer(None),
}
RESNET_LAYERS = ["flax.BatchNorm(fast)", "flax.BatchNorm(stable)", "jaxbn.BatchNorm(default)",
                 "jaxbn.BatchNorm(stable)", "none"]
MODES = ("single", "shard_map", "jit")


def norm_factory(name: str, axis_name: Optional[str]) -> Callable[..., Any]:
  """``f() -> module`` for layer ``name`` in training mode (the identity for ``none``)."""
  spec = LAYERS[name]
  if spec.cls is None:
    return lambda: (lambda x: x)
  kw = dict(spec.kw, epsilon=EPSILON)
  if spec.stats:
    kw.update(use_running_average=False, momentum=MOMENTUM, axis_name=axis_name)
  return functools.partial(spec.cls, **kw)


class OneLayer(nn.Module):
  """Just the normalization layer: the step differentiates its input and parameters."""
  norm: Callable[..., Any]

  @nn.compact
  def __call__(self, x):
    return self.norm()(x)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck (flax examples/imagenet): 1x1, 3x3 (strided), 1x1 x4, projection."""
  filters: int
  strides: Tuple[int, int]
  norm: Callable[..., Any]

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(conv(self.filters, (3, 3), self.strides)(y)))
    y = self.norm()(conv(self.filters * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = self.norm()(conv(self.filters * 4, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50, NHWC: 7x7 stem, max-pool, bottlenecks [3, 4, 6, 3], 53 norm layers, dense."""
  norm: Callable[..., Any]
  classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.max_pool(nn.relu(self.norm()(x)), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate((3, 4, 6, 3)):
      for j in range(blocks):
        x = Bottleneck(64 * 2**i, (2, 2) if i > 0 and j == 0 else (1, 1), self.norm)(x)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------


def build_step(model: str, layer: str, mode: str, mesh: Mesh, batch: int,
               layer_shape=(56, 56, 256)):
  """``(jitted_step, args)``: a train step and the ShapeDtypeStructs it is lowered for.

  ``batch`` is per device; the global batch is ``batch * mesh.size`` in the sharded modes.
  ``step(params, stats, x, target) -> (loss, new_stats, grad_params, grad_x)``.
  """
  spec = LAYERS[layer]
  ndev = 1 if mode == "single" else mesh.size
  axis_name = "data" if (mode == "shard_map" and spec.stats) else None
  if model == "resnet50":
    x_local, t_local, t_dtype = (batch, 224, 224, 3), (batch,), jnp.int32
    make = lambda ax: ResNet50(norm_factory(layer, ax))
  else:
    x_local = t_local = (batch,) + tuple(layer_shape)
    t_dtype = jnp.float32
    make = lambda ax: OneLayer(norm_factory(layer, ax))
  # variables' shapes from an init on a per-device input (no axis name, nothing allocated)
  shapes = jax.eval_shape(lambda k, x: make(None).init(k, x), jax.random.key(0),
                          jax.ShapeDtypeStruct(x_local, jnp.float32))
  params, stats = shapes.get("params", {}), shapes.get("batch_stats", {})
  net = make(axis_name)

  def loss_fn(params, x, stats, target):
    if spec.stats:
      out, upd = net.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
      stats = upd["batch_stats"]
    else:
      out = net.apply({"params": params}, x)
    if model == "resnet50":
      logp = jax.nn.log_softmax(out.astype(jnp.float32))
      loss = -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))
    else:
      loss = jnp.mean(jnp.square(out.astype(jnp.float32) - target))
    if mode == "shard_map":
      loss = lax.pmean(loss, "data")
    return loss, stats

  def step(params, stats, x, target):
    (loss, new_stats), (gp, gx) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, x, stats, target)
    return loss, new_stats, gp, gx

  glob = lambda s: (s[0] * ndev,) + tuple(s[1:])
  if mode == "single":
    return jax.jit(step), (params, stats, jax.ShapeDtypeStruct(glob(x_local), jnp.float32),
                           jax.ShapeDtypeStruct(glob(t_local), t_dtype))
  rep, shd = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  on = lambda tree, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    tree)
  args = (on(params, rep), on(stats, rep),
          jax.ShapeDtypeStruct(glob(x_local), jnp.float32, sharding=shd),
          jax.ShapeDtypeStruct(glob(t_local), t_dtype, sharding=shd))
  if mode == "shard_map":
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=(P(), P(), P(), P("data")))), args
  if mode == "jit":
    return jax.jit(step, in_shardings=(rep, rep, shd, shd),
                   out_shardings=(rep, rep, rep, shd)), args
  raise ValueError(f"bench_accel: unknown mode {mode!r}; choose from {MODES}")


def data_mesh(devices) -> Mesh:
  return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


# ---------------------------------------------------------------------------------------------
# Counting in StableHLO text (as printed by jax.export's mlir_module()).
# ---------------------------------------------------------------------------------------------

_ELEM = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
         "i1": 1, "ui64": 8, "ui32": 4, "ui16": 2, "ui8": 1, "f8E4M3FN": 1, "f8E5M2": 1}
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)")
_MLIR_OP = re.compile(r'^(?:(%[\w#:, %]+?)\s=\s)?"?([a-z_]+\.[a-z_0-9]+)"?')
_FUNC = re.compile(r"^\s*func\.func\s+(?:public|private)?\s*@([\w.$\-]+)\(")
_CALL = re.compile(r"call @([\w.$\-]+)\(")
_CASE_INDEX = re.compile(r'"stablehlo\.(?:case|if)"\((%[\w#]+)\)')
MLIR_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                    "collective_permute", "collective_broadcast")
_STRUCTURAL = {"func.return", "stablehlo.return", "func.call", "func.func"}


def _operand_bytes(line: str) -> int:
  """Bytes of the operand types in an op's ``: (tensor<...>, ...) -> ...`` signature."""
  line = re.sub(r"\sloc\(.*$", "", line)
  sig = line.rsplit(" : ", 1)[-1] if " : " in line else line
  operands = sig.split(" -> ", 1)[0]
  total = 0
  for dims, elem in _TENSOR.findall(operands):
    total += math.prod(int(d) for d in dims.split("x") if d) * _ELEM.get(elem, 4)
  return total


class _Frame:
  """An op whose regions are open while its lines are read."""

  def __init__(self, op: str, index_const: bool):
    self.op, self.regions, self.index_const = op, 1, index_const

  @property
  def conditional(self) -> bool:
    return self.op in ("stablehlo.case", "stablehlo.if") and self.regions >= 2 and not (
        self.index_const)


def _parse_functions(text: str) -> Dict[str, List[tuple]]:
  """Per function, its ops in order as ``(name, frames, bytes, callee, frame)`` tuples."""
  funcs: Dict[str, List[tuple]] = {}
  cur: Optional[List[tuple]] = None
  stack: List[_Frame] = []
  defs: Dict[str, str] = {}
  last: Optional[tuple] = None
  for raw in text.splitlines():
    line = raw.strip()
    m = _FUNC.match(raw)
    if m:
      cur, stack, defs, last = [], [], {}, None
      funcs[m.group(1)] = cur
      continue
    if cur is None or not line or line.startswith("^bb"):
      continue
    if line.startswith("}"):
      if not stack:  # the function's closing brace
        cur = None
        continue
      if line.endswith("{"):  # "}, {" or "} do {": the same op's next region
        stack[-1].regions += 1
        continue
      frame = stack.pop()
      # a collective with a region (all_reduce, reduce_scatter) has its types on this line
      for i in range(len(cur) - 1, -1, -1):
        if cur[i][4] is frame and cur[i][2] is None:
          cur[i] = cur[i][:2] + (_operand_bytes(line),) + cur[i][3:]
          break
      continue
    m = _MLIR_OP.match(line)
    if not m:
      if line.endswith("{") and last is not None:  # "cond {", "reducer(...) {"
        stack.append(last[4])
      continue
    results, name = m.group(1), m.group(2)
    if results:
      for r in re.findall(r"%[\w]+", results):
        defs[r] = name
    index_const = False
    if name in ("stablehlo.case", "stablehlo.if"):
      idx = _CASE_INDEX.search(line)
      index_const = bool(idx) and defs.get(idx.group(1).split("#")[0]) == "stablehlo.constant"
    frame = _Frame(name, index_const)
    callee = None
    if name == "func.call":
      c = _CALL.search(line)
      callee = c.group(1) if c else None
    nbytes = None
    if name.split(".")[-1] in MLIR_COLLECTIVES and not line.endswith("{"):
      nbytes = _operand_bytes(line)
    op = (name, tuple(stack), nbytes, callee, frame)
    cur.append(op)
    last = op
    if line.endswith("{"):
      stack.append(frame)
  return funcs


def stablehlo_counts(text: str) -> Dict[str, Any]:
  """Counts a StableHLO module's ops as one call of ``main`` executes them.

  A ``func.call`` counts its callee's ops once more. Ops inside a run-time conditional
  (``case``/``if`` with >= 2 regions and a non-constant index) are counted as in-branch;
  cases on a constant index (``lax.platform_dependent``) are ``case_if_static``.
  """
  funcs = _parse_functions(text)
  c: Counter = Counter()
  coll: Dict[str, Counter] = {}

  def visit(fname: str, in_branch: bool, in_loop: bool, depth: int):
    for name, frames, nbytes, callee, frame in funcs.get(fname, []):
      br = in_branch or any(f.conditional for f in frames)
      loop = in_loop or any(f.op == "stablehlo.while" for f in frames)
      if name not in _STRUCTURAL:
        c["ops"] += 1
      if name in ("stablehlo.case", "stablehlo.if"):
        c["case_if_static" if not frame.conditional else
          ("case_if_in_branch" if br else "case_if")] += 1
      elif name == "stablehlo.while":
        c["while_in_branch" if br else "while"] += 1
      elif name == "stablehlo.optimization_barrier":
        c["optimization_barrier"] += 1
      elif name == "stablehlo.custom_call":
        c["custom_call"] += 1
      elif name.split(".")[-1] in MLIR_COLLECTIVES:
        k = coll.setdefault(name.split(".")[-1], Counter())
        sfx = "_in_branch" if br else ""
        k["count" + sfx] += 1
        k["bytes" + sfx] += nbytes or 0
      elif name == "func.call" and callee and depth < 100:
        visit(callee, br, loop, depth + 1)

  visit("main", False, False, 0)
  out = {k: c.get(k, 0) for k in ("ops", "case_if", "case_if_in_branch", "case_if_static",
                                  "while", "while_in_branch", "optimization_barrier",
                                  "custom_call")}
  out["collectives"] = {k: dict(v) for k, v in coll.items()}
  return out


def coll_total(coll: Dict[str, Dict[str, int]], kind: Optional[str] = None,
               in_branch: bool = False) -> Tuple[int, int]:
  """(count, bytes) of one collective kind (or all kinds), unconditional or in branches."""
  sfx = "_in_branch" if in_branch else ""
  items = [v for k, v in coll.items() if kind is None or k == kind]
  return (sum(v.get("count" + sfx, 0) for v in items), sum(v.get("bytes" + sfx, 0)
                                                          for v in items))


# ---------------------------------------------------------------------------------------------
# Counting in compiled HLO text (XLA:CPU after SPMD partitioning, or XLA:TPU).
# ---------------------------------------------------------------------------------------------

_HLO_ELEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HLO_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
_HLO_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s")
_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')
HLO_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "collective-broadcast")


def _hlo_bytes(shape: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _HLO_ELEM[dt]
             for dt, dims in _HLO_ARRAY.findall(shape))


def hlo_counts(text: str) -> Dict[str, Any]:
  """Counts a compiled HLO module: the computations that run as kernels or runtime ops.

  Fusion bodies and reducers are skipped (their instructions are inside one kernel).
  Computations reachable from a ``conditional``'s branches are in-branch. Collectives count
  their ``-start`` once (``-done`` skipped); bytes are the result shape per device.
  ``estimated_cycles`` sums the per-instruction estimates XLA:TPU writes into backend_config
  (0 on other backends).
  """
  comps: Dict[str, List[str]] = {}
  cur = None
  for line in text.splitlines():
    if cur is None and line and not line[0].isspace() and line.rstrip().endswith("{"):
      m = _HLO_COMP.match(line)
      if m and not line.startswith("HloModule"):
        cur = m.group(2)
        comps[cur] = []
      continue
    if line.startswith("}"):
      cur = None
    elif cur is not None:
      comps[cur].append(line)
  inner, branches = set(), set()
  for lines in comps.values():
    for line in lines:
      if re.search(r"\sfusion\(", line):
        inner.update(re.findall(r"calls=%?([\w.\-]+)", line))
      inner.update(re.findall(r"to_apply=%?([\w.\-]+)", line))
      for grp in re.findall(r"branch_computations=\{([^}]*)\}", line):
        branches.update(x.strip().lstrip("%") for x in grp.split(","))
      branches.update(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
  in_branch, todo = set(), list(branches)
  while todo:
    name = todo.pop()
    if name in in_branch or name not in comps:
      continue
    in_branch.add(name)
    for line in comps[name]:
      todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
      for grp in re.findall(r"branch_computations=\{([^}]*)\}", line):
        todo += [x.strip().lstrip("%") for x in grp.split(",")]
      todo += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
  c: Counter = Counter()
  coll: Dict[str, Counter] = {}
  for name, lines in comps.items():
    if name in inner:
      continue
    sfx = "_in_branch" if name in in_branch else ""
    for line in lines:
      cyc = _CYCLES.search(line)
      if cyc:
        c["estimated_cycles" + sfx] += int(cyc.group(1))
      m = _HLO_INSTR.match(line.split(", metadata=")[0])
      if not m:
        continue
      shape, opc = m.group(1), m.group(2)
      if opc.endswith("-done"):
        continue
      base = opc[:-len("-start")] if opc.endswith("-start") else opc
      if base in HLO_COLLECTIVES:
        nbytes = _hlo_bytes(shape)
        if opc.endswith("-start") and base in ("all-gather", "collective-permute"):
          # the start's tuple holds (operands, outputs[, contexts]): keep the outputs
          parts = [_hlo_bytes(p) for p in re.split(r",\s(?![^\[]*\])", shape.strip("()"))]
          nbytes = parts[len(parts) // 2] if len(parts) >= 2 else nbytes
        k = coll.setdefault(base, Counter())
        k["count" + sfx] += 1
        k["bytes" + sfx] += nbytes
      elif opc == "fusion":
        c["fusions" + sfx] += 1
      elif opc == "conditional":
        c["conditional" + sfx] += 1
      elif opc == "while":
        c["while" + sfx] += 1
  out = {k: c.get(k, 0) for k in ("conditional", "conditional_in_branch", "while", "fusions",
                                  "fusions_in_branch", "estimated_cycles",
                                  "estimated_cycles_in_branch")}
  out["collectives"] = {k: dict(v) for k, v in coll.items()}
  return out


# ---------------------------------------------------------------------------------------------
# Part 1: CUDA lowering.
# ---------------------------------------------------------------------------------------------


CUDA_LABEL = ("CUDA lowering count (StableHLO from jax.export on a CPU machine, no GPU; jit "
              "mode's collectives: XLA:CPU compiled-HLO count)")
TPU_LABEL = ("TPU compile estimate (XLA:TPU cost model, not a measurement; libtpu AOT compile "
             "on a CPU machine, no TPU)")


def _labelled(label: str, t: Dict[str, Any]) -> Dict[str, Any]:
  """A table that names its platform (``render_results`` shows it; a CPU label is wrong here)."""
  t["platform"] = label
  return t


def cuda_configs(args) -> List[Tuple[str, str, str]]:
  models = ["layer"] if args.quick else args.models.split(",")
  pick = None if args.layers == "all" else set(args.layers.split(",")) | {"none"}
  out = []
  for model in models:
    names = list(LAYERS) if model == "layer" else RESNET_LAYERS
    for mode in args.modes.split(","):
      for name in names:
        if pick is None or name in pick:
          out.append((model, name, mode))
  return out


def cuda_one(model, layer, mode, mesh, args) -> Dict[str, Any]:
  t0 = time.perf_counter()
  fn, sds = build_step(model, layer, mode, mesh, args.batch)
  exp = jax.export.export(fn, platforms=["cuda"])(*sds)
  rec = dict(model=model, layer=layer, mode=mode, stablehlo=stablehlo_counts(exp.mlir_module()))
  rec["lower_s"] = time.perf_counter() - t0
  if mode == "jit" and (args.cpu_compile == "all" or (args.cpu_compile == "layer"
                                                      and model == "layer")):
    t1 = time.perf_counter()
    rec["cpu_hlo"] = hlo_counts(fn.lower(*sds).compile().as_text())
    rec["cpu_compile_s"] = time.perf_counter() - t1
  return rec


def cuda_tables(records) -> List[Dict[str, Any]]:
  ok = {(r["model"], r["layer"], r["mode"]): r for r in records if "error" not in r}
  tables = []
  for model, title in (("layer", "one layer, (8, 56, 56, 256) float32 per device"),
                       ("resnet50", "ResNet-50 train step, batch 8 per device, float32")):
    rows = []
    for r in records:
      if r["model"] != model:
        continue
      if "error" in r:
        rows.append([r["layer"], r["mode"]] + [None] * 12 + [r["error"]])
        continue
      s = r["stablehlo"]
      ar_n, ar_b = coll_total(s["collectives"], "all_reduce")
      other_n, _ = coll_total({k: v for k, v in s["collectives"].items() if k != "all_reduce"})
      br_n, br_b = coll_total(s["collectives"], in_branch=True)
      flax = LAYERS[r["layer"]].flax
      ref = ok.get((model, flax, r["mode"])) if flax else None
      none = ok.get((model, "none", r["mode"])) if r["layer"] != "none" else None
      ref_b = added = None
      if r["mode"] != "jit":  # jit: the StableHLO has no collectives yet (see the CPU column)
        ref_b = coll_total(ref["stablehlo"]["collectives"], "all_reduce")[1] if ref else None
        added = (ar_b - coll_total(none["stablehlo"]["collectives"], "all_reduce")[1]
                 if none else None)
      cpu = r.get("cpu_hlo")
      cpu_cell = None
      if cpu is not None:
        cpu_n, cpu_b = coll_total(cpu["collectives"], "all-reduce")
        cpu_cell = f"{cpu['conditional']} / {cpu_n} / {cpu_b:,} B"
        if none and none.get("cpu_hlo"):
          cpu_cell += (f" (minus none's: "
                       f"{cpu_b - coll_total(none['cpu_hlo']['collectives'], 'all-reduce')[1]:,}"
                       " B)")
        if ref and ref.get("cpu_hlo"):
          cpu_cell += (f"; {flax}: "
                       f"{coll_total(ref['cpu_hlo']['collectives'], 'all-reduce')[1]:,} B")
      rows.append([r["layer"], r["mode"], s["case_if"], s["case_if_in_branch"], s["while"],
                   s["optimization_barrier"], ar_n, ar_b, added, ref_b, f"{br_n} ({br_b:,} B)",
                   other_n, s["ops"], cpu_cell, ""])
    if rows:
      tables.append(_labelled(CUDA_LABEL, _results.table(
          f"CUDA lowering count: {title}",
          ["layer", "mode", "case/if", "case/if in branches", "while", "optimization barriers",
           "all-reduce ops", "all-reduce bytes", "all-reduce bytes minus none's",
           "flax counterpart's all-reduce bytes",
           "collectives in branches (bytes)", "other collectives", "StableHLO ops",
           "XLA:CPU-compiled (jit): conditionals / all-reduce ops / bytes", "error"],
          rows, formats=[None] * 7 + [",d", ",d", ",d"] + [None] * 5,
          note="StableHLO from `jax.export.export(jax.jit(step), platforms=['cuda'])`, counted "
               "as one step executes it; case/if: run-time conditionals only (>= 2 regions, "
               "non-constant index; each is a host synchronization on XLA:GPU). Bytes per "
               "device, including the parameter-gradient all-reduces of shard_map's "
               "transpose. `jit`: StableHLO before SPMD partitioning has no collectives; the "
               "last column is the partitioned HLO compiled by XLA:CPU for 8 CPU devices "
               "(a proxy for what the partitioner inserts).")))
  return tables


def run_cuda(args) -> None:
  mesh = data_mesh(jax.devices()[:8])
  records = []
  t0 = time.perf_counter()
  configs = cuda_configs(args)

  def write():  # after every configuration: a stopped run keeps what it measured
    return _results.write_results(
        "bench_accel_cuda", cuda_tables(records), command=_results.command_line(),
        title="CUDA lowering counts: conditionals, barriers, collectives (`bench_accel.py`)",
        notes=["Platform: **CUDA lowering count** (StableHLO for XLA:GPU, lowered on a CPU "
               "machine with `jax.export`; nothing runs on a GPU, nothing is timed). The "
               "`jit` mode's collectives are **XLA:CPU-compiled counts** after SPMD "
               "partitioning on 8 simulated CPU devices.",
               f"Train step: loss, gradient w.r.t. parameters and input, batch statistics "
               f"updated; momentum {MOMENTUM}, epsilon {EPSILON}; shard_map: 8 devices, "
               f"axis_name='data' for the layers with batch statistics. "
               f"{len(records)} of {len(configs)} configurations, wall time "
               f"{time.perf_counter() - t0:.0f} s."],
        out_dir=_results.output_dir(args))

  for model, layer, mode in configs:
    try:
      rec = cuda_one(model, layer, mode, mesh, args)
    except Exception as e:  # a failing configuration is a row with its error
      rec = dict(model=model, layer=layer, mode=mode, error=_results.error_text(e))
    records.append(rec)
    s = rec.get("stablehlo")
    print(f"# cuda {model:<8} {layer:<28} {mode:<9} "
          + (f"case/if={s['case_if']} barriers={s['optimization_barrier']} "
             f"all-reduce={coll_total(s['collectives'], 'all_reduce')} ops={s['ops']} "
             f"{rec['lower_s']:.1f}s" if s else rec["error"]), file=sys.stderr, flush=True)
    if model == "resnet50":
      write()
  path = write()
  for t in cuda_tables(records):
    _results.print_table(t)
  print(f"# {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Part 2: TPU ahead-of-time compile (libtpu, compile-only devices).
# ---------------------------------------------------------------------------------------------


def _check_tpu_safety() -> None:
  """Refuses the TPU part unless libtpu can reach for no network (see the module docstring)."""
  problems = []
  if _CALLER_ENV["TPU_SKIP_MDS_QUERY"] != "1":
    problems.append("TPU_SKIP_MDS_QUERY=1 is not set")
  if _CALLER_ENV["JAX_PLATFORMS"] != "cpu":
    problems.append("JAX_PLATFORMS=cpu is not set")
  try:  # the interfaces of this process's network namespace (only "lo" under unshare --net)
    ifaces = sorted({name for _, name in socket.if_nameindex()} - {"lo"})
  except OSError:
    ifaces = ["(cannot list the network interfaces)"]
  if ifaces:
    problems.append(f"network interfaces {ifaces} are visible (not inside `unshare --net`)")
  if problems:
    raise SystemExit(
        "bench_accel.py --part tpu: refusing to load libtpu: " + "; ".join(problems) + ". Run "
        "`TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu unshare --net python benchmarks/"
        "bench_accel.py --part tpu` (libtpu must not look for a TPU VM's metadata server).")


def tpu_configs(args) -> List[Tuple[str, str, str, str]]:
  """(topology, model, layer, mode): every one-layer step on the first topology, a subset of
  layers on the larger ones (do counts and bytes grow with the device count?), ResNet-50
  under shard_map on the first topology only (a compile takes ~1 min on 2 cores)."""
  topos = args.topologies.split(",")
  pick = None if args.layers == "all" else set(args.layers.split(",")) | {"none"}
  big = set(args.big_layers.split(","))
  out = []
  models = ["layer"] if args.quick else args.models.split(",")
  for ti, topo in enumerate(topos):
    for model in models:
      if model == "resnet50" and ti > 0 and not args.resnet_all_topologies:
        continue
      names = list(LAYERS) if model == "layer" else RESNET_LAYERS
      modes = args.tpu_modes.split(",") if model == "layer" else args.resnet_modes.split(",")
      for mode in modes:
        for name in names:
          if pick is not None and name not in pick:
            continue
          if ti > 0 and name not in big:
            continue
          if model == "resnet50" and name not in args.resnet_layers.split(","):
            continue
          out.append((topo, model, name, mode))
  return out


def tpu_one(topo, model, layer, mode, mesh, args) -> Dict[str, Any]:
  t0 = time.perf_counter()
  fn, sds = build_step(model, layer, mode, mesh, args.batch)
  compiled = fn.lower(*sds).compile()
  rec = dict(topology=topo, model=model, layer=layer, mode=mode, devices=mesh.size,
             device_kind=mesh.devices.flat[0].device_kind, hlo=hlo_counts(compiled.as_text()))
  mem = compiled.memory_analysis()
  rec["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else (cost or {})
  rec["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
  rec["flops"] = float(cost.get("flops", float("nan")))
  rec["compile_s"] = time.perf_counter() - t0
  return rec


def tpu_tables(records) -> List[Dict[str, Any]]:
  ok = {(r["topology"], r["model"], r["layer"], r["mode"]): r for r in records
        if "error" not in r}
  rows = []
  for r in records:
    head = [r["topology"], r["model"], r["layer"], r["mode"]]
    if "error" in r:
      rows.append(head + [None] * 12 + [r["error"]])
      continue
    h = r["hlo"]
    ar_n, ar_b = coll_total(h["collectives"], "all-reduce")
    br_n, br_b = coll_total(h["collectives"], "all-reduce", in_branch=True)
    key = lambda name: (r["topology"], r["model"], name, r["mode"])
    none, ffast = ok.get(key("none")), ok.get(key("flax.BatchNorm(fast)"))
    own = (h["estimated_cycles"] - none["hlo"]["estimated_cycles"]) if none else None
    own_ff = (ffast["hlo"]["estimated_cycles"] - none["hlo"]["estimated_cycles"]
              if ffast and none else None)
    rows.append(head + [
        h["conditional"] + h["conditional_in_branch"], ar_n, ar_b, f"{br_n} ({br_b:,} B)",
        h["fusions"], h["estimated_cycles"] / 1e6, h["estimated_cycles_in_branch"] / 1e6,
        None if own is None or r["layer"] == "none" else own / 1e6,
        None if own is None or not own_ff or r["layer"] == "none" else own / own_ff,
        r["bytes_accessed"] / 1e9, None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20,
        r["compile_s"], ""])
  return [_labelled(TPU_LABEL, _results.table(
      "TPU compile estimate (XLA:TPU cost model, not a measurement)",
      ["topology", "model", "layer", "mode", "conditionals", "all-reduce ops",
       "all-reduce bytes", "all-reduce in branches (bytes)", "fusions", "est. Mcycles",
       "est. Mcycles in branches", "norm's own Mcycles (minus none)",
       "norm's own / flax fast's", "GB accessed", "temp MiB", "compile s", "error"],
      rows, formats=[None] * 6 + [",d", None, None, ".3f", ".3f", ".3f", ".2f", ".3f", ".1f",
                                  ".0f", None],
      note="Compiled by libtpu for compile-only TPU devices; per device. Cycles: sum of "
           "`estimated_cycles` in the backend_config of the top-level instructions on the "
           "path every step takes (branches apart); bytes accessed: `cost_analysis()`; temp: "
           "`memory_analysis().temp_size_in_bytes`. `none` is the same step with the "
           "normalization replaced by the identity: the floor."))]


def run_tpu(args) -> None:
  _check_tpu_safety()
  from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu)
  try:
    from importlib import metadata  # noqa: PLC0415
    libtpu = metadata.version("libtpu")
  except Exception:  # noqa: BLE001
    libtpu = None
  records = []
  t0 = time.perf_counter()
  meshes: Dict[str, Any] = {}
  configs = tpu_configs(args)

  def write():  # after every configuration: a stopped run keeps what it compiled
    return _results.write_results(
        "bench_accel_tpu", tpu_tables(records), command=_results.command_line(),
        title="TPU compile estimates: cycles, bytes, memory, collectives (`bench_accel.py`)",
        notes=["Platform: **TPU compile estimate (XLA:TPU cost model, not a measurement)**: "
               f"libtpu {libtpu} compiles for compile-only TPU devices "
               "(`jax.experimental.topologies.get_topology_desc`) on a CPU machine, under "
               "`unshare --net` with `TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu`. Nothing runs "
               "on a TPU; compare implementations within this run.",
               f"Train step: loss, gradient w.r.t. parameters and input, batch statistics "
               f"updated; batch {args.batch} per device; shard_map: axis_name='data' for the "
               f"layers with batch statistics; jit: batch-sharded, no axis name. "
               f"{len(records)} of {len(configs)} configurations, wall time "
               f"{time.perf_counter() - t0:.0f} s."],
        out_dir=_results.output_dir(args))

  for topo, model, layer, mode in configs:
    try:
      if topo not in meshes:
        meshes[topo] = data_mesh(topologies.get_topology_desc(topo, "tpu").devices)
      rec = tpu_one(topo, model, layer, mode, meshes[topo], args)
    except Exception as e:
      rec = dict(topology=topo, model=model, layer=layer, mode=mode,
                 error=_results.error_text(e))
    records.append(rec)
    h = rec.get("hlo")
    print(f"# tpu {topo} {model:<8} {layer:<28} {mode:<9} "
          + (f"cond={h['conditional']} ar={coll_total(h['collectives'], 'all-reduce')} "
             f"Mcyc={h['estimated_cycles'] / 1e6:.3f}"
             f"(+{h['estimated_cycles_in_branch'] / 1e6:.3f}) "
             f"GB={rec['bytes_accessed'] / 1e9:.3f} temp={rec['temp_bytes']} "
             f"{rec['compile_s']:.0f}s" if h else rec["error"]), file=sys.stderr, flush=True)
    write()
  path = write()
  for t in tpu_tables(records):
    _results.print_table(t)
  print(f"# {path}", file=sys.stderr)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", choices=["cuda", "tpu", "all"], default="cuda")
  p.add_argument("--quick", action="store_true", help="one-layer steps only")
  p.add_argument("--batch", type=int, default=8, help="per-device batch (default 8)")
  p.add_argument("--models", default="layer,resnet50")
  p.add_argument("--modes", default="single,shard_map,jit",
                 help="CUDA part: modes (every model)")
  p.add_argument("--layers", default="all", help="comma list of layer names (none is added)")
  p.add_argument("--cpu-compile", choices=["none", "layer", "all"], default="all",
                 help="CUDA part, jit mode: also compile for the 8 CPU devices and count the "
                      "partitioned HLO's collectives")
  p.add_argument("--tpu-modes", default="shard_map,jit",
                 help="TPU part: modes of the one-layer steps (the sharded ones only)")
  p.add_argument("--topologies", default="v5e:2x2,v5e:4x4",
                 help="TPU topologies; the first gets every configuration")
  p.add_argument("--big-layers", default="flax.BatchNorm(fast),jaxbn.BatchNorm(default),"
                 "flax.LayerNorm,jaxbn.LayerNorm,flax.GroupNorm(32),jaxbn.GroupNorm(32),none",
                 help="one-layer steps also compiled for the topologies after the first")
  p.add_argument("--resnet-layers", default="flax.BatchNorm(fast),flax.BatchNorm(stable),"
                 "jaxbn.BatchNorm(default),none", help="TPU part: ResNet-50 layers")
  p.add_argument("--resnet-modes", default="shard_map", help="TPU part: ResNet-50 modes")
  p.add_argument("--resnet-all-topologies", action="store_true",
                 help="TPU part: compile ResNet-50 for every topology (~1 min each)")
  _results.add_output_args(p)
  args = p.parse_args(argv)
  if args.part in ("tpu", "all"):
    _check_tpu_safety()  # before spending minutes on the CUDA part
  if args.part in ("cuda", "all"):
    run_cuda(args)
  if args.part in ("tpu", "all"):
    run_tpu(args)


if __name__ == "__main__":
  main()
