"""The moment algebra (``jaxbn/_core/moments.py``) on inputs that its other tests do not reach.

Added for mutants that survived mutation testing (``tests/MUTATION.md``): each test names the
claim it checks. References are float64 NumPy over the valid entries only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import parallel
from tests import _reference as ref

OFFSET = 1e4
D, PER, F = 8, 16, 3
REAL = (16, 3, 9, 0, 16, 5, 1, 12)  # real rows per device; device 3 has none


def _bound(n, r):
  """moments' own claim: one pass about a shift that is the mean of ``r`` valid sampled
  entries has c ≤ 1 + n/r, so the relative variance error is at most 4·c·log2(n)·u32
  (tests/README.md: k = 4, the summation's log2(n))."""
  return 4 * (1 + n / r) * np.log2(n) * ref.unit_roundoff(np.float32)


def _offset_data(shape, seed=0, dtype=np.float32):
  return (OFFSET + np.random.default_rng(seed).normal(size=shape)).astype(dtype)


@pytest.mark.parametrize("use_fast_variance", [False, True], ids=["stable", "fast"])
def test_one_pass_about_the_sampled_shift_is_exact_at_offset_1e4(use_fast_variance):
  """One device, 1000 × 3 at 1e4 ± 1: the variance within moments' bound (a shift that is not
  taken from the data, e.g. 0, errs by O(1)); grouped statistics (group_norm's blocks of
  channels) too, and complex data (real and imaginary parts both offset)."""
  x = _offset_data((1000, 3))
  got = jaxbn.moments(jnp.asarray(x), use_fast_variance=use_fast_variance)
  assert _rel_var_error(got.var, x, np.ones((1000, 1), bool)) <= _bound(1000, 4)
  # Grouped: 2 groups of 4 channels, statistics over (H, W, channels of the group).
  xg = _offset_data((2, 16, 16, 8), seed=1)
  y = np.asarray(jaxbn.group_norm(jnp.asarray(xg), num_groups=2, epsilon=1e-12), np.float64)
  # exact per-group statistics give var(y) = 1 over each group (float32 y: 8 eps)
  yg = y.reshape(2, 16 * 16, 2, 4).transpose(0, 2, 1, 3).reshape(2, 2, -1)
  assert np.max(np.abs(yg.var(-1) - 1.0)) <= _bound(16 * 16 * 4, 4 * 4 * 4) + 8 * 2 ** -23
  z = (_offset_data((1000, 2), seed=2) + 1j * _offset_data((1000, 2), seed=3)).astype(
      np.complex64)
  got = jaxbn.moments(jnp.asarray(z), use_fast_variance=use_fast_variance)
  want = np.mean(np.abs(z.astype(np.complex128) - z.astype(np.complex128).mean(0)) ** 2, 0)
  assert np.max(np.abs(np.asarray(got.var, np.float64) - want) / want) <= _bound(1000, 4)


def test_a_sample_with_no_valid_entry_takes_the_given_shift():
  """Every sampled row (0, 16, 32, 48) masked: the shift is the caller's ``shift`` (batch
  norm passes its running mean), here at the data: exact; not 0 (which errs by O(1))."""
  x = _offset_data((64, 3), seed=4)
  mask = (np.arange(64) % 16 != 0)[:, None]
  got = jaxbn.moments(jnp.asarray(x), mask=jnp.asarray(mask),
                      shift=jnp.full((3,), OFFSET, jnp.float32))
  assert _rel_var_error(got.var, x, mask) <= _bound(int(mask.sum()), 1)


def _padded_per_device(seed=0):
  """Each device's rows as ``parallel.pad_batch`` leaves them: real rows at 1e4, then zeros."""
  rng = np.random.default_rng(seed)
  xs, ms = [], []
  for k in REAL:
    real = (OFFSET + rng.normal(size=(k, F))).astype(np.float32)
    x, m = parallel.pad_batch(real, PER) if k else (np.zeros((PER, F), np.float32),
                                                    np.zeros(PER, bool))
    xs.append(np.asarray(x))
    ms.append(np.asarray(m))
  return np.concatenate(xs), np.concatenate(ms)[:, None]


def _rel_var_error(var, x, mask):
  v = x.astype(np.float64)[mask[:, 0]].var(0)
  return float(np.max(np.abs(np.asarray(var, np.float64) - v) / v))


@pytest.mark.parametrize("use_fast_variance", [False, True], ids=["stable", "fast"])
def test_shift_ignores_the_zero_padding_of_a_masked_batch(use_fast_variance):
  """The sampled shift is the mean of the sample's *valid* entries: zero padding rows (as
  pad_batch makes them) at the sampled positions do not pull it away from data at 1e4, so
  the variance stays exact — on one device and synchronized over 8 (shard_map)."""
  x, mask = _padded_per_device()
  # One device: 32 rows, the first 5 real (sampled rows 0, 8, 16, 24: one is valid).
  x1, m1 = parallel.pad_batch(x[:5], 32)
  m1 = np.asarray(m1)[:, None]
  got = jaxbn.moments(jnp.asarray(x1), mask=jnp.asarray(m1),
                      use_fast_variance=use_fast_variance)
  assert _rel_var_error(got.var, np.asarray(x1), m1) <= _bound(5, 1)

  mesh = parallel.data_mesh()
  f = jax.jit(jax.shard_map(
      lambda x, m: tuple(jaxbn.moments(x, mask=m, axis_name="data",
                                       use_fast_variance=use_fast_variance)),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
  _, var, count = f(put(x), put(mask))
  assert np.all(np.asarray(count) == sum(REAL))
  # Valid sampled entries over the devices: rows 0, 4, 8, 12 of each device that are real.
  r = sum(sum(1 for i in range(0, PER, PER // 4) if i < k) for k in REAL)
  assert _rel_var_error(var, x, mask) <= _bound(sum(REAL), r)


def _m2(v):
  return float(np.sum((v - v.mean()) ** 2)) if len(v) else 0.0


@pytest.mark.parametrize("na,nb", [(0, 1), (1, 0), (1, 1), (3, 1), (1, 3), (0, 2), (5, 7)])
def test_chan_merge_of_small_and_empty_sides_equals_float64(na, nb):
  """moments.merge (Chan et al.) equals float64 on the concatenated values for sides of 0, 1
  and a few entries (the counts where a wrong weight or a wrong empty-side test shows), and
  a side with n = 0 leaves the other unchanged — for the second side whatever its values
  (NaN), bit for bit. Bound: 4·log2(n)·u32·cond (tests/README.md; offset data 1e4 ± 1)."""
  from jaxbn._core import moments as mom
  rng = np.random.default_rng(na * 10 + nb)
  a = (OFFSET + rng.normal(size=na)).astype(np.float32).astype(np.float64)
  b = (OFFSET + 3 + rng.normal(size=nb)).astype(np.float32).astype(np.float64)
  side = lambda v: (jnp.float32(len(v)), jnp.float32(v.mean() if len(v) else 0.0),  # noqa
                    jnp.float32(_m2(v)))
  n, mean, m2 = (np.float64(v) for v in mom.merge(*side(a), *side(b)))
  both = np.concatenate([a, b])
  assert n == len(both)
  u, logn = ref.unit_roundoff(np.float32), max(1.0, np.log2(len(both)))
  assert abs(mean - both.mean()) <= 4 * logn * u * abs(both.mean())
  # M2 also carries the float32 rounding of the two means (≤ u·|μ| each) through
  # |δ|² n_a n_b / n: 2|δ|·u·(|μ_a| + |μ_b|)·n_a n_b / n, twice for k.
  delta = (b.mean() if nb else 0.0) - (a.mean() if na else 0.0)
  slack = 4 * abs(delta) * u * 2 * OFFSET * na * nb / len(both)
  assert abs(m2 - _m2(both)) <= 4 * logn * u * _m2(both) + slack
  if nb == 0:
    nan = jnp.float32(np.nan)
    out = mom.merge(*side(a), jnp.float32(0), nan, nan)
    assert [float(v) for v in out] == [float(v) for v in side(a)]


def test_float32_statistics_stay_float32_with_jax_enable_x64():
  """With jax_enable_x64 on, float32 data keeps float32 statistics: the merge and the synced
  masked path (the sample's valid counts weight the common shift) promote nothing to the
  default float64."""
  from jaxbn._core import moments as mom
  f = jnp.float32
  with jax.enable_x64(True):
    out = mom.merge(f(3), f(1.0), f(2.0), f(2), f(3.0), f(1.0))
    assert [v.dtype for v in out] == [jnp.float32] * 3
    x, mask = _padded_per_device()
    mesh = parallel.data_mesh()
    g = jax.jit(jax.shard_map(lambda x, m: tuple(jaxbn.moments(x, mask=m, axis_name="data")),
                              mesh=mesh, in_specs=P("data"), out_specs=P()))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    mean, var, _ = g(put(jnp.asarray(x)), put(jnp.asarray(mask)))
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32


def test_masked_grouped_statistics_are_exact_at_offset_1e4():
  """Grouped statistics with a mask (group_norm's blocks of channels, masked positions): the
  sample's valid entries and counts are summed per block, so each group's variance over its
  valid entries is exact: var(y) = 1 over the valid entries of each (example, group)."""
  xg = _offset_data((2, 8, 8, 8), seed=7)
  mask = np.random.default_rng(8).random((2, 8, 8, 1)) > 0.3
  y = np.asarray(jaxbn.group_norm(jnp.asarray(xg), num_groups=2, epsilon=1e-12,
                                  mask=jnp.asarray(mask)), np.float64)
  m = np.broadcast_to(mask, xg.shape)
  for i in range(2):
    for g in range(2):
      sl = (i, slice(None), slice(None), slice(4 * g, 4 * g + 4))
      v = y[sl][m[sl]]
      assert abs(v.var() - 1.0) <= _bound(v.size, 1) + 8 * 2 ** -23, (i, g, v.var())
