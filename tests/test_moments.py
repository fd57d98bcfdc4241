"""The moment algebra (``jaxbn/_core/moments.py``) on inputs that its other tests do not reach.

Added for mutants that survived mutation testing (``docs/mutation.md``): each test names the
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
