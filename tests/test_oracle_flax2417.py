"""flax #2417, run for real: masked BN synced over devices with uneven valid counts.

flax's ``nn.BatchNorm(axis_name=...)`` with a ``mask`` computes each device's masked moments
and then ``pmean``s them, so every device weighs the same whatever its number of valid
entries. The true statistics of the global batch weight each entry equally. Both libraries run
under the same ``jax.shard_map`` on the same data; the float64 NumPy reference of the global
masked batch decides. flax must be wrong in exactly the way the issue describes (its values
equal the unweighted average of per-device moments) and jaxbn right.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import parallel
from tests import _reference as ref

nn = pytest.importorskip("flax.linen")  # flax is a test dependency: never skipped under CI


def _run(x, mask, devices):
  """(flax mean, flax var, jaxbn mean, jaxbn var, jaxbn y) with momentum 0 (= batch stats)."""
  c = x.shape[-1]
  mesh = parallel.data_mesh(devices=jax.devices()[:devices])
  xs, ms = parallel.shard_batch((x, mask), mesh)
  mod = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="data")

  def flax_stats(x, m):
    _, upd = mod.apply({"params": {"scale": jnp.ones(c), "bias": jnp.zeros(c)},
                        "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}}, x,
                       mask=m, mutable=["batch_stats"])
    return upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

  def jaxbn_stats(x, m):
    y, st = jaxbn.batch_norm(x, jaxbn.init_stats(c), training=True, momentum=0.0,
                             axis_name="data", mask=m)
    return st.mean, st.var, y

  f = jax.jit(jax.shard_map(flax_stats, mesh=mesh, in_specs=P("data"), out_specs=(P(), P()),
                            check_vma=False))
  g = jax.jit(jax.shard_map(jaxbn_stats, mesh=mesh, in_specs=P("data"),
                            out_specs=(P(), P(), P("data"))))
  fm, fv = (np.asarray(a, np.float64) for a in f(xs, ms))
  jm, jv, jy = (np.asarray(a, np.float64) for a in g(xs, ms))
  return fm, fv, jm, jv, jy


def _unweighted_device_moments(x, mask, devices):
  """The #2417 formula: mean over devices of per-device masked E[x] and E[x²]."""
  xs = np.split(np.asarray(x, np.float64), devices)
  ms = np.split(np.broadcast_to(mask, x.shape), devices)
  mu = np.mean([np.sum(a * m, 0) / np.sum(m, 0) for a, m in zip(xs, ms)], 0)
  mu2 = np.mean([np.sum(a * a * m, 0) / np.sum(m, 0) for a, m in zip(xs, ms)], 0)
  return mu, mu2 - mu * mu


def test_issue_2417_example_flax_mean_6_jaxbn_mean_4():
  # Device 0 holds the valid values (2, 2, 2), device 1 holds (10,); the rest is padding.
  x = np.array([2, 2, 2, -7, 10, 99, 99, 99], np.float32)[:, None]
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)[:, None]
  fm, fv, jm, jv, _ = _run(x, mask, 2)
  _, mean, var = ref.moments(x, mask=mask)
  assert mean.ravel() == [4.0] and var.ravel() == [12.0]  # (3·2² + 6²)/4 = 12
  # Small integers: every step is exact in float32, so equality is exact on both sides.
  np.testing.assert_array_equal(jm, [4.0])
  np.testing.assert_array_equal(jv, [12.0])
  np.testing.assert_array_equal(fm, [6.0])  # (2 + 10)/2: devices weighted equally
  np.testing.assert_array_equal(fv, [16.0])  # (4 + 100)/2 − 6²


def test_uneven_counts_on_8_devices_flax_wrong_by_the_2417_formula_jaxbn_exact():
  rng = np.random.default_rng(0)
  devices, per, c = 8, 8, 3
  x = (rng.normal(size=(devices * per, c)) * 2 + np.arange(devices).repeat(per)[:, None])
  x = x.astype(np.float32)
  counts = np.arange(1, devices + 1)  # device i has i + 1 valid rows of 8
  mask = np.concatenate([np.arange(per) < k for k in counts])[:, None]
  fm, fv, jm, jv, jy = _run(x, mask, devices)
  x64 = np.asarray(x, np.float64)
  _, mean, var = ref.moments(x64, mask=mask)
  y_ref, _ = ref.batch_norm(x64, mask=mask)
  # jaxbn: float32 statistics within log2(n)·cond_offset^(1, 2) of float64 (tests/README.md).
  ref.assert_close(jm, mean.ravel(), jnp.float32, cond=ref.stats_cond(x64, mask=mask),
                   what="jaxbn mean")
  ref.assert_close(jv, var.ravel(), jnp.float32, cond=ref.stats_cond(x64, order=2, mask=mask),
                   what="jaxbn var")
  ref.assert_close(jy, y_ref, jnp.float32, cond=ref.bn_output_cond(x64, jnp.float32, mask=mask),
                   where=np.broadcast_to(mask, x.shape), what="jaxbn y")
  # flax: equal to the unweighted average of per-device moments, far from the true ones.
  bug_mean, bug_var = _unweighted_device_moments(x64, mask, devices)
  ref.assert_close(fm, bug_mean, jnp.float32, cond=ref.stats_cond(x64, mask=mask))
  ref.assert_close(fv, bug_var, jnp.float32, cond=ref.stats_cond(x64, order=2, mask=mask))
  assert np.all(np.abs(fm - mean.ravel()) > 0.5)  # devices with more rows hold larger values
  assert not ref.close(fv, var.ravel(), jnp.float32, cond=ref.stats_cond(x64, order=2,
                                                                           mask=mask))
