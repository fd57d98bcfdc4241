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
    if len(v):
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
