"""Eval-step benchmark: BatchNorm folded into the convolutions vs flax's BatchNorm.

The ResNet of ``tests/_resnet.py`` (conv + BN + ReLU blocks with residuals and projection
shortcuts, no conv bias) is evaluated (``train=False``, under ``jax.jit``, warm) three ways:

* ``flax``: ``flax.linen.BatchNorm`` with running statistics (the baseline);
* ``jaxbn``: ``jaxbn.linen.BatchNorm`` with running statistics;
* ``folded``: the flax model's variables folded with ``jaxbn.linen.find_conv_bn_pairs`` +
  ``fold_batch_norm_layers`` and run through ``jaxbn.linen.folded(model.apply)`` (every BN
  becomes a bias add after its convolution).

Interleaved rounds (one step of each per round); medians and paired median ratios vs flax
(< 1 is faster), plus the largest difference between the folded and the flax outputs.

Equal work: the three rows evaluate the same ResNet with the same variables, inputs and model
``dtype``; only the norm (or its folded form) differs.

Results go to ``benchmarks/results/bench_fold.json`` (``benchmarks/out/`` with ``--quick``).

Usage::

    python benchmarks/bench_fold.py            # CIFAR-size ResNet-14, batch 256
    python benchmarks/bench_fold.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
import _common  # noqa: E402
import _results  # noqa: E402
import _resnet  # noqa: E402

import jaxbn.linen  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def trained(shapes, seed=0):
  """Filled variables with statistics away from (0, 1), as after training."""
  variables = _resnet.fill(shapes, seed)
  rng = np.random.default_rng(seed + 1)

  def leaf(path, v):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name and "mean" in name:
      return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    if "batch_stats" in name and "var" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
    return v
  return jax.tree_util.tree_map_with_path(leaf, variables)


def bench_dtype(args, dtype_name):
  dtype = DTYPES[dtype_name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3)), dtype)
  models = {name: _resnet.ResNet(stage_sizes=tuple(args.stages), num_filters=args.filters,
                                 batch_norm=bn, dtype=dtype)
            for name, bn in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm))}
  shapes = jax.eval_shape(functools.partial(models["flax"].init, train=False),
                          jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
  variables = trained(shapes)
  flax_model = models["flax"]
  pairs = jaxbn.linen.find_conv_bn_pairs(flax_model.apply, variables, x, train=False)
  folded_vars = jaxbn.linen.fold_batch_norm_layers(variables, pairs)
  n_bn = len(jax.tree.leaves(variables["batch_stats"])) // 2

  def compiled(apply, v):
    return jax.jit(functools.partial(apply, train=False)).lower(v, x).compile(), v

  steps = {
      "flax": compiled(flax_model.apply, variables),
      "jaxbn": compiled(models["jaxbn"].apply, variables),
      "folded": compiled(jaxbn.linen.folded(flax_model.apply), folded_vars),
  }
  fns = {k: functools.partial(c, v, x) for k, (c, v) in steps.items()}
  ref = np.asarray(fns["flax"](), np.float32)
  err = float(np.max(np.abs(np.asarray(fns["folded"](), np.float32) - ref)))
  times = _common.interleaved(fns, reps=args.reps, warmup=1 if args.quick else 2)
  rows = []
  for name in steps:
    per_round = _common.paired_ratios(times[name], times["flax"])
    rows.append(dict(impl=name, ms=1e3 * _common.median(times[name]),
                     rom=_common.ratio_of_medians(times[name], times["flax"]),
                     ratio=_common.median(per_round),
                     spread="{:.2f}–{:.2f}".format(*_common.quartiles(per_round))))
  return rows, len(pairs), n_bn, err, float(np.max(np.abs(ref)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=32, help="image height and width")
  p.add_argument("--filters", type=int, default=16)
  p.add_argument("--stages", type=int, nargs="+", default=[2, 2, 2])
  p.add_argument("--reps", type=int, default=30, help="timed rounds")
  p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  p.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
  _results.add_output_args(p)
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.size, args.filters, args.stages, args.reps = 4, 4, 4, [1], 2
    if args.dtypes == list(DTYPES):
      args.dtypes = ["bfloat16"]

  command = _results.command_line()
  rows = []
  for dtype_name in args.dtypes:
    try:
      res, n_pairs, n_bn, err, scale = bench_dtype(args, dtype_name)
    except Exception as e:  # a failing configuration is a row with its error
      rows.append([dtype_name, "flax, jaxbn, folded", None, None, None, None, None, None,
                   None, _results.error_text(e)])
      continue
    for r in res:
      folded = r["impl"] == "folded"
      rows.append([dtype_name, r["impl"], r["ms"], r["rom"], r["ratio"], r["spread"],
                   f"{n_pairs}/{n_bn}" if folded else "0", err if folded else None,
                   scale if folded else None, ""])
  tables = [_results.table(
      "ResNet eval step: BatchNorm folded into the convolutions vs flax.linen.BatchNorm",
      ["dtype", "BN", "median eval step ms", "ms ÷ flax's", "per-round ratio to flax (median)",
       "per-round q25–q75", "BNs folded", "max abs diff vs flax", "max abs output", "error"],
      rows, formats=[None, None, ".2f", ".2f", ".2f", None, None, ".1e", ".2f", None],
      platform=_results.platform_label("timing"),
      note=(f"ResNet stages={args.stages} filters={args.filters}, input "
            f"{args.batch}x{args.size}x{args.size}x3 NHWC, one device, train=False under "
            f"jax.jit; {args.reps} interleaved rounds (< 1 is faster). `ms ÷ flax's` divides "
            "the two median cells; the per-round ratio is the median over rounds of t / t_flax "
            "from the same round, with its quartiles: on a quiet machine the two agree."))]
  for t in tables:
    _results.print_table(t)
  _results.write_results(
      "bench_fold", tables, command=command,
      title="Folding BN into convolutions, eval step (`bench_fold.py`)",
      notes=["Equal work: same ResNet, variables (statistics away from (0, 1), as after "
             "training), inputs and model dtype on every row; only the norm differs."],
      out_dir=_results.output_dir(args))


if __name__ == "__main__":
  main()
