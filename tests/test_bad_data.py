"""Bad data inside jit (DESIGN.md "Bad input"): non-finite batches, one value per feature,
masked counts <= 1, and checkify finding a NaN at its source.

The contract: a feature whose batch statistics are not finite keeps its running statistics
bit for bit while the others update (``count`` advances when any feature updated), the NaN
stays visible in the output, synchronized devices decide alike; ``skip_nonfinite=False`` is
flax's propagation. One value per feature in training raises before tracing (not during
linen ``init``, not in eval); a mask that leaves a feature <= 1 valid entry leaves it as an
empty batch does.

Tolerances (tests/README.md): running statistics of the clean features against a float64
reference with ``k = 4`` and ``cond = stats_cond`` (the data here have |mean|/std <= ~3);
kept features and devices are compared bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxbn
from tests import _reference as R

C = 3
M = 0.5
EPS = 1e-5
OLD = jaxbn.BatchStats(jnp.array([0.3, -1.2, 2.0], jnp.float32),
                       jnp.array([0.5, 2.0, 1.5], jnp.float32), jnp.array(5, jnp.int32))


def _x(seed, shape=(8, C)):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * [1.0, 2.0, 0.5] + [0.5, -1.0, 1.0]).astype(np.float32)


def _bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _ema_ref(old, x64, rule):
  """float64 running (mean, var) after one call, per ``rule``; features with a non-finite
  batch statistic keep ``old`` (the contract)."""
  om, ov = np.asarray(old.mean, np.float64), np.asarray(old.var, np.float64)
  with np.errstate(invalid="ignore"):
    return _ema_ref_impl(om, ov, x64, rule)


def _ema_ref_impl(om, ov, x64, rule):

  def step(om, ov, n, mu, v, std=False):
    ok = np.isfinite(mu) & np.isfinite(v) & (n > 1)
    if std:
      s = M * np.sqrt(ov + EPS) + (1 - M) * np.sqrt(v + EPS)
      nv = s * s - EPS
    else:
      nv = M * ov + (1 - M) * v
    return np.where(ok, M * om + (1 - M) * mu, om), np.where(ok, nv, ov)

  if rule in ("bn", "std"):
    n, mu, v = (a.reshape(-1) for a in R.moments(x64))
    return step(om, ov, n, mu, v, std=rule == "std")
  blocks = [R.moments(x64[s:s + 4]) for s in range(0, x64.shape[0], 4)]
  blocks = [tuple(a.reshape(-1) for a in b) for b in blocks]
  if rule == "average":  # pooled moments of the virtual batches
    n = sum(b[0] for b in blocks)
    mu = sum(b[0] * b[1] for b in blocks) / n
    v = sum(b[0] * b[2] for b in blocks) / n
    return step(om, ov, n, mu, v)
  for n, mu, v in blocks:  # sequential: one update per virtual batch
    om, ov = step(om, ov, n, mu, v)
  return om, ov


VARIANTS = {
    "batch_norm": (jaxbn.batch_norm, {}, "bn"),
    "batch_renorm": (jaxbn.batch_renorm, {}, "bn"),
    "batch_renorm_running_std": (jaxbn.batch_renorm, {"running_std": True}, "std"),
    "ghost_average": (jaxbn.ghost_batch_norm, {"virtual_batch_size": 4}, "average"),
    "ghost_sequential": (jaxbn.ghost_batch_norm,
                         {"virtual_batch_size": 4, "stats_update": "sequential"}, "sequential"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_nonfinite_feature_keeps_its_running_statistics_bit_for_bit_under_jit(name):
  core, kw, rule = VARIANTS[name]
  f = jax.jit(functools.partial(core, training=True, momentum=M, epsilon=EPS, **kw))
  clean = _x(0)
  x = clean.copy()
  x[2, 1] = np.nan  # virtual batch 0, feature 1
  if rule != "sequential":
    x[5, 2] = np.inf
  y, new = f(x, OLD)
  # Pooled statistics: the bad features keep their values. Sequential: feature 1 skips
  # virtual batch 0 only, and the other virtual batch updates it as usual (the reference).
  for j in ([] if rule == "sequential" else [1, 2]):
    assert _bitwise_equal(new.mean[j], OLD.mean[j]) and _bitwise_equal(new.var[j], OLD.var[j])
  mean_ref, var_ref = _ema_ref(OLD, x.astype(np.float64), rule)
  cond = R.stats_cond(clean.astype(np.float64), order=2)
  R.assert_close(np.asarray(new.mean), mean_ref, np.float32, cond=cond, what="running mean")
  R.assert_close(np.asarray(new.var), var_ref, np.float32, cond=cond, what="running var")
  steps = 2 if rule == "sequential" else 1
  assert int(new.count) == int(OLD.count) + steps
  # The NaN stays visible where the formula puts it (the bad feature's outputs).
  assert np.isnan(np.asarray(y)[2, 1]) and np.all(np.isfinite(np.asarray(y)[:, 0]))
  # A clean batch afterwards updates every feature normally.
  x2 = _x(1)
  _, new2 = f(x2, new)
  mean_ref2, var_ref2 = _ema_ref(new, x2.astype(np.float64), rule)
  cond2 = R.stats_cond(x2.astype(np.float64), order=2)
  R.assert_close(np.asarray(new2.mean), mean_ref2, np.float32, cond=cond2, what="clean mean")
  R.assert_close(np.asarray(new2.var), var_ref2, np.float32, cond=cond2, what="clean var")
  assert np.all(np.isfinite(np.asarray(new2.mean))) and int(new2.count) == int(new.count) + steps


def test_all_features_nonfinite_keeps_everything_and_count():
  x = _x(2)
  x[0] = np.nan
  y, new = jax.jit(functools.partial(jaxbn.batch_norm, training=True))(x, OLD)
  for a, b in zip(new, OLD):
    assert _bitwise_equal(a, b)
  assert np.all(np.isnan(np.asarray(y)))


def test_update_stats_decides_with_a_select_not_a_conditional():
  """No host check, no conditional: the skip is a select on feature-sized vectors."""
  batch = jaxbn.Moments(jnp.zeros(C), jnp.ones(C), jnp.full(C, 4.0))
  text = str(jax.make_jaxpr(jaxbn.update_stats)(OLD, batch))
  assert "select_n" in text
  assert not any(p in text for p in ("cond[", "while[", "callback"))


def test_skip_nonfinite_false_propagates_nan_like_flax():
  flax_nn = pytest.importorskip("flax.linen")
  x = _x(3)
  x[4, 1] = np.nan
  bn = flax_nn.BatchNorm(use_running_average=False, momentum=M, epsilon=EPS)
  variables = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(variables, x, mutable=["batch_stats"])
  fm, fv = (np.asarray(upd["batch_stats"][k]) for k in ("mean", "var"))
  _, new = jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, momentum=M, epsilon=EPS,
                            use_fast_variance=True, skip_nonfinite=False)
  np.testing.assert_array_equal(np.isnan(new.mean), np.isnan(fm))
  np.testing.assert_array_equal(np.isnan(new.var), np.isnan(fv))
  assert np.isnan(fm[1]) and np.isnan(fv[1])
  # Two float32 implementations: k = 8 (tests/README.md).
  cond = R.stats_cond(x.astype(np.float64)[:, [0, 2]], order=2)
  R.assert_close(np.asarray(new.mean), fm, np.float32, cond=cond, k=8, what="mean vs flax",
                 where=np.isfinite(fm))
  R.assert_close(np.asarray(new.var), fv, np.float32, cond=cond, k=8, what="var vs flax",
                 where=np.isfinite(fv))
  for core, kw in ((jaxbn.batch_renorm, {}), (jaxbn.ghost_batch_norm,
                                               {"virtual_batch_size": 4})):
    _, new = core(x, jaxbn.init_stats(C), training=True, skip_nonfinite=False, **kw)
    assert np.isnan(new.mean[1]) and np.isfinite(new.mean[0])


def test_synced_nan_on_one_device_keeps_the_feature_on_every_device():
  """shard_map over 8 devices: one device's shard holds a NaN; every device keeps the old
  statistics of that feature (bit for bit, the same on all devices), the others update as
  single-device BN on the global batch."""
  d = 8
  mesh = jax.make_mesh((d,), ("data",), axis_types=(AxisType.Explicit,))
  x = _x(4, (4 * d, C))
  x[4 * 5 + 1, 1] = np.nan  # device 5

  def local(x, stats):
    y, new = jaxbn.batch_norm(x, stats, training=True, momentum=M, epsilon=EPS,
                              axis_name="data")
    return y, jax.tree.map(lambda a: a[None], new)  # one row per device

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()),
                            out_specs=(P("data"), P("data"))))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  stats = jax.device_put(OLD, NamedSharding(mesh, P()))
  y, new = f(xs, stats)
  mean, var, count = (np.asarray(a) for a in new)
  for rows in (mean, var, count):
    assert all(r.tobytes() == rows[0].tobytes() for r in rows)  # identical on every device
  assert _bitwise_equal(mean[0, 1], OLD.mean[1]) and _bitwise_equal(var[0, 1], OLD.var[1])
  assert int(count[0]) == int(OLD.count) + 1
  mean_ref, var_ref = _ema_ref(OLD, x.astype(np.float64), "bn")
  cond = R.stats_cond(x.astype(np.float64)[:, [0, 2]], order=2)
  R.assert_close(mean[0], mean_ref, np.float32, cond=cond, what="synced mean")
  R.assert_close(var[0], var_ref, np.float32, cond=cond, what="synced var")
  y = np.asarray(y)
  assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))


# ------------------------------------------------------------------ one value per feature

ONE_VALUE = r"expected more than 1 value per feature when training.*use_running_average=True"


@pytest.mark.parametrize("core,kw,shape", [
    (jaxbn.batch_norm, {}, (1, C)),
    (jaxbn.batch_norm, {"axis": 1}, (1, C, 1, 1)),
    (jaxbn.batch_renorm, {}, (1, C)),
    (jaxbn.ghost_batch_norm, {"virtual_batch_size": 1}, (4, C)),
])
def test_one_value_per_feature_in_training_raises_before_tracing(core, kw, shape):
  name = core.__name__
  with pytest.raises(ValueError, match=name + ": " + ONE_VALUE):
    jax.jit(functools.partial(core, training=True, **kw)).lower(
        jnp.zeros(shape), jaxbn.init_stats(C))
  core(jnp.zeros(shape), jaxbn.init_stats(C), training=False, **kw)  # eval: fine


def test_one_value_counts_synchronized_devices_and_groups():
  x = jnp.ones((1, C))
  vm = lambda f, k: jax.vmap(f, axis_name="b")(jnp.stack([x] * k))
  bn = lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, axis_name="b")[0]
  with pytest.raises(ValueError, match=r"synchronized over 1 device \(axis_name='b'\)"):
    vm(bn, 1)
  assert vm(bn, 2).shape == (2, 1, C)  # 2 values per feature after synchronization
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  for groups, fails in (([[i] for i in range(8)], True), ([[0, 1, 2, 3], [4, 5, 6, 7]], False)):
    f = jax.shard_map(lambda x: jaxbn.batch_norm(
        x, jaxbn.init_stats(C), training=True, axis_name="data", axis_index_groups=groups)[0],
        mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    xs = jax.device_put(jnp.ones((8, C)), NamedSharding(mesh, P("data")))
    if fails:
      with pytest.raises(ValueError, match=ONE_VALUE):
        jax.jit(f).lower(xs)
    else:
      jax.jit(f).lower(xs)
  # More than one value from the other reduced axes, or an empty batch: no error.
  jaxbn.batch_norm(jnp.ones((1, 2, C)), jaxbn.init_stats(C), training=True)
  jaxbn.batch_norm(jnp.ones((0, C)), jaxbn.init_stats(C), training=True)


def test_masked_count_of_one_leaves_the_feature_unchanged_like_an_empty_batch():
  x = _x(5)
  mask = np.ones((8, C), bool)
  mask[1:, 0] = False  # feature 0: one valid value
  mask[:, 1] = False  # feature 1: none
  y, new = jax.jit(functools.partial(jaxbn.batch_norm, training=True, momentum=M))(
      x, OLD, mask=jnp.asarray(mask))
  for j in (0, 1):
    assert _bitwise_equal(new.mean[j], OLD.mean[j]) and _bitwise_equal(new.var[j], OLD.var[j])
  n, mu, v = (a.reshape(-1) for a in R.moments(x.astype(np.float64), mask=mask))
  R.assert_close(new.var[2], M * 1.5 + (1 - M) * v[2], np.float32,
                 cond=R.stats_cond(x.astype(np.float64)[:, 2:], order=2))
  assert int(new.count) == int(OLD.count) + 1 and np.all(np.isfinite(np.asarray(y)))


def test_ghost_fully_masked_virtual_batch_unbiased_pooled_variance_matches_float64():
  """Mutation survivor: a fully masked virtual batch must add no degrees of freedom (with
  ``n_l − 1 = −1`` the running variance came out 1.2x the reference); a virtual batch with
  one valid entry is left out like an empty one."""
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(16, 2, C)) * [1.0, 2.0, 0.5]).astype(np.float32)
  mask = np.ones((16, 2, 1), bool)
  mask[4:8] = False  # virtual batch 1: empty
  mask[8:12] = False
  mask[9, 1] = True  # virtual batch 2: one valid entry
  mask[13, 0] = False
  for unbiased in (True, False):
    _, new = jaxbn.ghost_batch_norm(x, jaxbn.init_stats(C), training=True, momentum=0.0,
                                    virtual_batch_size=4, mask=jnp.asarray(mask),
                                    unbiased_running_var=unbiased)
    used = [(x[s:s + 4].astype(np.float64), mask[s:s + 4]) for s in (0, 12)]
    mom = [tuple(a.reshape(-1) for a in R.moments(xb, axis=-1, mask=mb)) for xb, mb in used]
    n = sum(m[0] for m in mom)
    mu = sum(m[0] * m[1] for m in mom) / n
    dof = sum(m[0] - 1 for m in mom) if unbiased else n
    var = sum(m[0] * m[2] for m in mom) / dof
    cond = R.stats_cond(x.reshape(-1, C).astype(np.float64), order=2)
    R.assert_close(new.mean, mu, np.float32, cond=cond, what="pooled mean")
    R.assert_close(new.var, var, np.float32, cond=cond, what=f"pooled var ({unbiased=})")


def test_merge_moments_skips_nonfinite_features():
  x = _x(7)
  bad = x.copy()
  bad[0, 2] = np.inf
  acc = jaxbn.merge_moments(jaxbn.init_population_moments(C), jaxbn.moments(x))
  acc2 = jaxbn.merge_moments(acc, jaxbn.moments(bad))
  assert _bitwise_equal(acc2.count[2], acc.count[2]) and _bitwise_equal(acc2.m2[2], acc.m2[2])
  assert float(acc2.count[0]) == 16.0
  assert np.isnan(jaxbn.merge_moments(acc, jaxbn.moments(bad), skip_nonfinite=False).m2[2])


# ------------------------------------------------------------------ checkify finds the source


CORES = [
    lambda x, m: jaxbn.batch_norm(x, OLD, jnp.ones(C), jnp.zeros(C), training=True, mask=m),
    lambda x, m: jaxbn.batch_renorm(x, OLD, training=True, mask=m, running_std=True,
                                    unbiased_running_var=True),
    lambda x, m: jaxbn.ghost_batch_norm(x, OLD, training=True, virtual_batch_size=4, mask=m,
                                        unbiased_running_var=True),
    lambda x, m: jaxbn.ghost_batch_norm(x, OLD, training=True, virtual_batch_size=4, mask=m,
                                        stats_update="sequential", momentum=None),
]


@pytest.mark.parametrize("i", range(len(CORES)))
def test_checkify_reports_an_upstream_nan_at_its_op_and_no_false_alarm(i):
  """Forward and backward under ``checkify.float_checks``: clean (masked) data raises no
  alarm — jaxbn generates no NaN internally, not even in a discarded ``where`` branch, with a
  fully masked feature, a feature with one valid entry and an empty virtual batch — and a
  NaN made upstream (``log(-1)``) is reported at that op."""
  core = CORES[i]

  def loss(z, m):
    y, new = core(jnp.log(z), m)
    return jnp.sum(y * y) + jnp.sum(new.var)

  f = jax.jit(checkify.checkify(jax.value_and_grad(loss), errors=checkify.float_checks))
  z = np.exp(_x(8)).astype(np.float32)
  mask = np.ones((8, C), bool)
  mask[4:, 1] = False  # feature 1 half masked: the second virtual batch has no valid entry
  mask[1:, 2] = False  # feature 2: one valid entry (count 1)
  masks = [jnp.asarray(mask), jnp.zeros((8, C), bool)]  # the second: all masked
  for m in masks:
    err, _ = f(z, m)
    assert err.get() is None, err.get()
  z_bad = z.copy()
  z_bad[3, 0] = -1.0  # log(-1) = NaN, upstream of jaxbn
  err, _ = f(z_bad, masks[0])
  assert err.get() is not None and "nan generated by primitive: log" in err.get(), err.get()
  if i == 0:  # the unmasked path
    g = jax.jit(checkify.checkify(jax.value_and_grad(lambda z: loss(z, None)),
                                  errors=checkify.float_checks))
    assert g(z)[0].get() is None
    assert "primitive: log" in (g(z_bad)[0].get() or "")


# ------------------------------------------------------------------ layers (linen and nnx)

LAYER_KW = {"BatchNorm": {}, "BatchRenorm": {}, "GhostBatchNorm": {"virtual_batch_size": 4}}


def _linen_train(name, x, **kw):
  layer = getattr(jaxbn.linen, name)(use_running_average=False, momentum=M, **LAYER_KW[name],
                                     **kw)
  variables = layer.init(jax.random.key(0), x)
  _, upd = layer.apply(variables, x, mutable=["batch_stats"])
  return variables["batch_stats"], upd["batch_stats"]


def _nnx_train(name, x, **kw):
  from flax import nnx
  layer = getattr(jaxbn.nnx, name)(C, momentum=M, rngs=nnx.Rngs(0), **LAYER_KW[name], **kw)
  old = {k: np.asarray(getattr(layer, k)[...]) for k in ("mean", "var")}
  layer(x)
  return old, {k: np.asarray(getattr(layer, k)[...]) for k in ("mean", "var")}


@pytest.mark.parametrize("name", list(LAYER_KW))
def test_layers_keep_nonfinite_features_and_skip_nonfinite_false_is_flax(name):
  pytest.importorskip("flax")
  x = _x(9)
  x[3, 1] = np.nan
  runs = {}
  for fw, train in (("linen", _linen_train), ("nnx", _nnx_train)):
    old, new = train(name, x)
    assert _bitwise_equal(new["mean"][1], old["mean"][1])
    assert _bitwise_equal(new["var"][1], old["var"][1])
    assert np.all(np.isfinite(np.asarray(new["mean"])))
    _, flaxlike = train(name, x, skip_nonfinite=False)
    assert np.isnan(flaxlike["mean"][1]) and np.isnan(flaxlike["var"][1])
    assert np.isfinite(flaxlike["mean"][0])
    runs[fw] = new
  for k in ("mean", "var"):  # linen equals nnx
    np.testing.assert_array_equal(runs["linen"][k], runs["nnx"][k])


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm", "GhostBatchNorm",
                                  "BatchChannelNorm", "SplitBatchNorm"])
def test_linen_init_with_one_row_works_training_with_one_row_raises(name):
  """Users init with a one-row dummy batch: init works (flax's variables, flax's output for
  BatchNorm), a one-row training step raises, eval works."""
  flax_nn = pytest.importorskip("flax.linen")
  kw = {"GhostBatchNorm": {"virtual_batch_size": 1}, "BatchChannelNorm": {"num_groups": 1},
        "SplitBatchNorm": {"num_domains": 2}}.get(name, {})
  layer = getattr(jaxbn.linen, name)(use_running_average=False, **kw)
  x1 = jnp.asarray(_x(10)[:1])
  y, variables = layer.init_with_output(jax.random.key(0), x1)
  if name == "BatchNorm":
    y_f, v_f = flax_nn.BatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), x1)
    jax.tree.map(np.testing.assert_array_equal, variables, v_f)
    np.testing.assert_array_equal(y, y_f)
  with pytest.raises(ValueError, match=ONE_VALUE):
    layer.apply(variables, x1, mutable=["batch_stats"])
  getattr(jaxbn.linen, name)(use_running_average=True, **kw).apply(variables, x1)


def test_nnx_one_row_training_call_raises_and_eval_works():
  from flax import nnx
  layer = jaxbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  x1 = jnp.asarray(_x(11)[:1])
  with pytest.raises(ValueError, match="batch_norm: " + ONE_VALUE):
    layer(x1)
  layer.eval()
  assert layer(x1).shape == (1, C)


def test_checkify_through_the_layers():
  from flax import nnx
  z = np.exp(_x(12)).astype(np.float32)
  z_bad = z.copy()
  z_bad[2, 2] = -1.0
  lin = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = lin.init(jax.random.key(0), z)

  def linen_loss(params, z):
    y, _ = lin.apply({**variables, "params": params}, jnp.log(z), mutable=["batch_stats"])
    return jnp.sum(y * y)

  layer = jaxbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  graph, state = nnx.split(layer)

  def nnx_loss(state, z):
    return jnp.sum(nnx.merge(graph, state)(jnp.log(z)) ** 2)

  for loss, arg in ((linen_loss, variables["params"]), (nnx_loss, state)):
    f = jax.jit(checkify.checkify(jax.grad(loss), errors=checkify.float_checks))
    assert f(arg, z)[0].get() is None
    assert "nan generated by primitive: log" in (f(arg, z_bad)[0].get() or "")


@pytest.mark.parametrize("name", ["SplitBatchNorm", "EvoNormB0", "BatchChannelNorm"])
def test_other_layers_with_running_statistics_take_skip_nonfinite(name):
  from flax import nnx
  x = _x(13, (8, 2, C))
  x[1, 0, 1] = np.nan
  kw = {"BatchChannelNorm": {"num_groups": 1}}.get(name, {})
  for skip in (True, False):
    lin = getattr(jaxbn.linen, name)(use_running_average=False, skip_nonfinite=skip, **kw)
    variables = lin.init(jax.random.key(0), x)
    _, upd = lin.apply(variables, x, mutable=["batch_stats"])
    layer = getattr(jaxbn.nnx, name)(C, skip_nonfinite=skip, rngs=nnx.Rngs(0), **kw)
    layer(x)
    for var in (np.asarray(upd["batch_stats"]["var"]), np.asarray(layer.var[...])):
      row = var[0] if var.ndim == 2 else var  # SplitBatchNorm: domain 0's row
      assert np.isnan(row[1]) != skip and np.isfinite(row[0])
      if skip:
        assert row[1] == 1.0  # the initial running variance, kept
