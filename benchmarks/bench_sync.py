"""Synchronized BN benchmark: synced vs unsynced conv+BN train steps, jaxbn vs flax.

On 8 simulated CPU devices, a data-parallel train step (a stack of 3x3 conv + BN + ReLU
layers, squared loss, SGD) runs under ``jax.jit(jax.shard_map(...))`` in four variants —
jaxbn and ``flax.linen.BatchNorm``, each with statistics synchronized over the 8 devices
(``axis_name='data'``) and without — at a small and a large shape. Timings are warm and
interleaved (one call of every variant per round); the table gives medians and paired ratios
from the same rounds. The run also counts, in the compiled HLO, the all-reduces of a BN-only
function (forward, and forward+backward) for both libraries, and prints flax's and jaxbn's
results on the flax #2417 masked counter-example.

Equal work: both libraries run the same model, inputs, momentum (0.9) and epsilon (1e-5) in
float32 under the same ``shard_map``; each uses its default variance algorithm.

Usage::

    python benchmarks/bench_sync.py            # small and large shapes, 30 rounds
    python benchmarks/bench_sync.py --quick    # smoke run: tiny shape, 2 rounds

Results go to ``benchmarks/results/bench_sync.json`` (``benchmarks/out/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _results  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn import parallel, testing  # noqa: E402

MOMENTUM, EPS, LR = 0.9, 1e-5, 0.01
# name: (global batch, height = width, channels, conv+BN layers)
SHAPES = {"small": (32, 16, 16, 3), "large": (128, 32, 64, 3)}
QUICK_SHAPES = {"tiny": (16, 4, 8, 1)}


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jaxbn_norm(axis_name):
  def norm(h, stats, scale, bias):
    return jaxbn.batch_norm(h, stats, scale, bias, training=True, momentum=MOMENTUM,
                            epsilon=EPS, axis_name=axis_name)
  return norm


def flax_norm(axis_name):
  import flax.linen as nn
  mod = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS,
                     axis_name=axis_name)

  def norm(h, stats, scale, bias):
    y, upd = mod.apply({"params": {"scale": scale, "bias": bias},
                        "batch_stats": {"mean": stats.mean, "var": stats.var}}, h,
                       mutable=["batch_stats"])
    new = upd["batch_stats"]
    return y, jaxbn.BatchStats(new["mean"], new["var"], stats.count + 1)
  return norm


def make_step(norm, synced):
  """Per-device train step: conv+BN+ReLU stack, squared loss on the global mean, SGD."""
  axis = "data"

  def step(params, stats, x, t):
    n = lax.psum(x.shape[0], axis)

    def loss_fn(params):
      h, new_stats = x, []
      for p, s in zip(params, stats):
        h, s = norm(conv(h, p["w"]), s, p["scale"], p["bias"])
        h = jax.nn.relu(h)
        new_stats.append(s)
      return jnp.sum((h.mean(-1) - t) ** 2) / n, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LR * g, params, grads)  # grads: summed (shard_map)
    if not synced:  # per-device statistics leave shard_map stacked over devices
      new_stats = jax.tree.map(lambda a: a[None], new_stats)
    return params, new_stats, lax.psum(loss, axis)

  return step


def build(shape, norm_factory, synced, mesh):
  b, hw, c, layers = shape
  rng = np.random.default_rng(0)
  params, cin = [], 3
  for _ in range(layers):
    params.append({"w": jnp.asarray(rng.normal(size=(3, 3, cin, c)) / np.sqrt(9 * cin),
                                    jnp.float32),
                   "scale": jnp.ones(c), "bias": jnp.zeros(c)})
    cin = c
  stats = [jaxbn.init_stats(c) for _ in range(layers)]
  x = rng.normal(size=(b, hw, hw, 3)).astype(np.float32)
  t = rng.normal(size=(b, hw, hw)).astype(np.float32)
  x, t = parallel.shard_batch((x, t), mesh)
  step = make_step(norm_factory("data" if synced else None), synced)
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                            out_specs=(P(), P() if synced else P("data"), P())))
  args = (params, stats, x, t)
  compiled = f.lower(*args).compile()
  return (lambda: compiled(*args)), compiled


def bn_only_counts(norm_factory, mesh):
  """All-reduces of one synced BN call: forward, and forward+backward (lowered, compiled)."""
  c = 8
  norm = norm_factory("data")
  stats = jaxbn.init_stats(c)

  def fwd(x, s, b):
    return norm(x, stats, s, b)[0]

  def fwd_bwd(x, s, b, w):
    return jax.grad(lambda x, s, b: jnp.sum(fwd(x, s, b) * w), argnums=(0, 1, 2))(x, s, b)

  sh = jax.NamedSharding(mesh, P("data"))
  rep = jax.NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((16, 4, 4, c), jnp.float32, sharding=sh)
  v = jax.ShapeDtypeStruct((c,), jnp.float32, sharding=rep)
  out = {}
  for name, fn, args, outs in (("forward", fwd, (x, v, v), P("data")),
                               ("forward+backward", fwd_bwd, (x, v, v, x),
                                (P("data"), P(), P()))):
    in_specs = tuple(P("data") if a is x else P() for a in args)
    lowered = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                                    out_specs=outs)).lower(*args)
    compiled = lowered.compile()
    count = lambda p, **kw: testing.collective_counts(p, **kw).get("all-reduce", 0)  # noqa
    # Every call (outside lax.cond branches) and only in a branch (a rarely taken fallback).
    out[name] = (count(lowered, conditional=False), count(compiled, conditional=False),
                 count(compiled, operands=True, conditional=False),
                 count(compiled, conditional=True))
  return out


def counter_example():
  """flax #2417: device 0 holds valid (2, 2, 2), device 1 holds valid (10,)."""
  import flax.linen as nn
  x = np.array([2, 2, 2, -7, 10, 99, 99, 99], np.float32)[:, None]
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)[:, None]
  mesh = parallel.data_mesh(devices=jax.devices()[:2])
  xs, ms = parallel.shard_batch((x, mask), mesh)
  mod = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="data")

  def flax_mean(x, m):
    _, upd = mod.apply({"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
                        "batch_stats": {"mean": jnp.zeros(1), "var": jnp.ones(1)}}, x,
                       mask=m, mutable=["batch_stats"])
    return upd["batch_stats"]["mean"]

  def jaxbn_mean(x, m):
    return jaxbn.batch_norm(x, jaxbn.init_stats(1), training=True, momentum=0.0,
                            axis_name="data", mask=m)[1].mean

  res = {}
  for name, fn in (("flax", flax_mean), ("jaxbn", jaxbn_mean)):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P(),
                              check_vma=False))
    res[name] = float(np.asarray(f(xs, ms))[0])
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny shape only, 2 rounds")
  ap.add_argument("--reps", type=int, default=30)
  _results.add_output_args(ap)
  args = ap.parse_args()
  command = _results.command_line()
  reps = 2 if args.quick else args.reps
  shapes = QUICK_SHAPES if args.quick else SHAPES
  mesh = parallel.data_mesh()

  rows = []
  for sname, shape in shapes.items():
    fns, counts, errors = {}, {}, {}
    for lib, factory in (("jaxbn", jaxbn_norm), ("flax", flax_norm)):
      for synced in (True, False):
        key = f"{lib} {'synced' if synced else 'unsynced'}"
        try:
          fns[key], compiled = build(shape, factory, synced, mesh)
        except Exception as e:  # a failing variant is a row with its error
          errors[key] = _results.error_text(e)
          continue
        counts[key] = tuple(testing.collective_counts(
            compiled, operands=arrays, conditional=False).get("all-reduce", 0)
                            for arrays in (False, True))
    times = _common.interleaved(fns, reps=reps, warmup=1 if args.quick else 2)
    for key in fns:
      lib, mode = key.split()
      other = "unsynced" if mode == "synced" else "synced"
      ref = times.get(f"flax {mode}")
      vs_flax = _common.paired_ratio(times[key], ref) if ref else None
      vs_flax_medians = _common.ratio_of_medians(times[key], ref) if ref else None
      sync_ratio = (_common.paired_ratio(times[key], times[f"{lib} {other}"])
                    if mode == "synced" and f"{lib} {other}" in times else None)
      rows.append([f"{sname} {shape}", key, _common.median(times[key]) * 1e3, vs_flax_medians,
                   vs_flax, sync_ratio, counts[key][0], counts[key][1], ""])
    for key, err in errors.items():
      rows.append([f"{sname} {shape}", key, None, None, None, None, None, None, err])
  tables = [_results.table(
      f"Train step (3x3 conv + BN + ReLU) x layers, jit(shard_map), "
      f"{jax.device_count()} devices ({reps} rounds)",
      ["shape (global N, H=W, C, layers)", "variant", "median ms/step",
       "ms/step ÷ flax's (same sync)", "per-round ratio to flax, same sync (median)",
       "synced / unsynced (per-round median)", "all-reduce ops, every call",
       "all-reduce arrays, every call", "error"], rows,
      formats=[None, None, ".2f", ".3f", ".3f", ".3f", "d", "d", None],
      platform=(f"{_results.platform_label('timing')}, {jax.device_count()} simulated "
                "devices sharing its cores; all-reduces: XLA:CPU compiled-HLO count"),
      note="`ms/step ÷ flax's` divides the two `median ms/step` cells; the per-round ratios "
           "are medians over rounds of ratios timed in the same round (they cancel load that "
           "changes between rounds): on a quiet machine the two agree. "
           "All-reduces counted in the compiled HLO of the whole train step "
           "(`jaxbn.testing.collective_counts`), outside `lax.cond` branches; the step's "
           "loss psum and XLA's combining of independent all-reduces are included.")]

  count_rows = []
  for lib, factory in (("jaxbn", jaxbn_norm), ("flax", flax_norm)):
    try:
      for name, (lo, ops, arrays, branch) in bn_only_counts(factory, mesh).items():
        count_rows.append([lib, name, lo, ops, arrays, branch, ""])
    except Exception as e:
      count_rows.append([lib, "forward, forward+backward", None, None, None, None,
                         _results.error_text(e)])
  tables.append(_results.table(
      f"All-reduces of one synced BN call (BN-only function, {jax.device_count()} devices)",
      ["library", "pass", "lowered, every call", "compiled ops, every call",
       "compiled arrays, every call", "compiled ops in a lax.cond branch", "error"],
      count_rows, formats=[None, None, "d", "d", "d", "d", None],
      platform=f"{_results.platform_label('hlo')}, {jax.device_count()} simulated devices",
      note="'Every call': outside any `lax.cond` branch; 'in a lax.cond branch': inside one "
           "(jaxbn has none: its exact statistics use two forward all-reduces, the common "
           "shift and the moments, and no conditional). Counted by "
           "`jaxbn.testing.collective_counts`; "
           "`tests/test_oracle_collectives.py` checks that counter against two independent "
           "parsers."))

  try:
    res = counter_example()
    ce_rows = [[name, 4.0, value, ""] for name, value in res.items()]
  except Exception as e:
    ce_rows = [["flax, jaxbn", 4.0, None, _results.error_text(e)]]
  tables.append(_results.table(
      "flax #2417 masked counter-example (2 devices)",
      ["library", "true masked mean", "synced masked mean", "error"], ce_rows,
      platform=f"{_results.platform_label()}: computed values (not a timing)",
      formats=[None, ".4f", ".4f", None],
      note="Valid entries: device 0 holds (2, 2, 2), device 1 holds (10,); the true masked "
           "mean is 4.0 (the test `tests/test_oracle_flax2417.py` asserts both values)."))
  for t in tables:
    _results.print_table(t)
  _results.write_results(
      "bench_sync", tables, command=command,
      title="Synchronized BN: synced vs unsynced train steps, jaxbn vs flax (`bench_sync.py`)",
      notes=[f"{jax.device_count()} simulated CPU devices on one machine: the collectives are "
             "memory copies, so this measures the overhead of synchronization in the program, "
             "not network cost. Equal work: same model, inputs, momentum 0.9, epsilon 1e-5, "
             "float32, same shard_map; each library uses its default variance algorithm."],
      out_dir=_results.output_dir(args))


if __name__ == "__main__":
  main()
