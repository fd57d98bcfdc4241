"""jaxbn.batch_norm against float64 NumPy, flax and PyTorch references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import _reference as ref

# Tolerances: tests/_reference.assert_close, |err| <= k·cond·u(dtype)·(|expected| + rms), with
# the condition factors of tests/README.md; tests/test_planted_errors.py shows each bound
# rejects a planted bug.


def _data(shape, dtype=jnp.float32, offset=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2 + offset, dtype)


def _grad_cond(x, scale, dy, eps=1e-5):
  """(cond, scale of dx) for float32 BN gradients, features on the last axis.

  dx = g·inv·(dy − mean(dy) − x̂·mean(dy·x̂)) cancels: its bound is relative to the
  un-cancelled term g·inv·dy (its RMS is the absolute slack); the sums over n examples and the
  float32 statistics give cond = log2(n)·cond_offset².
  """
  x64 = np.asarray(x, np.float64)
  x2 = x64.reshape(-1, x64.shape[-1])
  _, _, var = ref.moments(x2)
  raw = np.asarray(scale, np.float64) / np.sqrt(var + eps) * np.asarray(dy, np.float64).reshape(
      x2.shape)
  return ref.stats_cond(x2, order=2), float(np.sqrt(np.mean(raw ** 2)))


def _params(c, seed=1):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=c) * 0.5 + 1, jnp.float32),
          jnp.asarray(rng.normal(size=c) * 0.5, jnp.float32))


@pytest.mark.parametrize("shape,axis", [((6, 5, 4), -1), ((3, 4, 5, 2), 1), ((4, 3, 2, 5), (1, 3)),
                                        ((7, 3), 0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_running_stats_match_float64(shape, axis, dtype):
  # Spread 0.05 (variance 2.5e-3): epsilon + 1e-3 would move y by ~20%, visible in bfloat16
  # too (at variance 4 it moves y by 1e-4, below bfloat16's resolution; test_planted_errors).
  x = jnp.asarray(np.asarray(_data(shape), np.float64) * 0.025 + 0.02, dtype)
  feat = ref.feature_axes(len(shape), axis)
  fshape = tuple(shape[a] for a in feat)
  scale, bias = (p.reshape(-1)[: int(np.prod(fshape))].reshape(fshape)
                 for p in _params(int(np.prod(fshape)) + 8))
  stats = jaxbn.init_stats(fshape)
  y, new = jaxbn.batch_norm(x, stats, scale, bias, training=True, axis=axis, momentum=0.9)
  xq = np.asarray(x.astype(jnp.float32), np.float64)
  y_ref, (n, mean, var) = ref.batch_norm(xq, scale, bias, axis)
  assert y.dtype == dtype and y.shape == x.shape
  # Output: one rounding to dtype + float32 statistics (cond = 1 + cond_offset²·u32/u(dtype)).
  ref.assert_close(y, y_ref, dtype, cond=ref.bn_output_cond(xq, dtype, axis), what="y")
  # Running statistics are float32: cond = log2(n)·cond_offset (mean), ·cond_offset² (var).
  ref.assert_close(new.mean, ref.ema(0.0, mean.reshape(fshape), 0.9), jnp.float32,
                   cond=ref.stats_cond(xq, axis), what="running mean")
  ref.assert_close(new.var, ref.ema(1.0, var.reshape(fshape), 0.9), jnp.float32,
                   cond=ref.stats_cond(xq, axis, order=2), what="running var")
  assert new.mean.dtype == jnp.float32 and new.count.dtype == jnp.int32 and int(new.count) == 1


def test_eval_uses_running_stats_and_returns_them_bit_identical():
  x = _data((5, 3))
  stats = jaxbn.BatchStats(jnp.array([1.0, -2.0, 0.5]), jnp.array([4.0, 0.25, 1.0]),
                           jnp.array(7, jnp.int32))
  scale, bias = _params(3)
  y, out = jaxbn.batch_norm(x, stats, scale, bias, training=False, epsilon=1e-3)
  assert out is stats
  expect = (np.asarray(x, np.float64) - stats.mean) / np.sqrt(np.asarray(stats.var) + 1e-3)
  # float32 eval: x − mean rounds at u·|x|; |x|/std ≲ 8 here amplifies it (cond = 8).
  ref.assert_close(y, expect * scale + bias, jnp.float32, cond=8, what="eval output")
  _, out_jit = jax.jit(functools.partial(jaxbn.batch_norm, training=False))(x, stats, scale, bias)
  for a, b in zip(out_jit, stats):
    np.testing.assert_array_equal(a, b)


def test_jit_equals_eager_and_running_stats_are_exact_over_steps():
  stats = jaxbn.init_stats(4)
  step = jax.jit(functools.partial(jaxbn.batch_norm, training=True, momentum=0.8))
  mean_ref, var_ref = np.zeros(4), np.ones(4)
  for i in range(3):
    x = _data((16, 4), seed=i)
    y_jit, stats_jit = step(x, stats)
    y_eager, stats_eager = jaxbn.batch_norm(x, stats, training=True, momentum=0.8)
    x64 = np.asarray(x, np.float64)
    # Two float32 evaluations of the same formula (fusion may differ): the output bound.
    ref.assert_close(y_jit, y_eager, jnp.float32, cond=ref.bn_output_cond(x64, jnp.float32),
                     what="jit vs eager")
    _, (n, m, v) = ref.batch_norm(np.asarray(x))
    mean_ref, var_ref = ref.ema(mean_ref, m.ravel(), 0.8), ref.ema(var_ref, v.ravel(), 0.8)
    stats = stats_jit
    # Running statistics, float32: log2(n)·cond_offset (mean), ·cond_offset² (var); the EMA
    # adds one rounding per step (3 steps, within k = 4).
    ref.assert_close(stats.mean, mean_ref, jnp.float32, cond=ref.stats_cond(x64), what="mean")
    ref.assert_close(stats.var, var_ref, jnp.float32, cond=ref.stats_cond(x64, order=2),
                     what="var")
  assert int(stats.count) == 3


def test_cumulative_average_momentum_none_matches_torch_semantics():
  stats = jaxbn.init_stats(2)
  xs = [_data((8, 2), seed=s) for s in range(4)]
  for x in xs:
    _, stats = jaxbn.batch_norm(x, stats, training=True, momentum=None)
  means = [ref.moments(np.asarray(x))[1].ravel() for x in xs]
  vars_ = [ref.moments(np.asarray(x))[2].ravel() for x in xs]
  x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])
  # float32 statistics (cond as in the forward test) averaged over 4 updates (k = 4 covers it).
  ref.assert_close(stats.mean, np.mean(means, 0), jnp.float32, cond=ref.stats_cond(x64))
  ref.assert_close(stats.var, np.mean(vars_, 0), jnp.float32, cond=ref.stats_cond(x64, order=2))


def test_unbiased_running_var_and_torch_momentum_helper():
  x = _data((10, 3))
  _, st = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True,
                           momentum=jaxbn.momentum_from_torch(0.1), unbiased_running_var=True)
  v = np.var(np.asarray(x, np.float64), axis=0, ddof=1)
  # float32 running variance: cond = log2(n)·cond_offset².
  ref.assert_close(st.var, 0.9 * 1 + 0.1 * v, jnp.float32,
                   cond=ref.stats_cond(np.asarray(x, np.float64), order=2))
  assert jaxbn.momentum_from_torch(0.1) == pytest.approx(0.9)
  assert jaxbn.momentum_from_torch(None) is None
  with pytest.raises(ValueError, match="torch_momentum"):
    jaxbn.momentum_from_torch(1.5)


def test_debias_first_update_replaces_initial_values():
  x = _data((32, 3), offset=5.0)
  _, st = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True, momentum=0.99, debias=True)
  _, (n, m, v) = ref.batch_norm(np.asarray(x))
  x64 = np.asarray(x, np.float64)  # float32 statistics: cond = log2(n)·cond_offset^(1, 2)
  ref.assert_close(st.mean, m.ravel(), jnp.float32, cond=ref.stats_cond(x64))
  ref.assert_close(st.var, v.ravel(), jnp.float32, cond=ref.stats_cond(x64, order=2))


def test_large_offset_variance_is_stable_and_fast_variance_is_not():
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.normal(size=(4096, 3)), jnp.float32)
  true_var = np.var(np.asarray(x, np.float64), axis=0)
  m = jaxbn.moments(x)
  # Stable variance of float32 data: x − mean is exact (Sterbenz), the squares sum with error
  # ~u32·log2(n): cond = log2(4096) = 12, relative bound 4·12·u32 = 2.9e-6 (issue: ~1e-5).
  var_tol = ref.tol(jnp.float32, cond=np.log2(4096))
  assert np.max(np.abs(m.var / true_var - 1)) < var_tol
  # The one-pass E[x²] − E[x]² loses every digit on this data ...
  one_pass = jnp.mean(x ** 2, 0) - jnp.mean(x, 0) ** 2
  assert np.max(np.abs(one_pass / true_var - 1)) > 1e-2
  # ... so fast mode's guard falls back to the exact two-pass variance (same bound).
  fast = jaxbn.moments(x, use_fast_variance=True)
  assert np.max(np.abs(fast.var / true_var - 1)) < var_tol
  y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True)
  # Stable path: each output rounds x − mean at u·|x|, i.e. cond = |mean|/std = cond_offset
  # (not its square, which the one-pass formula would need: its variance is 0 here).
  x64 = np.asarray(x, np.float64)
  y_ref, _ = ref.batch_norm(x64)
  ref.assert_close(y, y_ref, jnp.float32, cond=ref.cond_offset(x64), what="offset data output")


def _loss(x, scale, bias, dy, **kw):
  y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(x.shape[-1]), scale, bias, training=True, **kw)
  return jnp.sum(y.astype(jnp.float32) * dy)


@pytest.mark.parametrize("use_mask", [False, True])
def test_gradients_match_float64_closed_form(use_mask):
  x = _data((6, 4, 3))
  dy = _data((6, 4, 3), seed=5)
  scale, bias = _params(3)
  mask = None
  if use_mask:
    mask = jnp.asarray(np.random.default_rng(3).random((6, 4, 1)) > 0.3)
  g = jax.grad(_loss, argnums=(0, 1, 2))(x, scale, bias, dy, mask=mask)
  g_ref = ref.grads(np.asarray(x), scale, bias, dy, mask=None if mask is None else np.asarray(mask))
  # Gradients, float32: sums of n terms and the cancelling projection (see _grad_cond).
  cond, dx_scale = _grad_cond(x, scale, dy)
  ref.assert_close(g[0], g_ref[0], jnp.float32, cond=cond, scale=dx_scale, what="dx")
  for a, b in zip(g[1:], g_ref[1:]):
    ref.assert_close(a, b, jnp.float32, cond=cond, what="dscale/dbias")


def test_check_grads_second_order_forward_and_reverse():
  x = _data((5, 3))
  scale, bias = _params(3)

  def f(x, scale, bias):
    y, st = jaxbn.batch_norm(x, jaxbn.init_stats(3), scale, bias, training=True)
    return jnp.sum(jnp.sin(y)) + jnp.sum(st.mean * st.var)

  # check_grads compares with central finite differences in float32 (step 1e-2 by default for
  # float32): truncation O(h²·|f'''|) plus rounding O(u·|f|/h) ≈ 1e-2 for these O(1) values, so
  # 2e-2 is the finite-difference bound, not the library's accuracy (tested above vs float64).
  check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)
  jac_f = jax.jacfwd(f, argnums=0)(x, scale, bias)
  jac_r = jax.jacrev(f, argnums=0)(x, scale, bias)
  # Forward- and reverse-mode Jacobians: two float32 evaluations of the gradient formula.
  cond, _ = _grad_cond(x, scale, np.ones(x.shape))
  ref.assert_close(jac_f, jac_r, jnp.float32, cond=cond, what="jacfwd vs jacrev")
  hess = jax.hessian(f)(x, scale, bias)
  assert hess.shape == x.shape * 2 and np.all(np.isfinite(hess))


def test_backward_saves_only_x_and_per_feature_vectors():
  x = _data((8, 4, 4, 16), jnp.bfloat16)
  scale, bias = _params(16)
  _, vjp = jax.vjp(lambda x, s, b: jaxbn.batch_norm(x, jaxbn.init_stats(16), s, b,
                                                    training=True)[0], x, scale, bias)
  leaves = jax.tree.leaves(vjp)
  full = [l for l in leaves if np.size(l) == x.size]
  assert len(full) == 1 and full[0].dtype == jnp.bfloat16
  assert all(np.size(l) <= 16 for l in leaves if np.size(l) != x.size)


def test_bf16_forward_writes_no_float32_copy_of_x():
  x = _data((8, 4, 4, 16), jnp.bfloat16)
  hlo = jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(16), training=True)[0]) \
      .lower(x).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  assert "f32[8,4,4,16]" not in entry
  y = jaxbn.batch_norm(x, jaxbn.init_stats(16), training=True)[0]
  assert y.dtype == jnp.bfloat16


def test_masked_entries_do_not_count_even_when_nan():
  x = np.asarray(_data((6, 2, 3)))
  mask = np.ones((6, 2, 1), bool)
  mask[4:] = False
  x_bad = x.copy()
  x_bad[4:] = np.nan
  x_bad[5, 0, 0] = np.inf
  scale, bias = _params(3)
  y, st = jaxbn.batch_norm(jnp.asarray(x_bad), jaxbn.init_stats(3), scale, bias, training=True,
                           mask=jnp.asarray(mask), momentum=0.5)
  y_ref, (n, m, v) = ref.batch_norm(x[:4], scale, bias)
  ref.assert_close(np.asarray(y)[:4], y_ref, jnp.float32,
                   cond=ref.bn_output_cond(np.asarray(x[:4], np.float64), jnp.float32))
  assert np.all(np.isfinite(np.asarray(y)))
  ref.assert_close(st.mean, 0.5 * m.ravel(), jnp.float32,
                   cond=ref.stats_cond(np.asarray(x[:4], np.float64)))
  g = jax.grad(lambda x: jnp.sum(jnp.where(mask, jaxbn.batch_norm(
      x, jaxbn.init_stats(3), scale, bias, training=True, mask=jnp.asarray(mask))[0], 0) ** 2))(
          jnp.asarray(x_bad))
  assert np.all(np.isfinite(np.asarray(g)))
  g_clean = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, jaxbn.init_stats(3), scale, bias,
                                                        training=True)[0] ** 2))(jnp.asarray(x[:4]))
  cond, dx_scale = _grad_cond(x[:4], scale, 2 * np.asarray(y)[:4])
  ref.assert_close(np.asarray(g)[:4], g_clean, jnp.float32, cond=cond, scale=dx_scale)


def test_fully_masked_batch_is_finite_and_leaves_stats_unchanged():
  x = _data((4, 3))
  stats = jaxbn.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 2.0, 2.0]),
                           jnp.array(5, jnp.int32))
  mask = jnp.zeros((4, 1), bool)

  def f(x):
    y, st = jaxbn.batch_norm(x, stats, training=True, mask=mask)
    return jnp.sum(y ** 2), (y, st)

  (_, (y, st)), g = jax.value_and_grad(f, has_aux=True)(x)
  assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(g)))
  for a, b in zip(st, stats):
    np.testing.assert_array_equal(a, b)
  # Empty along the batch axis too.
  y0, st0 = jaxbn.batch_norm(jnp.zeros((0, 3)), stats, training=True)
  assert y0.shape == (0, 3)
  np.testing.assert_array_equal(st0.mean, stats.mean)
  assert int(st0.count) == 5


def test_per_feature_mask_leaves_only_empty_features_unchanged():
  x = _data((5, 2))
  mask = jnp.asarray(np.array([[True, False]] * 5))
  _, st = jaxbn.batch_norm(x, jaxbn.init_stats(2), training=True, mask=mask, momentum=0.0)
  ref.assert_close(st.mean[0], np.mean(np.asarray(x, np.float64)[:, 0]), jnp.float32,
                   cond=ref.stats_cond(np.asarray(x, np.float64)))
  assert float(st.mean[1]) == 0.0 and float(st.var[1]) == 1.0


def test_complex_input_matches_flax_convention():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3)), jnp.complex64)
  stats = jaxbn.init_stats(3, jnp.complex64)
  y, st = jaxbn.batch_norm(x, stats, training=True, momentum=0.0)
  y_ref, (n, m, v) = ref.batch_norm(np.asarray(x))
  x128 = np.asarray(x, np.complex128)  # complex64: the float32 bounds (u = 2^-24)
  ref.assert_close(y, y_ref, jnp.complex64, cond=ref.bn_output_cond(x128, jnp.complex64))
  ref.assert_close(st.var, v.ravel(), jnp.complex64, cond=ref.stats_cond(x128, order=2))
  assert y.dtype == jnp.complex64


def test_output_dtype_argument_and_scale_dtype_promotion():
  x = _data((4, 3), jnp.bfloat16)
  y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(3), jnp.ones(3), training=True, dtype=jnp.float32)
  assert y.dtype == jnp.float32
  y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(3), jnp.ones(3), training=True)
  assert y.dtype == jnp.bfloat16


def test_traced_momentum_and_epsilon_do_not_recompile():
  traces = []

  @jax.jit
  def step(x, stats, m, e):
    traces.append(1)
    return jaxbn.batch_norm(x, stats, training=True, momentum=m, epsilon=e)

  x = _data((4, 3))
  for m in (0.9, 0.5, 0.1):
    _, st = step(x, jaxbn.init_stats(3), m, 1e-5)
  assert len(traces) == 1
  _, (n, mean, var) = ref.batch_norm(np.asarray(x))
  ref.assert_close(st.mean, 0.9 * mean.ravel(), jnp.float32,
                   cond=ref.stats_cond(np.asarray(x, np.float64)))


def test_stats_are_a_scan_carry():
  xs = jnp.stack([_data((8, 3), seed=s) for s in range(3)])

  def body(stats, x):
    y, stats = jaxbn.batch_norm(x, stats, training=True)
    return stats, y

  stats, ys = jax.lax.scan(body, jaxbn.init_stats(3), xs)
  assert int(stats.count) == 3 and ys.shape == xs.shape
  # Values: each step's output and the carried running statistics equal a float64 loop.
  mean_ref, var_ref = np.zeros(3), np.ones(3)
  for i in range(3):
    x64 = np.asarray(xs[i], np.float64)
    y_ref, (_, m, v) = ref.batch_norm(x64)
    ref.assert_close(ys[i], y_ref, jnp.float32, cond=ref.bn_output_cond(x64, jnp.float32),
                     what=f"scan step {i} output")
    mean_ref, var_ref = ref.ema(mean_ref, m.ravel(), 0.99), ref.ema(var_ref, v.ravel(), 0.99)
  all_x = np.asarray(xs, np.float64).reshape(-1, 3)
  ref.assert_close(stats.mean, mean_ref, jnp.float32, cond=ref.stats_cond(all_x),
                   what="carried mean")
  ref.assert_close(stats.var, var_ref, jnp.float32, cond=ref.stats_cond(all_x, order=2),
                   what="carried var")


def test_matches_flax_linen_batchnorm():
  nn = pytest.importorskip("flax.linen")
  x = _data((6, 4, 4, 5), offset=0.5)
  scale, bias = _params(5)
  for fast in (True, False):
    mod = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                       use_fast_variance=fast)
    y_f, upd = mod.apply({"params": {"scale": scale, "bias": bias},
                          "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}, x,
                         mutable=["batch_stats"])
    y, st = jaxbn.batch_norm(x, jaxbn.init_stats(5), scale, bias, training=True, momentum=0.9,
                             use_fast_variance=fast)
    # Two float32 implementations: each within the output/statistics bound of float64, so
    # within twice that of each other (k = 8).
    x64 = np.asarray(x, np.float64)
    ref.assert_close(y, y_f, jnp.float32, k=8, cond=ref.bn_output_cond(x64, jnp.float32))
    ref.assert_close(st.mean, upd["batch_stats"]["mean"], jnp.float32, k=8,
                     cond=ref.stats_cond(x64))
    ref.assert_close(st.var, upd["batch_stats"]["var"], jnp.float32, k=8,
                     cond=ref.stats_cond(x64, order=2))


def test_matches_torch_functional_batch_norm():
  torch = pytest.importorskip("torch", reason="PyTorch parity is optional")
  x = np.asarray(_data((4, 3, 5, 5)))
  scale, bias = (np.asarray(p) for p in _params(3))
  rm, rv = torch.zeros(3), torch.ones(3)
  xt = torch.tensor(x, requires_grad=True)
  w, b = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
  yt = torch.nn.functional.batch_norm(xt, rm, rv, w, b, True, 0.1, 1e-5)
  dy = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  yt.backward(torch.tensor(dy))
  stats = jaxbn.init_stats(3)

  def f(x, s, b_):
    return jaxbn.batch_norm(x, stats, s, b_, training=True, axis=1,
                            momentum=jaxbn.momentum_from_torch(0.1), unbiased_running_var=True)

  (y, st), vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  gx, gs, gb = vjp((jnp.asarray(dy), jax.tree.map(jnp.zeros_like, st)))
  # Two float32 implementations: twice the float64 bounds (k = 8); axis=1 is the feature axis.
  x64 = np.asarray(x, np.float64)
  ref.assert_close(y, yt.detach().numpy(), jnp.float32, k=8,
                   cond=ref.bn_output_cond(x64, jnp.float32, axis=1))
  ref.assert_close(st.mean, rm.numpy(), jnp.float32, k=8, cond=ref.stats_cond(x64, axis=1))
  ref.assert_close(st.var, rv.numpy(), jnp.float32, k=8, cond=ref.stats_cond(x64, 1, order=2))
  cond, dx_scale = _grad_cond(np.moveaxis(x, 1, -1), scale, np.moveaxis(dy, 1, -1))
  ref.assert_close(gx, xt.grad.numpy(), jnp.float32, k=8, cond=cond, scale=dx_scale)
  ref.assert_close(gs, w.grad.numpy(), jnp.float32, k=8, cond=cond)
  ref.assert_close(gb, b.grad.numpy(), jnp.float32, k=8, cond=cond)


def test_axis_name_pmean_sync_under_vmap_equals_global_batch():
  x = _data((4, 6, 3))  # 4 "devices" x 6 examples
  scale, bias = _params(3)

  def f(x):
    return jaxbn.batch_norm(x, jaxbn.init_stats(3), scale, bias, training=True, axis_name="d")

  y, st = jax.vmap(f, axis_name="d", out_axes=(0, None))(x)
  y_ref, (n, m, v) = ref.batch_norm(np.asarray(x).reshape(24, 3), scale, bias)
  x64 = np.asarray(x, np.float64).reshape(24, 3)  # the global batch
  ref.assert_close(np.asarray(y).reshape(24, 3), y_ref, jnp.float32,
                   cond=ref.bn_output_cond(x64, jnp.float32))
  ref.assert_close(st.mean, 0.01 * m.ravel(), jnp.float32, cond=ref.stats_cond(x64))
