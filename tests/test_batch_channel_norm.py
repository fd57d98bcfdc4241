"""Batch-channel normalization: the functional op, linen and nnx layers against float64 NumPy.

Reference: BN over (N, H, W) with the batch (training) or running (eval) statistics, then
GN per example over (H, W, channels of the group), then ``γ``/``β``, all in float64; the
running update is flax's ``m·old + (1 − m)·batch`` with the biased variance.

Tolerances: float32 input of O(1-10), two normalizations each of a few roundings, outputs
O(1): ``atol = rtol = 128 · eps32 ≈ 1.5e-5``. A planted epsilon of 1e-3 instead of 1e-5 moves
the output by ~5e-4; a GN over one group instead of two by O(1).
The freeze / recompute / fold / surgery / TENT tools are exercised on this layer, unchanged,
by tests/test_registry.py (``..._as_its_kind_says``), which loops over the registry's rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

EPS32 = float(jnp.finfo(jnp.float32).eps)
TOL = dict(rtol=128 * EPS32, atol=128 * EPS32)
G, C, EPSILON, MOMENTUM = 2, 6, 1e-5, 0.9


def _data():
  r = np.random.default_rng(0)
  x = (r.normal(size=(8, 3, 3, C)) * 3 + r.normal(size=C)).astype(np.float32)
  mean, var = r.normal(size=C), r.uniform(0.5, 2, C)
  scale, bias = r.uniform(0.5, 2, C), r.normal(size=C)
  return x, mean, var, scale, bias


def _reference(x, mean, var, scale, bias, training):
  x = np.asarray(x, np.float64)
  if training:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  z = (x - mean) / np.sqrt(var + EPSILON)
  zg = z.reshape(z.shape[:-1] + (G, C // G))
  mu = zg.mean((1, 2, 4), keepdims=True)
  sd = np.sqrt(zg.var((1, 2, 4), keepdims=True) + EPSILON)
  return ((zg - mu) / sd).reshape(z.shape) * scale + bias, mean, var


@pytest.mark.parametrize("training", [True, False])
def test_functional_linen_and_nnx_equal_the_float64_reference(training):
  x, mean, var, scale, bias = _data()
  want, bmean, bvar = _reference(x, mean, var, scale, bias, training)
  stats = jaxbn.BatchStats(jnp.float32(mean), jnp.float32(var), jnp.int32(0))
  y, new = jaxbn.batch_channel_norm(x, stats, jnp.float32(scale), jnp.float32(bias),
                                    training=training, num_groups=G, momentum=MOMENTUM,
                                    epsilon=EPSILON, use_fast_variance=True)  # the layers'
  np.testing.assert_allclose(y, want, **TOL)
  assert y.dtype == jnp.float32
  if training:  # flax's update, biased variance
    np.testing.assert_allclose(new.mean, MOMENTUM * mean + (1 - MOMENTUM) * bmean, **TOL)
    np.testing.assert_allclose(new.var, MOMENTUM * var + (1 - MOMENTUM) * bvar, **TOL)
  else:
    jax.tree.map(np.testing.assert_array_equal, new, stats)

  layer = jaxbn.linen.BatchChannelNorm(num_groups=G, momentum=MOMENTUM, epsilon=EPSILON)
  v = {"params": {"scale": jnp.float32(scale), "bias": jnp.float32(bias)},
       "batch_stats": {"mean": jnp.float32(mean), "var": jnp.float32(var)}}
  y_linen, upd = layer.apply(v, x, use_running_average=not training, mutable=["batch_stats"])
  np.testing.assert_array_equal(y_linen, y)

  bn = jaxbn.nnx.BatchChannelNorm(C, num_groups=G, momentum=MOMENTUM, epsilon=EPSILON,
                                  use_running_average=not training, rngs=nnx.Rngs(0))
  bn.scale[...], bn.bias[...] = jnp.float32(scale), jnp.float32(bias)
  bn.mean[...], bn.var[...] = jnp.float32(mean), jnp.float32(var)
  np.testing.assert_array_equal(bn(x), y)
  np.testing.assert_array_equal(bn.var[...], new.var)
  if training:
    np.testing.assert_array_equal(upd["batch_stats"]["var"], new.var)


def test_channels_must_be_last():
  x, mean, var, _, _ = _data()
  with pytest.raises(ValueError, match=r"batch_channel_norm: `axis`=1: the channels must be "
                                       r"the last axis"):
    jaxbn.batch_channel_norm(jnp.moveaxis(x, -1, 1), jaxbn.init_stats(C), training=True,
                             axis=1, num_groups=G)
