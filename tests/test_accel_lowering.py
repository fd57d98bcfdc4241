"""The CUDA lowering of every layer's train step: no conditional, no barrier, O(C) collectives.

``jax.export.export(jax.jit(step), platforms=['cuda'])`` lowers a train step to the StableHLO
that XLA:GPU would compile, on this CPU machine (no GPU needed, nothing runs). The step is a
loss, its gradient with respect to the parameters and the input, and the batch statistics
updated. For the functional core (``jaxbn.batch_norm`` stable and fast), every Linen
normalization layer in its default configuration, and ``jaxbn.nnx.BatchNorm``, in three modes —
one device; ``jax.shard_map`` over 8 devices with ``axis_name`` for the layers with batch
statistics; plain ``jax.jit`` on batch-sharded arrays — the tests check:

* no run-time conditional: ``stablehlo.case`` / ``stablehlo.if`` with two or more regions and a
  non-constant index (on XLA:GPU each is a ConditionalThunk: a predicate copy to the host and a
  host synchronization per step). A case on a constant index is what ``lax.platform_dependent``
  leaves when lowered for one platform; XLA folds it, so it is not counted;
* no ``stablehlo.optimization_barrier`` (XLA:CPU-only devices must not reach the CUDA program);
* under shard_map, all-reduced bytes per device per train step of one layer at most
  ``8 · C · 4`` bytes plus 64 bytes, C the feature count. Budget, in float32 C-vectors: forward
  moments <= 3 (count-weighted sums and second moments, plus a second round of an exact merge),
  backward <= 2 (``Σdy``, ``Σdy·x̂``), parameter gradients <= 3 (scale, bias and a third
  per-channel parameter for FRN/EvoNorm); the 64 bytes cover scalars (the loss, counts). A
  layer that all-reduces an activation-sized tensor is ``N·H·W/8`` times over it.
  LayerNorm/GroupNorm/InstanceNorm/RMSNorm also stay within 2x flax's bytes.

For plain ``jit`` the StableHLO is the program before SPMD partitioning (the partitioner adds
the collectives at compile time), so only conditionals and barriers are checked there.

The StableHLO parser below is written for this test (it trusts nothing in ``jaxbn``):
``func.call`` bodies count once per call, ops are attributed to the function they are printed in.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import jaxbn
import jaxbn.linen as jbl
import jaxbn.nnx as jbx

N_DEV = 8
# Global shapes: batch 4 per device (2 ghost batches of 2), C = 32 features. Lowering allocates
# nothing, so the large shape costs no more than the small one; on one device the two take both
# sides of jaxbn's small-input path (below 2**16 entries, unsharded, no axis_name).
SHAPES = {"small": (N_DEV * 4, 4, 4, 32), "large": (N_DEV * 4, 64, 64, 32)}
C = 32
BYTES_PER_C_VECTOR = C * 4
MAX_C_VECTORS = 8  # forward 3 + backward 2 + parameter gradients 3 (see the module docstring)
SCALAR_BYTES = 64
MODES = ("single", "shard_map", "jit")

# ---------------------------------------------------------------------------------------------
# A small StableHLO text parser.
# ---------------------------------------------------------------------------------------------

_ELEM = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
         "i1": 1, "ui32": 4, "ui8": 1}
_FUNC = re.compile(r"^\s*func\.func\s+(?:public|private)?\s*@([\w.$\-]+)\(")
_OP = re.compile(r'^(?:(%[^=]+?)\s=\s)?"?([a-z_]+\.[a-z_0-9]+)"?')


def _operand_bytes(line):
  sig = re.sub(r"\sloc\(.*$", "", line).rsplit(" : ", 1)[-1].split(" -> ", 1)[0]
  return sum(math.prod(int(d) for d in dims.split("x") if d) * _ELEM[t]
             for dims, t in re.findall(r"tensor<((?:\d+x)*)(\w+)>", sig))


def lowering_counts(text):
  """``Counter`` of conditionals, barriers, all-reduce ops and bytes in one call of ``main``."""
  funcs, cur, stack, defs, last = {}, None, [], {}, None
  for raw in text.splitlines():
    line = raw.strip()
    if m := _FUNC.match(raw):
      cur, stack, defs, last = [], [], {}, None
      funcs[m.group(1)] = cur
      continue
    if cur is None or not line or line.startswith("^bb"):
      continue
    if line.startswith("}"):
      if not stack:
        cur = None
      elif line.endswith("{"):  # "}, {": the next region of the same op
        stack[-1]["regions"] += 1
      else:
        op = stack.pop()
        if op["name"] == "stablehlo.all_reduce":
          op["bytes"] = _operand_bytes(line)
      continue
    m = _OP.match(line)
    if not m:
      if line.endswith("{") and last is not None:  # "cond {" of a while, "reducer(...) {"
        stack.append(last)
      continue
    for r in re.findall(r"%\w+", m.group(1) or ""):
      defs[r] = m.group(2)
    op = dict(name=m.group(2), regions=1, bytes=0, callee=None, const_index=False)
    if op["name"] in ("stablehlo.case", "stablehlo.if"):
      idx = re.search(r'"\((%\w+)', line)
      op["const_index"] = bool(idx) and defs.get(idx.group(1)) == "stablehlo.constant"
    if op["name"] == "func.call":
      op["callee"] = re.search(r"call @([\w.$\-]+)\(", line).group(1)
    cur.append(op)
    last = op
    if line.endswith("{"):
      stack.append(op)

  counts = Counter()

  def visit(name, depth=0):
    for op in funcs[name]:
      kind = op["name"]
      if kind in ("stablehlo.case", "stablehlo.if"):
        counts["case_if" if op["regions"] >= 2 and not op["const_index"] else "static_case"] += 1
      elif kind == "stablehlo.optimization_barrier":
        counts["optimization_barrier"] += 1
      elif kind == "stablehlo.all_reduce":
        counts["all_reduce"] += 1
        counts["all_reduce_bytes"] += op["bytes"]
      elif kind == "func.call" and depth < 100:
        visit(op["callee"], depth + 1)

  visit("main")
  return counts


def test_parser_counts_a_conditional_a_barrier_and_psum_bytes():
  """The parser on a known program: a lax.cond on data, a barrier, a psum of C floats under
  shard_map (counted once per call of a jitted helper called twice); platform_dependent's
  constant-index case is not a conditional."""
  mesh = _mesh()

  @jax.jit
  def helper(v):
    return lax.psum(v, "data")

  def f(x):
    s = helper(jnp.sum(x, axis=0)) + helper(jnp.sum(x * x, axis=0))
    s = lax.cond(s[0] > 0, lambda v: v + 1, lambda v: v - 1, s)
    s = lax.optimization_barrier(s)
    return lax.platform_dependent(s, cpu=lambda v: v * 2, default=lambda v: v * 3)

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P()))
  c = _lower(fn, (_sds((N_DEV * 2, C), mesh, P("data")),))
  assert (c["case_if"], c["optimization_barrier"], c["all_reduce"], c["all_reduce_bytes"]) == (
      1, 1, 2, 2 * C * 4), c


# ---------------------------------------------------------------------------------------------
# Train steps.
# ---------------------------------------------------------------------------------------------


def _mesh():
  return Mesh(np.array(jax.devices()[:N_DEV]), ("data",), axis_types=(AxisType.Auto,))


def _sds(shape, mesh=None, spec=None, dtype=jnp.float32):
  sharding = None if mesh is None else NamedSharding(mesh, spec)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _lower(fn, args):
  return lowering_counts(jax.export.export(fn, platforms=["cuda"])(*args).mlir_module())


def _wrap(step, mode, mesh, params, stats, shape):
  """The step jitted for ``mode`` and its ShapeDtypeStruct arguments (global batch ``shape``)."""
  specs = lambda tree, s: jax.tree.map(lambda a: _sds(a.shape, mesh, s, a.dtype), tree)
  if mode == "single":
    return jax.jit(step), (params, stats, _sds(shape), _sds(shape))
  args = (specs(params, P()), specs(stats, P()), _sds(shape, mesh, P("data")),
          _sds(shape, mesh, P("data")))
  if mode == "shard_map":
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=(P(), P(), P(), P("data")))), args
  rep, shd = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(rep, rep, shd, shd),
                 out_shardings=(rep, rep, rep, shd)), args


def _loss(y, target, mode):
  loss = jnp.mean(jnp.square(y.astype(jnp.float32) - target))
  return lax.pmean(loss, "data") if mode == "shard_map" else loss


def _step_of(apply, mode):
  """``apply(params, stats, x) -> (y, new_stats)`` made a train step."""
  def step(params, stats, x, target):
    def loss(params, x, stats):
      y, new_stats = apply(params, stats, x)
      return _loss(y, target, mode), new_stats
    (value, new_stats), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, x, stats)
    return value, new_stats, gp, gx
  return step


def core_step(fast, mode, mesh, shape):
  axis_name = "data" if mode == "shard_map" else None

  def apply(params, stats, x):
    return jaxbn.batch_norm(x, jaxbn.BatchStats(**stats), params["scale"], params["bias"],
                            training=True, axis_name=axis_name, use_fast_variance=fast)
  params = {"scale": _sds((C,)), "bias": _sds((C,))}
  stats = jaxbn.init_stats(C)._asdict()
  stats = jax.tree.map(lambda a: _sds(a.shape, dtype=a.dtype), stats)

  def apply_dict(params, stats, x):
    y, new = apply(params, stats, x)
    return y, new._asdict()
  return _wrap(_step_of(apply_dict, mode), mode, mesh, params, stats, shape)


# Linen layers in their default configuration (groups chosen to divide C = 32; the ghost
# batch of 2 divides the per-device batch of 4). Statistics: "train" (mutable batch_stats,
# use_running_average=False, axis_name under shard_map), "read" (reads batch_stats, updates
# nothing; axis_name where the layer takes one), None (no statistics).
LINEN = {
    "BatchNorm": (jbl.BatchNorm, {}, "train"),
    "BatchRenorm": (jbl.BatchRenorm, {}, "train"),
    "GhostBatchNorm": (jbl.GhostBatchNorm, dict(virtual_batch_size=2), "train"),
    "SplitBatchNorm": (jbl.SplitBatchNorm, {}, "train"),
    "EvoNormB0": (jbl.EvoNormB0, {}, "train"),
    "FrozenBatchNorm": (jbl.FrozenBatchNorm, {}, "read"),
    "TestTimeBatchNorm": (jbl.TestTimeBatchNorm, {}, "read"),
    "GroupNorm": (jbl.GroupNorm, dict(num_groups=8), None),
    "LayerNorm": (jbl.LayerNorm, {}, None),
    "InstanceNorm": (jbl.InstanceNorm, {}, None),
    "RMSNorm": (jbl.RMSNorm, {}, None),
    "FilterResponseNorm": (jbl.FilterResponseNorm, {}, None),
    "EvoNormS0": (jbl.EvoNormS0, dict(num_groups=8), None),
}
if hasattr(jbl, "BatchChannelNorm"):
  LINEN["BatchChannelNorm"] = (jbl.BatchChannelNorm, dict(num_groups=8), "train")
NOT_NORMS = {"WSConv", "ScaledWSConv"}  # weight standardization: no activation statistics
FLAX = {"GroupNorm": (nn.GroupNorm, dict(num_groups=8)), "LayerNorm": (nn.LayerNorm, {}),
        "InstanceNorm": (nn.InstanceNorm, {}), "RMSNorm": (nn.RMSNorm, {})}


def linen_step(cls, kw, statistics, mode, mesh, shape):
  fields = cls.__dataclass_fields__

  def make(axis_name):
    extra = {}
    if statistics == "train":
      extra["use_running_average"] = False
    if statistics and "axis_name" in fields:
      extra["axis_name"] = axis_name
    return cls(**kw, **extra)
  shapes = jax.eval_shape(make(None).init, jax.random.key(0), _sds(shape))
  params, stats = shapes["params"], shapes.get("batch_stats", {})
  layer = make("data" if mode == "shard_map" and statistics else None)

  def apply(params, stats, x):
    if not stats:
      return layer.apply({"params": params}, x), stats
    if statistics == "read":  # reads its statistics, never updates them
      return layer.apply({"params": params, "batch_stats": stats}, x), stats
    y, upd = layer.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]
  return _wrap(_step_of(apply, mode), mode, mesh, params, stats, shape)


def nnx_step(mode, mesh, shape):
  model = jbx.BatchNorm(C, axis_name="data" if mode == "shard_map" else None,
                        rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  abstract = lambda tree: jax.tree.map(lambda a: _sds(a.shape, dtype=a.dtype), tree)

  def step(params, stats, x, target):  # merged inside the trace, differentiated with nnx.grad
    m = nnx.merge(graphdef, params, stats)
    value, (gm, gx) = nnx.value_and_grad(lambda m, x: _loss(m(x), target, mode),
                                         argnums=(0, 1))(m, x)
    return value, nnx.state(m, nnx.BatchStat), gm, gx
  return _wrap(step, mode, mesh, abstract(params), abstract(stats), shape)


def _build(name, mode, mesh, shape):
  if name.startswith("batch_norm("):
    return core_step(name == "batch_norm(fast)", mode, mesh, shape)
  if name == "nnx.BatchNorm":
    return nnx_step(mode, mesh, shape)
  return linen_step(*LINEN[name], mode, mesh, shape)


NAMES = ["batch_norm(stable)", "batch_norm(fast)", *LINEN, "nnx.BatchNorm"]


def test_every_layer_of_the_layer_table_is_lowered_here():
  """A new layer (a row of jaxbn's layer table) is checked here too, or the test says so."""
  from jaxbn._layers.registry import LAYERS  # noqa: PLC0415
  missing = {row.name for row in LAYERS} - set(LINEN) - NOT_NORMS
  assert not missing, f"add {sorted(missing)} (default configuration) to LINEN above"


@pytest.fixture(scope="module")
def mesh():
  return _mesh()


@pytest.fixture(scope="module")
def counts(mesh):
  """Lowered once per (layer, mode), shared by the tests."""
  cache = {}

  def get(name, mode, size):
    if (name, mode, size) not in cache:
      cache[name, mode, size] = _lower(*_build(name, mode, mesh, SHAPES[size]))
    return cache[name, mode, size]
  return get


# The small shape only on one device: the sharded modes have no small-input path.
MODE_SIZES = [("single", "small"), ("single", "large"), ("shard_map", "large"), ("jit", "large")]


@pytest.mark.parametrize("mode,size", MODE_SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_lowering_has_no_conditional_and_no_optimization_barrier(counts, name, mode, size):
  c = counts(name, mode, size)
  assert c["case_if"] == 0, (
      f"{name} [{mode}, {size}]: {c['case_if']} run-time stablehlo.case/if in the CUDA lowering "
      f"(each a host synchronization on XLA:GPU); counts {dict(c)}")
  assert c["optimization_barrier"] == 0, (
      f"{name} [{mode}, {size}]: {c['optimization_barrier']} optimization barriers in the CUDA "
      f"lowering; counts {dict(c)}")


@pytest.mark.parametrize("name", NAMES)
def test_shard_map_all_reduce_bytes_are_O_features(counts, name):
  size = "large"  # an activation-sized all-reduce is 2 MiB here, ~1,900x the bound
  c = counts(name, "shard_map", size)
  bound = MAX_C_VECTORS * BYTES_PER_C_VECTOR + SCALAR_BYTES
  assert c["all_reduce_bytes"] <= bound, (
      f"{name} [shard_map, {size}]: {c['all_reduce_bytes']:,} B all-reduced per device per train "
      f"step in {c['all_reduce']} ops; the bound is {bound:,} B ({MAX_C_VECTORS} float32 "
      f"vectors of C = {C} features + {SCALAR_BYTES} B; one activation is "
      f"{math.prod(SHAPES[size]) // N_DEV * 4:,} B)")


@pytest.mark.parametrize("name", list(FLAX))
def test_batch_free_norms_all_reduce_at_most_twice_flax(counts, mesh, name):
  cls, kw = FLAX[name]
  flax_bytes = _lower(*linen_step(cls, kw, None, "shard_map", mesh, SHAPES["large"]))[
      "all_reduce_bytes"]
  ours = counts(name, "shard_map", "large")["all_reduce_bytes"]
  assert ours <= 2 * flax_bytes, (
      f"{name} [shard_map]: {ours:,} B all-reduced per device per train step, flax's "
      f"{flax_bytes:,} B (bound 2x)")
