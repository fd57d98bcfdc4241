"""The CNN trainer on several processes (hosts) with synchronized BN across all of them.

On one machine, the launcher starts ``--processes N`` worker processes with ``--local_devices
M`` simulated CPU devices each; they join with ``jax.distributed`` on 127.0.0.1 and form one
mesh of N x M devices::

  python -m examples.cnn.multihost --processes 2 --local_devices 4 -- --config digits_ci

(everything after ``--`` is trainer flags, as for ``python -m examples.cnn.main``). Every
process computes the same global batch order from the seed and loads only its own rows of each
batch (``jaxbn.parallel.shard_local_batch``); the BN layers synchronize their statistics over
the mesh's ``data`` axis, which spans all processes (``--parallel shard_map``); gradients are
summed over all devices. Process 0 prints the per-step losses as JSON lines (``step``,
``loss``) and the final test accuracy.

On a real cluster, run one worker per host yourself (no launcher)::

  python -m examples.cnn.multihost --worker --coordinator HOST0:PORT \\
      --num_processes N --process_id I -- --config digits_ci

with the same flags everywhere except ``--process_id`` (0 … N-1), ``HOST0`` the address of
process 0's host and ``PORT`` a free port there; drop ``--local_devices`` to use the hosts' real
accelerators. (On Cloud TPU, or under SLURM/Open MPI, ``jax.distributed.initialize()`` finds
these values itself: pass ``--coordinator auto``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python examples/cnn/multihost.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cnn import main as main_lib  # noqa: E402  (no JAX import yet)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m examples.cnn.multihost",
      description="Train the CNN example on several processes with synchronized BN; trainer "
                  "flags go after `--`.")
  p.add_argument("--processes", type=int, default=2,
                 help="launcher: number of worker processes to start on this machine "
                      "(default: 2)")
  p.add_argument("--local_devices", type=int, default=None,
                 help="simulated CPU devices per process (default: 4 with the launcher; a "
                      "worker without it uses its real devices)")
  p.add_argument("--timeout", type=float, default=600,
                 help="launcher: kill all workers after this many seconds (default: 600)")
  p.add_argument("--worker", action="store_true",
                 help="run as one worker (what the launcher starts; on a cluster, run this on "
                      "every host)")
  p.add_argument("--coordinator", default=None,
                 help="worker: address:port of process 0's coordinator, or `auto`")
  p.add_argument("--num_processes", type=int, default=None, help="worker: number of processes")
  p.add_argument("--process_id", type=int, default=None, help="worker: this process's index")
  p.add_argument("trainer_flags", nargs="*",
                 help="flags of python -m examples.cnn.main (after `--`)")
  return p


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> int:
  """One process: join the cluster, train with synced BN, print losses (process 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  if args.local_devices:
    jax.config.update("jax_platforms", "cpu")
    main_lib.set_cpu_devices(args.local_devices)
  if args.coordinator == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  try:
    return _train(args)
  finally:
    jax.distributed.shutdown()


def _train(args: argparse.Namespace) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxbn.parallel  # pylint: disable=import-outside-toplevel

  from examples.cnn import data as data_lib  # pylint: disable=import-outside-toplevel
  from examples.cnn import train  # pylint: disable=import-outside-toplevel

  config = main_lib.parse_config(args.trainer_flags).replace(
      devices=jax.device_count(), parallel="shard_map", sync_bn=True)
  train.check_config(config)
  n_proc, me = jax.process_count(), jax.process_index()
  if config.batch_size % n_proc:
    raise configs_error(f"--batch_size {config.batch_size} must be a multiple of the "
                        f"{n_proc} processes")
  ds = train.load_data(config)
  per_epoch = train.steps_per_epoch(config, ds)
  total = train.total_steps(config, per_epoch)
  runner = train.make_runner("shard_map", jax.devices(), train.renorm_args(config, total),
                             api=config.api)
  mesh = jaxbn.parallel.data_mesh(train.AXIS, devices=jax.devices())
  rows = config.batch_size // n_proc  # this process's rows of every global batch

  def put_local(batch: data_lib.Batch):
    local = jax.tree.map(lambda a: a[me * rows:(me + 1) * rows], batch)
    return jaxbn.parallel.shard_local_batch(local, mesh)

  runner = dataclasses.replace(runner, put_batch=put_local)
  _, state = train.init_state(config, ds, total)
  state = runner.put_state(state)
  step, epoch, t0 = 0, 0, time.time()
  while step < total:
    epoch += 1
    for batch in train.epoch_batches(config, ds, epoch):
      if step == total:
        break
      state, sums = runner.train(state, runner.put_batch(batch))
      step += 1
      if me == 0:
        loss = float(sums["loss"]) / max(float(sums["count"]), 1.0)
        print(json.dumps({"step": step, "loss": loss}), flush=True)
  test = train.evaluate(runner, state, ds.x_test, ds.y_test, config.batch_size)
  if me == 0:
    print(json.dumps({"done": True, "processes": n_proc, "devices": jax.device_count(),
                      "steps": step, "test_accuracy": test["accuracy"],
                      "seconds": round(time.time() - t0, 2)}), flush=True)
  return 0


def configs_error(message: str) -> Exception:
  from examples.cnn.configs import UsageError  # pylint: disable=import-outside-toplevel
  return UsageError(message)


# ----------------------------------------------------------------------------- launcher


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (bind to port 0, read it back)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, local_devices: int, trainer_flags: Sequence[str], *,
           timeout: float = 600, env: Optional[dict[str, str]] = None
           ) -> list[subprocess.CompletedProcess]:
  """Starts the workers on 127.0.0.1, waits for all, kills all on timeout or first failure.

  Returns:
    One ``CompletedProcess`` per worker (stdout/stderr as text), in process order.

  Raises:
    RuntimeError: a worker failed or the run timed out (with the workers' stderr tails).
  """
  port = free_port()
  env = dict(os.environ if env is None else env)
  env.pop("JAX_NUM_CPU_DEVICES", None)  # the worker sets its own device count
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  procs = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "examples.cnn.multihost", "--worker",
           "--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
           "--process_id", str(i), "--local_devices", str(local_devices), "--",
           *trainer_flags]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=_ROOT))
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for i, p in enumerate(procs):
    out, err = p.communicate()
    results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  failed = [i for i, r in enumerate(results) if r.returncode != 0]
  if failed:
    tails = "\n".join(f"--- process {i} (exit {results[i].returncode}):\n"
                      f"{results[i].stderr[-3000:]}" for i in failed)
    raise RuntimeError(f"multihost: worker(s) {failed} failed or timed out after "
                       f"{timeout:.0f} s\n{tails}")
  return results


def parse_losses(stdout: str) -> tuple[list[float], dict]:
  """Process 0's per-step losses and its final record."""
  losses, done = [], {}
  for line in stdout.splitlines():
    if line.startswith("{"):
      rec = json.loads(line)
      if "loss" in rec:
        losses.append(rec["loss"])
      if rec.get("done"):
        done = rec
  return losses, done


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.worker:
    if args.coordinator is None or (args.coordinator != "auto" and (
        args.num_processes is None or args.process_id is None)):
      parser.error("--worker needs --coordinator HOST:PORT, --num_processes and --process_id "
                   "(or --coordinator auto)")
    return worker(args)
  if args.processes < 1:
    parser.error(f"--processes must be >= 1, got {args.processes}")
  results = launch(args.processes, args.local_devices or 4, args.trainer_flags,
                   timeout=args.timeout)
  sys.stdout.write(results[0].stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
