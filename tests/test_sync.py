"""Synchronized batch statistics across devices: every parallel path equals global-batch BN.

Each path (``jax.shard_map`` over one and over two mesh axes, ``jax.pmap``, ``jax.vmap`` and
nested vmaps, ``pmap`` of ``vmap``, plain ``jax.jit`` on batch-sharded arrays) runs synced BN
forward and backward on 8 simulated devices and is checked against

* a float64 NumPy reference on the concatenated global batch (outputs, running statistics,
  gradients of ``x``, ``scale`` and ``bias``), and
* JAX autodiff of a naive synced BN under the *same* wrapper, which pins the gradient
  semantics of replicated parameters: under ``shard_map`` the gradient of a ``P()`` parameter
  comes out summed over devices, under ``pmap``/``vmap`` (and ``shard_map(check_vma=False)``)
  it is per device and sums to the global gradient.

Collectives are counted in the compiled HLO (and in the lowered StableHLO, before XLA's
all-reduce combiner could merge anything): per BN call two all-reduces forward (the common
shift from the sampled entries, then the moments about it) and one backward, and no
conditional; the first forward one depends on the sample only (checked in the compiled
program's data flow), so it can run while the pass over the local batch does.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import parallel, testing
from jaxbn._core.unsynced import UnsyncedStatisticsWarning
from tests import _reference as ref

F = 3
D = 8
PER = 4
N = D * PER
MOMENTUM = 0.9
EPS = 1e-5
# Valid rows per device: uneven, one device with none.
UNEVEN = (4, 1, 3, 0, 2, 4, 1, 2)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, F)) * [1.0, 2.0, 0.5] + [1.0, -3.0, 10.0]
  x += np.repeat(rng.normal(size=(D, 1)), PER, axis=0)  # devices see different means
  mask = np.concatenate([np.arange(PER) < k for k in UNEVEN])[:, None]
  return dict(x=x.astype(np.float32), mask=mask,
              s=rng.uniform(0.5, 1.5, F).astype(np.float32),
              b=rng.normal(size=F).astype(np.float32),
              w=rng.normal(size=(N, F)).astype(np.float32))


DATA = _data()


def _naive_bn(x, mask, s, b, axis_name):
  """Synced BN written the obvious way (three collectives), differentiated by JAX."""
  m = jnp.broadcast_to(jnp.ones((x.shape[0], 1), bool) if mask is None else mask, x.shape)
  red = tuple(range(x.ndim - 1))

  def total(v):
    v = jnp.sum(v, axis=red)
    return v if axis_name is None else lax.psum(v, axis_name)

  n = total(m.astype(jnp.float32))
  mean = total(jnp.where(m, x, 0)) / n
  var = total(jnp.where(m, (x - mean) ** 2, 0)) / n
  return (x - mean) * lax.rsqrt(var + EPS) * s + b


def _local(axis_name, masked):
  """What every device runs: jaxbn BN and the naive BN, forward and backward."""

  def run(x, mask, s, b, w):
    mask = mask if masked else None

    def loss(x, s, b):
      y, new = jaxbn.batch_norm(x, jaxbn.init_stats(F), s, b, training=True,
                                momentum=MOMENTUM, epsilon=EPS, axis_name=axis_name,
                                mask=mask)
      return jnp.sum(y * w), (y, new)

    (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, s, b)
    gn = jax.grad(lambda x, s, b: jnp.sum(_naive_bn(x, mask, s, b, axis_name) * w),
                  argnums=(0, 1, 2))(x, s, b)
    return y, new.mean, new.var, g, gn

  return run


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _shard_map_path(mesh_shape, names, masked):
  mesh = jax.make_mesh(mesh_shape, names)
  axis = names if len(names) > 1 else names[0]
  bspec = P(axis)
  f = jax.jit(jax.shard_map(
      _local(axis, masked), mesh=mesh,
      in_specs=(bspec, bspec, P(), P(), bspec),
      out_specs=(bspec, P(), P(), (bspec, P(), P()), (bspec, P(), P()))))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  d = DATA
  y, mean, var, g, gn = _np(f(put(d['x'], bspec), put(d['mask'], bspec), put(d['s'], P()),
                              put(d['b'], P()), put(d['w'], bspec)))
  # shard_map: gradients of replicated parameters are already summed over devices.
  return dict(y=y, mean=mean, var=var, g=g, gn=gn)


def _stacked_path(mapper, shape, masked):
  """pmap / vmap / nested maps: leading mapped axes ``shape``; per-device parameter grads."""
  d = DATA
  split = lambda a: a.reshape(shape + (-1,) + a.shape[1:])
  y, mean, var, g, gn = _np(jax.jit(mapper(_local(mapper.axis_name, masked)))(
      split(d['x']), split(d['mask']), d['s'], d['b'], split(d['w'])))
  k = len(shape)
  flat = lambda a: a.reshape((N,) + a.shape[k + 1:])
  per_dev = lambda a: a.reshape((-1,) + a.shape[k:])
  # Every device holds the same (global) statistics.
  for v in (per_dev(mean), per_dev(var)):
    np.testing.assert_array_equal(v, np.broadcast_to(v[:1], v.shape))
  return dict(y=flat(y), mean=per_dev(mean)[0], var=per_dev(var)[0],
              g=(flat(g[0]), per_dev(g[1]), per_dev(g[2])),
              gn=(flat(gn[0]), per_dev(gn[1]), per_dev(gn[2])))


class _Map:
  """A (possibly nested) mapping of the local function over leading axes."""

  def __init__(self, kinds_names, axis_name):
    self.kinds_names = kinds_names
    self.axis_name = axis_name

  def __call__(self, fn):
    for kind, name, size in reversed(self.kinds_names):
      in_axes = (0, 0, None, None, 0)
      if kind == "vmap":
        fn = jax.vmap(fn, in_axes=in_axes, axis_name=name)
      else:
        fn = jax.pmap(fn, in_axes=in_axes, axis_name=name, devices=jax.devices()[:size])
    return fn


def _jit_path(masked):
  mesh = jax.make_mesh((D,), ("data",))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  d = DATA
  f = jax.jit(_local(None, masked))
  y, mean, var, g, gn = _np(f(put(d['x'], P('data')), put(d['mask'], P('data')),
                              put(d['s'], P()), put(d['b'], P()), put(d['w'], P('data'))))
  return dict(y=y, mean=mean, var=var, g=g, gn=gn)


PATHS = {
    "shard_map": lambda masked: _shard_map_path((D,), ("data",), masked),
    "shard_map_2axes": lambda masked: _shard_map_path((4, 2), ("data", "fsdp"), masked),
    "pmap": lambda masked: _stacked_path(_Map([("pmap", "i", D)], "i"), (D,), masked),
    "vmap": lambda masked: _stacked_path(_Map([("vmap", "v", D)], "v"), (D,), masked),
    "vmap_nested": lambda masked: _stacked_path(
        _Map([("vmap", "outer", 4), ("vmap", "inner", 2)], ("outer", "inner")), (4, 2),
        masked),
    "pmap_of_vmap": lambda masked: _stacked_path(
        _Map([("pmap", "p", 4), ("vmap", "v", 2)], ("p", "v")), (4, 2), masked),
    "jit_sharded": _jit_path,
}


def _batch_stats_from_running(mean, var):
  """The batch statistics of one update from init_stats (mean 0, var 1), in float64.

  ``running = m·old + (1 − m)·batch`` shrinks an error of the batch statistics by ``1 − m``
  (tenfold at m = 0.9), so a bound on the running value is ten times too loose for the batch
  statistics; the comparison undoes the update instead: ``batch = (running − m·old) / (1 − m)``.
  That amplifies the float32 rounding of the update (≤ 2u·|running|) by 1 / (1 − m) = 10:
  ≤ 20u·|running| ≈ 28u here, below the bound's absolute slack (k·cond·u·scale ≥ 48u).
  """
  w = 1.0 - MOMENTUM
  mean = np.asarray(mean, np.float64)
  var = np.asarray(var, np.float64)
  return mean / w, (var - MOMENTUM * 1.0) / w


def _assert_batch_stats(mean, var, mean_ref, var_ref, mask):
  """Running statistics after one update hold the global batch's statistics, within the bound
  of tests/README.md: the mean's float32 sums, log2(n)·cond_offset; the stable variance of
  offset data, log2(n) (``x − K`` is exact by Sterbenz for a shift K near the data)."""
  x64 = DATA['x'].astype(np.float64)
  bmean, bvar = _batch_stats_from_running(mean, var)
  ref.assert_close(bmean, mean_ref.ravel(), np.float32,
                   cond=ref.stats_cond(x64, mask=mask), what="batch mean")
  ref.assert_close(bvar, var_ref.ravel(), np.float32,
                   cond=ref.stats_cond(x64, order=0, mask=mask), what="batch variance")


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven_mask"])
@pytest.mark.parametrize("path", list(PATHS))
def test_path_equals_global_batch_norm(path, masked):
  d = DATA
  mask = d['mask'] if masked else None
  out = PATHS[path](masked)
  y_ref, (_, mean_ref, var_ref) = ref.batch_norm(d['x'], d['s'], d['b'], eps=EPS, mask=mask)
  dx_ref, ds_ref, db_ref = ref.grads(d['x'], d['s'], d['b'], d['w'], eps=EPS, mask=mask)
  np.testing.assert_allclose(out['y'], y_ref, rtol=1e-5, atol=2e-5)
  _assert_batch_stats(out['mean'], out['var'], mean_ref, var_ref, mask)
  gx, gs, gb = out['g']
  # Per-device paths return per-device parameter gradients: they sum to the global one.
  gs_total = gs if gs.ndim == 1 else gs.sum(0)
  gb_total = gb if gb.ndim == 1 else gb.sum(0)
  scale = np.abs(dx_ref).max()
  np.testing.assert_allclose(gx, dx_ref, rtol=1e-4, atol=2e-5 * scale)
  np.testing.assert_allclose(gs_total, ds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gb_total, db_ref, rtol=1e-4, atol=1e-4)
  # Same gradient semantics as JAX autodiff of a naive synced BN under the same wrapper.
  for a, b in zip(out['g'], out['gn']):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * max(1.0, np.abs(b).max()))


def test_nhwc_input_under_shard_map_reduces_batch_and_space():
  """4-D NHWC input: statistics over (N, H, W) of the whole global batch."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(16, 3, 2, F)) * 2 + 5).astype(np.float32)
  mask = (rng.uniform(size=(16, 1, 1, 1)) < 0.6)
  mesh = parallel.data_mesh()
  bn = lambda x, m: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True, momentum=0.0,
                                     axis_name="data", mask=m)
  f = jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=P("data"),
                            out_specs=(P("data"), P())))
  y, stats = f(*parallel.shard_batch((x, mask), mesh))
  y_ref, (_, mean_ref, var_ref) = ref.batch_norm(x, mask=mask)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(stats.mean), mean_ref.ravel(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.var), var_ref.ravel(), rtol=1e-5)


# ----------------------------------------------------------------------------- collectives


def _bn_fwd(axis_name, masked, layers=1, fast=False):
  def f(x, mask, s, b):
    for _ in range(layers):
      x, _ = jaxbn.batch_norm(x, jaxbn.init_stats(F), s, b, training=True,
                              axis_name=axis_name, mask=mask if masked else None,
                              use_fast_variance=fast)
    return x
  return f


def _bn_fwd_bwd(axis_name, masked, layers=1, fast=False):
  fwd = _bn_fwd(axis_name, masked, layers, fast)

  def f(x, mask, s, b, w):
    return jax.grad(lambda x, s, b: jnp.sum(fwd(x, mask, s, b) * w),
                    argnums=(0, 1, 2))(x, s, b)
  return f


def _sds(shape, dtype, mesh=None, spec=None):
  sharding = None if mesh is None else NamedSharding(mesh, spec)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _shard_map_lowered(fn, backward, mesh_shape=(D,), names=("data",)):
  mesh = jax.make_mesh(mesh_shape, names)
  b = P(names if len(names) > 1 else names[0])
  args = [_sds((N, F), jnp.float32, mesh, b), _sds((N, 1), jnp.bool_, mesh, b),
          _sds((F,), jnp.float32, mesh, P()), _sds((F,), jnp.float32, mesh, P())]
  in_specs = [b, b, P(), P()]
  out_specs = b
  if backward:
    args.append(_sds((N, F), jnp.float32, mesh, b))
    in_specs.append(b)
    out_specs = (b, P(), P())
  f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs))
  return f.lower(*args)


def _pmap_lowered(fn, backward):
  args = [_sds((D, PER, F), jnp.float32), _sds((D, PER, 1), jnp.bool_),
          _sds((F,), jnp.float32), _sds((F,), jnp.float32)]
  in_axes = [0, 0, None, None]
  if backward:
    args.append(_sds((D, PER, F), jnp.float32))
    in_axes.append(0)
  return jax.pmap(fn, axis_name="i", in_axes=tuple(in_axes)).lower(*args)


COUNT_CASES = {
    # name: (lowered-program builder, all-reduces forward + backward, none in branches):
    # per BN call two forward (the common shift, then the moments) and one backward.
    "shard_map_forward": (lambda: _shard_map_lowered(_bn_fwd("data", False), False), 2, 0),
    "shard_map_forward_backward": (
        lambda: _shard_map_lowered(_bn_fwd_bwd("data", False), True), 3, 0),
    "shard_map_2axes_masked_forward_backward": (
        lambda: _shard_map_lowered(_bn_fwd_bwd(("data", "fsdp"), True), True, (4, 2),
                                   ("data", "fsdp")), 3, 0),
    "shard_map_fast_variance_forward_backward": (
        lambda: _shard_map_lowered(_bn_fwd_bwd("data", False, fast=True), True), 3, 0),
    "shard_map_two_layers_forward_backward": (
        lambda: _shard_map_lowered(_bn_fwd_bwd("data", True, layers=2), True), 6, 0),
    "pmap_forward": (lambda: _pmap_lowered(_bn_fwd("i", True), False), 2, 0),
    "pmap_masked_forward_backward": (lambda: _pmap_lowered(_bn_fwd_bwd("i", True), True), 3,
                                     0),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_two_collectives_forward_and_one_backward_per_bn_call(case):
  build, common, branch = COUNT_CASES[case]
  lowered = build()
  compiled = lowered.compile()
  for program in (lowered, compiled):
    # What JAX emitted, before any XLA pass could combine or remove collectives, and what
    # runs: two all-reduces per BN forward (the common shift, the moments) and one per
    # backward, each reducing one array (nothing combined) ...
    assert testing.collective_counts(program, conditional=False) == {"all-reduce": common}
    # ... and no conditional: nothing that runs only sometimes.
    assert testing.collective_counts(program, conditional=True) == (
        {"all-reduce": branch} if branch else {})
  assert testing.collective_counts(compiled, operands=True, conditional=False) == {
      "all-reduce": common}


def test_plain_jit_on_sharded_batch_reduces_without_gathering_the_batch():
  """No axis name: XLA's partitioner inserts the reductions. Masked one-pass statistics
  all-reduce five arrays forward (the shift's sample sum and valid count; Σ(x−K), Σ(x−K)²,
  count), the backward two (Σdy, Σdy·x̂) — all per-feature — and nothing batch-sized is
  all-gathered (per-feature vectors are broadcast with x's sharding)."""
  mesh = parallel.data_mesh()
  b = P("data")
  args = [_sds((N, F), jnp.float32, mesh, b), _sds((N, 1), jnp.bool_, mesh, b),
          _sds((F,), jnp.float32, mesh, P()), _sds((F,), jnp.float32, mesh, P()),
          _sds((N, F), jnp.float32, mesh, b)]
  fwd = jax.jit(_bn_fwd(None, True)).lower(*args[:4]).compile()
  fwd_bwd = jax.jit(_bn_fwd_bwd(None, True)).lower(*args).compile()
  for program, common in ((fwd, 5), (fwd_bwd, 7)):
    assert testing.collective_counts(program, operands=True, conditional=False) == {
        "all-reduce": common}
    assert set(testing.collective_counts(program)) == {"all-reduce"}  # no gather, anywhere


def test_collective_counts_sees_through_the_all_reduce_combiner():
  """Three independent psums: XLA combines them into one op; operands=True still says 3."""
  mesh = parallel.data_mesh()
  f = jax.jit(jax.shard_map(
      lambda a, b, c: (lax.psum(a, "data"), lax.psum(2 * b, "data"), lax.psum(c + 1, "data")),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  x = _sds((N, F), jnp.float32, mesh, P("data"))
  lowered = f.lower(x, x, x)
  assert testing.collective_counts(lowered) == {"all-reduce": 3}
  assert testing.collective_counts(lowered.compile(), operands=True) == {"all-reduce": 3}
  assert testing.collective_counts(lowered.compile())["all-reduce"] in (1, 3)
  assert testing.collective_counts("ROOT %x = f32[] add(%a, %b)") == {}


# ----------------------------------------------------------------- numerics, masks, groups


@pytest.mark.parametrize("mode", ["shard_map", "jit_sharded"])
def test_variance_exact_in_every_mode_across_8_devices(mode):
  """float32, |mean| / std = 1e4: both variance modes exact, synchronized as unsynchronized.

  Bound: after the exact correction the variance has the rounding error of a two-pass
  float32 sum of n = 512 terms, |error| <= c · sqrt(n) · eps32 with c = 8 (2.2e-5); the
  synced one-pass E[x²] − E[x]² of flax (and jaxbn 0.1's fast mode) errs by O(1), and the
  merge of per-device float32 means of jaxbn 0.1's stable mode by ~1e-4.
  """
  rng = np.random.default_rng(7)
  x = (1e4 + rng.normal(size=(D * 64, 4)) + np.repeat(rng.normal(size=(D, 1)), 64, 0)
       * 0.5).astype(np.float32)
  var_ref = x.astype(np.float64).var(0)
  assert np.all(np.abs(x.mean(0)) / np.sqrt(var_ref) > 8e3)
  bound = 8 * np.sqrt(x.shape[0]) * np.finfo(np.float32).eps
  mesh = parallel.data_mesh()
  xs = parallel.shard_batch(x, mesh)

  def moments(fast):
    if mode == "jit_sharded":
      return jax.jit(lambda x: jaxbn.moments(x, use_fast_variance=fast))(xs)
    return jax.jit(jax.shard_map(
        lambda x: jaxbn.moments(x, axis_name="data", use_fast_variance=fast), mesh=mesh,
        in_specs=P("data"), out_specs=P()))(xs)

  for fast in (False, True):
    err = np.abs(np.asarray(moments(fast).var) - var_ref) / var_ref
    assert err.max() <= bound, (fast, err.max())


def test_flax_2417_counter_example_weights_devices_by_true_counts():
  """flax #2417: with `mask` and `axis_name`, flax averages per-device masked means.

  Device 0 holds the valid values (2, 2, 2), device 1 holds (10,) (the rest is padding). The
  global masked mean is (2+2+2+10)/4 = 4.0 and the variance (3·2² + 6²)/4 = 12.0. flax
  0.12.8's ``nn.BatchNorm(axis_name=...)`` with this mask computes the mean as the average of
  the two device means, (2 + 10)/2 = 6.0 (``benchmarks/bench_sync.py`` prints it next to
  jaxbn's). jaxbn weights each device by its count of valid entries.
  """
  x = np.array([2, 2, 2, -7, 10, 99, 99, 99], np.float32)[:, None]
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)[:, None]
  mesh = parallel.data_mesh(devices=jax.devices()[:2])
  f = jax.jit(jax.shard_map(
      lambda x, m: jaxbn.batch_norm(x, jaxbn.init_stats(1), training=True, momentum=0.0,
                                    axis_name="data", mask=m)[1],
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  stats = f(*parallel.shard_batch((x, mask), mesh))
  np.testing.assert_allclose(np.asarray(stats.mean), [4.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats.var), [12.0], rtol=1e-6)
  # The same through pmap.
  g = jax.pmap(lambda x, m: jaxbn.moments(x, mask=m, axis_name="i"), axis_name="i",
               devices=jax.devices()[:2])(x.reshape(2, 4, 1), mask.reshape(2, 4, 1))
  np.testing.assert_allclose(np.asarray(g.mean), [[4.0], [4.0]], rtol=1e-6)


def test_step_without_any_valid_entry_leaves_stats_unchanged_and_finite():
  mesh = parallel.data_mesh()
  stats = jaxbn.BatchStats(jnp.full((F,), 0.5), jnp.full((F,), 2.0), jnp.array(7, jnp.int32))

  def local(x, m, s, w):
    def loss(x, s):
      y, new = jaxbn.batch_norm(x, stats, s, training=True, axis_name="data", mask=m)
      return jnp.sum(y * w), (y, new)
    (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, s)
    return y, new, g

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P("data")),
                            out_specs=(P("data"), P(), (P("data"), P()))))
  x, mask, w = parallel.shard_batch((DATA['x'], np.zeros((N, 1), bool), DATA['w']), mesh)
  y, new, (gx, gs) = f(x, mask, DATA['s'], w)
  for a, b in zip(new, stats):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a in (y, gx, gs):
    assert np.all(np.isfinite(np.asarray(a)))


GROUPS = [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_axis_index_groups_under_pmap_sync_within_each_group():
  d = DATA
  xs = d['x'].reshape(D, PER, F)
  ws = d['w'].reshape(D, PER, F)

  def local(x, s, b, w):
    def loss(x, s, b):
      y, new = jaxbn.batch_norm(x, jaxbn.init_stats(F), s, b, training=True, momentum=0.0,
                                axis_name="i", axis_index_groups=GROUPS)
      return jnp.sum(y * w), (y, new)
    (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, s, b)
    return y, new.mean, g

  y, mean, (gx, gs, gb) = _np(jax.pmap(local, axis_name="i", in_axes=(0, None, None, 0))(
      xs, d['s'], d['b'], ws))
  for group in GROUPS:
    gx_ref = ref.grads(xs[group].reshape(-1, F), d['s'], d['b'], ws[group].reshape(-1, F),
                       eps=EPS)
    y_ref, (_, mean_ref, _) = ref.batch_norm(xs[group].reshape(-1, F), d['s'], d['b'], eps=EPS)
    np.testing.assert_allclose(y[group].reshape(-1, F), y_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(mean[group], np.broadcast_to(mean_ref.ravel(), (4, F)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx[group].reshape(-1, F), gx_ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gs[group].sum(0), gx_ref[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb[group].sum(0), gx_ref[2], rtol=1e-4, atol=1e-4)


def test_axis_index_groups_under_shard_map_without_vma_checking():
  mesh = parallel.data_mesh()
  f = jax.jit(jax.shard_map(
      lambda x: jaxbn.moments(x, axis_name="data", axis_index_groups=GROUPS).mean[None],
      mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
  mean = np.asarray(f(parallel.shard_batch(DATA['x'], mesh)))
  xs = DATA['x'].reshape(D, PER, F)
  for group in GROUPS:
    np.testing.assert_allclose(mean[group], np.broadcast_to(
        xs[group].reshape(-1, F).astype(np.float64).mean(0), (4, F)), rtol=1e-5)


NOT_SUPPORTED = r"axis_index_groups` is not supported by JAX here.*own mesh axis"


def test_axis_index_groups_clear_error_under_shard_map_and_vmap():
  mesh = parallel.data_mesh()
  bn = lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True, axis_name="data",
                                  axis_index_groups=GROUPS)[0]
  with pytest.raises(NotImplementedError, match="batch_norm: `" + NOT_SUPPORTED):
    jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))).lower(
        _sds((N, F), jnp.float32, mesh, P("data")))
  with pytest.raises(NotImplementedError, match="moments: `" + NOT_SUPPORTED):
    jax.vmap(lambda x: jaxbn.moments(x, axis_name="v", axis_index_groups=GROUPS),
             axis_name="v")(jnp.ones((D, PER, F)))


@pytest.mark.parametrize("groups, error, pattern", [
    ([[0, 1, 2, 3], [4, 5, 6]], ValueError,
     r"moments: `axis_index_groups`=.* does not partition the 8 indices of "
     r"`axis_name`='i': indices \[7\] are in no group"),
    ([[0, 1, 2, 3], [3, 4, 5, 6, 7]], ValueError, r"indices \[3\] appear more than once"),
    ([[0, 1, 2, 3], [4, 5, 6, 8]], ValueError,
     r"indices \[8\] are outside \[0, 7\]; indices \[7\] are in no group"),
    ([[0, 1, 2], [3, 4, 5, 6, 7]], ValueError, r"groups of sizes \[3, 5\]; JAX requires"),
    ([0, 1, 2, 3], TypeError, r"must be a list of lists of device indices"),
])
def test_axis_index_groups_must_partition_the_axis(groups, error, pattern):
  with pytest.raises(error, match=pattern):
    jax.pmap(lambda x: jaxbn.moments(x, axis_name="i", axis_index_groups=groups),
             axis_name="i").lower(_sds((D, PER, F), jnp.float32))


def test_axis_index_groups_without_axis_name():
  with pytest.raises(ValueError, match=r"batch_norm: `axis_index_groups`=.* was given "
                                       r"without `axis_name`"):
    jaxbn.batch_norm(jnp.ones((4, F)), jaxbn.init_stats(F), training=True,
                     axis_index_groups=GROUPS)


def test_unbound_and_misspelled_axis_names():
  with pytest.raises(ValueError, match=r"batch_norm: `axis_name`='data': the axis name 'data' "
                                       r"is not bound here\..*No mapped axis is bound here"):
    jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True,
                                       axis_name="data")).lower(jnp.ones((4, F)))
  mesh = parallel.data_mesh()
  with pytest.raises(ValueError, match=r"moments: `axis_name`=\('data', 'dta'\): the axis "
                                       r"name 'dta' is not bound here.*check the spelling.*"
                                       r"The axis names bound here are \('data',\)"):
    jax.jit(jax.shard_map(lambda x: jaxbn.moments(x, axis_name=("data", "dta")).mean,
                          mesh=mesh, in_specs=P("data"), out_specs=P())).lower(
                              _sds((N, F), jnp.float32, mesh, P("data")))
  with pytest.raises(ValueError, match=r"axis name 'j' is not bound here.*bound here are "
                                       r"\('i',\)"):
    jax.pmap(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True,
                                        axis_name="j"), axis_name="i").lower(
                                            _sds((D, PER, F), jnp.float32))


def test_mask_whose_batch_dimension_does_not_match():
  """A replicated mask with a sharded batch: local x is (4, 3) but the mask is (32, 1)."""
  mesh = parallel.data_mesh()
  f = jax.jit(jax.shard_map(
      lambda x, m: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True, axis_name="data",
                                    mask=m)[0],
      mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
  with pytest.raises(ValueError, match=r"batch_norm: `mask` of shape \(32, 1\) does not "
                                       r"broadcast to `x` of shape \(4, 3\)"):
    f.lower(_sds((N, F), jnp.float32, mesh, P("data")), _sds((N, 1), jnp.bool_, mesh, P()))


# ------------------------------------------------------------------------ jaxbn.parallel


def _train_step(axis_name, psum_grads=False):
  """One SGD step of a linear layer + BN + masked squared loss, written per device.

  ``psum_grads``: under pmap, gradients are per device and must be summed; under shard_map
  they come out summed already.
  """

  def step(state, batch):
    params, stats = state
    x, t, mask = batch
    count = jnp.sum(mask, dtype=jnp.float32)
    n = count if axis_name is None else lax.psum(count, axis_name)

    def loss_fn(params):
      h, new_stats = jaxbn.batch_norm(x @ params["w"], stats, params["scale"], params["bias"],
                                      training=True, momentum=MOMENTUM, axis_name=axis_name,
                                      mask=mask[:, None])
      return jnp.sum(jnp.where(mask, (h.sum(-1) - t) ** 2, 0)) / n, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if psum_grads:
      grads = lax.psum(grads, axis_name)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    if axis_name is not None:
      loss = lax.psum(loss, axis_name)
    return (params, new_stats), loss

  return step


def test_padded_last_batch_train_step_shard_map_and_pmap_equal_single_device():
  """13 real examples padded to 16 over 8 devices (some hold only padding) = BN on the 13."""
  rng = np.random.default_rng(11)
  x = (rng.normal(size=(13, 4)) * 3 + 2).astype(np.float32)
  t = rng.normal(size=13).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=(4, F)), jnp.float32),
            "scale": jnp.ones(F), "bias": jnp.zeros(F)}
  state = (params, jaxbn.init_stats(F))
  (px, pt), mask = parallel.pad_batch((x, t), 16)
  assert mask.sum() == 13 and not mask[13:].any()

  (p1, s1), l1 = jax.jit(_train_step(None))(state, (x, t, np.ones(13, bool)))
  mesh = parallel.data_mesh()
  sm = parallel.shard_map_step(_train_step("data"), mesh)
  placed = parallel.shard_batch((px, pt, mask), mesh)
  (p8, s8), l8 = sm(state, placed)
  # Only all-reduces of 6 arrays: BN's two forward (the common shift, the moments) and its
  # backward (its scale and bias gradients included), the weight gradient of the matmul,
  # the count and the loss.
  assert testing.collective_counts(sm.lower(state, placed).compile(), operands=True,
                                   conditional=False) == {"all-reduce": 6}
  np.testing.assert_array_equal(np.asarray(sm(state, (px, pt, mask))[1]), np.asarray(l8))
  pm = parallel.pmap_step(_train_step("batch", psum_grads=True))
  split = lambda a: a.reshape(D, -1, *a.shape[1:])
  (pp, sp), lp = pm(state, (split(px), split(pt), split(mask)))
  for p, s, l in ((p8, s8, l8), (pp, sp, lp)):
    np.testing.assert_allclose(float(l), float(l1), rtol=1e-5)
    for k in params:
      np.testing.assert_allclose(np.asarray(p[k]), np.asarray(p1[k]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.mean), np.asarray(s1.mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.var), np.asarray(s1.var), rtol=1e-5, atol=1e-6)
  # and against float64: the running mean after one step is (1 - m) * mean of the real rows.
  h = x.astype(np.float64) @ np.asarray(params["w"], np.float64)
  np.testing.assert_allclose(np.asarray(s8.mean), (1 - MOMENTUM) * h.mean(0), rtol=1e-5)


def test_shard_batch_and_shard_local_batch_place_rows_on_devices():
  mesh = parallel.data_mesh(("data", "fsdp"), (4, 2))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  for placed in (parallel.shard_batch({"x": x}, mesh)["x"],
                 parallel.shard_local_batch({"x": x}, mesh)["x"]):
    assert placed.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(placed), x)
    for shard in placed.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
      assert shard.data.shape == (2, 3)
  with pytest.raises(ValueError, match=r"shard_batch: a batch leaf of size 13 does not split "
                                       r"evenly over 8 devices; pad it with "
                                       r"jaxbn.parallel.pad_batch\(batch, 16\)"):
    parallel.shard_batch(x[:13], mesh)


def test_data_mesh_and_pad_batch_errors():
  assert dict(parallel.data_mesh().shape) == {"data": D}
  with pytest.raises(ValueError, match=r"data_mesh: `axis_names`=\('a', 'b'\) has 2 axes but "
                                       r"no `shape`"):
    parallel.data_mesh(("a", "b"))
  with pytest.raises(ValueError, match=r"data_mesh: `shape`=\(3, 2\) .* does not fit 8 "):
    parallel.data_mesh(("a", "b"), (3, 2))
  with pytest.raises(ValueError, match=r"pad_batch: the leaves of `batch` have different "
                                       r"leading sizes \[3, 4\]"):
    parallel.pad_batch((np.ones(3), np.ones(4)), 8)
  with pytest.raises(ValueError, match=r"pad_batch: the batch has 9 rows, more than "
                                       r"`batch_size`=8"):
    parallel.pad_batch(np.ones((9, 2)), 8)
  padded, mask = parallel.pad_batch(jnp.ones((3, 2)), 4)
  assert isinstance(padded, jax.Array)
  np.testing.assert_array_equal(np.asarray(padded), [[1, 1], [1, 1], [1, 1], [0, 0]])


def test_average_stats_pools_device_statistics():
  """Law of total variance over devices, on BatchStats, flax dicts, and inside shard_map."""
  rng = np.random.default_rng(5)
  means = rng.normal(size=(D, F)).astype(np.float32)
  vars_ = rng.uniform(0.5, 2, size=(D, F)).astype(np.float32)
  counts = np.array([3, 3, 3, 4, 4, 4, 4, 4], np.int32)
  # Device d's data: a population with mean means[d] and variance vars_[d] (equal sizes).
  pooled_mean = means.astype(np.float64).mean(0)
  pooled_var = (vars_ + (means - pooled_mean) ** 2).mean(0)
  per_device = jaxbn.BatchStats(jnp.asarray(means), jnp.asarray(vars_), jnp.asarray(counts))
  avg = parallel.average_stats(per_device)
  np.testing.assert_allclose(np.asarray(avg.mean), pooled_mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(avg.var), pooled_var, rtol=1e-6)
  assert int(avg.count) == 4 and avg.count.dtype == jnp.int32
  flax_style = {"bn1": {"mean": means, "var": vars_}, "other": np.arange(8.0)}
  out = parallel.average_stats(flax_style)
  np.testing.assert_allclose(np.asarray(out["bn1"]["var"]), pooled_var, rtol=1e-6)
  np.testing.assert_allclose(float(out["other"]), 3.5)
  mesh = parallel.data_mesh()
  f = jax.jit(jax.shard_map(lambda s: parallel.average_stats(
      jax.tree.map(lambda a: a[0], s), axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  inside = f(parallel.shard_batch(per_device, mesh))
  for a, b in zip(inside, avg):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_missing_axis_name_under_shard_map_gets_a_jaxbn_hint_not_only_jaxs_error():
  """Forgetting `axis_name` under shard_map: per-device statistics are legitimate, so a
  warning at trace time (with the fix) where JAX's out_specs error would come next, and
  jaxbn's own error in shard_map_step. Traced only (eval_shape): no compile."""
  mesh = jax.make_mesh((D,), ("data",))
  x = jax.device_put(jnp.ones((N, 2, 2, F)), NamedSharding(mesh, P("data")))
  stats, ones = jaxbn.init_stats(F), jnp.ones(F)

  def mapped(**kw):
    def step(x, stats):
      if kw.pop("per_device", False):
        stats = lax.pcast(stats, "data", to="varying")
        y, new = jaxbn.evonorm_b0(x, stats, None, None, ones, **kw)
        return y, parallel.average_stats(new, axis_name="data")
      return jaxbn.evonorm_b0(x, stats, None, None, ones, **kw)
    return jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P()),
                         out_specs=(P("data"), P()))

  with pytest.warns(UnsyncedStatisticsWarning,
                    match=r"evonorm_b0: `x` is split over the jax.shard_map mesh axes "
                          r"\('data',\) but no `axis_name`.*pass axis_name='data'"):
    with pytest.raises(ValueError, match="out_specs which require replication"):
      jax.eval_shape(mapped(training=True), x, stats)
  with warnings.catch_warnings():
    warnings.simplefilter("error")                       # none of these warn
    jax.eval_shape(mapped(training=True, axis_name="data"), x, stats)
    jax.eval_shape(mapped(training=False), x, stats)
    jax.eval_shape(mapped(training=True, per_device=True), x, stats)   # on purpose
    jaxbn.evonorm_b0(jnp.ones((4, 2, 2, F)), stats, None, None, ones, training=True)

  # The same hint from the BN family's functions and the layers built on them.
  def bn_mapped(call):
    return jax.shard_map(call, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P()))
  calls = {
      "batch_norm": lambda x, st: jaxbn.batch_norm(x, st, training=True),
      "batch_renorm": lambda x, st: jaxbn.batch_renorm(x, st, training=True),
      "ghost_batch_norm": lambda x, st: jaxbn.ghost_batch_norm(
          x, st, training=True, virtual_batch_size=2)}
  for fn, call in calls.items():
    with pytest.warns(UnsyncedStatisticsWarning, match=rf"{fn}: `x` is split.*'data'"):
      with pytest.raises(ValueError, match="out_specs which require replication"):
        jax.eval_shape(bn_mapped(call), x, stats)
  layer = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = layer.init(jax.random.key(0), jnp.ones((2, 2, 2, F)))

  def linen_step(x, v):
    return layer.apply(v, x, mutable=["batch_stats"])
  with pytest.warns(UnsyncedStatisticsWarning, match=r"batch_norm: `x` is split"):
    with pytest.raises(ValueError, match="out_specs which require replication"):
      jax.eval_shape(jax.shard_map(linen_step, mesh=mesh, in_specs=(P("data"), P()),
                                   out_specs=(P("data"), P())), x, variables)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # synced, or statistics per device on purpose: no warning
    jax.eval_shape(bn_mapped(lambda x, st: jaxbn.batch_norm(x, st, training=True,
                                                            axis_name="data")), x, stats)

    def per_device(x, st):
      y, new = jaxbn.batch_norm(x, lax.pcast(st, "data", to="varying"), training=True)
      return y, parallel.average_stats(new, axis_name="data")
    jax.eval_shape(bn_mapped(per_device), x, stats)

  def step(state, batch):
    y, new = jaxbn.batch_norm(batch, state, training=True)
    return new, jnp.sum(y)
  with pytest.warns(UnsyncedStatisticsWarning, match="batch_norm: `x` is split"):
    with pytest.raises(ValueError, match=r"shard_map_step: `out_specs` says these outputs.*"
                                         r"outputs\[0\]\.mean varies over \('data',\).*"
                                         r"outputs\[1\] varies.*pass axis_name='data'"):
      jax.eval_shape(parallel.shard_map_step(step, mesh), stats, jnp.ones((N, F)))


def _hlo_computations(text):
  """{computation name: its instruction lines} and the entry's name, of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) ", line)
    if head and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and " = " in line:
      comps[current].append(line.split(", metadata=")[0].strip())
  return comps, entry


@pytest.mark.parametrize("masked", [False, True])
def test_round_one_depends_on_the_sample_only_so_it_can_overlap_the_pass(masked):
  """The synced design's claim: the first all-reduce (the common shift) needs only the
  sampled entries, not the pass over the local batch, so XLA may run it while the pass runs;
  the second (the moments) needs the pass. Checked in the compiled program's data flow: no
  instruction that reduces the whole local batch is an ancestor of the first all-reduce."""
  rows = 64 * PER
  mesh = jax.make_mesh((D,), ("data",))
  b = P("data")
  args = [_sds((D * rows, 8, 8, F), jnp.float32, mesh, b),
          _sds((D * rows, 1, 1, 1), jnp.bool_, mesh, b),
          _sds((F,), jnp.float32, mesh, P()), _sds((F,), jnp.float32, mesh, P())]
  fn = jax.jit(jax.shard_map(_bn_fwd("data", masked), mesh=mesh, in_specs=(b, b, P(), P()),
                             out_specs=b))
  comps, entry = _hlo_computations(fn.lower(*args).compile().as_text())
  full = f"f32[{rows},8,8,{F}]"

  def shapes(lines):  # instruction name -> its result type
    return {ln.split(" = ")[0].replace("ROOT ", "").lstrip("%"): ln.split(" = ", 1)[1]
            for ln in lines}

  def reduces_batch(name, seen=()):  # does computation `name` (or what it calls) reduce x?
    types = shapes(comps.get(name, ()))
    for line in comps.get(name, ()):
      op = re.search(r"\breduce\(%([\w.\-]+)", line)
      if op and types.get(op.group(1), "").startswith(full):
        return True
      for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        if callee not in seen and reduces_batch(callee, seen + (name,)):
          return True
    return False

  defs = {}
  for line in comps[entry]:
    name = line.split(" = ")[0].replace("ROOT ", "").strip().lstrip("%")
    defs[name] = line

  def passes_before(name):  # the full-batch reductions among `name`'s ancestors
    out, todo, seen = set(), [name], set()
    while todo:
      cur = todo.pop()
      if cur in seen or cur not in defs:
        continue
      seen.add(cur)
      line = defs[cur]
      callees = re.findall(r"calls=%?([\w.\-]+)", line)
      if any(reduces_batch(c) for c in callees):
        out.add(cur)
      todo.extend(re.findall(r"%([\w.\-]+)", line.split(" = ", 1)[1].split("calls=")[0]))
    return out

  reduces = [n for n, line in defs.items() if re.search(r"\ball-reduce(-start)?\(", line)]
  assert len(reduces) == 2, reduces
  assert not passes_before(reduces[0]), passes_before(reduces[0])
  assert passes_before(reduces[1])  # the detector sees the pass where it is
