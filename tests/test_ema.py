"""Running-statistics conventions (``jaxbn/_core/ema.py``) at their boundaries.

Added for mutants that survived mutation testing (tests/MUTATION.md).
"""

import pytest

import jaxbn


def test_momentum_from_torch_accepts_both_ends_of_0_to_1_and_nothing_outside():
  """PyTorch's momentum p in [0, 1] becomes 1 − p: both ends are valid (p = 1: the batch
  only; p = 0: frozen), anything outside raises."""
  assert jaxbn.momentum_from_torch(0.0) == 1.0
  assert jaxbn.momentum_from_torch(1.0) == 0.0
  assert jaxbn.momentum_from_torch(0.25) == 0.75
  for bad in (-1e-9, 1.0 + 1e-9):
    with pytest.raises(ValueError, match=r"momentum_from_torch: `torch_momentum` must be in "
                                         r"\[0, 1\]"):
      jaxbn.momentum_from_torch(bad)


def test_momentum_zero_stores_the_batch_statistics_exactly():
  """momentum=0: the running values are the batch's, bit for bit (no rounding of new − old:
  from var 1 a batch variance of 1e-4 was stored 2.4e-4 off in relative terms)."""
  import jax.numpy as jnp
  import jaxbn
  stats = jaxbn.init_stats(3)
  batch = jaxbn.Moments(jnp.array([1e4, -3.0, 0.1]), jnp.array([1e-4, 7.0, 3e-9]),
                        jnp.array([8.0, 8.0, 8.0]))
  new = jaxbn.update_stats(stats, batch, momentum=0.0)
  assert (new.mean == batch.mean).all() and (new.var == batch.var).all()
