"""Exact statistics for any offset, in every variance mode, on every parallel path.

float32 data ``offset + N(0, σ²)`` with ``|mean| / std = 1e4``, uneven masks and a device
with no valid entry, on 8 devices. For each path (1 device, ``shard_map``, ``pmap``,
``vmap``, plain ``jit`` on sharded arrays), both variance modes, and each of
``batch_norm``, ``batch_renorm``, ``ghost_batch_norm``, ``group_norm`` and the linen and nnx
BatchNorm layers with their defaults (``use_fast_variance=True``), the variance is compared
with float64 NumPy on the global valid entries, for three starting points of the running
statistics: fresh (mean 0: the first step), already at the data (the one-pass common path),
and after a jump of the data mean by 1e4·std (running mean 1e4·std away).

Bound: the relative error of the variance is at most ``c · sqrt(n) · eps32`` with ``c = 8``
(the rounding of a float32 sum of ``n`` terms after the exact correction; 3e-5 here, below
the 1e-4 of the design contract). A raw one-pass ``E[x²] − E[x]²`` errs by O(1) on this data,
and the merge of per-device float32 means (jaxbn 0.1's stable mode) by ~1e-4: both fail it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

D, PER, F = 8, 16, 4
N = D * PER
STD = 1.0
OFFSET = 1e4
VALID = (16, 3, 9, 0, 16, 5, 1, 12)  # valid rows per device; device 3 has none
EPS32 = np.finfo(np.float32).eps


def _data():
  rng = np.random.default_rng(0)
  x = (OFFSET + STD * rng.normal(size=(N, F))).astype(np.float32)
  mask = np.concatenate([np.arange(PER) < k for k in VALID])[:, None]
  return x, mask


X, MASK = _data()
XV = X.astype(np.float64)[MASK[:, 0]]
VAR_REF = XV.var(0)
BOUND = 8 * np.sqrt(len(XV)) * EPS32
# Starting running means: fresh, at the data, after a jump of 1e4 std.
STARTS = {"fresh": 0.0, "at_data": OFFSET, "jump": OFFSET - 1e4 * STD}

LINEN = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.0)


def _ghost_ref():
  """Pooled within-virtual-batch variance (virtual batch = one device's rows)."""
  num = den = 0.0
  for d in range(D):
    v = X.astype(np.float64)[d * PER:(d + 1) * PER][MASK[d * PER:(d + 1) * PER, 0]]
    if len(v) > 1:  # a virtual batch with at most one valid row is left out (the contract)
      num = num + len(v) * v.var(0)
      den += len(v)
  return num / den


def _variances(x, mask, start, axis_name, fast):
  """Every normalization's batch variance for one device's (or the global) batch."""
  stats = jaxbn.BatchStats(jnp.full((F,), start, jnp.float32), jnp.ones((F,)),
                           jnp.zeros((), jnp.int32))
  kw = dict(training=True, momentum=0.0, axis_name=axis_name, mask=mask,
            use_fast_variance=fast)
  out = {"batch_norm": jaxbn.batch_norm(x, stats, **kw)[1].var,
         "renorm": jaxbn.batch_renorm(x, stats, r_max=1e3, d_max=1e9, **kw)[1].var}
  if x.shape[0] == PER:  # one virtual batch per device's rows
    out["ghost"] = jaxbn.ghost_batch_norm(x, stats, virtual_batch_size=PER, **kw)[1].var
  # group norm over the (single-group) features of every example: var(y) per row is
  # var / (var + eps) for an exact variance.
  y = jaxbn.group_norm(x, num_groups=1, epsilon=1e-12)
  out["group_norm_rows"] = jnp.var(y.astype(jnp.float32), axis=1)
  # the layers, with their defaults (flax's use_fast_variance=True) and their running mean
  variables = {"params": {"scale": jnp.ones(F), "bias": jnp.zeros(F)},
               "batch_stats": {"mean": stats.mean, "var": stats.var}}
  _, upd = LINEN.clone(axis_name=axis_name).apply(variables, x, mask=mask,
                                                   mutable=["batch_stats"])
  out["linen"] = upd["batch_stats"]["var"]
  layer = jaxbn.nnx.BatchNorm(F, momentum=0.0, axis_name=axis_name, rngs=nnx.Rngs(0))
  layer.mean[...] = stats.mean
  layer(x, mask=mask)
  out["nnx"] = layer.var[...]
  return out


def _check(out):
  for name, v in out.items():
    v = np.asarray(v, np.float64)
    if name == "group_norm_rows":
      # var(y) = 1 for an exact per-example variance (eps = 1e-12); bound as above for the
      # F terms of each row, plus the float32 rounding of y (|y| <= 2: 8 eps).
      err = np.max(np.abs(v - 1.0))
      assert err <= 8 * np.sqrt(F) * EPS32 + 8 * EPS32, (name, err)
      continue
    ref = _ghost_ref() if name == "ghost" else VAR_REF
    err = np.max(np.abs(v.reshape(-1, F)[0] - ref) / ref)
    assert err <= BOUND, (name, err, BOUND)


def _build(path, fast):
  """The compiled check for one path and mode, called with each starting running mean
  (a traced scalar: one compile serves the three starts)."""
  x, mask = X, MASK
  f = functools.partial(_variances, fast=fast)
  if path == "single":
    g = jax.jit(lambda x, m, st: f(x, m, st, axis_name=None))
    return lambda st: g(x, mask, st)
  mesh = jax.make_mesh((D,), ("data",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  if path == "jit_sharded":
    g = jax.jit(lambda x, m, st: f(x, m, st, axis_name=None))
    xs, ms = put(x), put(mask)
    return lambda st: g(xs, ms, st)
  if path == "shard_map":
    specs = {k: P("data") if k == "group_norm_rows" else P()
             for k in jax.eval_shape(lambda x, m: f(x, m, 0.0, axis_name=None), X[:PER],
                                     MASK[:PER])}
    g = jax.jit(jax.shard_map(lambda x, m, st: f(x, m, st, axis_name="data"), mesh=mesh,
                              in_specs=(P("data"), P("data"), P()), out_specs=specs))
    xs, ms = put(x), put(mask)
    return lambda st: g(xs, ms, jax.device_put(jnp.float32(st), NamedSharding(mesh, P())))
  split = lambda a: a.reshape(D, PER, *a.shape[1:])
  mapper = (functools.partial(jax.pmap, in_axes=(0, 0, None)) if path == "pmap"
            else functools.partial(jax.vmap, in_axes=(0, 0, None)))
  g = mapper(lambda x, m, st: f(x, m, st, axis_name="i"), axis_name="i")
  return lambda st: g(split(x), split(mask), jnp.float32(st))


@pytest.mark.parametrize("fast", [False, True], ids=["stable", "fast"])
@pytest.mark.parametrize("path", ["single", "shard_map", "pmap", "vmap", "jit_sharded"])
def test_variance_exact_for_any_offset(path, fast):
  run = _build(path, fast)
  for start in STARTS.values():
    out = run(start)
    if path in ("pmap", "vmap"):  # every device holds the same global statistics
      rows = np.asarray(out.pop("group_norm_rows")).reshape(-1)
      for v in jax.tree.leaves(out):
        v = np.asarray(v)
        np.testing.assert_array_equal(v, np.broadcast_to(v[:1], v.shape))
      out = jax.tree.map(lambda v: np.asarray(v)[0], out)
      out["group_norm_rows"] = rows
    _check(out)


def test_learned_epsilon_gets_its_gradient():
  """dy/dε through the engine's closed-form derivative, checked numerically in float64."""
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64) * 2 + 1
    s = jnp.linspace(0.5, 1.5, 5, dtype=jnp.float64)
    stats = jaxbn.init_stats(5, jnp.float64)
    for f in (lambda e, x: jaxbn.rms_norm(x, s, epsilon=e),
              lambda e, x: jaxbn.layer_norm(x, s, s, epsilon=e),
              lambda e, x: jaxbn.group_norm(x[:, None, :], s, s, num_groups=1, epsilon=e),
              lambda e, x: jaxbn.batch_norm(x, stats, s, s, training=True, epsilon=e)[0]):
      check_grads(f, (jnp.float64(0.3), x), order=1, modes=("fwd", "rev"))
      assert abs(float(jax.grad(lambda e: jnp.sum(f(e, x) ** 3))(0.3))) > 1e-3


def test_update_stats_keeps_float64_precision():
  with jax.enable_x64(True):
    stats = jaxbn.init_stats(1, jnp.float64)
    batch = jaxbn.Moments(jnp.array([2.0]), jnp.array([3.0]), jnp.array([4.0]))
    new = jaxbn.update_stats(stats, batch, momentum=0.9)
    assert new.mean.dtype == jnp.float64
    # 0.1 * 2 in float64 (a float32 momentum would give 0.20000004768)
    assert abs(float(new.mean[0]) - 0.2) <= 4 * np.finfo(np.float64).eps


# ----------------------------------------------------------------- the sampled shift


def _rel_var_err(x, m, mask=None):
  xv = np.asarray(x, np.float64)
  if mask is not None:
    xv = xv[np.broadcast_to(mask, x.shape)[:, 0]]
  ref = xv.var(0)
  return np.max(np.abs(np.asarray(m.var, np.float64) - ref) / ref)


@pytest.mark.parametrize("rows", [1000, 70000])  # both sides of ALIAS_MIN_SIZE (2 features)
def test_single_device_exact_on_both_sides_of_the_cpu_alias_threshold(rows):
  """One device, no axis name: one pass about the sampled shift is exact at offset 1e4 for a
  small input (no barriers) and one above moments.ALIAS_MIN_SIZE (per-pass aliases on CPU).
  Bound: 8·sqrt(n)·eps32 as above; a shift of 0 (the running mean of a fresh start) errs by
  O(1) here, so the bound rejects a shift that is not taken from the data."""
  from jaxbn._core import moments as mom
  assert (rows * 2 >= mom.ALIAS_MIN_SIZE) == (rows == 70000)
  rng = np.random.default_rng(3)
  x = (OFFSET + rng.normal(size=(rows, 2))).astype(np.float32)
  for fast in (False, True):
    m = jax.jit(functools.partial(jaxbn.moments, use_fast_variance=fast))(x)
    assert _rel_var_err(x, m) <= 8 * np.sqrt(rows) * EPS32
  naive = np.mean(x * x, 0, dtype=np.float32) - np.mean(x, 0, dtype=np.float32) ** 2
  assert np.max(np.abs(naive - x.astype(np.float64).var(0))) > 0.5  # the planted shift 0


def test_sampled_shift_bound_holds_when_every_sampled_entry_is_an_outlier():
  """Adversarial sample: the strided positions the shift is taken from hold outliers 1e3·σ
  away. K − μ is then large in σ units, but bounded by the data's own spread:
  c = 1 + (μ − K)²/σ² ≤ 1 + n/r. The variance keeps the error c·sqrt(n)·eps32 of that bound
  (stated in the moments docstring) — not the O(1) error of a shift far from the data."""
  from jaxbn._core import moments as mom
  n = 4096
  rng = np.random.default_rng(5)
  x = (OFFSET + rng.normal(size=(n, 1))).astype(np.float32)
  step = -(-n // mom.SAMPLE_PER_AXIS)
  x[::step] += 1e3
  m = jaxbn.moments(x)
  xv = x.astype(np.float64)
  r = len(x[::step])
  c = 1 + (xv[::step].mean() - xv.mean()) ** 2 / xv.var()
  assert c <= 1 + n / r
  assert _rel_var_err(x, m) <= 8 * c * np.sqrt(n) * EPS32


def test_fully_masked_sample_falls_back_to_the_running_mean():
  """A mask that hides every sampled position (here: all but the last rows are padding, as
  left-padded data would be) makes the shift the caller's fallback — batch norm's running
  mean — and the statistics are still those of the valid entries (exact where the running
  mean is near the data)."""
  rng = np.random.default_rng(6)
  x = (OFFSET + rng.normal(size=(64, 3))).astype(np.float32)
  mask = (np.arange(64) % 16 != 0)[:, None]  # the 4 sampled rows (0, 16, 32, 48) are masked
  stats = jaxbn.BatchStats(jnp.full((3,), OFFSET, jnp.float32), jnp.ones(3),
                           jnp.zeros((), jnp.int32))
  _, new = jaxbn.batch_norm(x, stats, training=True, momentum=0.0, mask=mask)
  ref = x.astype(np.float64)[mask[:, 0]]
  assert np.max(np.abs(np.asarray(new.var) - ref.var(0)) / ref.var(0)) <= BOUND
  assert np.max(np.abs(np.asarray(new.mean) - ref.mean(0))) <= 4 * OFFSET * EPS32


def _lowered_text(f, *args, platform):
  return jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


def test_cpu_only_aliases_and_no_conditional_on_gpu_or_tpu():
  """Optimization barriers exist in the XLA:CPU program only — jax.checkpoint's guard against
  CSE at every size, plus the per-pass aliases above moments.ALIAS_MIN_SIZE — the CUDA and TPU
  programs of the same train step hold none, and no platform's program holds a run-time
  conditional (a case/if with a non-constant index)."""
  def step(x, s, b):
    def loss(x, s, b):
      y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(8), s, b, training=True)
      return jnp.sum(y.astype(jnp.float32) ** 3)
    return jax.grad(loss, argnums=(0, 1, 2))(x, s, b)

  vec = jax.ShapeDtypeStruct((8,), jnp.float32)
  cpu_barriers = {}
  for rows in (64, 16384):  # both sides of ALIAS_MIN_SIZE (8 features)
    x = jax.ShapeDtypeStruct((rows, 8), jnp.bfloat16)
    for platform in ("cpu", "cuda", "tpu"):
      text = _lowered_text(step, x, vec, vec, platform=platform)
      barriers = text.count("stablehlo.optimization_barrier")
      if platform == "cpu":
        cpu_barriers[rows] = barriers
      else:
        assert barriers == 0, (rows, platform)
      assert "stablehlo.if" not in text and "stablehlo.while" not in text
      assert _runtime_cases(text) == 0, (rows, platform)
  assert cpu_barriers[16384] > cpu_barriers[64] > 0, cpu_barriers


def _runtime_cases(text: str) -> int:
  """Cases whose index is computed at run time. lax.platform_dependent emits cases indexed
  by a constant, or by the result of such a case (XLA folds both away)."""
  import re
  static, count = set(), 0
  for line in text.splitlines():
    m = re.match(r"\s*(%[\w#]+)(?::\d+)? = (.*)", line)
    if not m:
      continue
    name, rhs = m.group(1), m.group(2)
    if rhs.startswith("stablehlo.constant"):
      static.add(name)
    elif rhs.startswith('"stablehlo.case"('):
      index = re.match(r'"stablehlo.case"\((%[\w#]+)', rhs).group(1)
      if index in static:
        static.add(name)
      else:
        count += 1
  return count
