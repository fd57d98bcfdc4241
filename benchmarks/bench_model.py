"""Model-level benchmark: a ResNet train step with jaxbn's BatchNorm vs flax's.

The ResNet of ``tests/_resnet.py`` (conv + BN + ReLU blocks with residuals, the norm injected
with ``functools.partial``) is built with ``flax.linen.BatchNorm`` and with
``jaxbn.linen.BatchNorm`` (flax's defaults, so ``use_fast_variance=True`` on both sides), and
with ``jaxbn.linen.BatchNorm(use_fast_variance=False)`` (jaxbn's stable variance) as a third
row, and an identity in place of the norm as a fourth ("no norm"): the step time of a
model whose normalization costs nothing, which bounds what any BatchNorm can reach. For
float32 and bfloat16 (``dtype=`` of the model, as flax's examples), on one device and
on 8 simulated devices (``jax.shard_map`` over a batch-sharded input, statistics synchronized
with ``axis_name='batch'``), it reports:

* step time: a full SGD train step under ``jax.jit``, warm, interleaved (one step of every
  implementation per round); medians and the paired median ratio to flax;
* compile time: ``lower(...).compile()`` of the train step after ``jax.clear_caches()``
  (tracing, lowering and XLA compilation; interleaved, median);
* temporary memory: ``compiled.memory_analysis().temp_size_in_bytes``.

Equal work: every row is the same ResNet, optimizer, inputs and ``dtype`` (flax's ``dtype=``
of the model, float32 parameters), differing only in the norm layer (stated per row).

Results go to ``benchmarks/results/bench_model.json`` (``benchmarks/out/`` with ``--quick``);
an implementation that fails to build or compile is a row with its error.

It runs on whatever ``jax.devices()`` gives (``JAX_PLATFORMS`` picks): on a GPU the step table
also gives XLA's bytes accessed per step (``compiled.cost_analysis()``) over the step time as a
share of the card's datasheet HBM bandwidth (``_common.HBM_PEAK``). The 8-device rows need 8
devices (8 simulated CPU devices on a CPU machine); with fewer, only the 1-device rows run.

Usage::

    python benchmarks/bench_model.py                 # CIFAR-size ResNet-14, batch 128
    python benchmarks/bench_model.py --quick         # small smoke run
    python benchmarks/bench_model.py --hugepages both   # also rerun under glibc huge pages
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from typing import Any, Optional

import jax  # noqa: E402

# 8 simulated devices when JAX runs on the CPU (the data-parallel rows); on a GPU machine JAX
# runs on its GPU(s) and this setting only shapes the unused CPU backend.
try:
  jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError) as e:  # another jax, or a backend already started
  print(f"# bench_model: could not set 8 CPU devices ({e})", file=sys.stderr)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
import _common  # noqa: E402
import _results  # noqa: E402
import _resnet  # noqa: E402

import jaxbn.linen  # noqa: E402



class NoNorm(nn.Module):
  """Identity in place of BatchNorm: the step time a free BatchNorm would give (a bound)."""

  use_running_average: Any = None
  momentum: Any = None
  epsilon: Any = None
  dtype: Any = None
  axis_name: Any = None

  @nn.compact
  def __call__(self, x):
    self.variable("batch_stats", "unused", jnp.zeros, ())  # keeps the step's signature
    return x


IMPLS = {
    "flax": (nn.BatchNorm, {}),
    "jaxbn": (jaxbn.linen.BatchNorm, {}),
    "jaxbn stable var": (jaxbn.linen.BatchNorm, {"use_fast_variance": False}),
    "no norm (bound)": (NoNorm, {}),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_step(model, tx, devices):
  """The jitted train step ``(params, stats, opt_state, x, labels) -> (..., loss)``."""

  def local(params, stats, opt_state, x, labels):
    def loss_fn(p):
      loss, new = _resnet.linen_loss(model, p, stats, x, labels)
      return (loss if devices == 1 else lax.pmean(loss, "batch")), new
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  if devices == 1:
    return jax.jit(local)
  mesh = jax.make_mesh((devices,), ("batch",))
  return jax.jit(jax.shard_map(local, mesh=mesh,
                               in_specs=(P(), P(), P(), P("batch"), P("batch")),
                               out_specs=(P(), P(), P(), P())))


def make_inputs(args, devices, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3)), dtype)
  labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("batch",))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    labels = jax.device_put(labels, NamedSharding(mesh, P("batch")))
  return x, labels


def bench_config(args, dtype_name, devices):
  dtype = DTYPES[dtype_name]
  x, labels = make_inputs(args, devices, dtype)
  tx = optax.sgd(0.01, momentum=0.9)
  steps, state, compiled, temp, errors, accessed = {}, {}, {}, {}, {}, {}
  compile_s = {k: [] for k in IMPLS}
  for name, (bn, kw) in IMPLS.items():
    try:
      model = _resnet.ResNet(stage_sizes=tuple(args.stages), num_filters=args.filters,
                             batch_norm=bn, dtype=dtype,
                             axis_name="batch" if devices > 1 else None, norm_kwargs=kw)
      shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct(x.shape, x.dtype))
      variables = _resnet.fill(shapes)
      params, stats = variables["params"], variables["batch_stats"]
      state[name] = (params, stats, tx.init(params))
      steps[name] = make_step(model, tx, devices)
    except Exception as e:  # a failing implementation is a row with its error
      errors[name] = _results.error_text(e)
  for _ in range(args.compile_reps):  # interleaved compiles, fresh each time
    for name in list(steps):
      jax.clear_caches()
      t0 = time.perf_counter()
      try:
        c = steps[name].lower(*state[name], x, labels).compile()
      except Exception as e:
        errors[name] = _results.error_text(e)
        del steps[name]
        continue
      compile_s[name].append(time.perf_counter() - t0)
      compiled[name] = c
      temp[name] = c.memory_analysis().temp_size_in_bytes
      accessed[name] = bytes_accessed(c)
  fns = {name: functools.partial(compiled[name], *state[name], x, labels) for name in steps}
  times = _common.interleaved(fns, reps=args.reps, warmup=1 if args.quick else 2)
  rows = []
  base = "flax" if "flax" in fns else None
  peak = peak_bandwidth()
  for name in IMPLS:
    kw = IMPLS[name][1]
    if name in errors:
      rows.append([dtype_name, devices, name, str(kw) if kw else "", None, None, None, None,
                   None, None, None, None, None, None] + ([None] if peak else [])
                  + [errors[name]])
      continue
    med = _common.median(times[name])
    per_round = (_common.paired_ratios(times[name], times[base]) if base else None)
    gbs = accessed[name] / med / 1e9 if accessed.get(name) else None
    row = [
        dtype_name, devices, name, str(kw) if kw else "", 1e3 * med,
        _common.ratio_of_medians(times[name], times[base]) if base else None,
        _common.median(per_round) if per_round else None,
        "{:.2f}–{:.2f}".format(*_common.quartiles(per_round)) if per_round else None,
        _common.median(compile_s[name]),
        _common.paired_ratio(compile_s[name], compile_s[base]) if base else None,
        temp[name] / 2**20, temp[name] / max(temp[base], 1) if base else None,
        accessed.get(name, 0) / 2**20 if accessed.get(name) else None, gbs]
    if peak:
      row.append(100 * gbs * 1e9 / peak if gbs else None)
    rows.append(row + [""])
  return rows


def bytes_accessed(compiled) -> Optional[float]:
  """XLA's estimate of the bytes a compiled step reads and writes (``cost_analysis()``)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend reports it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  v = (cost or {}).get("bytes accessed")
  return float(v) if v else None


def peak_bandwidth() -> Optional[float]:
  dev = jax.devices()[0]
  return None if dev.platform == "cpu" else _common.hbm_peak(getattr(dev, "device_kind", ""))


COLUMNS = ["dtype", "devices", "BN", "options", "step ms", "step ms ÷ flax's",
           "per-round step ratio to flax (median)", "per-round q25–q75", "compile s",
           "compile / flax", "temp MiB", "temp / flax", "XLA bytes accessed MiB",
           "GB/s (XLA bytes)"]
FORMATS = [None, "d", None, None, ".1f", ".2f", ".2f", None, ".2f", ".2f", ".1f", ".2f", ".1f",
           ".1f"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--size", type=int, default=32, help="image height and width")
  p.add_argument("--filters", type=int, default=16)
  p.add_argument("--stages", type=int, nargs="+", default=[2, 2, 2])
  p.add_argument("--reps", type=int, default=20, help="timed rounds")
  p.add_argument("--compile-reps", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--devices", type=int, nargs="+", default=None,
                 help="default: 1 and 8 (8 only with --quick); 8 only where JAX has 8 devices")
  p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                 help="default: both (bfloat16 only with --quick)")
  p.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds: skip the configurations that would not finish by then")
  p.add_argument("--name", default="bench_model", help="result file stem")
  _results.add_output_args(p)
  p.add_argument("--hugepages", choices=["off", "both"], default="off",
                 help="'both': rerun in a child process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.size, args.filters, args.stages = 8, 4, 4, [1]
    args.reps = 2
  if args.compile_reps is None:
    args.compile_reps = 1 if args.quick else 3
  if args.dtypes is None:
    args.dtypes = ["bfloat16"] if args.quick else list(DTYPES)
  if args.devices is None:
    have = len(jax.devices())
    args.devices = ([8] if args.quick else [1, 8]) if have >= 8 else [1]

  command = _results.command_line()
  rows = []
  deadline = _common.Deadline(args.deadline)
  for dtype_name in args.dtypes:
    for devices in args.devices:
      if deadline.allows(f"{dtype_name} on {devices} device(s)"):
        started = time.perf_counter()
        rows += bench_config(args, dtype_name, devices)
        deadline.took(started)
  huge = "hugetlb" in os.environ.get("GLIBC_TUNABLES", "")
  dev = jax.devices()[0]
  peak = peak_bandwidth()
  columns, formats = COLUMNS + (["% of HBM peak"] if peak else []) + ["error"], \
      FORMATS + ([".0f"] if peak else []) + [None]
  peak_note = (f" `% of HBM peak`: XLA's bytes accessed per step ÷ step time ÷ "
               f"{peak / 1e12:.2f} TB/s, the datasheet bandwidth of {dev.device_kind} "
               "(`_common.HBM_PEAK`); XLA's count is an estimate from the compiled program "
               "(each fusion's operands and results), not a hardware counter." if peak else "")
  tables = [_results.table(
      f"ResNet train step{' (glibc huge pages)' if huge else ''}: "
      "jaxbn.linen.BatchNorm vs flax.linen.BatchNorm",
      columns, rows, formats=formats,
      platform=(f"{_results.platform_label('timing')} for step and compile times; "
                f"{_results.platform_label('compile').split(' (')[0]} memory_analysis() and "
                "cost_analysis() for temp and bytes accessed"),
      note=(f"ResNet stages={args.stages} filters={args.filters}, input "
            f"{args.batch}x{args.size}x{args.size}x3 NHWC, SGD+momentum; {args.reps} "
            f"interleaved rounds, {args.compile_reps} compiles each (< 1 is better). "
            "`step ms ÷ flax's` divides the two `step ms` medians; the per-round ratio is the "
            "median over rounds of t / t_flax from the same round (it cancels load changing "
            "between rounds) and its quartiles show the spread: the two agree on a quiet "
            "machine. 'no norm (bound)' is an identity in place of BN." + peak_note))]
  for t in tables:
    _results.print_table(t)
  name = args.name + ("_hugepages" if huge and not args.name.endswith("_hugepages") else "")
  _results.write_results(
      name, tables, command=command,
      title="ResNet train step: jaxbn vs flax (`bench_model.py`)"
            + (", glibc huge pages" if huge else "")
            + (f", {dev.platform.upper()} ({dev.device_kind})" if dev.platform != "cpu" else ""),
      notes=["Equal work: the same ResNet, optimizer, inputs and model `dtype` on every row "
             "(flax's `dtype=`, float32 parameters); only the norm layer differs. `jaxbn` keeps "
             "flax's defaults (use_fast_variance=True); `jaxbn stable var` uses jaxbn's "
             "stable variance."] + ([deadline.note()] if deadline.note() else []),
      out_dir=_results.output_dir(args))
  if args.hugepages == "both":
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    child = [a for a in (argv if argv is not None else sys.argv[1:])
             if a not in ("--hugepages", "both")]
    print("\n## The same under GLIBC_TUNABLES=glibc.malloc.hugetlb=1\n", flush=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), *child], env=env, check=True)


if __name__ == "__main__":
  main()
