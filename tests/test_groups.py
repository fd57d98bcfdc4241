"""BN synchronized within groups of devices under shard_map and plain jit (float64 per group).

8 devices in 2 groups of 4: each group's outputs are BN of that group's 16 rows; the
running statistics pooled over groups (``average_stats``) are the equal-weight pooled
moments of the groups' batch statistics. Bound: float32 BN of O(1) data, |y| <= 4:
32 · eps32 absolute on y, 8 · eps32 relative on the statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import parallel, testing

G, K, PER, F = 2, 4, 4, 3
EPS32 = np.finfo(np.float32).eps


def _data():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(G * K * PER, F)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]
  x[: K * PER] += 2.0  # the groups see different data
  return x.astype(np.float32)


def _reference(x):
  y, means, varis = [], [], []
  for g in np.split(x.astype(np.float64), G):
    m, v = g.mean(0), g.var(0)
    y.append((g - m) / np.sqrt(v + 1e-5))
    means.append(m)
    varis.append(v)
  means, varis = np.array(means), np.array(varis)
  pooled_mean = means.mean(0)
  pooled_var = (varis + (means - pooled_mean) ** 2).mean(0)
  return np.concatenate(y), pooled_mean, pooled_var


@pytest.mark.parametrize("path", ["shard_map", "jit"])
def test_batch_norm_synced_within_groups_equals_float64_per_group(path):
  x = _data()
  mesh = parallel.group_mesh(K)
  if path == "shard_map":
    def step(x):
      y, stats = jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True, momentum=0.0,
                                  axis_name="data")
      return y, parallel.average_stats(stats, axis_name="group")
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(("group", "data")),
                              out_specs=(P(("group", "data")), P())))
    y, stats = f(parallel.shard_batch(x, mesh))
  else:
    def step(xg):
      y, stats = jax.vmap(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(F), training=True,
                                                     momentum=0.0))(xg)
      return y.reshape(-1, F), parallel.average_stats(stats)
    y, stats = jax.jit(step)(parallel.group_batch(x, mesh))
    # XLA reduced within the groups only: no all-gather of the batch, all-reduces only.
    lowered = jax.jit(step).lower(parallel.group_batch(x, mesh))
    assert set(testing.collective_counts(lowered.compile())) <= {"all-reduce"}
  y_ref, mean_ref, var_ref = _reference(x)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=32 * EPS32)
  np.testing.assert_allclose(np.asarray(stats.mean), mean_ref, rtol=8 * EPS32, atol=8 * EPS32)
  np.testing.assert_allclose(np.asarray(stats.var), var_ref, rtol=8 * EPS32)
  # A planted error: statistics of the whole batch (no groups) are far outside the bound.
  y_global = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  assert np.abs(y_global - y_ref).max() > 1000 * 32 * EPS32


def test_group_mesh_errors():
  with pytest.raises(ValueError, match=r"group_mesh: `group_size`=3 must be a positive divisor"):
    parallel.group_mesh(3)
