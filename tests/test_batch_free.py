"""Batch-independent norms (FRN/TLU, EvoNorm-B0/S0, weight standardization) against the papers'
formulas in float64 NumPy: values, masks, gradients (``check_grads`` in float64), running
statistics, 8-device synchronization, the linen and nnx layers, and timm where it imports.

Tolerances: float64 results vs float64 references at 1e-10 (a few hundred ulps of 2.2e-16
through a handful of reductions; a planted error such as ε off by 1e-3 or an unbiased variance
moves results by >= 1e-4 here). float32 layers vs the float64 reference at 2e-5 absolute on
O(1) outputs (float32 eps 1.2e-7 × ~100 for the reductions and the division).
"""

import importlib
import importlib.util
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
import jaxbn.linen
import jaxbn.nnx

SHAPE = (4, 3, 5, 6)  # NHWC
SPATIAL = (1, 2)
TOL64 = 1e-10
TOL32 = 2e-5


def _x(seed=0, shape=SHAPE, scale=1.0, offset=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape) * scale + offset


def _p(seed, n=SHAPE[-1], center=0.0, spread=0.5):
  return center + spread * np.random.default_rng(seed).normal(size=n)


def _mask(seed=3, shape=SHAPE):
  m = np.random.default_rng(seed).uniform(size=shape[:-1] + (1,)) > 0.3
  m[0, 0, 0] = True
  return np.broadcast_to(m, shape)


# ----------------------------------------------------------------- float64 references
def np_frn(x, g, b, tau, eps, mask=None, red=SPATIAL):
  w = np.ones_like(x) if mask is None else mask.astype(np.float64)
  nu2 = (w * x * x).sum(red, keepdims=True) / np.maximum(w.sum(red, keepdims=True), 1)
  y = g * x / np.sqrt(nu2 + eps) + b
  return y if tau is None else np.maximum(y, tau)


def np_var(x, red, mask=None):
  w = np.ones_like(x) if mask is None else mask.astype(np.float64)
  n = np.maximum(w.sum(red, keepdims=True), 1)
  mu = (w * x).sum(red, keepdims=True) / n
  return (w * (x - mu) ** 2).sum(red, keepdims=True) / n


def np_b0(x, var_b, g, b, v, eps, mask=None):
  inst = np_var(x, SPATIAL, mask)
  return x / np.maximum(np.sqrt(var_b + eps), v * x + np.sqrt(inst + eps)) * g + b


def np_s0(x, g, b, v, groups, eps, mask=None):
  n, h, w_, c = x.shape
  xg = x.reshape(n, h, w_, groups, c // groups)
  mg = None if mask is None else mask.reshape(xg.shape)
  var = np_var(xg, (1, 2, 4), mg)
  std = np.broadcast_to(np.sqrt(var + eps), xg.shape).reshape(x.shape)
  return x / (1 + np.exp(-v * x)) / std * g + b


def np_ws(w, gain, eps, scaled):
  red = tuple(range(w.ndim - 1))
  mu = w.mean(red, keepdims=True)
  var = ((w - mu) ** 2).mean(red, keepdims=True)
  out = (w - mu) / np.sqrt(var + eps)
  if scaled:
    out = out / np.sqrt(np.prod(w.shape[:-1]))
  return out if gain is None else out * gain


# ----------------------------------------------------------------- FRN
@pytest.mark.parametrize("masked", [False, True])
def test_frn_float64_matches_paper_formula(masked):
  x, g, b, tau = _x(0, scale=0.05), _p(1, center=1), _p(2), _p(3, spread=0.2)
  mask = _mask() if masked else None
  with jax.enable_x64(True):
    y = jaxbn.filter_response_norm(x, g, b, tau, epsilon=1e-4, mask=mask)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, np_frn(x, g, b, tau, 1e-4, mask), rtol=0, atol=TOL64)
    # without TLU; the learned-epsilon variant adds |eps_l|
    y = jaxbn.filter_response_norm(x, g, b, epsilon=1e-6, learned_epsilon=-2e-4)
    np.testing.assert_allclose(y, np_frn(x, g, b, None, 1e-6 + 2e-4), rtol=0, atol=TOL64)
    # `feature_axes`, the layers' name of the channel `axis`, is accepted as well
    y = jaxbn.filter_response_norm(np.moveaxis(x, -1, 1), g, b, tau, epsilon=1e-4,
                                   feature_axes=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), np_frn(x, g, b, tau, 1e-4),
                               rtol=0, atol=TOL64)


def test_frn_gradients_float64_including_learned_epsilon():
  x, g, b, tau = _x(0, shape=(2, 3, 2, 3)), _p(1, 3, 1), _p(2, 3), _p(3, 3)
  with jax.enable_x64(True):
    f = lambda x, g, b, tau, e: jaxbn.filter_response_norm(x, g, b, tau, epsilon=1e-6,
                                                          learned_epsilon=e)
    check_grads(jax.jit(f), (x, g, b, tau, 0.3), order=1, modes=["rev"])
    # and the learned epsilon really gets the derivative of the formula
    loss = lambda e: f(x, g, b, None, e).sum()
    h = 1e-6
    fd = (np_frn(x, g, b, None, 1e-6 + 0.3 + h).sum() - np_frn(x, g, b, None,
                                                              1e-6 + 0.3 - h).sum()) / (2 * h)
    np.testing.assert_allclose(jax.grad(loss)(0.3), fd, rtol=1e-6)


def test_frn_bfloat16_input_accumulates_in_float32():
  x = _x(6, scale=0.05)
  y = jaxbn.filter_response_norm(jnp.asarray(x, jnp.bfloat16), tau=jnp.zeros(6),
                                 epsilon=1e-4)
  assert y.dtype == jnp.bfloat16
  # bf16 rounding of the input and of the output (2^-8 relative each) on O(1) values
  ref = np_frn(np.float64(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)), 1, 0, 0, 1e-4)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2 ** -7, atol=2 ** -7)


def test_frn_is_per_example_batch_independent():
  x = _x(5)
  y_all = jaxbn.filter_response_norm(jnp.asarray(x, jnp.float32), tau=jnp.zeros(6))
  y_one = jaxbn.filter_response_norm(jnp.asarray(x[1:2], jnp.float32), tau=jnp.zeros(6))
  np.testing.assert_array_equal(np.asarray(y_all[1:2]), np.asarray(y_one))


# ----------------------------------------------------------------- EvoNorm-B0
@pytest.mark.parametrize("masked", [False, True])
def test_evonorm_b0_training_and_eval_float64(masked):
  x, g, b, v = _x(0, scale=2.0, offset=1.0), _p(1, center=1), _p(2), _p(3, center=1)
  mask = _mask() if masked else None
  stats = jaxbn.BatchStats(jnp.zeros(6), jnp.asarray(_p(4, center=2, spread=0.3)),
                           jnp.zeros((), jnp.int32))
  with jax.enable_x64(True):
    stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64 if a.ndim else a.dtype), stats)
    y, new = jaxbn.evonorm_b0(x, stats, g, b, v, training=True, momentum=0.75, epsilon=1e-3,
                              mask=mask)
    var_b = np_var(x, (0, 1, 2), mask)
    np.testing.assert_allclose(y, np_b0(x, var_b, g, b, v, 1e-3, mask), rtol=0, atol=TOL64)
    np.testing.assert_allclose(new.var, 0.75 * np.asarray(stats.var) + 0.25 * var_b.ravel(),
                               rtol=0, atol=TOL64)
    assert new.mean is stats.mean and int(new.count) == 1  # B0 keeps no running mean
    # (momentum 0.75 is exact in float32, in which update_stats takes it)
    # timm's convention: the unbiased batch variance is folded into the running one
    n = (np.ones_like(x) if mask is None else mask).sum((0, 1, 2))
    _, unb = jaxbn.evonorm_b0(x, stats, g, b, v, training=True, momentum=0.75, epsilon=1e-3,
                              mask=mask, unbiased_running_var=True)
    np.testing.assert_allclose(unb.var, 0.75 * np.asarray(stats.var)
                               + 0.25 * var_b.ravel() * n / (n - 1), rtol=0, atol=TOL64)
    ye, same = jaxbn.evonorm_b0(x, stats, g, b, v, training=False, epsilon=1e-3, mask=mask)
    assert same is stats
    np.testing.assert_allclose(ye, np_b0(x, np.asarray(stats.var), g, b, v, 1e-3, mask),
                               rtol=0, atol=TOL64)


def test_evonorm_b0_gradients_float64():
  x, g, b, v = _x(0, shape=(3, 2, 2, 3), offset=0.5), _p(1, 3, 1), _p(2, 3), _p(3, 3, 1)
  with jax.enable_x64(True):
    stats = jaxbn.init_stats(3, jnp.float64)
    for training in (True, False):
      f = lambda x, g, b, v: jaxbn.evonorm_b0(x, stats, g, b, v, training=training,
                                              epsilon=1e-3)[0]
      check_grads(jax.jit(f), (x, g, b, v), order=1, modes=["rev"])


def test_evonorm_b0_synchronized_over_8_devices_equals_global_batch():
  x, g, b, v = _x(7, shape=(16, 2, 2, 4), offset=1.0), _p(1, 4, 1), _p(2, 4), _p(3, 4, 1)
  x = jnp.asarray(x, jnp.float32)
  stats = jaxbn.init_stats(4)
  mesh = jax.make_mesh((8,), ("batch",))
  f = jax.jit(jax.shard_map(
      lambda x: jaxbn.evonorm_b0(x, stats, g, b, v, training=True, momentum=0.9,
                                 axis_name="batch"),
      mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P())))
  y, new = f(jax.device_put(x, NamedSharding(mesh, P("batch"))))
  y1, new1 = jaxbn.evonorm_b0(x, stats, g, b, v, training=True, momentum=0.9)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y1), rtol=0, atol=TOL32)
  np.testing.assert_allclose(np.asarray(new.var), np.asarray(new1.var), rtol=1e-6)


# ----------------------------------------------------------------- EvoNorm-S0
@pytest.mark.parametrize("masked", [False, True])
def test_evonorm_s0_float64_matches_paper_formula(masked):
  x, g, b, v = _x(0, scale=3.0, offset=2.0), _p(1, center=1), _p(2), _p(3, center=1)
  mask = _mask() if masked else None
  with jax.enable_x64(True):
    y = jaxbn.evonorm_s0(x, g, b, v, num_groups=3, epsilon=1e-3, mask=mask)
    np.testing.assert_allclose(y, np_s0(x, g, b, v, 3, 1e-3, mask), rtol=0, atol=TOL64)
    y2 = jaxbn.evonorm_s0(x, g, b, v, num_groups=None, group_size=3, epsilon=1e-3)
    np.testing.assert_allclose(y2, np_s0(x, g, b, v, 2, 1e-3), rtol=0, atol=TOL64)
    # the channel `axis`: NCHW input with axis=1 is the NHWC result transposed
    to_nchw = lambda a: None if a is None else np.moveaxis(a, -1, 1)
    y3 = jaxbn.evonorm_s0(to_nchw(x), g, b, v, axis=1, num_groups=3, epsilon=1e-3,
                          mask=to_nchw(mask))
    np.testing.assert_allclose(np.moveaxis(np.asarray(y3), 1, -1),
                               np_s0(x, g, b, v, 3, 1e-3, mask), rtol=0, atol=TOL64)


def test_evonorm_s0_gradients_float64():
  x, g, b, v = _x(0, shape=(2, 2, 2, 4), offset=0.5), _p(1, 4, 1), _p(2, 4), _p(3, 4, 1)
  with jax.enable_x64(True):
    f = lambda x, g, b, v: jaxbn.evonorm_s0(x, g, b, v, num_groups=2, epsilon=1e-3)
    check_grads(jax.jit(f), (x, g, b, v), order=1, modes=["rev"])


# ----------------------------------------------------------------- weight standardization
@pytest.mark.parametrize("scaled", [False, True])
def test_standardize_weight_float64_and_gradients(scaled):
  w = _x(0, shape=(3, 3, 2, 5), scale=0.2, offset=0.1)
  gain = _p(1, 5, center=1)
  with jax.enable_x64(True):
    out = jaxbn.standardize_weight(w, gain, epsilon=1e-4, fan_in_scaling=scaled)
    np.testing.assert_allclose(out, np_ws(w, gain, 1e-4, scaled), rtol=0, atol=TOL64)
    if scaled:  # (one gradient check covers both: the plain form is the scaled one / const)
      check_grads(jax.jit(lambda w, g: jaxbn.standardize_weight(w, g, epsilon=1e-4,
                                                                fan_in_scaling=True)),
                  (w[:2, :2], gain), order=1, modes=["rev"])
  # a dense kernel (in, out) and the output axis first (PyTorch's OIHW)
  w2 = _x(4, shape=(7, 3))
  with jax.enable_x64(True):
    np.testing.assert_allclose(jaxbn.standardize_weight(w2, epsilon=1e-6),
                               np_ws(w2, None, 1e-6, False), rtol=0, atol=TOL64)
    np.testing.assert_allclose(jaxbn.standardize_weight(w2.T, axis=0, epsilon=1e-6),
                               np_ws(w2, None, 1e-6, False).T, rtol=0, atol=TOL64)


# ----------------------------------------------------------------- layers
def test_linen_layers_equal_functional_and_nnx_twins():
  x = jnp.asarray(_x(0, offset=0.5), jnp.float32)
  key = jax.random.key(0)
  params = {"scale": jnp.asarray(_p(1, center=1), jnp.float32),
            "bias": jnp.asarray(_p(2), jnp.float32)}
  # FRN with TLU and learned epsilon
  frn = jaxbn.linen.FilterResponseNorm(learn_epsilon=True)
  variables = frn.init(key, x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {
      "bias": (6,), "eps": (), "scale": (6,), "tau": (6,)}}
  variables = {"params": {**variables["params"], **params, "tau": jnp.full(6, -0.2)}}
  y = frn.apply(variables, x)
  np.testing.assert_allclose(
      y, np_frn(np.float64(x), params["scale"], params["bias"], -0.2, 1e-6 + 1e-4),
      rtol=0, atol=TOL32)
  layer = jaxbn.nnx.FilterResponseNorm(6, learn_epsilon=True, rngs=nnx.Rngs(0))
  nnx.update(layer, nnx.State(variables["params"]))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y))
  # EvoNorm-S0
  s0 = jaxbn.linen.EvoNormS0(num_groups=3)
  variables = s0.init(key, x)
  assert set(variables["params"]) == {"scale", "bias", "v"}
  y = s0.apply(variables, x)
  np.testing.assert_allclose(y, np_s0(np.float64(x), 1, 0, 1, 3, 1e-5), rtol=0, atol=TOL32)
  layer = jaxbn.nnx.EvoNormS0(6, num_groups=3, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y))


def test_evonorm_b0_layers_train_eval_and_stats_like_batch_norm():
  x = jnp.asarray(_x(0, scale=2.0, offset=1.0), jnp.float32)
  b0 = jaxbn.linen.EvoNormB0(momentum=0.9)
  variables = b0.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, variables) == {
      "batch_stats": {"var": (6,)}, "params": {"bias": (6,), "scale": (6,), "v": (6,)}}
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))  # init: no update
  # init issues no collective: an axis name need not be bound there (as flax's BatchNorm)
  synced = jaxbn.linen.EvoNormB0(axis_name="batch").init(jax.random.key(0), x,
                                                         use_running_average=False)
  np.testing.assert_array_equal(synced["batch_stats"]["var"], np.ones(6))
  y, upd = b0.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  var_b = np_var(np.float64(x), (0, 1, 2))
  np.testing.assert_allclose(y, np_b0(np.float64(x), var_b, 1, 0, 1, 1e-5), rtol=0, atol=TOL32)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var_b.ravel(), rtol=1e-6)
  ye = b0.apply({**variables, **upd}, x, use_running_average=True)
  np.testing.assert_allclose(
      ye, np_b0(np.float64(x), np.asarray(upd["batch_stats"]["var"]), 1, 0, 1, 1e-5),
      rtol=0, atol=TOL32)
  layer = jaxbn.nnx.EvoNormB0(6, momentum=0.9, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(layer.var[...]), np.asarray(upd["batch_stats"]["var"]))
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(ye))


def test_evonorm_b0_state_is_the_same_in_functional_linen_and_nnx():
  """B0 keeps a running variance only (no mean, as the paper); with momentum=None the layers
  also keep the update count, so the cumulative average equals the functional one."""
  xs = [jnp.asarray(_x(s, shape=(4, 2, 2, 3), scale=1 + s, offset=s), jnp.float32)
        for s in range(2)]
  stats = jaxbn.init_stats(3)
  b0 = jaxbn.linen.EvoNormB0(momentum=None)
  variables = b0.init(jax.random.key(0), xs[0], use_running_average=False)
  assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {"count": (), "var": (3,)}
  layer = jaxbn.nnx.EvoNormB0(3, momentum=None, rngs=nnx.Rngs(0))
  ones = jnp.ones(3)
  for x in xs:
    y, stats = jaxbn.evonorm_b0(x, stats, ones, jnp.zeros(3), ones, training=True,
                                momentum=None)
    y_linen, upd = b0.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **upd}
    np.testing.assert_array_equal(np.asarray(y_linen), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y))
  np.testing.assert_array_equal(stats.mean, np.zeros(3))
  # the cumulative average of the two batch variances, in all three forms
  var_b = [np_var(np.float64(x), (0, 1, 2)).ravel() for x in xs]
  np.testing.assert_allclose(stats.var, (var_b[0] + var_b[1]) / 2, rtol=1e-6)
  for var, count in ((variables["batch_stats"]["var"], variables["batch_stats"]["count"]),
                     (layer.var[...], layer.count[...])):
    np.testing.assert_array_equal(np.asarray(var), np.asarray(stats.var))
    assert int(count) == int(stats.count) == 2


def test_ws_conv_is_flax_conv_on_the_standardized_kernel():
  x = jnp.asarray(_x(0, shape=(2, 5, 5, 3)), jnp.float32)
  gain = jnp.asarray(_p(5, 4, center=1), jnp.float32)
  conv_args = dict(strides=(2, 2), padding="VALID")
  ref_conv = nn.Conv(4, (3, 3), **conv_args)
  for scaled in (False, True):
    cls = jaxbn.linen.ScaledWSConv if scaled else jaxbn.linen.WSConv
    conv = cls(4, (3, 3), **conv_args)
    variables = conv.init(jax.random.key(0), x)
    plain = {k: v for k, v in variables["params"].items() if k != "gain"}
    assert jax.tree.map(jnp.shape, plain) == {"bias": (4,), "kernel": (3, 3, 3, 4)}
    if scaled:
      variables = {"params": {**variables["params"], "gain": gain}}
    w_hat = np_ws(np.float64(plain["kernel"]), np.float64(gain) if scaled else None, 1e-6,
                  scaled)
    ref = ref_conv.apply({"params": {"kernel": jnp.asarray(w_hat, jnp.float32),
                                     "bias": plain["bias"]}}, x)
    y = conv.apply(variables, x)
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOL32)
  # the nnx twin: nnx.Conv's state plus `gain`, same output
  layer = jaxbn.nnx.ScaledWSConv(3, 4, (3, 3), **conv_args, rngs=nnx.Rngs(0))
  nnx.update(layer, nnx.State(variables["params"]))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(y), rtol=0, atol=1e-6)
  # gradients reach the raw kernel and the gain through the standardization
  grads = jax.grad(lambda p: conv.apply({"params": p}, x).sum())(variables["params"])
  assert float(jnp.abs(grads["kernel"]).max()) > 0 and float(jnp.abs(grads["gain"]).max()) > 0


def test_errors_name_the_argument():
  x = jnp.ones((2, 3, 3, 4))
  with pytest.raises(ValueError, match=r"filter_response_norm: `axis`=0 includes axis 0"):
    jaxbn.filter_response_norm(x, axis=0)
  with pytest.raises(ValueError, match=r"filter_response_norm: `scale` has shape \(3,\)"):
    jaxbn.filter_response_norm(x, jnp.ones(3))
  with pytest.raises(TypeError, match=r"filter_response_norm: give the channel axis once"):
    jaxbn.filter_response_norm(x, axis=1, feature_axes=3)
  with pytest.raises(ValueError, match=r"evonorm_s0: `num_groups`=3 must be a positive divisor "
                                       r"of the 4"):
    jaxbn.evonorm_s0(x, None, None, jnp.ones(4), num_groups=3)
  with pytest.raises(TypeError, match=r"evonorm_s0: `axis` must be one int"):
    jaxbn.evonorm_s0(x, None, None, jnp.ones(4), axis=(1, 3), num_groups=2)
  with pytest.raises(ValueError, match=r"evonorm_b0: `stats` must be a jaxbn.BatchStats"):
    jaxbn.evonorm_b0(x, jaxbn.init_stats(3), None, None, jnp.ones(4), training=True)
  with pytest.raises(TypeError, match=r"standardize_weight: `kernel` must be a real floating"):
    jaxbn.standardize_weight(jnp.ones((3, 3), jnp.int32))


# ----------------------------------------------------------------- timm parity (optional)
def _timm(name):
  """timm's layer module ``name``, imported without timm's package ``__init__`` (which
  needs torchvision); None when timm or torch is not installed."""
  if importlib.util.find_spec("torch") is None:
    return None
  if "timm" not in sys.modules:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
      return None
    root = list(spec.submodule_search_locations)[0]
    for pkg, path in (("timm", root), ("timm.layers", root + "/layers")):
      m = types.ModuleType(pkg)
      m.__path__ = [path]
      sys.modules[pkg] = m
  return importlib.import_module("timm.layers." + name)


def test_parity_with_timm():
  frn_mod, evo, std = _timm("filter_response_norm"), _timm("evo_norm"), _timm("std_conv")
  if evo is None:
    pytest.skip("timm (optional) is not installed; conventions are checked against the "
                "papers' formulas above")
  import torch
  x = _x(0, scale=2.0, offset=0.5).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  nchw = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  # FRN + TLU: timm's eps default 1e-5
  t = frn_mod.FilterResponseNormTlu2d(6)
  with torch.no_grad():
    t.tau.fill_(-0.1)
  y = jaxbn.filter_response_norm(x, jnp.ones(6), jnp.zeros(6), jnp.full(6, -0.1), epsilon=1e-5)
  np.testing.assert_allclose(y, nchw(t(xt)), rtol=0, atol=TOL32)
  # EvoNorm-B0: PyTorch momentum 0.1 = flax 0.9, unbiased running variance, eps 1e-3
  t = evo.EvoNorm2dB0(6)
  t.train()
  yt = nchw(t(xt))
  y, new = jaxbn.evonorm_b0(x, jaxbn.init_stats(6), jnp.ones(6), jnp.zeros(6), jnp.ones(6),
                            training=True, momentum=0.9, epsilon=1e-3,
                            unbiased_running_var=True)
  np.testing.assert_allclose(y, yt, rtol=0, atol=TOL32)
  np.testing.assert_allclose(new.var, t.running_var.numpy(), rtol=1e-6)
  t.eval()
  ye, _ = jaxbn.evonorm_b0(x, new, jnp.ones(6), jnp.zeros(6), jnp.ones(6), training=False,
                           epsilon=1e-3)
  np.testing.assert_allclose(ye, nchw(t(xt)), rtol=0, atol=TOL32)
  # EvoNorm-S0: groups, eps 1e-5
  t = evo.EvoNorm2dS0(6, groups=3)
  y = jaxbn.evonorm_s0(x, jnp.ones(6), jnp.zeros(6), jnp.ones(6), num_groups=3, epsilon=1e-5)
  np.testing.assert_allclose(y, nchw(t(xt)), rtol=0, atol=TOL32)
  # StdConv2d / ScaledStdConv2d: eps 1e-6 inside the square root, kernel OIHW
  for cls, scaled in ((std.StdConv2d, False), (std.ScaledStdConv2d, True)):
    conv = cls(6, 4, 3, padding=0, bias=False)  # timm's defaults: gamma 1, gain 1
    w = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    out = jaxbn.standardize_weight(w, epsilon=1e-6, fan_in_scaling=scaled)
    yt = nchw(conv(xt))
    y = jax.lax.conv_general_dilated(x, out, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, yt, rtol=0, atol=1e-4)
