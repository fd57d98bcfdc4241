"""Which batch-statistics algorithms XLA:TPU fuses into the producing convolution, and which are exact.

On XLA:TPU a reduction whose input is an elementwise function of a convolution's output and of
values known *before* the convolution (parameters, running statistics) becomes part of the
convolution's output fusion: the statistics cost no extra read of the activation. This is how
flax's ``E[x²] − E[x]²`` gets its speed. This script measures, for one convolution + batch
statistics + normalization step, each statistics algorithm on two axes at once:

* **fusion** (XLA:TPU compile estimate, not a measurement): whether the statistics are outputs
  of the convolution's fusion, the sum of XLA:TPU's ``estimated_cycles`` over the step's
  top-level instructions, and ``cost_analysis()`` bytes accessed;
* **exactness** (measured here on the CPU in float32 against float64 NumPy): the relative error
  of the variance for data ``1e4 + N(0, 1)`` (``|μ|/σ = 1e4``) with the running mean at 0 (the
  first step, or a jump of the data) and at the data (the common step).

Algorithms: ``raw`` (``Σx, Σx²``: flax's fast variance), ``about running mean`` (the same sums
about the running mean, an input: fusable), ``two-pass`` (mean, then ``Σ(x − μ)²``: flax's
stable variance), ``Welford`` (a variadic ``lax.reduce`` of ``(n, μ, M₂)`` with Chan's
combine, integer counts) and ``jaxbn`` (the library's statistics: sums about a shift sampled
from the batch itself). Exactness needs a shift near the data; a shift from the data needs the
convolution's output first, so it cannot be fused into the convolution that produces it.

Safety: as ``bench_accel.py --part tpu`` (libtpu reaches for no network). Usage::

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu unshare --net \\
        /path/to/venv-with-libtpu/bin/python benchmarks/bench_tpu_stats.py

Results: ``benchmarks/results/bench_tpu_stats.json``, rendered into RESULTS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_accel  # noqa: E402  (sets TPU_SKIP_MDS_QUERY / JAX_PLATFORMS defaults first)

import argparse  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import _results  # noqa: E402
from jaxbn._core import moments as _moments  # noqa: E402

F32 = jnp.float32
RED = (0, 1, 2)


def raw(y, k_run):
  del k_run
  m = jnp.mean(y.astype(F32), RED)
  return m, jnp.mean(jnp.square(y.astype(F32)), RED) - m * m


def about_running_mean(y, k_run):
  d = y.astype(F32) - k_run
  s1 = jnp.mean(d, RED)
  return k_run + s1, jnp.mean(d * d, RED) - s1 * s1


def two_pass(y, k_run):
  del k_run
  m = jnp.mean(y.astype(F32), RED)
  return m, jnp.mean(jnp.square(y.astype(F32) - m), RED)


def _chan(a, b):
  (na, ma, sa), (nb, mb, sb) = a, b
  n = na + nb
  d = mb - ma
  f = nb.astype(F32) / jnp.maximum(n, 1).astype(F32)
  return n, ma + d * f, sa + sb + d * d * na.astype(F32) * f


def welford(y, k_run):
  del k_run
  yf = lax.stop_gradient(y).astype(F32)
  n, m, m2 = lax.reduce((jnp.ones(y.shape, jnp.int32), yf, jnp.zeros_like(yf)),
                        (jnp.int32(0), F32(0), F32(0)), _chan, RED)
  return m, m2 / n.astype(F32)


def jaxbn_stats(y, k_run):
  _, m, v = _moments.batch_moments(y, None, _moments.Plan(red=RED), k_run)
  return m, v


ALGORITHMS = {"raw (flax fast)": raw, "about running mean": about_running_mean,
              "two-pass (flax stable)": two_pass, "Welford (variadic reduce)": welford,
              "jaxbn (sampled shift)": jaxbn_stats}


def cpu_error(stats, offset: float, start: float) -> float:
  """Max relative variance error, float32 on the CPU vs float64 NumPy, of (n, 8, 8, 16) data."""
  rng = np.random.default_rng(0)
  x = (offset + rng.normal(size=(16, 8, 8, 16))).astype(np.float32)
  _, v = jax.jit(stats)(jnp.asarray(x), jnp.full((16,), start, F32))  # the CPU backend
  ref = x.astype(np.float64).var(RED)
  return float(np.max(np.abs(np.asarray(v, np.float64) - ref) / ref))


def tpu_step(stats, mesh, shape, c):
  """conv 1x1 (bf16) -> statistics -> normalization, per-device statistics, forward."""
  def step(x, k, k_run, scale, bias):
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    m, v = stats(y, k_run)
    out = (y.astype(F32) - m) * lax.rsqrt(v + 1e-5) * scale + bias
    return out.astype(y.dtype), m, v
  rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sds = (jax.ShapeDtypeStruct((shape[0] * mesh.size,) + shape[1:], jnp.bfloat16, sharding=bat),
         jax.ShapeDtypeStruct((1, 1, shape[-1], c), jnp.bfloat16, sharding=rep),
         *(jax.ShapeDtypeStruct((c,), F32, sharding=rep) for _ in range(3)))
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"),) + (P(),) * 4,
                             out_specs=(P("data"), P("data"), P("data"))))
  return fn.lower(*sds).compile()


_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')


def fused_into_conv(text: str, c: int) -> bool:
  """Whether a fusion holding the convolution also outputs a per-feature f32[c] statistic."""
  bodies = {}
  for block in re.split(r"\n(?=\S)", text):
    head = block.split("\n", 1)[0]
    name = head.split(" ", 1)[0].lstrip("%")
    bodies[name] = block
  for line in text[text.index("ENTRY"):].splitlines():
    m = re.search(r"= \((.*?)\) fusion\(.*calls=%?([\w.\-]+)", line)
    if m and f"f32[{c}]" in m.group(1) and "convolution(" in bodies.get(m.group(2), ""):
      return True
  return False


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--shape", default="8,56,56,64", help="per-device conv input (NHWC)")
  p.add_argument("--features", type=int, default=256, help="conv output features")
  _results.add_output_args(p)
  args = p.parse_args(argv)
  bench_accel._check_tpu_safety()
  from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu)
  mesh = Mesh(np.array(topologies.get_topology_desc(args.topology, "tpu").devices), ("data",))
  shape = tuple(int(s) for s in args.shape.split(","))
  rows = []
  for name, fn in ALGORITHMS.items():
    errs = [cpu_error(fn, 1e4, start) for start in (0.0, 1e4)]
    try:
      comp = tpu_step(fn, mesh, shape, args.features)
      text = comp.as_text()
      entry = text[text.index("ENTRY"):]
      cycles = sum(int(m.group(1)) for m in _CYCLES.finditer(entry))
      cost = comp.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else (cost or {})
      rows.append([name, fused_into_conv(text, args.features), cycles / 1e3,
                   float(cost.get("bytes accessed", float("nan"))) / 1e6, *errs, ""])
    except Exception as e:  # noqa: BLE001 (a row with its error, not a missing row)
      rows.append([name, None, None, None, *errs, _results.error_text(e)])
    print(f"# {rows[-1]}", file=sys.stderr, flush=True)
  table = bench_accel._labelled(bench_accel.TPU_LABEL + "; exactness: CPU float32", _results.table(
      "Statistics algorithms: fused into the convolution on XLA:TPU, and exact?",
      ["algorithm", "a statistic fused into the conv", "est. kcycles", "MB accessed",
       "var rel. error, running mean 0", "var rel. error, running mean at data", "error"],
      rows, formats=[None, None, ".1f", ".1f", ".1e", ".1e", None],
      note=f"Step: conv 1x1 bf16 {shape} -> {args.features} features per device on "
           f"{args.topology} ({mesh.size} devices, per-device statistics), statistics, "
           f"normalization; forward. Cycles: sum of XLA:TPU's `estimated_cycles` of the "
           f"step's top-level instructions. Errors: float32 on the CPU, data 1e4 + N(0, 1), "
           f"(16, 8, 8, 16), max over features of |var - var64| / var64; the design contract "
           f"is 1e-4."))
  path = _results.write_results(
      "bench_tpu_stats", [table], command=_results.command_line(),
      title="Statistics algorithms: TPU fusion and exactness (`bench_tpu_stats.py`)",
      notes=["Fusion columns: **TPU compile estimate (XLA:TPU cost model, not a "
             "measurement)**, libtpu AOT on a CPU machine. Exactness columns: measured on the "
             "CPU in float32. An algorithm is exact here only with a shift near the data, and a "
             "shift taken from the data needs the convolution's output first."],
      out_dir=_results.output_dir(args))
  _results.print_table(table)
  print(f"# {path}", file=sys.stderr)


if __name__ == "__main__":
  main()
