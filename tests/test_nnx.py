"""jaxbn.nnx.BatchNorm: flax.nnx.BatchNorm's interface and state; NNX transformations; and
linen == nnx == the functional core, bit for bit, and all three == float64 NumPy (outputs in
training and eval, running statistics) over a product of options.

References: flax.nnx.BatchNorm (constructor, state, dtypes, RNG use) and float64 NumPy.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors, nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

BN = jaxbn.nnx.BatchNorm


def np_stats(x, mask=None):
  """Float64 batch mean and biased variance over all axes but the last."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  w = np.ones_like(x) if mask is None else np.broadcast_to(
      np.asarray(mask, np.float64).reshape(-1, 1), x.shape)
  mean = (w * x).sum(0) / w.sum(0)
  return mean, (w * (x - mean) ** 2).sum(0) / w.sum(0)


def np_normalize(x, mean, var, scale, bias, eps=1e-5):
  x = np.asarray(x, np.float64)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


# --------------------------------------------------------------------------------------------
# Interface and state
# --------------------------------------------------------------------------------------------


def test_constructor_is_flax_constructor_plus_extras():
  ours = inspect.signature(BN.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  for name, p in theirs.items():
    assert ours[name].kind == p.kind, name
    if name != "promote_dtype":  # jaxbn's own copy (no private flax import), same behaviour:
      assert ours[name].default == p.default, name  # tests/test_layers_fields.py checks it
  assert set(ours) - set(theirs) == {"unbiased_running_var", "debias", "skip_nonfinite"}


@pytest.mark.parametrize("cfg", [dict(), dict(use_scale=False), dict(use_bias=False),
                                 dict(param_dtype=jnp.bfloat16),
                                 dict(scale_metadata={"note": "gamma"})], ids=str)
def test_same_state_and_rng_use_as_flax(cfg):
  rngs_ours, rngs_theirs = nnx.Rngs(params=3), nnx.Rngs(params=3)
  ours, theirs = BN(5, rngs=rngs_ours, **cfg), nnx.BatchNorm(5, rngs=rngs_theirs, **cfg)
  so, st = nnx.state(ours), nnx.state(theirs)
  assert jax.tree.structure(so) == jax.tree.structure(st)
  jax.tree.map(np.testing.assert_array_equal, so, st)
  assert [a.dtype for a in jax.tree.leaves(so)] == [a.dtype for a in jax.tree.leaves(st)]
  assert {type(v) for v in jax.tree.leaves(so, is_leaf=lambda v: isinstance(v, nnx.Variable))} \
      <= {nnx.Param, nnx.BatchStat}
  # The same keys were drawn: layers built afterwards get the same initial values.
  assert int(rngs_ours.params.count[...]) == int(rngs_theirs.params.count[...])
  if "scale_metadata" in cfg:
    assert ours.scale.note == theirs.scale.note == "gamma"
  assert ours.use_running_average is False


def test_train_eval_and_view_match_flax():
  x = jax.random.normal(jax.random.key(0), (6, 4)) * 2 + 1
  ours, theirs = BN(4, momentum=0.8, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, momentum=0.8,
                                                                      rngs=nnx.Rngs(0))
  for _ in range(2):
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
  mean, var = np_stats(x)
  np.testing.assert_allclose(ours.mean[...], (1 - 0.8 ** 2) * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.var[...], 0.8 ** 2 + (1 - 0.8 ** 2) * var, rtol=1e-5)
  ours.eval()
  theirs.eval()
  before = nnx.clone(nnx.state(ours, nnx.BatchStat))
  y = ours(x)
  np.testing.assert_allclose(y, theirs(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, np_normalize(x, ours.mean[...], ours.var[...], 1.0, 0.0),
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours, nnx.BatchStat), before)
  train_view = nnx.view(ours, use_running_average=False)
  assert train_view.use_running_average is False and ours.use_running_average is True
  ours.train()
  assert ours.use_running_average is False


def test_output_dtype_follows_flax():
  for x_dtype in (jnp.float32, jnp.bfloat16):
    for cfg in (dict(), dict(dtype=jnp.bfloat16), dict(param_dtype=jnp.bfloat16),
                dict(use_scale=False, use_bias=False)):
      x = jnp.ones((4, 3), x_dtype)
      for use_ra in (False, True):
        ours = BN(3, use_running_average=use_ra, rngs=nnx.Rngs(0), **cfg)
        theirs = nnx.BatchNorm(3, use_running_average=use_ra, rngs=nnx.Rngs(0), **cfg)
        out = nnx.eval_shape(lambda m: m(x), ours)
        assert out.dtype == nnx.eval_shape(lambda m: m(x), theirs).dtype, (x_dtype, cfg)


def test_grads_under_nnx_jit_match_flax():
  x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
  w = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def grads(model):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)) * w))(model)

  g_ours = grads(BN(3, rngs=nnx.Rngs(0)))
  g_theirs = grads(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
               g_ours, g_theirs)
  assert float(jnp.max(jnp.abs(g_ours["scale"][...]))) > 0.1


def test_momentum_none_and_debias_add_a_count():
  x = jax.random.normal(jax.random.key(0), (6, 2)) + 3
  bn = BN(2, momentum=None, rngs=nnx.Rngs(0))
  assert set(nnx.state(bn, nnx.BatchStat)) == {"mean", "var", "count"}
  bn(x)
  bn(2 * x)
  np.testing.assert_allclose(bn.mean[...], (np_stats(x)[0] + np_stats(2 * x)[0]) / 2,
                             rtol=1e-5)
  assert int(bn.count[...]) == 2
  bn = BN(2, debias=True, unbiased_running_var=True, rngs=nnx.Rngs(0))
  bn(x)
  np.testing.assert_allclose(bn.var[...], np_stats(x)[1] * 6 / 5, rtol=1e-5)
  assert "count" not in nnx.state(BN(2, rngs=nnx.Rngs(0)))


def test_errors():
  x = jnp.ones((4, 3))
  # flax's error type and sentence first, then jaxbn's explanation.
  with pytest.raises(ValueError, match=r"^No `use_running_average` argument was provided to "
                                       r"BatchNorm\. jaxbn.nnx.BatchNorm: give "
                                       r"`use_running_average`"):
    BN(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match=r"jaxbn.nnx.BatchNorm: `x` has features of shape "
                                       r"\(3,\) on axis -1 but the layer was built with "
                                       r"num_features=5"):
    BN(5, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match=r"jaxbn.nnx.BatchNorm: `momentum` must be in \[0, 1\]"):
    BN(3, momentum=1.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"jaxbn.nnx.BatchNorm: `epsilon` must be > 0"):
    BN(3, epsilon=0.0, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# Transformations (flax issues #4760, #4734)
# --------------------------------------------------------------------------------------------


def test_vmap_over_the_batch_needs_a_sync_or_says_how():
  """flax #4760: a shared layer under nnx.vmap over the batch."""
  x = jax.random.normal(jax.random.key(0), (4, 5, 3)) * 2 + 1  # (mapped, batch, features)
  bn = BN(3, momentum=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TraceContextError,
                     match=r"(?s)cannot write the running statistics.*axis_name='batch'\)"):
    nnx.vmap(lambda x: bn(x), in_axes=0)(x)  # a shared layer mapped over, as in #4760
  # The idiom: name the mapped axis and synchronize over it (statistics of the whole batch).
  bn = BN(3, momentum=0.0, axis_name="batch", rngs=nnx.Rngs(0))
  f = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")
  y = f(bn, x)
  y = f(bn, x)  # twice: nothing leaked
  mean, var = np_stats(x)
  np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
  np.testing.assert_allclose(y, np_normalize(x, mean, var, 1.0, 0.0), rtol=1e-4, atol=1e-4)


def test_vmap_ensemble_has_one_state_per_member():
  x = jax.random.normal(jax.random.key(0), (3, 6, 2)) * jnp.array([1.0, 2.0, 3.0])[:, None, None]

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return BN(2, momentum=0.0, rngs=rngs)

  ensemble = make(nnx.Rngs(0).split(3))
  y = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(ensemble, x)
  assert y.shape == x.shape and ensemble.mean[...].shape == (3, 2)
  for i in range(3):
    mean, var = np_stats(x[i])
    np.testing.assert_allclose(ensemble.mean[...][i], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ensemble.var[...][i], var, rtol=1e-5)


def test_scan_over_a_stack_of_layers():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.bn = BN(3, momentum=0.5, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.bn(self.linear(x)))

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return Block(rngs)

  stack = make(nnx.Rngs(0).split(4))
  ref = nnx.clone(stack)
  x = jax.random.normal(jax.random.key(1), (5, 3))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def forward(block, h):
    return block(h)

  y = nnx.jit(forward)(stack, x)
  # Reference: the layers one by one (sliced out of the stacked state).
  graphdef, state = nnx.split(ref)
  h = x
  for i in range(4):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    h = layer(h)
    np.testing.assert_allclose(stack.bn.mean[...][i], layer.bn.mean[...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


def test_eval_shape_split_merge_and_a_pure_train_step():
  """flax #4734 (abstract init and call), and the functional split/merge API under jax.jit."""
  abstract = nnx.eval_shape(lambda: BN(4, rngs=nnx.Rngs(0)))
  assert abstract.mean.shape == (4,)
  out = nnx.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((2, 4), jnp.bfloat16))
  assert out.shape == (2, 4) and out.dtype == jnp.float32  # flax's promotion

  model = BN(4, momentum=0.5, rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def step(params, stats, x):
    m = nnx.merge(graphdef, params, stats)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 3))(m)
    return grads, nnx.state(m, nnx.BatchStat)

  x = jax.random.normal(jax.random.key(0), (6, 4)) + 2
  grads, new_stats = step(params, stats, x)
  np.testing.assert_allclose(new_stats["mean"][...], 0.5 * np_stats(x)[0], rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert float(jnp.max(jnp.abs(grads["scale"][...]))) > 1.0
  nnx.update(model, new_stats)
  np.testing.assert_allclose(model.mean[...], new_stats["mean"][...])


# --------------------------------------------------------------------------------------------
# linen == nnx == functional core, and all three == float64
# --------------------------------------------------------------------------------------------

EPS32 = float(jnp.finfo(jnp.float32).eps)
# Statistics are accumulated in float32 over n <= 48 entries of O(1) data: 64 * eps32. Outputs
# |y| <= ~4 in float32: 256 * eps32; rounded to bfloat16: one rounding, 2^-9 relative, so 2^-8.
STATS_TOL = dict(rtol=64 * EPS32, atol=64 * EPS32)
OUT_TOL = {jnp.float32: dict(rtol=256 * EPS32, atol=256 * EPS32),
           jnp.bfloat16: dict(rtol=2.0 ** -8, atol=2.0 ** -8)}


def _agreement_cases():
  cases = []
  for i, (momentum, mask, dtype) in enumerate(itertools.product(
      (0.9, None, 1.0), (False, True), (jnp.float32, jnp.bfloat16))):
    cases.append(dict(momentum=momentum, mask=mask, x_dtype=dtype,
                      use_fast_variance=i % 2 == 0, axis=-1 if i % 3 else 1))
  cases.append(dict(momentum=0.9, debias=True, use_scale=False, axis=-1))
  cases.append(dict(momentum=0.8, unbiased_running_var=True, epsilon=1e-3, use_bias=False,
                    mask=True, axis=-1))
  return cases


def _np_update(old, batch, n, cfg, count):
  """Float64 running-statistics update (flax's momentum convention)."""
  m = cfg["momentum"]
  if cfg.get("unbiased_running_var"):
    batch = (batch[0], batch[1] * n / (n - 1))
  if m is None:
    w_old = count / (count + 1)
  elif cfg.get("debias"):
    w_old = m * (1 - m ** count) / (1 - m ** (count + 1))
  else:
    w_old = m
  return tuple(w_old * o + (1 - w_old) * b for o, b in zip(old, batch))


@pytest.mark.parametrize("case", _agreement_cases(), ids=str)
def test_linen_nnx_and_core_agree_bit_for_bit_and_with_float64(case):
  case = dict(case)
  x_dtype = case.pop("x_dtype", jnp.float32)
  use_mask = case.pop("mask", False)
  axis = case["axis"]
  shape = (6, 2, 4) if axis == -1 else (4, 3, 2, 2)
  cfg = dict(case, dtype=x_dtype)  # outputs in the input's dtype
  nf = shape[axis]
  kx, km, ks = jax.random.split(jax.random.key(7), 3)
  x = (jax.random.normal(kx, shape) * 2 + 1).astype(x_dtype)
  mshape = tuple(1 if a == axis % len(shape) else d for a, d in enumerate(shape))
  mask = jax.random.bernoulli(km, 0.7, mshape).at[0].set(True) if use_mask else None

  model = BN(nf, rngs=nnx.Rngs(0), **cfg)
  # Non-trivial parameters and statistics (and an update count of 3), shared by all three.
  state = jax.tree.map(lambda a: a + 0.25 * jax.random.normal(ks, a.shape, a.dtype)
                       if jnp.issubdtype(a.dtype, jnp.floating) else a + 3, nnx.state(model))
  graphdef = nnx.graphdef(model)

  @jax.jit
  def run(x, mask, state):
    params = {k: state[k][...] for k in ("scale", "bias") if k in state}
    stats = {k: state[k][...] for k in ("mean", "var", "count") if k in state}
    core_stats = jaxbn.BatchStats(stats["mean"], stats["var"],
                                  stats.get("count", jnp.zeros((), jnp.int32)))
    out = {}
    for use_ra in (True, False):  # eval first: training updates the merged state in place
      y_core, s_core = jaxbn.batch_norm(
          x, core_stats, params.get("scale"), params.get("bias"), training=not use_ra,
          axis=axis, momentum=0.0 if cfg["momentum"] == 1.0 else cfg["momentum"],
          epsilon=cfg.get("epsilon", 1e-5), mask=mask, dtype=x_dtype,
          use_fast_variance=cfg.get("use_fast_variance", True),
          unbiased_running_var=cfg.get("unbiased_running_var", False),
          debias=cfg.get("debias", False))
      if cfg["momentum"] == 1.0:  # the running statistics stay (see test_layers_flax.py)
        s_core = s_core._replace(mean=core_stats.mean, var=core_stats.var)
      core = (y_core, {k: getattr(s_core, k) for k in stats})
      y_lin, upd = jaxbn.linen.BatchNorm(**cfg).apply(
          {"params": params, "batch_stats": stats}, x, use_running_average=use_ra, mask=mask,
          mutable=["batch_stats"])
      m = nnx.merge(graphdef, state)
      y_nnx = m(x, use_running_average=use_ra, mask=mask)
      out[use_ra] = (core, (y_lin, dict(upd["batch_stats"])),
                     (y_nnx, {k: getattr(m, k)[...] for k in stats}))
    return out

  out = run(x, mask, state)
  for use_ra in (False, True):
    core, lin, nnx_out = out[use_ra]
    for other in (lin, nnx_out):
      assert jax.tree.structure(other) == jax.tree.structure(core)
      for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(core)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))

  # And the shared answer is right: float64 references for outputs and running statistics.
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  feat = axis % x.ndim
  red = tuple(a for a in range(x.ndim) if a != feat)
  kshape = [nf if a == feat else 1 for a in range(x.ndim)]
  k = lambda v: f64(v).reshape(kshape)  # noqa: E731
  x64 = f64(x)
  w = np.ones_like(x64) if mask is None else np.broadcast_to(f64(mask), x64.shape)
  n = w.sum(red)
  mean_b = (w * x64).sum(red) / n
  var_b = (w * (x64 - k(mean_b)) ** 2).sum(red) / n
  old = (f64(state["mean"][...]), f64(state["var"][...]))
  scale = k(state["scale"][...]) if "scale" in state else 1.0
  bias = k(state["bias"][...]) if "bias" in state else 0.0
  eps = cfg.get("epsilon", 1e-5)
  count = int(state["count"][...]) if "count" in state else 0

  y_train = (x64 - k(mean_b)) / np.sqrt(k(var_b) + eps) * scale + bias
  y_eval = (x64 - k(old[0])) / np.sqrt(k(old[1]) + eps) * scale + bias
  np.testing.assert_allclose(f64(out[False][0][0]), y_train, **OUT_TOL[x_dtype])
  np.testing.assert_allclose(f64(out[True][0][0]), y_eval, **OUT_TOL[x_dtype])
  new = old if cfg["momentum"] == 1.0 else _np_update(old, (mean_b, var_b), n, cfg, count)
  got = out[False][0][1]
  np.testing.assert_allclose(f64(got["mean"]), new[0], **STATS_TOL)
  np.testing.assert_allclose(f64(got["var"]), new[1], **STATS_TOL)
  for key in ("mean", "var"):  # eval leaves the statistics bit-identical
    np.testing.assert_array_equal(f64(out[True][0][1][key]), f64(state[key][...]))
  if "count" in got:
    assert int(got["count"]) == count + 1


@pytest.mark.parametrize("cls,kw", [(jaxbn.nnx.BatchNorm, {}), (jaxbn.nnx.BatchRenorm, {}),
                                    (jaxbn.nnx.GhostBatchNorm, {"virtual_batch_size": 5}),
                                    (jaxbn.nnx.BatchChannelNorm, {"num_groups": 1})])
def test_every_bn_family_layer_shared_under_vmap_says_how_and_names_itself(cls, kw):
  """The BN family's layers give the same hint (flax #4760), each under its own name."""
  x = jax.random.normal(jax.random.key(0), (4, 5, 3))
  layer = cls(3, rngs=nnx.Rngs(0), **kw)
  with pytest.raises(errors.TraceContextError,
                     match=rf"(?s)^jaxbn\.nnx\.{cls.__name__}: cannot write the running "
                           r"statistics.*axis_name='batch'\)"):
    nnx.vmap(lambda x: layer(x), in_axes=0)(x)
