"""The CNN trainer on 2 processes x 2 CPU devices equals 1 process x 4 devices (issue 13).

``examples/cnn/multihost.py`` launches the workers on 127.0.0.1 with ``jax.distributed`` (gloo
CPU collectives); each process feeds only its half of every batch
(``jaxbn.parallel.shard_local_batch``) and the BN layers synchronize over all 4 devices. The
same trainer on one process with 4 devices is the reference: the same global batches, the same
mesh shape, so the losses must agree step by step up to float32 rounding of the cross-process
sums (a different summation order): each step's loss is a few sums of O(1) terms, and an error
carries into later steps through the parameters, so the bound is
``rtol = 64 * eps(float32) * steps`` (2.3e-5 at 3 steps).
"""

from __future__ import annotations

import numpy as np
import pytest

from examples.cnn import multihost

STEPS = 3
FLAGS = ["--config", "smoke", "--steps", str(STEPS), "--batch_size", "16", "--seed", "1"]


@pytest.mark.slow
def test_two_processes_equal_one_process():
  one = multihost.launch(1, 4, FLAGS, timeout=300)
  two = multihost.launch(2, 2, FLAGS, timeout=300)
  ref, ref_done = multihost.parse_losses(one[0].stdout)
  got, got_done = multihost.parse_losses(two[0].stdout)
  assert ref_done["processes"] == 1 and got_done["processes"] == 2
  assert ref_done["devices"] == got_done["devices"] == 4
  assert len(ref) == len(got) == STEPS
  assert np.all(np.isfinite(got))
  rtol = 64 * np.finfo(np.float32).eps * STEPS
  np.testing.assert_allclose(got, ref, rtol=rtol)
  assert got_done["test_accuracy"] == ref_done["test_accuracy"]
  assert not two[1].stdout.strip() or "loss" not in two[1].stdout  # only process 0 reports
