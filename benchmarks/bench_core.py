"""Functional BN benchmark: jaxbn vs flax (linen, nnx), haiku, equinox and torch CPU.

Times the training-mode forward and forward+backward under ``jax.jit`` on NHWC shapes, in
float32 and bfloat16, warm and interleaved (one call of every implementation per round), and
reports medians and paired ratios to ``flax.linen.BatchNorm`` from the same rounds. The
memory-bandwidth roofline is measured in the same run with an in-place donated copy. It also
reports the compiled temporary memory of a small conv+BN+ReLU CNN train step and the compile
time of a 20-layer one, jaxbn vs flax.

Usage::

    python benchmarks/bench_core.py                 # full table (about 10 minutes on 2 cores)
    python benchmarks/bench_core.py --quick         # small smoke run
    python benchmarks/bench_core.py --hugepages both   # also rerun under glibc huge pages

On these CPU VMs fresh buffers of 32 MiB or more are dominated by page faults; ``--hugepages
both`` reruns the timing in a child process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(its tables go to ``bench_core_hugepages.json``).

Results go to ``benchmarks/results/bench_core.json`` (``benchmarks/out/`` with ``--quick``);
``render_results.py`` renders them into ``RESULTS.md``. An anchor that is not installed or
raises is a row with its error, not a missing row.

Equal work: every implementation gets the same input (float32 or bfloat16), float32 scale and
bias, momentum 0.99, epsilon 1e-5, returns its output in the input dtype and its updated
running statistics; flax's layers are built with ``dtype`` = the input dtype. Variance
algorithms differ by design: flax uses its default one-pass ``E[x²] − E[x]²`` and jaxbn its
default (guarded one-pass with an exact fallback).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _results  # noqa: E402

import jaxbn  # noqa: E402

SHAPES = [(256, 32, 32, 64), (128, 16, 16, 256), (64, 56, 56, 64), (32, 8, 8, 16)]
MOMENTUM, EPS = 0.99, 1e-5


# ---------------------------------------------------------------- implementations
def make_jaxbn(c, dtype):
  stats = jaxbn.init_stats(c)

  def fwd(x, scale, bias):
    return jaxbn.batch_norm(x, stats, scale, bias, training=True, momentum=MOMENTUM,
                            epsilon=EPS)

  return fwd


def make_flax_linen(c, dtype):
  import flax.linen as nn
  mod = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, dtype=dtype)
  stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

  def fwd(x, scale, bias):
    y, upd = mod.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
                       mutable=["batch_stats"])
    return y, upd["batch_stats"]

  return fwd


def make_flax_nnx(c, dtype):
  from flax import nnx
  bn = nnx.BatchNorm(c, momentum=MOMENTUM, epsilon=EPS, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(bn, nnx.Param, ...)
  names = [str(k[0].key) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rest_leaves = [jnp.asarray(v) for v in jax.tree.leaves(rest)]

  def fwd(x, scale, bias):  # fresh state built inside the trace, as nnx.jit would do
    p = jax.tree.unflatten(jax.tree.structure(params),
                           [{"scale": scale, "bias": bias}[n] for n in names])
    r = jax.tree.unflatten(jax.tree.structure(rest), rest_leaves)
    model = nnx.merge(graphdef, p, r)
    y = model(x)
    return y, nnx.state(model, nnx.BatchStat)

  return fwd


def make_haiku(c, dtype):
  import haiku as hk

  def f(x, is_training=True):
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPS,
                        data_format="channels_last")(x, is_training)

  t = hk.transform_with_state(f)
  state = t.init(jax.random.key(0), jnp.zeros((2, c), jnp.float32))[1]

  def fwd(x, scale, bias):
    params = {"batch_norm": {"scale": scale.reshape((1,) * (x.ndim - 1) + (c,)),
                             "offset": bias.reshape((1,) * (x.ndim - 1) + (c,))}}
    return t.apply(params, state, None, x)

  return fwd


def make_equinox(c, dtype):
  import equinox as eqx
  bn = eqx.nn.BatchNorm(c, axis_name="batch", momentum=MOMENTUM, eps=EPS, mode="batch")
  state = eqx.nn.State(bn)

  def fwd(x, scale, bias):  # equinox works per example, channel-first, under vmap
    m = eqx.tree_at(lambda b: (b.weight, b.bias), bn, (scale, bias))
    xc = jnp.moveaxis(x, -1, 1)
    y, st = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xc, state)
    return jnp.moveaxis(y, 1, -1), st

  return fwd


ANCHORS = {
    "jaxbn": make_jaxbn,
    "flax.linen": make_flax_linen,
    "flax.nnx": make_flax_nnx,
    "haiku": make_haiku,
    "equinox": make_equinox,
}


def available():
  """(working anchors, {name: error} for the anchors that failed to import or run)."""
  out, failed = {}, {}
  for name, make in ANCHORS.items():
    try:
      make(4, jnp.float32)(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4))
      out[name] = make
    except Exception as e:  # optional anchors: reported as rows, never dropped silently
      failed[name] = _results.error_text(e)
      print(f"# {name} unavailable: {failed[name]}", file=sys.stderr)
  return out, failed


def compile_pair(make, shape, dtype):
  c = shape[-1]
  fwd = make(c, dtype)

  def f_fwd(x, scale, bias):
    return fwd(x, scale, bias)

  def f_fb(x, scale, bias, dy):
    (y, st), vjp = jax.vjp(lambda a, s, b: fwd(a, s, b), x, scale, bias)
    ct_st = jax.tree.map(jnp.zeros_like, st)
    return y, vjp((dy.astype(y.dtype), ct_st)), st

  return jax.jit(f_fwd), jax.jit(f_fb)


# ---------------------------------------------------------------- torch
def torch_fns(shape, dtype_name, threads):
  import torch  # ImportError becomes an error row
  torch.set_num_threads(threads)
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  n, h, w, c = shape
  x = torch.randn(n, c, h, w, dtype=tdt).to(memory_format=torch.channels_last)
  dy = torch.randn_like(x)
  weight = torch.ones(c, requires_grad=True)
  bias = torch.zeros(c, requires_grad=True)
  rm, rv = torch.zeros(c), torch.ones(c)
  xg = x.clone().requires_grad_(True)
  F = torch.nn.functional

  def fwd():
    with torch.no_grad():
      return F.batch_norm(x, rm, rv, weight, bias, True, 1 - MOMENTUM, EPS)

  def fb():
    y = F.batch_norm(xg, rm, rv, weight, bias, True, 1 - MOMENTUM, EPS)
    return torch.autograd.grad(y, (xg, weight, bias), dy)

  return fwd, fb


# ---------------------------------------------------------------- roofline
def roofline_bandwidth(nbytes: int, reps: int) -> float:
  """Bytes/s of an in-place donated elementwise update (reads and writes every byte once)."""
  n = nbytes // 4
  f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  a = jnp.zeros((n,), jnp.float32)
  times = []
  for i in range(reps + 2):
    t0 = time.perf_counter()
    a = f(a)
    a.block_until_ready()
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return 2 * nbytes / _common.median(times)


# ---------------------------------------------------------------- CNN memory / compile
def cnn(num_layers, channels, bn):
  """A conv+BN+ReLU stack and its loss; ``bn(x, i, params, stats) -> (y, new_stats_i)``."""

  def loss(params, stats, x, labels):
    h = x
    new_stats = []
    for i in range(num_layers):
      h = jax.lax.conv_general_dilated(h, params["conv"][i], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h, s = bn(h, i, params, stats)
      new_stats.append(s)
      h = jax.nn.relu(h)
    logits = jnp.mean(h.astype(jnp.float32), axis=(1, 2)) @ params["head"]
    ll = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(ll, labels[:, None], 1)), new_stats

  def step(params, stats, x, labels):
    (l, new_stats), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x, labels)
    params = jax.tree.map(lambda p, gi: p - 0.01 * gi.astype(p.dtype), params, g)
    return params, new_stats, l

  return step


def cnn_setup(num_layers, channels, dtype, impl):
  import flax.linen as nn
  rng = np.random.default_rng(0)  # NumPy: eager jax.random would compile per shape
  cin = 3
  convs = []
  for i in range(num_layers):
    convs.append(jnp.asarray(rng.normal(size=(3, 3, cin, channels)) * 0.1, dtype))
    cin = channels
  params = {"conv": convs, "head": jnp.zeros((channels, 10)),
            "scale": [jnp.ones(channels) for _ in range(num_layers)],
            "bias": [jnp.zeros(channels) for _ in range(num_layers)]}
  if impl == "jaxbn":
    stats = [jaxbn.init_stats(channels) for _ in range(num_layers)]

    def bn(h, i, p, s):
      return jaxbn.batch_norm(h, s[i], p["scale"][i], p["bias"][i], training=True,
                              momentum=MOMENTUM, epsilon=EPS)
  else:
    stats = [{"mean": jnp.zeros(channels), "var": jnp.ones(channels)}
             for _ in range(num_layers)]
    mod = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, dtype=dtype)

    def bn(h, i, p, s):
      y, upd = mod.apply({"params": {"scale": p["scale"][i], "bias": p["bias"][i]},
                          "batch_stats": s[i]}, h, mutable=["batch_stats"])
      return y, upd["batch_stats"]

  return cnn(num_layers, channels, bn), params, stats


def cnn_memory_and_compile(dtype, quick, rounds=3):
  """(impl, temp bytes, median compile seconds); compiles interleaved so neither pays warm-up."""
  temps, compiles = {}, {"jaxbn": [], "flax.linen": []}
  n_mem, c_mem, x_shape = (3, 32, (32, 32, 32, 3)) if not quick else (2, 8, (4, 8, 8, 3))
  for impl in ("jaxbn", "flax.linen"):
    step, params, stats = cnn_setup(n_mem, c_mem, dtype, impl)
    x = jnp.ones(x_shape, dtype)
    labels = jnp.zeros((x_shape[0],), jnp.int32)
    comp = jax.jit(step).lower(params, stats, x, labels).compile()
    temps[impl] = comp.memory_analysis().temp_size_in_bytes
  n = 20 if not quick else 2
  for r in range(rounds):
    for impl in (("jaxbn", "flax.linen") if r % 2 else ("flax.linen", "jaxbn")):
      step20, p20, s20 = cnn_setup(n, 16 + r, dtype, impl)  # new shapes: no cache hit
      x20 = jnp.ones((8, 16, 16, 3), dtype)
      t0 = time.perf_counter()
      jax.jit(step20).lower(p20, s20, x20, jnp.zeros((8,), jnp.int32)).compile()
      compiles[impl].append(time.perf_counter() - t0)
  return [(impl, temps[impl], _common.median(compiles[impl])) for impl in temps]


# ---------------------------------------------------------------- main
STEP_COLUMNS = ["shape", "dtype", "pass", "impl", "median ms", "ratio to flax.linen",
                "roofline ms", "% of roofline", "error"]
STEP_FORMATS = [None, None, None, None, ".3f", ".2f", ".2f", ".0f", None]


def run(args):
  """Runs the tables; returns (tables, notes) for ``_results.write_results``."""
  impls, failed = available()
  if args.only:
    keep = set(args.only.split(",")) | {"flax.linen"}
    impls = {k: v for k, v in impls.items() if k in keep}
    failed = {k: v for k, v in failed.items() if k in keep}
  shapes = SHAPES if not args.quick else [(8, 4, 4, 16)]
  dtypes = ["float32", "bfloat16"]
  reps = args.reps if not args.quick else 2
  big = max(int(np.prod(s)) for s in shapes) * 4
  bw = roofline_bandwidth(big, reps=max(reps, 5) if not args.quick else 2)
  rows = []
  rng = np.random.default_rng(0)
  torch_error = None
  for dname in dtypes:
    dtype = jnp.dtype(dname)
    for shape in shapes:
      c = shape[-1]
      x = jnp.asarray(rng.normal(size=shape) * 2 + 1, dtype)
      dy = jnp.asarray(rng.normal(size=shape), dtype)
      scale = jnp.asarray(rng.normal(size=c) * 0.1 + 1, jnp.float32)
      bias = jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32)
      fwds, fbs, errors = {}, {}, dict(failed)
      for name, make in impls.items():
        try:
          f, fb = compile_pair(make, shape, dtype)
          block(f(x, scale, bias))
          block(fb(x, scale, bias, dy))
        except Exception as e:  # a failing anchor is a row with its error
          errors[name] = _results.error_text(e)
          continue
        fwds[name] = functools.partial(f, x, scale, bias)
        fbs[name] = functools.partial(fb, x, scale, bias, dy)
      if not args.no_torch:
        try:
          tfns = torch_fns(shape, dname, os.cpu_count() or 1)
          fwds["torch (CPU)"], fbs["torch (CPU)"] = tfns
        except Exception as e:
          errors["torch (CPU)"] = torch_error = _results.error_text(e)
      size = int(np.prod(shape)) * dtype.itemsize
      for pname, fns, units in (("fwd", fwds, 3), ("fwd+bwd", fbs, 8)):
        times = _common.interleaved(fns, reps, warmup=1 if args.quick else 2)
        base = times.get("flax.linen")
        roof = units * size / bw * 1e3
        for name, t in times.items():
          med = _common.median(t) * 1e3
          ratio = _common.paired_ratio(t, base) if base else None
          rows.append([str(shape), dname, pname, name, med, ratio, roof, 100 * roof / med, ""])
        for name, err in errors.items():
          rows.append([str(shape), dname, pname, name, None, None, roof, None, err])
  step = _results.table(
      f"BN training step, NHWC, jit ({'quick: ' if args.quick else ''}{reps} rounds)",
      STEP_COLUMNS, rows, formats=STEP_FORMATS,
      note=(f"Roofline: an in-place donated copy of {big / 2**20:.1f} MiB ran at "
            f"{bw / 1e9:.2f} GB/s. Roofline bytes: fwd = read x twice (statistics, output) + "
            "write y; fwd+bwd adds read x, dy (reductions) and read x, dy + write dx: 8 array "
            "passes in all."))
  tables = [step]
  if not args.no_cnn:
    cnn_rows = []
    for dname in (dtypes if not args.quick else ["bfloat16"]):  # quick: one dtype suffices
      res = cnn_memory_and_compile(jnp.dtype(dname), args.quick, rounds=1 if args.quick else 3)
      fl = {r[0]: r for r in res}["flax.linen"]
      for impl, temp, ct in res:
        cnn_rows.append([dname, impl, temp, temp / fl[1], ct, ct / fl[2]])
    mem = "3 layers, 32x32x32x3" if not args.quick else "2 layers, 4x8x8x3"
    n = 2 if args.quick else 20
    tables.append(_results.table(
        "Small CNN train step (conv+BN+ReLU): temporary memory and compile time",
        ["dtype", "impl", f"temp bytes ({mem})", "temp ratio",
         f"compile s ({n} layers)", "compile ratio"], cnn_rows,
        formats=[None, None, "d", ".2f", ".2f", ".2f"],
        note=("Temporary bytes from `compiled.memory_analysis()`; compile time is the median of "
              "interleaved `lower().compile()` calls on fresh shapes. Both sides use the "
              "model's dtype for BN (flax: `dtype=`; jaxbn: the input's).")))
  notes = [
      "Equal work: same inputs (float32 or bfloat16 x, float32 scale/bias), momentum 0.99, "
      "epsilon 1e-5; every implementation returns its output in the input dtype and its "
      "updated running statistics; flax layers are built with `dtype` = the input dtype. "
      "flax uses its default one-pass variance, jaxbn its default (guarded one-pass with an "
      "exact fallback); torch runs `F.batch_norm` on channels-last tensors with "
      f"{os.cpu_count()} threads.",
  ]
  if torch_error:
    notes.append(f"torch unavailable: {torch_error}")
  return tables, notes


def block(out):
  return jax.block_until_ready(out)


def _without(argv, *flags):
  """``argv`` without the given ``--flag value`` / ``--flag=value`` options."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    elif not any(a.startswith(f + "=") for f in flags):
      out.append(a)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
  p.add_argument("--reps", type=int, default=15, help="timed rounds per table cell")
  p.add_argument("--only", default="", help="comma-separated implementations to include")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-cnn", action="store_true")
  p.add_argument("--hugepages", choices=["off", "on", "both"], default="off",
                 help="'both' reruns the table in a child with glibc huge pages")
  p.add_argument("--name", default="bench_core", help="result file stem")
  _results.add_output_args(p)
  args = p.parse_args()
  command = _results.command_line()
  if args.hugepages == "on" and "hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    argv = _without(sys.argv[1:], "--hugepages")
    sys.exit(subprocess.call([sys.executable, __file__, *argv, "--hugepages", "off"], env=env))
  tables, notes = run(args)
  for t in tables:
    _results.print_table(t)
  title = "Functional BN: jaxbn vs flax, haiku, equinox, torch (`bench_core.py`)"
  if "hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
    title += ", glibc huge pages"
  _results.write_results(args.name, tables, command=command, notes=notes, title=title,
                         out_dir=_results.output_dir(args))
  if args.hugepages == "both":
    print("\n# Rerun with GLIBC_TUNABLES=glibc.malloc.hugetlb=1\n", flush=True)
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    argv = _without(sys.argv[1:], "--hugepages", "--name")
    rc = subprocess.call([sys.executable, __file__, *argv, "--hugepages", "off", "--no-cnn",
                          "--name", f"{args.name}_hugepages"], env=env)
    sys.exit(rc)


if __name__ == "__main__":
  main()
