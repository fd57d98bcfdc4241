"""One process of the multi-process sync-BN test (launched by tests/test_multihost.py).

Usage: python -m tests._multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process owns 4 CPU devices; together they form one 8-device mesh. The process loads only
its half of the batch (``shard_local_batch``), runs synced BN forward and backward with
uneven masks under ``jax.shard_map``, gathers the results and writes them to
``OUT_DIR/result_<id>.npz``. :func:`make_data` and :func:`sync_bn_step` are shared with the
launcher, which runs the same step in one process as the reference.
"""

from __future__ import annotations

import os
import sys

import numpy as np

F = 3
ROWS = 32
UNEVEN = (4, 1, 3, 0, 2, 4, 1, 2)  # valid rows on each of the 8 devices (4 rows each)
MOMENTUM = 0.9


def make_data():
  rng = np.random.default_rng(2417)
  x = (rng.normal(size=(ROWS, F)) * [1.0, 2.0, 0.5] + [1.0, -3.0, 10.0]
       + np.repeat(rng.normal(size=(8, 1)), 4, axis=0)).astype(np.float32)
  mask = np.concatenate([np.arange(4) < k for k in UNEVEN])[:, None]
  return dict(x=x, mask=mask, s=rng.uniform(0.5, 1.5, F).astype(np.float32),
              b=rng.normal(size=F).astype(np.float32),
              w=rng.normal(size=(ROWS, F)).astype(np.float32))


def sync_bn_step(mesh):
  """The jitted, shard_map'ed BN forward + backward over the mesh's 'data' axis."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jaxbn

  def local(x, mask, s, b, w):
    def loss(x, s, b):
      y, new = jaxbn.batch_norm(x, jaxbn.init_stats(F), s, b, training=True,
                                momentum=MOMENTUM, axis_name="data", mask=mask)
      return jnp.sum(y * w), (y, new)
    (_, (y, new)), (gx, gs, gb) = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                     has_aux=True)(x, s, b)
    return y, new.mean, new.var, gx, gs, gb

  d = P("data")
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(d, d, P(), P(), d),
                               out_specs=(d, P(), P(), d, P(), P())))


LOOPBACK = "127.0.0.1"
_BOUND = []  # the address our gloo factory bound, once the CPU backend was created with it


def bind_gloo_to_loopback() -> None:
  """Makes the CPU backend's gloo collectives bind 127.0.0.1, whatever the hostname resolves to.

  By default gloo binds the address of ``gethostname()``; in most containers that is not a
  loopback address, and only loopback traffic is allowed on the test machines. jaxlib's
  ``make_gloo_tcp_collectives`` takes a ``hostname``; JAX passes none, so this re-registers the
  CPU backend factory with it (after ``jax.distributed.initialize``, before any backend
  starts). It uses JAX internals on purpose: if they change, the test fails loudly here
  instead of skipping.
  """
  from jax._src import distributed, xla_bridge
  from jax._src.lib import _jax

  def factory():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client, hostname=LOOPBACK)
    _BOUND.append(LOOPBACK)
    return xla_bridge.make_cpu_client(collectives=collectives)

  xla_bridge.register_backend_factory("cpu", factory, priority=0, fail_quietly=False)


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(coordinator_address=f"{LOOPBACK}:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  bind_gloo_to_loopback()
  try:
    from jax.experimental import multihost_utils

    from jaxbn import parallel, testing

    mesh = parallel.data_mesh()
    d = make_data()
    rows = ROWS // num_processes
    mine = slice(process_id * rows, (process_id + 1) * rows)
    # This process loads only its rows of x, mask and w; s and b are replicated.
    x, mask, w = parallel.shard_local_batch((d["x"][mine], d["mask"][mine], d["w"][mine]),
                                            mesh)
    step = sync_bn_step(mesh)
    compiled = step.lower(x, mask, d["s"], d["b"], w).compile()
    y, mean, var, gx, gs, gb = compiled(x, mask, d["s"], d["b"], w)
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    np.savez(os.path.join(out_dir, f"result_{process_id}.npz"),
             x=gather(x), y=gather(y), gx=gather(gx),
             mean=np.asarray(mean.addressable_data(0)), var=np.asarray(var.addressable_data(0)),
             gs=np.asarray(gs.addressable_data(0)), gb=np.asarray(gb.addressable_data(0)),
             # Outside any conditional branch (jaxbn's statistics have none).
             all_reduces=testing.collective_counts(compiled, operands=True,
                                                    conditional=False).get("all-reduce", 0),
             devices=jax.device_count(), local_devices=jax.local_device_count(),
             gloo_bound=_BOUND[0] if _BOUND else "")
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
