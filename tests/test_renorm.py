"""Batch renormalization: float64 NumPy reference over several steps, gradients, Keras 3
parity, traced clipping bounds, synchronized statistics, the warm-up schedule and the layers."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbn
from tests import _reference as R

# Tolerances (tests/README.md: |err| <= k·cond·u(dtype)·(|expected| + scale)). The float32
# data here have |mean|/std <= ~6, so cond_offset² <= ~40 and 4·40·u32 ≈ 1e-5: outputs and
# statistics use rtol/atol 1e-5 (2e-5 where values reach ~2), gradients 1e-4 (× log2(n) of the
# sums); rtol 1e-6/atol 1e-6 where two float32 evaluations of the same formula are compared
# (a few ulps); bfloat16 goes through tests/_reference.assert_close.
EPS = 1e-3
M = 0.8
C = 3


# ------------------------------------------------------------------ float64 reference
def np_renorm_step(x, mean, var, gamma, beta, *, r_max, d_max, r_min=None, mask=None,
                   running_std=False, eps=EPS, momentum=M):
  """One training step of Ioffe (2017), Algorithm 1, in float64 on (N, C) data."""
  x = np.asarray(x, np.float64)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  n = w.sum(0)
  xv = np.where(w > 0, x, 0.0)  # masked entries may hold NaN
  mu = (w * xv).sum(0) / n
  v = (w * (xv - mu) ** 2).sum(0) / n
  sb, sigma = np.sqrt(v + eps), np.sqrt(var + eps)
  r_lo = 1.0 / r_max if r_min is None else r_min
  r = np.clip(sb / sigma, r_lo, r_max)
  d = np.clip((mu - mean) / sigma, -d_max, d_max)
  y = ((x - mu) / sb * r + d) * gamma + beta
  new_mean = momentum * mean + (1 - momentum) * mu
  if running_std:
    s = momentum * sigma + (1 - momentum) * sb
    new_var = np.maximum(s * s - eps, 0.0)
  else:
    new_var = momentum * var + (1 - momentum) * v
  return y, new_mean, new_var, (r, d, mu, v, w)


def np_grads(x, g, gamma, aux, eps=EPS):
  """Closed-form gradients of sum(y * g) for y = γ(r x̂ + d) + β, r and d constant."""
  r, d, mu, v, w = aux
  x = np.asarray(x, np.float64)
  s = 1.0 / np.sqrt(v + eps)
  xh = (x - mu) * s
  n = w.sum(0)
  k = gamma * r * s
  dx = k * (g - w * (g.sum(0) + xh * (g * xh).sum(0)) / n)
  return dx, (g * (r * xh + d)).sum(0), g.sum(0)


def _data(seed, n=16, shift=0.0, spread=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(shift, spread, (n, C)) * np.array([1.0, 2.0, 0.5])).astype(np.float32)


TRACES = []


@functools.partial(jax.jit, static_argnames=("running_std",))
def _train_step(x, stats, scale, bias, r_max, d_max, mask, cot, *, running_std):
  TRACES.append(running_std)

  def loss(x, scale, bias):
    y, new = jaxbn.batch_renorm(x, stats, scale, bias, training=True, r_max=r_max,
                                d_max=d_max, momentum=M, epsilon=EPS, mask=mask,
                                running_std=running_std)
    return jnp.sum(y * cot), (y, new)

  (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias)
  return y, new, grads


@pytest.mark.parametrize("running_std", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference_over_steps(running_std, masked):
  """Outputs, running statistics and gradients over 6 steps, the clipping bounds following
  the warm-up schedule (traced: one compilation), with clipping active and inactive."""
  gamma = np.array([1.5, 0.5, -1.0], np.float32)
  beta = np.array([0.1, -0.2, 0.3], np.float32)
  stats = jaxbn.init_stats(C)
  mean, var = np.zeros(C), np.ones(C)
  mask = None
  if masked:
    mask = np.ones((16, 1), bool)
    mask[[1, 5, 6]] = False
  traces_before = len(TRACES)
  clipped_r = clipped_d = free = False
  for step in range(6):
    # Plain BN while warming up, then data far from the running statistics (clipping
    # engages), then closer to them (r, d inside their bounds).
    x = _data(step, shift=(0, 0, 3, 1, 0.5, 0.3)[step], spread=(1, 1, 3, 1.5, 1.2, 1)[step])
    if masked:
      x[1] = np.nan  # masked entries must not matter, even non-finite ones
    r_max, d_max = jaxbn.renorm_schedule(step, warmup_steps=1, r_max_steps=4, d_max_steps=3,
                                        r_max=2.0, d_max=1.0)
    cot = np.random.default_rng(100 + step).normal(size=(16, C))
    y, stats, (gx, gs, gb) = _train_step(
        x, stats, gamma, beta, r_max, d_max,
        None if mask is None else jnp.asarray(mask), cot, running_std=running_std)
    y_ref, mean, var, aux = np_renorm_step(
        x, mean, var, gamma, beta, r_max=float(r_max), d_max=float(d_max), mask=mask,
        running_std=running_std)
    r, d = aux[0], aux[1]
    lo, hi, dm = 1 / float(r_max), float(r_max), float(d_max)
    clipped_r |= hi > 1 and bool(np.any(np.isclose(r, hi) | np.isclose(r, lo)))
    clipped_d |= dm > 0 and bool(np.any(np.isclose(np.abs(d), dm)))
    free |= bool(np.any((r > lo + 1e-3) & (r < hi - 1e-3) & (np.abs(d) < dm - 1e-3)))
    keep = slice(None) if mask is None else mask[:, 0]
    np.testing.assert_allclose(np.asarray(y)[keep], y_ref[keep], rtol=1e-5, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5, atol=1e-6)
    assert int(stats.count) == step + 1
    mean, var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)
    gx_ref, gs_ref, gb_ref = np_grads(np.where(np.isnan(x), 0, x), cot, gamma, aux)
    np.testing.assert_allclose(np.asarray(gx)[keep], gx_ref[keep], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(gs, gs_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(gb, gb_ref, rtol=1e-5, atol=1e-5)
  assert clipped_r and clipped_d and free  # the test exercised both regimes
  assert len(TRACES) - traces_before == 1  # ramping r_max/d_max did not recompile


def test_unit_bounds_are_batch_norm_and_eval_is_bn_inference():
  x = _data(0, shift=2.0)
  stats = jaxbn.BatchStats(jnp.array([0.5, -1.0, 2.0]), jnp.array([2.0, 0.5, 3.0]),
                           jnp.array(3))
  g, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 1.0, -1.0])

  def loss(fn, **kw):
    def f(x, g, b):
      y, new = fn(x, stats, g, b, training=True, momentum=M, epsilon=EPS, **kw)
      return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), (y, new)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(x, g, b)

  (_, (y1, s1)), g1 = loss(jaxbn.batch_renorm, r_max=1.0, d_max=0.0)
  (_, (y2, s2)), g2 = loss(jaxbn.batch_norm)
  np.testing.assert_allclose(y1, y2, atol=1e-6)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, atol=1e-5)
  for a, c in zip(s1, s2):
    np.testing.assert_array_equal(a, c)
  # Eval: batch norm's inference with the running statistics; stats returned as is.
  y_eval, same = jaxbn.batch_renorm(x, stats, g, b, training=False, epsilon=EPS)
  assert same is stats
  ref = (x - stats.mean) / np.sqrt(np.asarray(stats.var) + EPS) * g + b
  np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)


def test_running_stats_get_no_gradient_and_bf16():
  x = _data(1)
  stats = jaxbn.BatchStats(jnp.full(C, 0.3), jnp.full(C, 2.0), jnp.array(1))

  def f(mean, var, r_max):
    y, _ = jaxbn.batch_renorm(x, jaxbn.BatchStats(mean, var, stats.count), training=True,
                              r_max=r_max, d_max=0.5)
    return jnp.sum(y ** 3)

  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(stats.mean, stats.var, 1.5)
  for gr in grads:
    np.testing.assert_array_equal(gr, 0.0)  # r, d and the running stats are constants
  xb = jnp.asarray(x, jnp.bfloat16)
  y16, s16 = jaxbn.batch_renorm(xb, stats, training=True, r_max=1.5, d_max=0.5)
  y32, s32 = jaxbn.batch_renorm(xb.astype(jnp.float32), stats, training=True, r_max=1.5,
                                d_max=0.5)
  assert y16.dtype == jnp.bfloat16 and s16.mean.dtype == jnp.float32
  # Same (quantized) input: the bf16 output is the float32 one rounded once, float32
  # statistics identical up to summation order (bound: R.bn_output_cond, R.stats_cond).
  xq = np.asarray(xb.astype(jnp.float32), np.float64)
  R.assert_close(y16, y32, jnp.bfloat16, cond=R.bn_output_cond(xq, jnp.bfloat16), what="bf16 y")
  R.assert_close(s16.var, s32.var, jnp.float32, cond=R.stats_cond(xq, order=2), what="var")


def test_synchronized_equals_global_batch():
  """Under shard_map over 8 devices with axis_name: the global batch's statistics, outputs,
  gradients (also of the replicated scale) and running statistics."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("b",))
  x = _data(2, n=32, shift=1.0, spread=2.0)
  cot = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
  stats = jaxbn.BatchStats(jnp.full(C, 0.5), jnp.full(C, 0.7), jnp.array(0))
  g = jnp.array([1.0, -2.0, 0.5])

  def make(axis_name):
    def loss(x, g, cot):
      y, new = jaxbn.batch_renorm(x, stats, g, training=True, r_max=1.3, d_max=0.4,
                                  momentum=M, axis_name=axis_name)
      return jnp.sum(y * cot), (y, new)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  def sharded(x, g, cot):  # the replicated scale's gradient comes out summed (vma typing)
    (_, (y, new)), (gx, gg) = make("b")(x, g, cot)
    return y, new, gx, gg

  fn = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P("b"), P(), P("b")),
                             out_specs=(P("b"), P(), P("b"), P())))
  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  cs = jax.device_put(cot, NamedSharding(mesh, P("b")))
  y, new, gx, gg = fn(xs, g, cs)
  (_, (y_ref, new_ref)), (gx_ref, gg_ref) = jax.jit(make(None))(x, g, cot)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gg, gg_ref, rtol=1e-4, atol=1e-4)
  for a, c in zip(new, new_ref):
    np.testing.assert_allclose(a, c, rtol=1e-6)


def test_keras3_parity():
  """Keras 3 ``BatchNormalization(renorm=True)`` on the JAX backend (renorm_momentum ==
  momentum, so its two pairs of averages coincide with jaxbn's one; running_std=True)."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras", reason="keras not installed")
  if keras.backend.backend() != "jax":
    pytest.skip(reason="keras was imported with another backend")
  clip = {"rmax": 2.0, "rmin": 0.6, "dmax": 1.0}
  layer = keras.layers.BatchNormalization(momentum=M, epsilon=EPS, renorm=True,
                                          renorm_clipping=clip, renorm_momentum=M)
  layer.build((16, C))
  tv = [jnp.array([1.5, 0.5, -1.0]), jnp.array([0.1, -0.2, 0.3])]
  ntv = [v.value for v in layer.non_trainable_variables]
  names = [v.path.split("/")[-1] for v in layer.non_trainable_variables]
  # Keras starts moving_stddev at sqrt(1): var = 1 - eps here.
  stats = jaxbn.BatchStats(jnp.zeros(C), jnp.full(C, 1.0 - EPS), jnp.array(0))

  def keras_loss(x, g, b, ntv, cot):
    y, new = layer.stateless_call([g, b], ntv, x, training=True)
    return jnp.sum(y * cot), (y, new)

  def jaxbn_loss(x, g, b, stats, cot):
    y, new = jaxbn.batch_renorm(x, stats, g, b, training=True, r_max=clip["rmax"],
                                r_min=clip["rmin"], d_max=clip["dmax"], momentum=M,
                                epsilon=EPS, running_std=True)
    return jnp.sum(y * cot), (y, new)

  kgrad = jax.jit(jax.value_and_grad(keras_loss, argnums=(0, 1, 2), has_aux=True))
  jgrad = jax.jit(jax.value_and_grad(jaxbn_loss, argnums=(0, 1, 2), has_aux=True))
  for step in range(4):
    x = jnp.asarray(_data(10 + step, shift=3.0 - step, spread=4.0 / (step + 1)))
    cot = jnp.asarray(np.random.default_rng(step).normal(size=x.shape), jnp.float32)
    (_, (yk, ntv)), gk = kgrad(x, *tv, ntv, cot)
    (_, (yj, stats)), gj = jgrad(x, *tv, stats, cot)
    np.testing.assert_allclose(yj, yk, rtol=1e-5, atol=2e-5)
    for a, c in zip(gj, gk):
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
    kv = dict(zip(names, ntv))
    np.testing.assert_allclose(stats.mean, kv["moving_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, kv["moving_variance"], rtol=1e-5, atol=1e-6)
  y_eval_k = layer.stateless_call(tv, ntv, x, training=False)[0]
  y_eval_j, _ = jaxbn.batch_renorm(x, stats, *tv, training=False, epsilon=EPS)
  np.testing.assert_allclose(y_eval_j, y_eval_k, rtol=1e-5, atol=2e-5)


def test_renorm_schedule():
  steps = jnp.array([0, 5_000, 12_500, 25_000, 30_000, 40_000, 10 ** 6])
  r, d = jax.jit(jax.vmap(jaxbn.renorm_schedule))(steps)
  t = np.asarray(steps, np.float64)
  np.testing.assert_allclose(r, 1 + 2 * np.clip((t - 5e3) / 35e3, 0, 1), rtol=1e-6)
  np.testing.assert_allclose(d, 5 * np.clip((t - 5e3) / 20e3, 0, 1), rtol=1e-6)
  with pytest.raises(ValueError, match=r"renorm_schedule: `r_max_steps`=100 must be greater "
                                       r"than `warmup_steps`=5000"):
    jaxbn.renorm_schedule(0, r_max_steps=100)
  with pytest.raises(ValueError, match=r"renorm_schedule: `r_max` must be >= 1"):
    jaxbn.renorm_schedule(0, r_max=0.5)


def test_errors():
  x = jnp.ones((4, C))
  st = jaxbn.init_stats(C)
  kw = dict(training=True)
  with pytest.raises(ValueError, match=r"batch_renorm: `r_max` must be >= 1 .*got 0.5"):
    jaxbn.batch_renorm(x, st, r_max=0.5, **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `d_max` must be >= 0 .*got -1.0"):
    jaxbn.batch_renorm(x, st, d_max=-1.0, **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `r_min` must be in \[0, r_max\]"):
    jaxbn.batch_renorm(x, st, r_max=2.0, r_min=3.0, **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `r_max` must be a scalar .*\(3,\)"):
    jaxbn.batch_renorm(x, st, r_max=jnp.ones(3), **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `d_max` must be a scalar .*got <U3"):
    jaxbn.batch_renorm(x, st, d_max="big", **kw)
  with pytest.raises(TypeError, match=r"batch_renorm: complex input is not supported"):
    jaxbn.batch_renorm(x.astype(jnp.complex64), jaxbn.init_stats(C, jnp.complex64), **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `x` has 3 features on axis -1 but "
                                       r"`stats.mean` has shape \(4,\)"):
    jaxbn.batch_renorm(x, jaxbn.init_stats(4), **kw)
  with pytest.raises(TypeError, match=r"batch_renorm: `stats` must be a jaxbn.BatchStats"):
    jaxbn.batch_renorm(x, (st.mean, st.var), **kw)
  with pytest.raises(TypeError, match=r"batch_renorm: `training` must be a Python bool"):
    jaxbn.batch_renorm(x, st, training=jnp.array(True))
  with pytest.raises(ValueError, match=r"batch_renorm: `axis_name`='nope': the axis name "
                                       r"'nope' is not bound here"):
    jaxbn.batch_renorm(x, st, axis_name="nope", **kw)
  with pytest.raises(ValueError, match=r"batch_renorm: `momentum` must be in \[0, 1[)\]]"):
    jaxbn.batch_renorm(x, st, momentum=1.5, **kw)


# ------------------------------------------------------------------ layers
def test_linen_and_nnx_layers():
  import flax.linen as nn
  from flax import nnx
  import jaxbn.linen
  import jaxbn.nnx

  x1, x2 = _data(20, shift=2.0, spread=3.0), _data(21)
  layer = jaxbn.linen.BatchRenorm(momentum=M, epsilon=EPS, r_max=1.5, d_max=0.5)
  variables = layer.init(jax.random.key(0), x1, use_running_average=False)
  bn_vars = jaxbn.linen.BatchNorm().init(jax.random.key(0), x1, use_running_average=False)
  flax_vars = nn.BatchNorm().init(jax.random.key(0), x1, use_running_average=False)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert spec(variables) == spec(bn_vars) == spec(flax_vars)  # a BN checkpoint loads as is

  @jax.jit
  def linen_step(variables, x, r_max):  # call-time r_max: traced, overrides the field
    return layer.apply(variables, x, use_running_average=False, r_max=r_max,
                       mutable=["batch_stats"])

  model = jaxbn.nnx.BatchRenorm(C, momentum=M, epsilon=EPS, r_max=1.5, d_max=0.5,
                                rngs=nnx.Rngs(0))
  stats = jaxbn.init_stats(C)
  for x, r_max in ((x1, 1.2), (x2, 2.0)):
    y_core, stats = jaxbn.batch_renorm(x, stats, training=True, r_max=r_max, d_max=0.5,
                                       momentum=M, epsilon=EPS)
    y_linen, upd = linen_step(variables, x, jnp.float32(r_max))
    variables = {**variables, **upd}
    y_nnx = model(x, r_max=r_max)
    np.testing.assert_allclose(y_linen, y_core, atol=1e-6)
    np.testing.assert_allclose(y_nnx, y_core, atol=1e-6)
    np.testing.assert_allclose(variables["batch_stats"]["var"], stats.var, rtol=1e-6)
    np.testing.assert_allclose(model.var[...], stats.var, rtol=1e-6)
  model.eval()
  y_eval, _ = jaxbn.batch_norm(x1, stats, training=False, epsilon=EPS)
  np.testing.assert_allclose(model(x1), y_eval, atol=1e-6)
  np.testing.assert_allclose(layer.apply(variables, x1, use_running_average=True), y_eval,
                             atol=1e-6)
