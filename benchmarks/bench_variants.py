"""Benchmark of the BN variants and batch-independent norms against the closest flax op.

One row per variant, shape, dtype and pass (forward; forward+backward), under ``jax.jit``,
warm and interleaved (one call of every implementation per round), with the median time and
the paired ratio (median over rounds of ours / theirs) to the closest flax.linen layer:

=====================  ==========================================================
jaxbn                  closest flax op
=====================  ==========================================================
batch_renorm           flax.linen.BatchNorm, training (flax has no renorm)
ghost_batch_norm       flax.linen.BatchNorm, training on the whole batch
frozen_batch_norm      flax.linen.BatchNorm(use_running_average=True)
layer_norm / rms_norm  flax.linen.LayerNorm / RMSNorm on (batch, tokens, features)
group_norm             flax.linen.GroupNorm(num_groups=32)
instance_norm          flax.linen.InstanceNorm
=====================  ==========================================================

``jaxbn.batch_norm`` is timed next to the BN-family rows, and for layer/group/instance norm
both jaxbn's default stable variance and ``use_fast_variance=True`` (flax's default, which the
drop-in ``jaxbn.linen``/``jaxbn.nnx`` layers keep) are shown. Backward passes take the
gradient of ``x``, ``scale`` and ``bias`` for a random cotangent; BN-family functions also
return their updated running statistics (so that nothing is dead code).

Equal work: both sides get the same ``x`` (float32 or bfloat16), float32 ``scale``/``bias``,
and return their output in ``x``'s dtype: flax's layers are built with ``dtype`` = the input
dtype and ``param_dtype=float32`` (without ``dtype`` flax would compute and return float32 for
a bfloat16 input, which is not the same work). Same epsilon (1e-5), momentum (0.99) and group
count; the variance algorithm is stated per row.

Usage::

    python benchmarks/bench_variants.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_variants.py --quick    # tiny shapes, bf16, 2 rounds (smoke test)

Results go to ``benchmarks/results/bench_variants.json`` (``benchmarks/out/`` with
``--quick``); an implementation that raises is a row with its error.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _results  # noqa: E402

import jaxbn  # noqa: E402

MOMENTUM, EPS = 0.99, 1e-5


# ---------------------------------------------------------------- implementations
# Each maker make(c, dtype) returns f(x, scale, bias) -> (y, aux); aux (running statistics)
# is returned too. flax layers get dtype=<input dtype>, param_dtype=float32 (equal work).
def flax_bn(train):
  import flax.linen as nn

  def make(c, dtype):
    mod = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS,
                       dtype=dtype, param_dtype=jnp.float32)
    stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

    def f(x, scale, bias):
      v = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
      if not train:
        return mod.apply(v, x), ()
      y, upd = mod.apply(v, x, mutable=["batch_stats"])
      return y, upd["batch_stats"]
    return f
  return make


def flax_norm(name, **kw):
  import flax.linen as nn

  def make(c, dtype):
    mod = getattr(nn, name)(dtype=dtype, param_dtype=jnp.float32, **kw)
    has_bias = name != "RMSNorm"

    def f(x, scale, bias):
      params = {"scale": scale, "bias": bias} if has_bias else {"scale": scale}
      return mod.apply({"params": params}, x), ()
    return f
  return make


def jaxbn_bn_family(fn, **kw):
  def make(c, dtype):
    stats = jaxbn.init_stats(c)

    def f(x, scale, bias):
      return fn(x, stats, scale, bias, training=True, momentum=MOMENTUM, epsilon=EPS, **kw)
    return f
  return make


def jaxbn_frozen(c, dtype):
  stats = jaxbn.init_stats(c)

  def f(x, scale, bias):
    return jaxbn.frozen_batch_norm(x, stats, scale, bias, epsilon=EPS, freeze_affine=False), ()
  return f


def jaxbn_norm(fn, has_bias=True, **kw):
  def make(c, dtype):
    def f(x, scale, bias):
      if has_bias:
        return fn(x, scale, bias, **kw), ()
      return fn(x, scale, **kw), ()
    return f
  return make


def variants(quick):
  cnn = [(4, 4, 4, 64)] if quick else [(64, 32, 32, 64), (32, 16, 16, 256)]
  seq = [(2, 8, 64)] if quick else [(16, 256, 512), (8, 128, 2048)]
  vbs = lambda shape: max(shape[0] // 8, 1)  # noqa: E731
  rows = []
  for shape in cnn:
    rows.append(("batch_renorm", shape, {
        "jaxbn.batch_renorm": jaxbn_bn_family(jaxbn.batch_renorm, r_max=3.0, d_max=5.0),
        "jaxbn.batch_norm": jaxbn_bn_family(jaxbn.batch_norm),
    }, flax_bn(True)))
    rows.append((f"ghost_batch_norm (vbs={vbs(shape)})", shape, {
        "jaxbn.ghost_batch_norm": jaxbn_bn_family(jaxbn.ghost_batch_norm,
                                                  virtual_batch_size=vbs(shape)),
        "jaxbn.batch_norm": jaxbn_bn_family(jaxbn.batch_norm),
    }, flax_bn(True)))
    rows.append(("frozen_batch_norm", shape, {"jaxbn.frozen_batch_norm": jaxbn_frozen},
                 flax_bn(False)))
    rows.append(("group_norm (32 groups)", shape, {
        "jaxbn.group_norm": jaxbn_norm(jaxbn.group_norm, num_groups=32),
        "jaxbn.group_norm fast var": jaxbn_norm(jaxbn.group_norm, num_groups=32,
                                                use_fast_variance=True),
    }, flax_norm("GroupNorm", num_groups=32)))
    rows.append(("instance_norm", shape, {
        "jaxbn.instance_norm": jaxbn_norm(jaxbn.instance_norm),
        "jaxbn.instance_norm fast var": jaxbn_norm(jaxbn.instance_norm,
                                                   use_fast_variance=True),
    }, flax_norm("InstanceNorm")))
  for shape in seq:
    rows.append(("layer_norm", shape, {
        "jaxbn.layer_norm": jaxbn_norm(jaxbn.layer_norm),
        "jaxbn.layer_norm fast var": jaxbn_norm(jaxbn.layer_norm, use_fast_variance=True),
    }, flax_norm("LayerNorm")))
    rows.append(("rms_norm", shape, {"jaxbn.rms_norm": jaxbn_norm(jaxbn.rms_norm,
                                                                  has_bias=False)},
                 flax_norm("RMSNorm")))
  return rows


def compile_pair(f):
  def fb(x, scale, bias, dy):
    y, vjp, aux = jax.vjp(f, x, scale, bias, has_aux=True)
    return y, vjp(dy.astype(y.dtype)), aux

  return jax.jit(f), jax.jit(fb)


# ---------------------------------------------------------------- main
VARIANCE = {  # the variance algorithm of each implementation label, stated per row
    "flax.linen": "flax default (one-pass E[x²]−E[x]²)",
    "fast var": "one-pass E[x²]−E[x]² (use_fast_variance=True)",
}


def variance_of(name, label):
  if name.startswith("frozen"):
    return "none (running statistics)"
  if name.startswith("rms"):
    return "none (mean of squares)"
  if label == "flax.linen":
    return VARIANCE["flax.linen"]
  if label.endswith("fast var"):
    return VARIANCE["fast var"]
  return "jaxbn default"


def run(args):
  reps = 2 if args.quick else args.reps
  dtypes = args.dtypes or (["bfloat16"] if args.quick else ["float32", "bfloat16"])
  rows = []
  rng = np.random.default_rng(0)
  for name, shape, ours, theirs in variants(args.quick):
    if args.only and not any(k in name for k in args.only.split(",")):
      continue
    c = shape[-1]
    for dname in dtypes:
      dtype = jnp.dtype(dname)
      x = jnp.asarray(rng.normal(size=shape) * 2 + 1, dtype)
      dy = jnp.asarray(rng.normal(size=shape), dtype)
      scale = jnp.asarray(rng.normal(size=c) * 0.1 + 1, jnp.float32)
      bias = jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32)
      impls = {"flax.linen": theirs, **ours}
      fwds, fbs, errors, out_dtype = {}, {}, {}, {}
      for label, make in impls.items():
        try:
          f, fb = compile_pair(make(c, dtype))
          y = jax.block_until_ready(f(x, scale, bias))[0]
          jax.block_until_ready(fb(x, scale, bias, dy))
          out_dtype[label] = str(y.dtype)
        except Exception as e:  # a failing implementation is a row with its error
          errors[label] = _results.error_text(e)
          continue
        fwds[label] = functools.partial(f, x, scale, bias)
        fbs[label] = functools.partial(fb, x, scale, bias, dy)
      for pname, fns in (("fwd", fwds), ("fwd+bwd", fbs)):
        times = _common.interleaved(fns, reps, warmup=1 if args.quick else 2)
        base = times.get("flax.linen")
        for label, t in times.items():
          rows.append([name, str(shape), dname, pname, label, out_dtype[label],
                       variance_of(name, label), _common.median(t) * 1e3,
                       _common.ratio_of_medians(t, base) if base else None,
                       _common.paired_ratio(t, base) if base else None,
                       "{:.2f}–{:.2f}".format(*_common.quartiles(_common.paired_ratios(t, base)))
                       if base else None, ""])
        for label, err in errors.items():
          rows.append([name, str(shape), dname, pname, label, None, variance_of(name, label), None,
                       None, None, None, err])
  table = _results.table(
      f"jaxbn variants vs the closest flax.linen op, jit ({reps} rounds)",
      ["variant", "shape", "dtype", "pass", "impl", "output dtype", "variance", "median ms",
       "median ms ÷ flax's", "per-round ratio to flax (median)", "per-round q25–q75",
       "error"], rows,
      formats=[None, None, None, None, None, None, None, ".3f", ".2f", ".2f", None, None],
      platform=_results.platform_label("timing"),
      note=("`median ms ÷ flax's` divides the two `median ms` cells; the per-round ratio is "
            "the median over rounds of t / t_flax from the same round (it cancels load that "
            "changes between rounds), with its quartiles: on a quiet machine the two agree. "
            "Equal work: flax layers built with `dtype` = input dtype and "
            "`param_dtype=float32`; the `output dtype` column shows each side's actual output "
            "dtype. Closest flax op: renorm and ghost BN vs `BatchNorm` training on the whole "
            "batch; frozen vs `BatchNorm(use_running_average=True)`; group/instance/layer/RMS "
            "norm vs flax's layer of the same name."))
  return [table]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
  p.add_argument("--reps", type=int, default=15, help="timed rounds per table cell")
  p.add_argument("--only", default="", help="comma-separated substrings of variant names")
  p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                 help="default: both (bfloat16 only with --quick)")
  _results.add_output_args(p)
  args = p.parse_args()
  command = _results.command_line()
  tables = run(args)
  for t in tables:
    _results.print_table(t)
  _results.write_results(
      "bench_variants", tables, command=command,
      title="BN variants and batch-free norms vs flax (`bench_variants.py`)",
      notes=["jaxbn.batch_norm is timed next to the BN-family rows as a reference; for "
             "layer/group/instance norm both jaxbn's default stable variance and "
             "`use_fast_variance=True` (flax's default) are shown. Backward passes take the "
             "gradient of x, scale and bias for a random cotangent."],
      out_dir=_results.output_dir(args))


if __name__ == "__main__":
  main()
