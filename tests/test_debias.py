"""Zero-debiased running averages (``debias=True``) against a float64 hidden-accumulator
reference, in batch norm, its variants and the layers.

The reference is Adam's/haiku's: a hidden average ``h_t = m h_{t-1} + (1 - m) b_t`` started at
**zero** for the mean and the variance alike, read as ``h_t / (1 - m^t)``. Equinox's
``BatchNorm(mode="batch")`` starts the hidden *variance* at 1 instead, so its first reads are
``(m + (1 - m) b_1) / (1 - m) = b_1 + m / (1 - m)``: inflated by 99 with ``m = 0.99``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

# Tolerances (tests/README.md: |err| <= k·cond·u(dtype)·(|expected| + scale)). The float32 data
# here have |mean|/std <= ~6, so cond_offset² <= ~40 and 4·40·u32 ≈ 1e-5: outputs and
# statistics use rtol/atol 1e-5 (2e-5 where values reach ~2), gradients 1e-4 (× log2(n) of the
# sums); rtol 1e-6/atol 1e-6 where two float32 evaluations of the same formula are compared
# (a few ulps); no bfloat16 here.

C = 3


def hidden_reference(values, m):
  """Debiased averages of ``values`` (float64), one per step."""
  h, out = 0.0, []
  for t, b in enumerate(values, start=1):
    h = m * h + (1 - m) * np.asarray(b, np.float64)
    out.append(h / (1 - m ** t))
  return out


def _batches(n_steps, n=16, seed=0):
  rng = np.random.default_rng(seed)
  # Small variances (0.01 .. 0.04) far from the initial value 1, and varying means.
  return [(rng.normal(size=(n, C)) * (0.1 + 0.05 * t) + t - 2.0).astype(np.float32)
          for t in range(n_steps)]


def _moments(x, unbiased=False):
  x = np.asarray(x, np.float64)
  return x.mean(0), x.var(0, ddof=1 if unbiased else 0)


@functools.partial(jax.jit, static_argnames=("fn", "kw"))
def _step(x, stats, momentum, *, fn, kw):
  return fn(x, stats, training=True, momentum=momentum, debias=True, **dict(kw))[1]


@pytest.mark.parametrize("m", [0.9, 0.99])
@pytest.mark.parametrize("unbiased", [False, True])
def test_batch_norm_matches_hidden_accumulator(m, unbiased):
  batches = _batches(6)
  stats = jaxbn.init_stats(C)
  kw = (("unbiased_running_var", unbiased),)
  ref_mean = hidden_reference([_moments(b)[0] for b in batches], m)
  ref_var = hidden_reference([_moments(b, unbiased)[1] for b in batches], m)
  for t, x in enumerate(batches):
    stats = _step(x, stats, m, fn=jaxbn.batch_norm, kw=kw)  # momentum traced
    np.testing.assert_allclose(stats.mean, ref_mean[t], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, ref_var[t], rtol=1e-5)
    assert int(stats.count) == t + 1


def test_early_inference_variance_is_not_inflated():
  m = 0.99
  x = _batches(1)[0]
  b_mean, b_var = _moments(x)
  stats = _step(x, jaxbn.init_stats(C), m, fn=jaxbn.batch_norm, kw=())
  # The first update replaces the initial (0, 1): exactly the batch's moments.
  np.testing.assert_allclose(stats.mean, b_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.var, b_var, rtol=1e-5)
  equinox_style = (m * 1.0 + (1 - m) * b_var) / (1 - m)  # hidden variance started at 1
  assert np.all(equinox_style > 90 * np.asarray(stats.var))
  plain = jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, momentum=m)[1]
  assert np.all(np.asarray(plain.var) > 0.9)  # without debias: still ~ the initial 1
  # Inference right after one step normalizes the batch to unit variance.
  y, _ = jaxbn.batch_norm(x, stats, training=False, epsilon=1e-8)
  np.testing.assert_allclose(np.asarray(y).std(0), 1.0, rtol=1e-3)


def test_empty_batches_momentum_none_and_masks():
  m = 0.9
  batches = _batches(3)
  stats = jaxbn.init_stats(C)
  stats = _step(batches[0], stats, m, fn=jaxbn.batch_norm, kw=())
  # A batch without valid entries changes nothing and does not advance the clock.
  empty = jaxbn.batch_norm(batches[1], stats, training=True, momentum=m, debias=True,
                           mask=jnp.zeros((16, 1), bool))[1]
  jax.tree.map(np.testing.assert_array_equal, empty, stats)
  stats = _step(batches[2], empty, m, fn=jaxbn.batch_norm, kw=())
  ref = hidden_reference([_moments(batches[0])[1], _moments(batches[2])[1]], m)
  np.testing.assert_allclose(stats.var, ref[1], rtol=1e-5)
  # A masked batch: the moments of the valid entries are what is averaged.
  mask = np.ones((16, 1), bool)
  mask[::3] = False
  masked = jaxbn.batch_norm(batches[1], jaxbn.init_stats(C), training=True, momentum=m,
                            debias=True, mask=jnp.asarray(mask))[1]
  np.testing.assert_allclose(masked.var, _moments(batches[1][mask[:, 0]])[1], rtol=1e-5)
  # momentum=None: the cumulative average is unbiased already; debias changes nothing.
  s_none, s_plain = jaxbn.init_stats(C), jaxbn.init_stats(C)
  for x in batches:
    s_none = jaxbn.batch_norm(x, s_none, training=True, momentum=None, debias=True)[1]
    s_plain = jaxbn.batch_norm(x, s_plain, training=True, momentum=None)[1]
  np.testing.assert_allclose(s_none.var, np.mean([_moments(b)[1] for b in batches], 0),
                             rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, s_none, s_plain)


def test_variants_and_layers_debias():
  from flax import nnx
  import jaxbn.linen
  import jaxbn.nnx

  m = 0.8
  batches = _batches(3, seed=1)
  ref_var = hidden_reference([_moments(b)[1] for b in batches], m)
  ref_std = hidden_reference([np.sqrt(_moments(b)[1] + 1e-5) for b in batches], m)
  renorm = functools.partial(jaxbn.batch_renorm, r_max=1.5, d_max=1.0)
  s_renorm = s_std = s_ghost = jaxbn.init_stats(C)
  # (use_fast_variance=False: flax's default E[x²] − E[x]² loses ~3e-4 here, |mean|/std ~ 40)
  layer = jaxbn.linen.BatchNorm(momentum=m, debias=True, use_running_average=False,
                                use_fast_variance=False)
  variables = layer.init(jax.random.key(0), batches[0])
  assert "count" in variables["batch_stats"]
  bn = jaxbn.nnx.BatchNorm(C, momentum=m, debias=True, use_fast_variance=False,
                           rngs=nnx.Rngs(0))
  ghost_moments = []
  for t, x in enumerate(batches):
    s_renorm = _step(x, s_renorm, m, fn=renorm, kw=())
    s_std = _step(x, s_std, m, fn=renorm, kw=(("running_std", True),))
    s_ghost = _step(x, s_ghost, m, fn=jaxbn.ghost_batch_norm,
                    kw=(("virtual_batch_size", 8), ("stats_update", "sequential")))
    ghost_moments += [_moments(x[:8])[1], _moments(x[8:])[1]]
    _, upd = layer.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **upd}
    bn(x)
    np.testing.assert_allclose(s_renorm.var, ref_var[t], rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.asarray(s_std.var) + 1e-5), ref_std[t], rtol=1e-5)
    np.testing.assert_allclose(s_ghost.var, hidden_reference(ghost_moments, m)[-1], rtol=1e-5)
    assert int(s_ghost.count) == 2 * (t + 1)  # the paper's rule: one update per slice
    np.testing.assert_allclose(variables["batch_stats"]["var"], ref_var[t], rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], ref_var[t], rtol=1e-5)
