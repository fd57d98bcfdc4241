"""Synced BN on a ``jax.distributed`` multi-process mesh: 2 processes x 4 CPU devices.

Launches ``tests/_multihost_worker.py`` twice on 127.0.0.1 (gloo CPU collectives bound to the
loopback address by the worker itself, whatever the hostname resolves to), with a timeout that
kills both workers, and checks their results against the same step run in this single process
on 8 devices and against the float64 global-batch reference. It never skips: where loopback
TCP does not work the launch fails with the workers' logs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxbn import parallel
from tests import _multihost_worker as worker
from tests import _reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((worker.LOOPBACK, 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, num_processes=2):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  procs, logs = [], []
  try:
    for i in range(num_processes):
      log = open(tmp_path / f"worker_{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tests._multihost_worker", str(i), str(num_processes),
           str(port), str(tmp_path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read()[-3000:])
    log.close()
  codes = [p.returncode for p in procs]
  if any(c != 0 for c in codes):
    pytest.fail(f"multi-process workers exited with {codes} (timeout {TIMEOUT_S} s):\n"
                + "\n".join(f"--- worker {i} ---\n{o}" for i, o in enumerate(outputs)))
  return [dict(np.load(tmp_path / f"result_{i}.npz")) for i in range(num_processes)]


@pytest.mark.slow
def test_two_processes_four_devices_each_equal_single_process_and_float64(tmp_path):
  results = _run_workers(tmp_path)
  d = worker.make_data()

  # The same step in this one process on its 8 devices.
  mesh = parallel.data_mesh()
  x, mask, w = parallel.shard_batch((d["x"], d["mask"], d["w"]), mesh)
  y1, mean1, var1, gx1, gs1, gb1 = jax.tree.map(
      np.asarray, worker.sync_bn_step(mesh)(x, mask, d["s"], d["b"], w))

  y_ref, (_, mean_ref, var_ref) = ref.batch_norm(d["x"], d["s"], d["b"], mask=d["mask"])
  dx_ref, ds_ref, db_ref = ref.grads(d["x"], d["s"], d["b"], d["w"], mask=d["mask"])
  for r in results:
    assert int(r["devices"]) == 8 and int(r["local_devices"]) == 4
    assert str(r["gloo_bound"]) == worker.LOOPBACK  # our loopback gloo made the CPU backend
    # Each process loaded its half; together they are the global batch, in order.
    np.testing.assert_array_equal(r["x"], d["x"])
    # Two all-reduces forward (the common shift, the moments) and one backward, also across
    # processes.
    assert int(r["all_reduces"]) == 3
    # Two processes vs one: the same float32 program, different collective implementations
    # (gloo vs in-process) may sum in another order: the float32 bounds (tests/README.md).
    x64 = np.asarray(d["x"], np.float64)
    c_y = ref.bn_output_cond(x64, np.float32, mask=d["mask"])
    c_mean = ref.stats_cond(x64, mask=d["mask"])
    c_var = ref.stats_cond(x64, order=2, mask=d["mask"])
    raw = d["s"] / np.sqrt(var_ref.ravel() + 1e-5) * d["w"]  # un-cancelled scale of dx
    dx_scale = float(np.sqrt(np.mean(raw ** 2)))
    for got, single, cond, what in ((r["y"], y1, c_y, "y"), (r["mean"], mean1, c_mean, "mean"),
                                    (r["var"], var1, c_var, "var"), (r["gx"], gx1, c_var, "dx"),
                                    (r["gs"], gs1, c_var, "dscale"),
                                    (r["gb"], gb1, c_var, "dbias")):
      ref.assert_close(got, single, np.float32, cond=cond, k=8, what=f"{what} vs 1 process",
                       scale=dx_scale if what == "dx" else None)
    valid = np.broadcast_to(d["mask"], d["x"].shape)
    ref.assert_close(r["y"], y_ref, np.float32, cond=c_y, where=valid, what="y")
    ref.assert_close(r["mean"], (1 - worker.MOMENTUM) * mean_ref.ravel(), np.float32,
                     cond=c_mean, what="running mean")
    ref.assert_close(r["var"], ref.ema(1.0, var_ref.ravel(), worker.MOMENTUM), np.float32,
                     cond=c_var, what="running var")
    ref.assert_close(r["gx"], dx_ref, np.float32, cond=c_var, scale=dx_scale, what="dx")
    ref.assert_close(r["gs"], ds_ref, np.float32, cond=c_var, what="dscale")
    ref.assert_close(r["gb"], db_ref, np.float32, cond=c_var, what="dbias")
