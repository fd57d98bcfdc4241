"""Planted errors: each tolerance class of the suite rejects a known-wrong answer.

For every dtype, the real jaxbn result is compared with the float64 reference through the
same helper (``tests/_reference.assert_close``) and the same bound the other tests use, and
must pass; then a *planted* wrong answer — the float64 reference of a plausible bug, rounded to
the dtype the library would return — must FAIL that bound. A tolerance that a planted bug
passes is a test that cannot fail (see tests/README.md).

Planted bugs: epsilon off by 1e-3; biased instead of unbiased running variance; the momentum
convention reversed; a dropped mask term (statistics over all entries); the projection terms
of the BN gradient dropped; a float32 variance from the one-pass formula on offset data.

The data have a small spread (std 0.05, variance 2.5e-3) so that epsilon + 1e-3 changes the
output by ~20%, visible even in bfloat16 (u = 2^-8); at variance ~1 such a bug moves the output
by 5e-4, below bfloat16's resolution — there only float32 tests can catch it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import _reference as ref

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPE, C = (32, 5, 6), 6
EPS, MOM = 1e-5, 0.9


def _case(dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=SHAPE) * 0.05 + 0.1, dtype)
  scale = jnp.asarray(rng.normal(size=C) * 0.5 + 1, jnp.float32)
  bias = jnp.asarray(rng.normal(size=C) * 0.5, jnp.float32)
  mask = rng.random((SHAPE[0], 1, 1)) > 0.3
  xq = np.asarray(x.astype(jnp.float32), np.float64)  # what the library sees
  return x, xq, scale, bias, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_output_bound_rejects_epsilon_off_by_1e_3(dtype):
  x, xq, scale, bias, _ = _case(dtype)
  y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(C), scale, bias, training=True, epsilon=EPS)
  y_ref, _ = ref.batch_norm(xq, scale, bias, eps=EPS)
  cond = ref.bn_output_cond(xq, dtype)
  ref.assert_close(y, y_ref, dtype, cond=cond, what="BN output")
  planted = ref.quantize(ref.batch_norm(xq, scale, bias, eps=EPS + 1e-3)[0], dtype)
  assert not ref.close(planted, y_ref, dtype, cond=cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_running_var_bound_rejects_biased_instead_of_unbiased(dtype):
  x, xq, scale, bias, _ = _case(dtype)
  # momentum 0: the running variance is the batch term itself (at momentum 0.9 the old value
  # 0.9 would dominate this small-variance batch and hide the batch term's error budget).
  _, st = jaxbn.batch_norm(x, jaxbn.init_stats(C), scale, bias, training=True, momentum=0.0,
                           unbiased_running_var=True)
  n, _, var = ref.moments(xq)
  n = float(n.ravel()[0])
  expected = var.ravel() * n / (n - 1)
  # Running statistics are float32 whatever the input dtype; variance cond = log2(n)·cond_offset².
  cond = ref.stats_cond(xq, order=2)
  ref.assert_close(st.var, expected, jnp.float32, cond=cond, what="unbiased running var")
  planted = var.ravel()  # biased variance (the factor n/(n-1) = 1.0063 missing)
  assert not ref.close(planted.astype(np.float32), expected, jnp.float32, cond=cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_running_mean_bound_rejects_reversed_momentum(dtype):
  x, xq, scale, bias, _ = _case(dtype)
  _, st = jaxbn.batch_norm(x, jaxbn.init_stats(C), scale, bias, training=True, momentum=MOM)
  _, mean, _ = ref.moments(xq)
  expected = ref.ema(0.0, mean.ravel(), MOM)
  cond = ref.stats_cond(xq)
  ref.assert_close(st.mean, expected, jnp.float32, cond=cond, what="running mean")
  planted = ref.ema(0.0, mean.ravel(), 1 - MOM)  # PyTorch's convention used by mistake
  assert not ref.close(planted.astype(np.float32), expected, jnp.float32, cond=cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_masked_bound_rejects_a_dropped_mask_term(dtype):
  x, xq, scale, bias, mask = _case(dtype)
  y, st = jaxbn.batch_norm(x, jaxbn.init_stats(C), scale, bias, training=True, momentum=MOM,
                           mask=jnp.asarray(mask))
  y_ref, (_, mean, _) = ref.batch_norm(xq, scale, bias, mask=mask)
  valid = np.broadcast_to(mask, SHAPE)
  cond = ref.bn_output_cond(xq[valid[:, 0, 0]], dtype)
  ref.assert_close(y, y_ref, dtype, cond=cond, where=valid, what="masked BN output")
  planted_y = ref.quantize(ref.batch_norm(xq, scale, bias)[0], dtype)  # mask ignored
  assert not ref.close(planted_y, y_ref, dtype, cond=cond, where=valid)
  expected_mean = ref.ema(0.0, mean.ravel(), MOM)
  c_mean = ref.stats_cond(xq)
  ref.assert_close(st.mean, expected_mean, jnp.float32, cond=c_mean, what="masked mean")
  planted_mean = ref.ema(0.0, ref.moments(xq)[1].ravel(), MOM)
  assert not ref.close(planted_mean.astype(np.float32), expected_mean, jnp.float32,
                       cond=c_mean)


def test_gradient_bound_rejects_dropped_projection_terms():
  x, xq, scale, bias, _ = _case(jnp.float32)
  dy = np.random.default_rng(7).normal(size=SHAPE)

  def loss(x, s, b):
    y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(C), s, b, training=True)
    return jnp.sum(y * jnp.asarray(dy, jnp.float32))

  gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  rx, rs, rb = ref.grads(xq, scale, bias, dy)
  # dx = g·inv·(dy − mean(dy) − x̂·mean(dy·x̂)): the subtraction cancels, so the bound is
  # relative to the size of the un-cancelled term g·inv·dy; sums over n = 32·5 terms: cond =
  # log2(n) · cond_offset².
  _, _, var = ref.moments(xq)
  raw = np.asarray(scale) / np.sqrt(var + EPS) * dy
  scale_dx = float(np.sqrt(np.mean(raw ** 2)))
  cond = np.log2(xq.size / C) * ref.cond_offset(xq) ** 2
  ref.assert_close(gx, rx, jnp.float32, cond=cond, scale=scale_dx, what="dx")
  ref.assert_close(gs, rs, jnp.float32, cond=cond, what="dscale")
  ref.assert_close(gb, rb, jnp.float32, cond=cond, what="dbias")
  planted = np.asarray(scale) / np.sqrt(var + EPS) * dy  # projection terms dropped
  assert not ref.close(planted, rx, jnp.float32, cond=cond, scale=scale_dx)
  planted_eps = ref.grads(xq, scale, bias, dy, eps=EPS + 1e-3)[0]
  assert not ref.close(planted_eps, rx, jnp.float32, cond=cond, scale=scale_dx)


def test_stable_variance_bound_rejects_the_one_pass_formula():
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.normal(size=(4096, 3)), jnp.float32)
  xq = np.asarray(x, np.float64)
  true_var = ref.moments(xq)[2].ravel()
  # A stable variance of float32 data: the centered values x − mean are exact (Sterbenz) and
  # their squares summed in float32, error ~ u32·log2(n); cond = log2(4096) = 12.
  cond = np.log2(xq.shape[0])
  m = jaxbn.moments(x)
  ref.assert_close(m.var, true_var, jnp.float32, cond=cond, scale=0, what="stable variance")
  one_pass = np.asarray(jnp.mean(x ** 2, 0) - jnp.mean(x, 0) ** 2, np.float64)
  assert not ref.close(one_pass, true_var, jnp.float32, cond=cond, scale=0)
  planted_ddof = true_var * 4096 / 4095  # unbiased where biased is specified
  assert not ref.close(planted_ddof, true_var, jnp.float32, cond=cond, scale=0)
