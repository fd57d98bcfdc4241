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

Usage::

    python benchmarks/bench_variants.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_variants.py --quick    # small shapes, 3 rounds (smoke test)
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

import jaxbn  # noqa: E402

MOMENTUM, EPS = 0.99, 1e-5


# ---------------------------------------------------------------- implementations
# Each maker returns f(x, scale, bias) -> (y, aux); aux (running statistics) is returned too.
def flax_bn(train):
  import flax.linen as nn

  def make(c):
    mod = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS)
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

  def make(c):
    mod = getattr(nn, name)(**kw)
    has_bias = name != "RMSNorm"

    def f(x, scale, bias):
      params = {"scale": scale, "bias": bias} if has_bias else {"scale": scale}
      return mod.apply({"params": params}, x), ()
    return f
  return make


def jaxbn_bn_family(fn, **kw):
  def make(c):
    stats = jaxbn.init_stats(c)

    def f(x, scale, bias):
      return fn(x, stats, scale, bias, training=True, momentum=MOMENTUM, epsilon=EPS, **kw)
    return f
  return make


def jaxbn_frozen(c):
  stats = jaxbn.init_stats(c)

  def f(x, scale, bias):
    return jaxbn.frozen_batch_norm(x, stats, scale, bias, epsilon=EPS, freeze_affine=False), ()
  return f


def jaxbn_norm(fn, has_bias=True, **kw):
  def make(c):
    def f(x, scale, bias):
      if has_bias:
        return fn(x, scale, bias, **kw), ()
      return fn(x, scale, **kw), ()
    return f
  return make


def variants(quick):
  cnn = [(8, 8, 8, 64)] if quick else [(64, 32, 32, 64), (32, 16, 16, 256)]
  seq = [(4, 16, 128)] if quick else [(16, 256, 512), (8, 128, 2048)]
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
def run(args):
  reps = 3 if args.quick else args.reps
  dtypes = ["float32", "bfloat16"]
  print(f"## jaxbn variants vs the closest flax.linen op, jit — {_common.machine()}\n")
  print("| variant | shape | dtype | pass | impl | median ms | ratio to flax |")
  print("|---|---|---|---|---|---|---|")
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
      fwds, fbs = {}, {}
      for label, make in impls.items():
        f, fb = compile_pair(make(c))
        fwds[label] = functools.partial(f, x, scale, bias)
        fbs[label] = functools.partial(fb, x, scale, bias, dy)
      for pname, fns in (("fwd", fwds), ("fwd+bwd", fbs)):
        times = _common.interleaved(fns, reps)
        base = times["flax.linen"]
        for label, t in times.items():
          print(f"| {name} | {shape} | {dname} | {pname} | {label} | "
                f"{_common.median(t) * 1e3:.3f} | {_common.paired_ratio(t, base):.2f} |",
                flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke test)")
  p.add_argument("--reps", type=int, default=15, help="timed rounds per table cell")
  p.add_argument("--only", default="", help="comma-separated substrings of variant names")
  run(p.parse_args())


if __name__ == "__main__":
  main()
