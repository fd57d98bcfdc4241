"""Collective bytes per BN call vs the number of devices, and a ResNet-50 pod-scale model.

Part 1 (measured): one BN layer's train step (forward + backward, float32) under
``jax.shard_map`` is compiled — not run — on 8, 64 and 256 simulated CPU devices (a fresh
process per count) for jaxbn (both variance modes) and ``flax.linen.BatchNorm(axis_name=)``;
the all-reduced bytes per device are read from the compiled HLO with
``jaxbn.testing.collective_bytes`` (the path every call takes, and, separately, anything
inside a conditional branch: jaxbn has none since its statistics need no guard).

Part 2 (model): ResNet-50's 53 BN layers (26,560 channels) — the per-layer bytes measured in
part 1 for each channel count of the network — summed per train step, and turned into time
for 8 … 4096 devices with the textbook cost of an all-reduce of ``B`` bytes over ``P``
devices: ``T = 2·log2(P)·α + 2·B/β`` (a latency-optimal tree/recursive-doubling schedule for
small messages; ring would be ``2(P−1)α + 2(P−1)/P·B/β``). The figures (stated assumptions,
not measurements): a GPU cluster with InfiniBand NDR, ``α = 5 µs`` per step and ``β = 50 GB/s``
per GPU (400 Gb/s links; NCCL's small-message latency is several µs per hop); a TPU pod on its
ICI torus, ``α = 1 µs`` and ``β = 100 GB/s`` per chip (order of one ICI link). Each BN call is
``calls`` separate all-reduces (the count measured in part 1) unless XLA combines them.

Usage::

    python benchmarks/bench_collectives.py            # 8/64/256 devices, ResNet-50 channels
    python benchmarks/bench_collectives.py --quick    # 8/64 devices, C = 256 only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

import _results

RESNET50_CHANNELS = (
    [64]  # stem
    + [64, 64, 256] * 3 + [256]      # stage 1: 3 bottlenecks + projection shortcut
    + [128, 128, 512] * 4 + [512]
    + [256, 256, 1024] * 6 + [1024]
    + [512, 512, 2048] * 3 + [2048])

_WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import flax.linen as nn
    import jaxbn
    from jaxbn import testing
    channels = [int(c) for c in sys.argv[1].split(",")]
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    b = P("data")
    n = 2 * len(jax.devices())
    sds = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                   sharding=NamedSharding(mesh, spec))
    def impls(C):
      stats = jaxbn.init_stats(C)
      def jaxbn_bn(fast):
        return lambda x, s, bb: jaxbn.batch_norm(x, stats, s, bb, training=True,
                                                 axis_name="data", use_fast_variance=fast)[0]
      layer = nn.BatchNorm(use_running_average=False, axis_name="data")
      def flax_bn(x, s, bb):
        v = {"params": {"scale": s, "bias": bb},
             "batch_stats": {"mean": stats.mean, "var": stats.var}}
        return layer.apply(v, x, mutable=["batch_stats"])[0]
      return {"jaxbn_stable": jaxbn_bn(False), "jaxbn_fast": jaxbn_bn(True), "flax": flax_bn}
    out = {}
    for C in channels:
      for name, f in impls(C).items():
        def step(x, s, bb, w, f=f):
          return jax.grad(lambda x, s, bb: jnp.sum(f(x, s, bb) * w), argnums=(0, 1, 2))(x, s, bb)
        g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(b, P(), P(), b),
                                  out_specs=(b, P(), P())))
        c = g.lower(sds((n, C), b), sds((C,), P()), sds((C,), P()), sds((n, C), b)).compile()
        out[f"{name}/{C}"] = {
            "bytes": testing.collective_bytes(c, conditional=False).get("all-reduce", 0),
            "calls": testing.collective_counts(c, conditional=False).get("all-reduce", 0),
            "branch_bytes": testing.collective_bytes(c, conditional=True).get("all-reduce", 0),
            "other": {k: v for k, v in testing.collective_counts(c).items()
                      if k != "all-reduce"}}
    print(json.dumps(out))
""")

IMPLS = ("jaxbn_stable", "jaxbn_fast", "flax")
CLUSTERS = {"GPU cluster (IB NDR)": (5e-6, 50e9), "TPU pod (ICI)": (1e-6, 100e9)}


def measure(devices, channels):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _WORKER, ",".join(map(str, channels))],
                       env=env, capture_output=True, text=True, timeout=1800)
  if res.returncode != 0:
    raise RuntimeError(res.stderr[-2000:])
  return json.loads(res.stdout.strip().splitlines()[-1])


def allreduce_time(nbytes, calls, devices, alpha, beta):
  """Seconds for ``calls`` all-reduces totalling ``nbytes`` over ``devices`` (tree model)."""
  if devices <= 1:
    return 0.0
  return calls * 2 * math.log2(devices) * alpha + 2 * nbytes / beta


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="8 and 64 devices, C = 256 only")
  _results.add_output_args(parser)
  args = parser.parse_args()
  device_counts = (8, 64) if args.quick else (8, 64, 256)
  channels = [256] if args.quick else sorted(set(RESNET50_CHANNELS))
  per = {d: measure(d, channels) for d in device_counts}

  rows = []
  for C in channels:
    for impl in IMPLS:
      cells = [per[d][f"{impl}/{C}"] for d in device_counts]
      rows.append([impl, C, cells[0]["calls"]] + [c["bytes"] for c in cells]
                  + [cells[0]["branch_bytes"], bool(len({c["bytes"] for c in cells}) == 1)])
  t1 = _results.table(
      "All-reduced bytes per device, one BN layer's forward + backward (compiled HLO)",
      ["implementation", "C", "all-reduces"] + [f"bytes at {d} devices" for d in device_counts]
      + ["bytes in the correction branch", "independent of devices"], rows,
      platform=(f"{_results.platform_label('hlo')}: compiled, not run, for "
                f"{', '.join(map(str, device_counts))} simulated CPU devices"),
      note="float32; 'bytes in the correction branch': all-reduces inside a conditional "
           "branch (0: jaxbn's exact statistics take two forward rounds, the common shift and "
           "the moments, and no conditional).")

  # ResNet-50: sum the measured per-layer bytes (they do not depend on the device count).
  tables = [t1]
  if not args.quick:
    d0 = device_counts[-1]
    step = {impl: (sum(per[d0][f"{impl}/{C}"]["bytes"] for C in RESNET50_CHANNELS),
                   sum(per[d0][f"{impl}/{C}"]["calls"] for C in RESNET50_CHANNELS))
            for impl in IMPLS}
    rows = []
    for P in (8, 64, 256, 1024, 4096):
      row = [P]
      for impl in IMPLS:
        nbytes, calls = step[impl]
        row.append(nbytes)
        for alpha, beta in CLUSTERS.values():
          row.append(1e3 * allreduce_time(nbytes, calls, P, alpha, beta))
      rows.append(row)
    cols = ["devices"]
    fmts = [None]
    for impl in IMPLS:
      cols.append(f"{impl} bytes/step")
      fmts.append(",d")
      for cl in CLUSTERS:
        cols.append(f"{impl} ms, {cl}")
        fmts.append(".2f")
    tables.append(_results.table(
        "ResNet-50 (53 BN layers, 26,560 channels): BN all-reduce per train step, modelled",
        cols, rows, formats=fmts,
        platform=("Model estimate: bytes from the XLA:CPU compiled-HLO counts above, time "
                  "from an assumed latency/bandwidth model of GPU and TPU networks; nothing "
                  "ran on a GPU or TPU"),
        note="bytes: sum of the per-layer HLO measurements above (measured at "
             f"{d0} devices; constant in the device count). Time: T = 2·log2(P)·α per "
             "all-reduce + 2·B/β; GPU α = 5 µs, β = 50 GB/s; TPU α = 1 µs, β = 100 GB/s "
             "(assumed, see the script's docstring). Latency dominates: per-call count "
             "matters more than bytes at these sizes."))
  path = _results.write_results(
      "bench_collectives", tables, command=_results.command_line(),
      title="Collectives per BN call vs device count, and at pod scale (`bench_collectives.py`)",
      notes=["Compile-only on simulated CPU devices; no timing is measured."],
      out_dir=_results.output_dir(args))
  for t in tables:
    _results.print_table(t)
  return path


if __name__ == "__main__":
  main()
