"""jaxbn.linen.BatchNorm: flax.linen.BatchNorm's interface, variables and numbers.

References: flax.linen.BatchNorm (interface, variables, dtypes, init behaviour) and a float64
NumPy batch norm (the numbers).
"""

from __future__ import annotations

import functools
import itertools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn.linen
from tests import _reference as ref

BN = jaxbn.linen.BatchNorm


def np_bn(x, axis=-1, mask=None, eps=1e-5, scale=None, bias=None):
  """Float64 reference: (y, batch mean, biased batch var, count) over the non-feature axes."""
  x = np.asarray(x, np.float64)
  feat = (axis,) if isinstance(axis, int) else tuple(axis)
  feat = tuple(a % x.ndim for a in feat)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
  n = w.sum(red, keepdims=True)
  mean = (w * x).sum(red, keepdims=True) / n
  var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
  y = (x - mean) / np.sqrt(var + eps)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(mean.shape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(mean.shape)
  return y, mean.reshape(-1), var.reshape(-1), n.reshape(-1)


def _apply_train(module, variables, x, **kw):
  return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kw)


def _variables(module, x, seed=0):
  """Variables of ``module`` for ``x`` without running init: random params, fresh stats."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(module.init, use_running_average=False),
                          jax.random.key(0), x)
  fresh = {"mean": np.zeros, "var": np.ones}
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(fresh[path[-1].key](s.shape) if path[0].key == "batch_stats"
                                  else rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


# --------------------------------------------------------------------------------------------
# Interface: fields, variables, dtypes
# --------------------------------------------------------------------------------------------


def test_fields_are_flax_fields_with_flax_defaults():
  ours = {f.name: f.default for f in BN.__dataclass_fields__.values() if f.init}
  theirs = {f.name: f.default for f in nn.BatchNorm.__dataclass_fields__.values() if f.init}
  assert set(theirs) <= set(ours)
  for name, default in theirs.items():
    assert ours[name] == default, name
  assert set(ours) - set(theirs) == {"unbiased_running_var", "debias", "skip_nonfinite"}


VARIABLE_CONFIGS = [
    dict(),
    dict(axis=1),
    dict(axis=(1, 2)),
    dict(use_scale=False),
    dict(use_bias=False, use_scale=False),
    dict(param_dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16, force_float32_reductions=False),
    dict(dtype=jnp.bfloat16, scale_init=nn.initializers.constant(2.0)),
]


@pytest.mark.parametrize("cfg", VARIABLE_CONFIGS, ids=str)
def test_same_variables_as_flax(cfg):
  x = jax.ShapeDtypeStruct((2, 3, 4, 5), jnp.float32)
  key = jax.random.key(0)
  ours = jax.eval_shape(functools.partial(BN(**cfg).init, use_running_average=False), key, x)
  theirs = jax.eval_shape(
      functools.partial(nn.BatchNorm(**cfg).init, use_running_average=False), key, x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.leaves(ours) == jax.tree.leaves(theirs)


def test_same_init_values_and_init_does_not_update_stats():
  x = jax.random.normal(jax.random.key(0), (6, 3)) * 4 + 2
  kw = dict(scale_init=nn.initializers.constant(3.0), bias_init=nn.initializers.constant(-1.0))

  @jax.jit
  def inits(x):
    return [(cls(**kw).init(jax.random.key(1), x, use_running_average=use_ra))
            for use_ra in (False, True) for cls in (BN, nn.BatchNorm)]

  ours_train, theirs_train, ours_eval, theirs_eval = inits(x)
  for ours, theirs in ((ours_train, theirs_train), (ours_eval, theirs_eval)):
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    np.testing.assert_array_equal(ours["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(ours["batch_stats"]["var"], np.ones(3))
    np.testing.assert_array_equal(ours["params"]["scale"], np.full(3, 3.0))


def test_init_issues_no_collective_and_apply_names_the_unbound_axis():
  x = jnp.ones((4, 3))
  bn = BN(use_running_average=False, axis_name="batch")
  variables = bn.init(jax.random.key(0), x)  # no enclosing map: fine during init, as flax
  with pytest.raises(ValueError, match=r"axis name 'batch' is not bound here"):
    bn.apply(variables, x, mutable=["batch_stats"])


def test_output_dtype_follows_flax_and_stats_keep_their_dtype():
  for x_dtype, cfg in itertools.product(
      (jnp.float32, jnp.bfloat16),
      (dict(), dict(dtype=jnp.bfloat16), dict(dtype=jnp.float32),
       dict(use_scale=False, use_bias=False), dict(param_dtype=jnp.bfloat16),
       dict(param_dtype=jnp.bfloat16, force_float32_reductions=False))):
    x = jax.ShapeDtypeStruct((4, 3), x_dtype)
    for use_ra in (False, True):
      def run(cls):
        def f(x):
          v = cls(**cfg).init(jax.random.key(0), x, use_running_average=use_ra)
          y, upd = cls(**cfg).apply(v, x, use_running_average=use_ra, mutable=["batch_stats"])
          return y, upd, v["batch_stats"]
        return jax.eval_shape(f, x)
      (y, upd, stats0), (y_ref, _, stats0_ref) = run(BN), run(nn.BatchNorm)
      assert y == y_ref, (x_dtype, cfg, use_ra)
      assert jax.tree.leaves(stats0) == jax.tree.leaves(stats0_ref)
      # Updated statistics keep the dtype they were created with (flax's drift from a bf16
      # param_dtype to float32 with force_float32_reductions=False does not happen here).
      assert jax.tree.leaves(upd["batch_stats"]) == jax.tree.leaves(stats0)


def test_integer_input_is_normalized_in_float32_as_flax():
  x = jnp.arange(12).reshape(4, 3)
  v = BN().init(jax.random.key(0), x, use_running_average=False)
  y, _ = _apply_train(BN(), v, x)
  y_ref, _ = _apply_train(nn.BatchNorm(), v, x)
  assert y.dtype == y_ref.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


NUMERIC_CONFIGS = [
    dict(shape=(8, 5), cfg=dict()),
    dict(shape=(4, 3, 3, 6), cfg=dict(use_fast_variance=False)),
    dict(shape=(4, 6, 3, 3), cfg=dict(axis=1)),
    dict(shape=(4, 3, 2, 5), cfg=dict(axis=(1, 3), use_bias=False)),
    dict(shape=(6, 2, 4), cfg=dict(), mask=True),
    dict(shape=(4, 3, 3, 6), cfg=dict(dtype=jnp.bfloat16), x_dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", NUMERIC_CONFIGS, ids=lambda c: str(c["cfg"] or c["shape"]))
def test_train_and_eval_match_flax_and_float64(case):
  shape, cfg = case["shape"], case["cfg"]
  x_dtype = case.get("x_dtype", jnp.float32)
  kx, km = jax.random.split(jax.random.key(3))
  x = (jax.random.normal(kx, shape) * 3 + 1).astype(x_dtype)
  mask = None
  if case.get("mask"):
    mask = jax.random.bernoulli(km, 0.6, shape[:-1] + (1,))
  momentum = 0.8
  bn, ref = BN(momentum=momentum, **cfg), nn.BatchNorm(momentum=momentum, **cfg)
  v = _variables(bn, x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(m, v, x):
    """Train step, then eval with the updated statistics: one compile per module."""
    y, upd = _apply_train(m, v, x, mask=mask)
    return y, upd, m.apply({**v, **upd}, x, use_running_average=True)

  (y, upd, y_eval), (y_ref, upd_ref, y_eval_ref) = run(bn, v, x), run(ref, v, x)
  tol = dict(rtol=2e-2, atol=2e-2) if x_dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  assert y.dtype == y_ref.dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **tol)

  axis = cfg.get("axis", -1)
  y64, mean64, var64, _ = np_bn(np.asarray(x, np.float64), axis, mask,
                                scale=v["params"]["scale"], bias=v["params"].get("bias"))
  np.testing.assert_allclose(np.asarray(y, np.float64), y64, **tol)
  fshape = upd["batch_stats"]["mean"].shape
  np.testing.assert_allclose(upd["batch_stats"]["mean"],
                             ((1 - momentum) * mean64).reshape(fshape), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"],
                             (momentum + (1 - momentum) * var64).reshape(fshape), rtol=1e-5)

  # Eval mode: normalized with the running statistics, as flax.
  feat = [a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)]
  kshape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
  k = lambda a: np.asarray(a, np.float64).reshape(kshape)  # noqa: E731
  y_eval64 = ((np.asarray(x, np.float64) - k(upd["batch_stats"]["mean"]))
              / np.sqrt(k(upd["batch_stats"]["var"]) + 1e-5) * k(v["params"]["scale"]))
  if "bias" in v["params"]:
    y_eval64 = y_eval64 + k(v["params"]["bias"])
  np.testing.assert_allclose(np.asarray(y_eval, np.float64), y_eval64, **tol)
  np.testing.assert_allclose(np.asarray(y_eval, np.float32),
                             np.asarray(y_eval_ref, np.float32), **tol)


def test_stable_variance_option_on_offset_data():
  """flax's fast variance returns 0 for 1e4 ± 1e-2; jaxbn's stable and guarded fast are right."""
  x = 1e4 + 1e-2 * jax.random.normal(jax.random.key(0), (64, 2))
  _, _, var64, _ = np_bn(x)
  v = _variables(BN(), x)
  # Running var 0: the momentum-0 update then stores the batch variance exactly (from var 1,
  # `old + 1·(new − old)` rounds at u·|old| ≈ 6e-8, 6e-4 of this variance).
  v["batch_stats"]["var"] = jnp.zeros_like(v["batch_stats"]["var"])

  @jax.jit
  def variances(x):
    return [_apply_train(m, v, x)[1]["batch_stats"]["var"] for m in
            (BN(use_fast_variance=False, momentum=0.0), BN(momentum=0.0),
             nn.BatchNorm(momentum=0.0))]

  stable, default, flax_default = variances(x)
  # The bound of tests/README.md for a stable variance of offset data: log2(n) only (x − K is
  # exact by Sterbenz for a shift K near the data): 4·6·u ≈ 1.4e-6 relative. It rejects a
  # two-pass variance about the float32-rounded mean without its correction term (an error of
  # (μ − fl(μ))², up to 7e-4 of this variance: 230x the bound), which rtol=1e-3 let pass.
  cond = ref.stats_cond(np.asarray(x, np.float64), order=0)
  ref.assert_close(stable, var64, np.float32, cond=cond, what="stable variance")
  # The default (flax's fast formula, made exact by jaxbn's shift) is as exact here, where
  # flax's formula loses every digit.
  ref.assert_close(default, var64, np.float32, cond=cond, what="default variance")
  # flax's own layer (the claim above): its one-pass formula loses every digit here.
  assert np.all(np.abs(np.asarray(flax_default, np.float64) - var64) > 0.5 * var64), (
      flax_default, var64)


def test_momentum_none_is_a_cumulative_average_with_a_count_variable():
  xs = [jax.random.normal(jax.random.key(i), (8, 3)) * (i + 1) + i for i in range(3)]
  bn = BN(momentum=None, use_running_average=False)
  v = bn.init(jax.random.key(0), xs[0])
  assert set(v["batch_stats"]) == {"mean", "var", "count"}
  assert v["batch_stats"]["count"].dtype == jnp.int32
  for x in xs:
    _, upd = bn.apply(v, x, mutable=["batch_stats"])
    v = {**v, **upd}
  refs = [np_bn(x) for x in xs]
  np.testing.assert_allclose(v["batch_stats"]["mean"], np.mean([r[1] for r in refs], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v["batch_stats"]["var"], np.mean([r[2] for r in refs], 0),
                             rtol=1e-5)
  assert int(v["batch_stats"]["count"]) == 3


def test_unbiased_running_var_and_debias():
  x = jax.random.normal(jax.random.key(0), (5, 3)) * 2 + 1
  _, mean64, var64, _ = np_bn(x)
  bn = BN(momentum=0.9, unbiased_running_var=True, debias=True, use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  assert set(v["batch_stats"]) == {"mean", "var", "count"}
  _, upd = bn.apply(v, x, mutable=["batch_stats"])
  # Debiased: the first update replaces the initial values entirely.
  np.testing.assert_allclose(upd["batch_stats"]["mean"], mean64, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], var64 * 5 / 4, rtol=1e-5)
  default = BN().init(jax.random.key(0), x, use_running_average=False)
  assert set(default["batch_stats"]) == {"mean", "var"}


def test_masked_statistics_synchronized_over_a_mapped_axis():
  """Uneven masks on 4 'devices': the statistics of the union of the valid entries."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 3)) * 2 + jnp.arange(4.0)[:, None, None]
  counts = np.array([6, 1, 3, 0])
  mask = jnp.asarray(np.arange(6)[None, :] < counts[:, None])[..., None]
  bn = BN(momentum=0.0, axis_name="d", use_running_average=False)
  v = _variables(BN(), x[0])
  y, upd = jax.jit(jax.vmap(lambda x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"]),
                            axis_name="d", out_axes=(0, None)))(x, mask)
  _, mean64, var64, _ = np_bn(x, mask=mask)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], mean64, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], var64, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors():
  x = jnp.ones((4, 3))
  # flax's error type and sentence first, then jaxbn's explanation.
  with pytest.raises(ValueError, match=r'^Parameter "use_running_average" must be passed to the '
                                       r"constructor or at call time\. jaxbn.linen.BatchNorm: "
                                       r"give `use_running_average`"):
    BN().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'^Parameter "use_running_average" was passed to the '
                                       r"constructor and at call time\. Should be passed just "
                                       r"once\. jaxbn.linen.BatchNorm: give"):
    BN(use_running_average=True).init(jax.random.key(0), x, use_running_average=True)
  v = BN().init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError, match=r"jaxbn.linen.BatchNorm: `x` has features of shape "
                                       r"\(5,\) on axis -1 but this layer's variables have "
                                       r"shape \(3,\)"):
    BN().apply(v, jnp.ones((4, 5)), use_running_average=True)
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\].*got 1.5"):
    BN(momentum=1.5).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match=r"`axis`=2 is out of range for `x` of rank 2"):
    BN(axis=2).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(flax.errors.ModifyScopeVariableError,
                     match=r"collection \"batch_stats\" is immutable"):
    BN().apply(v, x, use_running_average=False)  # as flax: batch_stats must be mutable


# --------------------------------------------------------------------------------------------
# Transformations (flax issues #2052, #3319)
# --------------------------------------------------------------------------------------------


class _Step(nn.Module):
  bn: type = BN

  @nn.compact
  def __call__(self, c, x):
    return c, self.bn(use_running_average=False, momentum=0.5)(nn.Dense(3)(x))


class _TimeScan(nn.Module):
  """One BN shared by all steps, statistics carried (flax #2052): the working idiom."""

  @nn.compact
  def __call__(self, c, xs):
    if self.is_initializing():  # carried collections must exist before the loop
      kw = dict(variable_broadcast=["params", "batch_stats"])
    else:
      kw = dict(variable_broadcast="params", variable_carry="batch_stats")
    return nn.scan(_Step, split_rngs={"params": False}, **kw)(name="step")(c, xs)


def test_scan_over_time_carries_batch_stats():
  xs = jax.random.normal(jax.random.key(0), (5, 4, 2)) * 2 + 1

  @jax.jit
  def run(xs):
    v = _TimeScan().init(jax.random.key(1), (), xs)
    return v, _TimeScan().apply(v, (), xs, mutable=["batch_stats"])

  v, ((_, ys), upd) = run(xs)
  # Reference: the same step applied sequentially, statistics threaded by hand.
  step = jax.jit(lambda vv, x: _Step().apply(vv, (), x, mutable=["batch_stats"]))
  vv = {"params": v["params"]["step"], "batch_stats": v["batch_stats"]["step"]}
  for t in range(xs.shape[0]):
    (_, y), u = step(vv, xs[t])
    vv = {**vv, **u}
    np.testing.assert_allclose(ys[t], y, rtol=1e-5, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               upd["batch_stats"]["step"], vv["batch_stats"])


def test_nested_vmap_synchronizes_over_both_axes():
  """flax #3319's setup: params and batch_stats shared, statistics over both mapped axes."""
  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
      return BN(use_running_average=False, momentum=0.0, axis_name=("outer", "inner"))(x)

  shared = dict(variable_axes={"params": None, "batch_stats": None},
                split_rngs={"params": False})
  model = nn.vmap(nn.vmap(Inner, axis_name="inner", **shared), axis_name="outer", **shared)
  x = jax.random.normal(jax.random.key(0), (3, 4, 2)) * 3 + 1  # (outer, inner, features)

  @jax.jit
  def run(x):
    v = model().init(jax.random.key(1), x)
    return model().apply(v, x, mutable=["batch_stats"])

  y, upd = run(x)
  y64, mean64, var64, _ = np_bn(x)
  np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["mean"], mean64, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["var"], var64, rtol=1e-5)


def test_scan_over_a_stack_of_layers_stacks_batch_stats():
  """nn.scan over blocks (params and batch_stats with a layer axis): one row of statistics per
  layer, each the statistics of that layer's own input (float64 reference, momentum 0)."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return nn.relu(BN(use_running_average=False, momentum=0.0)(nn.Dense(4)(h))), None

  stack = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                  split_rngs={"params": True}, length=3)
  x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1

  @jax.jit
  def run(x):
    v = stack().init(jax.random.key(2), x, None)
    return v, stack().apply(v, x, None, mutable=["batch_stats"])

  v, ((h_out, _), upd) = run(x)
  stats = upd["batch_stats"]["BatchNorm_0"]
  assert stats["mean"].shape == stats["var"].shape == (3, 4)
  h = np.asarray(x, np.float64)
  for i in range(3):  # float32 data of size O(10) through a 4-wide Dense: 1e-5 relative
    dense = jax.tree.map(lambda a: np.asarray(a[i], np.float64), v["params"]["Dense_0"])
    bn = jax.tree.map(lambda a: np.asarray(a[i], np.float64), v["params"]["BatchNorm_0"])
    z = h @ dense["kernel"] + dense["bias"]
    y, mean, var, _ = np_bn(z, scale=bn["scale"], bias=bn["bias"])
    np.testing.assert_allclose(stats["mean"][i], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"][i], var, rtol=1e-5)
    h = np.maximum(y, 0.0)
  np.testing.assert_allclose(h_out, h, rtol=1e-4, atol=1e-4)
