"""Property-based tests (hypothesis) over shapes, axes, dtypes, masks and momentum."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import jaxbn
from tests import _reference as ref


@st.composite
def cases(draw):
  ndim = draw(st.integers(2, 4))
  shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
  axis = draw(st.sampled_from([-1, 0, 1, (0, -1)] if ndim > 2 else [-1, 0]))
  dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
  momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, None]))
  use_mask = draw(st.booleans())
  offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
  seed = draw(st.integers(0, 2**16))
  return shape, axis, dtype, momentum, use_mask, offset, seed


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_batch_norm_matches_float64_reference(case):
  shape, axis, dtype, momentum, use_mask, offset, seed = case
  rng = np.random.default_rng(seed)
  x64 = rng.normal(size=shape) * 2 + offset
  x = jnp.asarray(x64, dtype)
  xq = np.asarray(x.astype(jnp.float32), np.float64)  # what the function actually sees
  feat = ref.feature_axes(len(shape), axis)
  fshape = tuple(shape[a] for a in feat)
  mask = None
  if use_mask:
    mask = rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3
  stats = jaxbn.init_stats(fshape)
  if np.prod(shape) == np.prod(fshape):  # one value per feature: an error, before tracing
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
      jaxbn.batch_norm(x, stats, training=True, axis=axis, momentum=momentum)
    return
  y, new = jaxbn.batch_norm(x, stats, training=True, axis=axis, momentum=momentum,
                            mask=None if mask is None else jnp.asarray(mask))
  y_ref, (n, mean, var) = ref.batch_norm(xq, axis=axis, mask=mask)
  assert y.dtype == x.dtype and y.shape == x.shape
  valid = np.broadcast_to(mask if mask is not None else True, shape)
  # Output: one rounding to dtype + float32 statistics (tests/README.md): cond =
  # 1 + cond_offset²·u32/u(dtype), over the valid entries only.
  ref.assert_close(y, y_ref, dtype, cond=ref.bn_output_cond(xq, dtype, axis, mask),
                   where=valid, what="y")
  n = n.reshape(fshape)
  has = n > 1  # a masked count <= 1 leaves the running statistics as they were
  w = 0.0 if momentum is None else momentum
  mean_ref = np.where(has, (1 - w) * mean.reshape(fshape), 0.0)
  var_ref = np.where(has, w + (1 - w) * var.reshape(fshape), 1.0)
  # Running statistics are float32: cond = log2(n)·cond_offset (mean), ·cond_offset² (var).
  # A mean near 0 of data of spread σ is a sum of O(σ) terms: its absolute rounding is
  # u·σ-sized, so the mean's slack scale is the (weighted) σ, not |mean|.
  ref.assert_close(new.mean, mean_ref, jnp.float32, cond=ref.stats_cond(xq, axis, 1, mask),
                   scale=max(float((1 - w) * np.sqrt(np.max(var))), 1e-30),
                   what="running mean")
  ref.assert_close(new.var, var_ref, jnp.float32, cond=ref.stats_cond(xq, axis, 2, mask),
                   what="running var")
  assert int(new.count) == int(np.any(has))
  assert new.mean.dtype == stats.mean.dtype and new.mean.shape == stats.mean.shape
