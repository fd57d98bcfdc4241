"""Functional BN benchmark: jaxbn vs flax (linen, nnx), haiku, equinox and torch.

Times the training-mode forward and forward+backward under ``jax.jit`` on NHWC shapes (a
small one, ``(32, 8, 8, 16)``, where per-kernel overhead dominates, and three large ones), in
float32 and bfloat16, warm and interleaved (one call of every implementation per round), and
reports medians, the ratio of medians and the median of the per-round (paired) ratios to
``flax.linen.BatchNorm`` from the same rounds. The memory-bandwidth roofline is measured in
the same run with an in-place donated copy (on a GPU also against the card's datasheet HBM
bandwidth). It also reports the compiled temporary memory of a small conv+BN+ReLU CNN train
step and the compile time of a 20-layer one, jaxbn vs flax, and a table of the ratios the
project's targets are stated in (issue 18: CPU f32 forward ≤ 1.0× flax, forward+backward ≤
0.85×, small shape ≤ 1.0×, bf16 forward+backward ≤ torch's).

It runs on whatever ``jax.devices()`` gives (CPU, or a GPU where JAX has one); torch runs on
the same kind of device (CUDA only where ``torch.cuda.is_available()``; otherwise its rows
record why they are missing). Every table names its platform.

Usage::

    python benchmarks/bench_core.py                 # full table (3-4 minutes on 2 cores)
    python benchmarks/bench_core.py --quick         # small smoke run
    python benchmarks/bench_core.py --hugepages both   # also rerun under glibc huge pages
    python benchmarks/bench_core.py --extra-shapes 256x56x56x64   # e.g. on a GPU (past L2)

On these CPU VMs fresh buffers of 32 MiB or more are dominated by page faults; ``--hugepages
both`` reruns the timing in a child process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(its tables go to ``bench_core_hugepages.json``).

Results go to ``benchmarks/results/bench_core.json`` (``benchmarks/out/`` with ``--quick``);
``render_results.py`` renders them into ``RESULTS.md``. An anchor that is not installed or
raises is a row with its error, not a missing row.

Equal work: every implementation gets the same input (float32 or bfloat16), scale and bias,
momentum 0.99, epsilon 1e-5, returns its output in the input dtype and its updated running
statistics, and is differentiated with respect to x, scale and bias. flax's layers are built
with ``dtype`` = the input dtype (float32 parameters). haiku creates its scale/offset in the
input's dtype, so they are passed in that dtype (a float32 scale would promote a bfloat16
output to float32: twice the bytes written). equinox's BatchNorm is per example and
channel-first: it runs as equinox's users call it, ``jax.vmap(bn, axis_name="batch")`` over
NCHW examples (the input is transposed once, outside the timed call), ``mode="batch"``, with
weight/bias in the input's dtype for the same reason. Variance algorithms differ by design and
are listed in the implementations table.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from typing import List, Optional, Tuple

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

  def fwd(x, scale, bias):  # haiku's parameters have the input's dtype and shape (1, ..., C)
    shape = (1,) * (x.ndim - 1) + (c,)
    params = {"batch_norm": {"scale": scale.astype(x.dtype).reshape(shape),
                             "offset": bias.astype(x.dtype).reshape(shape)}}
    return t.apply(params, state, None, x)

  return fwd


def make_equinox(c, dtype):
  import equinox as eqx
  bn = eqx.nn.BatchNorm(c, axis_name="batch", momentum=MOMENTUM, eps=EPS, mode="batch")
  state = eqx.nn.State(bn)

  def fwd(x, scale, bias):  # x: NCHW; equinox works per example (C, H, W) under vmap
    m = eqx.tree_at(lambda b: (b.weight, b.bias), bn, (scale.astype(x.dtype),
                                                       bias.astype(x.dtype)))
    return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

  return fwd


make_equinox.layout = "NCHW"  # the harness hands it x and dy channel-first (untimed transpose)


ANCHORS = {
    "jaxbn": make_jaxbn,
    "flax.linen": make_flax_linen,
    "flax.nnx": make_flax_nnx,
    "haiku": make_haiku,
    "equinox": make_equinox,
}


# How each implementation is called and what it computes (the implementations table).
HOW = {
    "jaxbn": ("jaxbn.batch_norm(x, stats, scale, bias, training=True)", "NHWC",
              "float32 scale/bias", "jaxbn's default (exact far from zero)"),
    "flax.linen": ("nn.BatchNorm(use_running_average=False, dtype=x.dtype).apply", "NHWC",
                   "float32 params", "flax's default one-pass E[x²]−E[x]²"),
    "flax.nnx": ("nnx.BatchNorm(dtype=x.dtype), split/merge inside jit", "NHWC",
                 "float32 params", "flax's default one-pass E[x²]−E[x]²"),
    "haiku": ("hk.transform_with_state(hk.BatchNorm(...)).apply", "NHWC",
              "scale/offset in x's dtype (haiku's)", "one-pass E[x²]−E[x]² in x's dtype"),
    "equinox": ("jax.vmap(eqx.nn.BatchNorm(mode='batch'), axis_name='batch')", "NCHW (per "
                "example, channel-first)", "weight/bias in x's dtype",
                "two-pass, per-channel vmap + pmean"),
    "torch": ("torch.nn.functional.batch_norm(training=True), autograd", "channels_last",
              "float32 weight/bias", "PyTorch's native kernel"),
}


def layout_of(name: str) -> str:
  return getattr(ANCHORS.get(name), "layout", "NHWC")


def to_layout(a, layout: str):
  return jnp.moveaxis(a, -1, 1) if layout == "NCHW" else a


def available():
  """(working anchors, {name: error} for the anchors that failed to import or run)."""
  out, failed = {}, {}
  for name, make in ANCHORS.items():
    try:
      make(4, jnp.float32)(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4))  # NHWC = NCHW here
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
def torch_device() -> Tuple[Optional[str], str]:
  """(torch device for this run, the torch row's name); device None with the reason if none.

  torch runs on the kind of device JAX runs on: its CPU beside XLA:CPU, CUDA beside a GPU.
  """
  plat = jax.devices()[0].platform
  if plat == "cpu":
    return "cpu", "torch (CPU)"
  import torch  # ImportError becomes an error row
  if plat in ("gpu", "cuda") and torch.cuda.is_available():
    return "cuda", "torch (CUDA)"
  return None, f"torch ({plat})"


def torch_fns(shape, dtype_name, threads, device="cpu"):
  import torch  # ImportError becomes an error row
  if device == "cpu":
    torch.set_num_threads(threads)
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  n, h, w, c = shape
  x = torch.randn(n, c, h, w, dtype=tdt, device=device).to(memory_format=torch.channels_last)
  dy = torch.randn_like(x)
  weight = torch.ones(c, requires_grad=True, device=device)
  bias = torch.zeros(c, requires_grad=True, device=device)
  rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
  xg = x.clone().requires_grad_(True)
  F = torch.nn.functional
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def fwd():
    with torch.no_grad():
      y = F.batch_norm(x, rm, rv, weight, bias, True, 1 - MOMENTUM, EPS)
    sync()  # the host timer brackets the device work
    return y

  def fb():
    y = F.batch_norm(xg, rm, rv, weight, bias, True, 1 - MOMENTUM, EPS)
    g = torch.autograd.grad(y, (xg, weight, bias), dy)
    sync()
    return g

  return fwd, fb


# ---------------------------------------------------------------- roofline
def roofline_bandwidth(nbytes: int, reps: int) -> Tuple[float, int]:
  """(bytes/s, buffer bytes) of an in-place donated update (reads and writes every byte once)."""
  if jax.devices()[0].platform != "cpu":
    nbytes = max(nbytes, 1 << 30)  # 1 GiB: far past any GPU's L2, so HBM is what is measured
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
  return 2 * nbytes / _common.median(times), nbytes


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
SMALL_SHAPE = (32, 8, 8, 16)
RATIO_OF_MEDIANS = "median ms ÷ flax.linen's"
PAIRED = "per-round ratio to flax.linen (median)"
SPREAD = "per-round ratio q25–q75"
RATIO_NOTE = (f"`{RATIO_OF_MEDIANS}` is this row's median divided by flax.linen's median (the "
              f"two `median ms` cells); `{PAIRED}` is the median over rounds of t / t_flax "
              "timed in the same round, which cancels load that changes between rounds; "
              f"`{SPREAD}` is that ratio's quartiles. On a quiet machine the two ratios agree; "
              "where they differ the run was noisy and the quartiles say by how much.")


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
  """'256x56x56x64,32x8x8x16' -> [(256, 56, 56, 64), (32, 8, 8, 16)]."""
  return [tuple(int(d) for d in part.split("x")) for part in text.split(",") if part.strip()]


def ratios(t: List[float], base: Optional[List[float]]):
  """(ratio of medians, median per-round ratio, 'q25–q75') of ``t`` against ``base``."""
  if not base:
    return None, None, None
  per_round = _common.paired_ratios(t, base)
  q1, q3 = _common.quartiles(per_round)
  return (_common.ratio_of_medians(t, base), _common.median(per_round), f"{q1:.2f}–{q3:.2f}")


def verdict(target: float, *values: Optional[float]) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "not measured"
  if all(v <= target for v in vals):
    return "yes"
  if all(v > target for v in vals):
    return "no"
  return "unclear: the ratios disagree (noisy run), rerun"


def acceptance_table(step_rows, columns, torch_name, torch_ratios, label, quick):
  """The ratios issue 18's targets are stated in, read off the step table's rows."""
  col = {c: i for i, c in enumerate(columns)}
  rows = {(r[col["shape"]], r[col["dtype"]], r[col["pass"]], r[col["impl"]]): r
          for r in step_rows}
  small = str(SMALL_SHAPE)
  shapes = sorted({k[0] for k in rows}, key=lambda s: (s == small, s))
  out = []

  def add(criterion, target, shape, dtype, pss, ref_name, paired_ref):
    me, ref = rows.get((shape, dtype, pss, "jaxbn")), rows.get((shape, dtype, pss, ref_name))
    if me is None:
      return
    if ref_name == "flax.linen":
      rom, pr, spread = me[col[RATIO_OF_MEDIANS]], me[col[PAIRED]], me[col[SPREAD]]
    else:
      rom, pr, spread = paired_ref.get((shape, dtype, pss), (None, None, None))
    ms_ref = ref[col["median ms"]] if ref is not None else None
    roof = lambda r: r[col["% of roofline"]] if r is not None else None  # noqa: E731
    out.append([criterion, shape, dtype, pss, ref_name, f"≤ {target:.2f}", pr, rom, spread,
                verdict(target, pr, rom), me[col["median ms"]], ms_ref, roof(me), roof(ref)])

  for shape in shapes:
    big = shape != small
    if big:
      add("f32 training forward ≤ 1.0× flax", 1.0, shape, "float32", "fwd", "flax.linen", {})
      add("f32 forward+backward ≤ 0.85× flax", 0.85, shape, "float32", "fwd+bwd",
          "flax.linen", {})
    else:
      add("small shape forward ≤ 1.0× flax", 1.0, shape, "float32", "fwd", "flax.linen", {})
      add("small shape forward+backward ≤ 1.0× flax", 1.0, shape, "float32", "fwd+bwd",
          "flax.linen", {})
  for shape in shapes:
    add(f"bf16 forward+backward ≤ {torch_name}", 1.0, shape, "bfloat16", "fwd+bwd",
        torch_name, torch_ratios)
  return _results.table(
      f"Target ratios (issue 18){' (quick)' if quick else ''}: jaxbn ÷ reference, read "
      "off the step table",
      ["criterion", "shape", "dtype", "pass", "reference", "target",
       "per-round ratio (median)", "ratio of medians", "per-round q25–q75", "meets target",
       "jaxbn median ms", "reference median ms", "jaxbn % of roofline",
       "reference % of roofline"], out,
      formats=[None, None, None, None, None, None, ".2f", ".2f", None, None, ".3f", ".3f",
               ".0f", ".0f"], platform=label,
      note=("The targets were set for CPU (issue 18); on another platform they are shown for "
            "information. 'meets target' is yes when both ratios are at or under it, no when "
            "both are over, unclear when they disagree. The bf16 rows compare with torch "
            "timed in the same rounds; where jaxbn is slower, the roofline columns give the "
            "gap in memory-bandwidth terms (the same minimum bytes for both). "
            + RATIO_NOTE))



def run(args):
  """Runs the tables; returns (tables, notes) for ``_results.write_results``."""
  impls, failed = available()
  if args.only:
    keep = set(args.only.split(",")) | {"flax.linen"}
    impls = {k: v for k, v in impls.items() if k in keep}
    failed = {k: v for k, v in failed.items() if k in keep}
  shapes = SHAPES if not args.quick else [(8, 4, 4, 16)]
  if args.shapes:
    shapes = parse_shapes(args.shapes)
  shapes = shapes + [s for s in parse_shapes(args.extra_shapes) if s not in shapes]
  dtypes = ["float32", "bfloat16"]
  reps = args.reps if not args.quick else 2
  dev = jax.devices()[0]
  timing = _results.platform_label("timing")
  peak = _common.hbm_peak(getattr(dev, "device_kind", "")) if dev.platform != "cpu" else None
  big = max(int(np.prod(s)) for s in shapes) * 4
  bw, copy_bytes = roofline_bandwidth(big, reps=max(reps, 5) if not args.quick else 2)
  rows = []
  rng = np.random.default_rng(0)
  torch_error = None
  torch_dev, torch_name = (None, "torch")
  if not args.no_torch:
    try:
      torch_dev, torch_name = torch_device()
    except Exception as e:
      torch_error = _results.error_text(e)
    if torch_dev is None and torch_error is None:
      torch_error = (f"skipped: JAX runs on {dev.platform} and torch.cuda is not available "
                     "here (a CPU torch beside a GPU is not the same work)")
  if torch_name == "torch":
    torch_name = "torch (CPU)" if dev.platform == "cpu" else f"torch ({dev.platform})"
  torch_ratios = {}  # (shape, dtype, pass) -> ratios(jaxbn, torch) from the same rounds
  deadline = _common.Deadline(args.deadline)
  for dname in dtypes:
    dtype = jnp.dtype(dname)
    for shape in shapes:
      if not deadline.allows(f"{shape} {dname}"):
        continue
      started = time.perf_counter()
      c = shape[-1]
      x = jnp.asarray(rng.normal(size=shape) * 2 + 1, dtype)
      dy = jnp.asarray(rng.normal(size=shape), dtype)
      scale = jnp.asarray(rng.normal(size=c) * 0.1 + 1, jnp.float32)
      bias = jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32)
      layouts = {lay: (to_layout(x, lay), to_layout(dy, lay))
                 for lay in {layout_of(n) for n in impls}}
      layouts = {k: jax.block_until_ready(v) for k, v in layouts.items()}
      fwds, fbs, errors = {}, {}, dict(failed)
      for name, make in impls.items():
        xi, dyi = layouts[layout_of(name)]
        try:
          f, fb = compile_pair(make, shape, dtype)
          block(f(xi, scale, bias))
          block(fb(xi, scale, bias, dyi))
        except Exception as e:  # a failing anchor is a row with its error
          errors[name] = _results.error_text(e)
          continue
        fwds[name] = functools.partial(f, xi, scale, bias)
        fbs[name] = functools.partial(fb, xi, scale, bias, dyi)
      if not args.no_torch:
        if torch_dev is None:
          errors[torch_name] = torch_error
        else:
          try:
            tfns = torch_fns(shape, dname, os.cpu_count() or 1, torch_dev)
            fwds[torch_name], fbs[torch_name] = tfns
          except Exception as e:
            errors[torch_name] = torch_error = _results.error_text(e)
      size = int(np.prod(shape)) * dtype.itemsize
      for pname, fns, units in (("fwd", fwds, 3), ("fwd+bwd", fbs, 8)):
        times = _common.interleaved(fns, reps, warmup=1 if args.quick else 2)
        base = times.get("flax.linen")
        nbytes = units * size
        roof = nbytes / bw * 1e3
        if "jaxbn" in times and torch_name in times:
          torch_ratios[(str(shape), dname, pname)] = ratios(
              times["jaxbn"], times[torch_name])
        for name, t in times.items():
          med = _common.median(t) * 1e3
          rom, pr, spread = ratios(t, base)
          gbs = nbytes / (med * 1e-3) / 1e9
          row = [str(shape), dname, pname, name, med, rom, pr, spread, roof, 100 * roof / med,
                 gbs]
          if peak:
            row.append(100 * gbs * 1e9 / peak)
          rows.append(row + [""])
        for name, err in errors.items():
          rows.append([str(shape), dname, pname, name, None, None, None, None, roof, None, None]
                      + ([None] if peak else []) + [err])
      deadline.took(started)
  columns = ["shape", "dtype", "pass", "impl", "median ms", RATIO_OF_MEDIANS, PAIRED, SPREAD,
             "roofline ms", "% of roofline", "GB/s (min bytes)"]
  formats = [None, None, None, None, ".3f", ".2f", ".2f", None, ".3f", ".0f", ".1f"]
  peak_note = ""
  if peak:
    columns.append("% of HBM peak")
    formats.append(".0f")
    peak_note = (f" `% of HBM peak`: minimum bytes ÷ time ÷ {peak / 1e12:.2f} TB/s, the "
                 f"datasheet bandwidth of {dev.device_kind} (`_common.HBM_PEAK`).")
  elif dev.platform != "cpu":
    peak_note = (f" No datasheet bandwidth is known for {getattr(dev, 'device_kind', '?')!r} "
                 "(`_common.HBM_PEAK`): only the measured copy is shown.")
  columns.append("error")
  formats.append(None)
  step = _results.table(
      f"BN training step, NHWC, jit ({'quick: ' if args.quick else ''}{reps} rounds)",
      columns, rows, formats=formats, platform=timing,
      note=(f"Roofline: an in-place donated copy of {copy_bytes / 2**20:.1f} MiB ran at "
            f"{bw / 1e9:.2f} GB/s (bytes read + written). Minimum bytes: fwd = read x twice "
            "(statistics, output) + write y; fwd+bwd adds read x, dy (reductions) and "
            "read x, dy + write dx: 8 array passes in all. `roofline ms` = minimum bytes ÷ the "
            "copy's bandwidth; `GB/s (min bytes)` = minimum bytes ÷ median time."
            + peak_note + " Times are host wall clock around a blocking call (dispatch "
            "included), as a user's step sees them. " + RATIO_NOTE))
  legend = _results.table(
      "Implementations: how each is called",
      ["impl", "call", "layout", "parameters", "variance"],
      [[n if n != "torch" else torch_name, *HOW[n]] for n in HOW
       if n in ANCHORS or n == "torch"],
      platform="(describes the code; no measurement)",
      note=("Same inputs, momentum and epsilon everywhere; each returns y in x's dtype and "
            "its updated running statistics, and is differentiated w.r.t. x, scale and bias."))
  tables = [step, acceptance_table(rows, columns, torch_name, torch_ratios, timing, args.quick),
            legend]
  if not args.no_cnn:
    cnn_rows = []
    for dname in (dtypes if not args.quick else ["bfloat16"]):  # quick: one dtype suffices
      res = cnn_memory_and_compile(jnp.dtype(dname), args.quick,
                                   rounds=1 if args.quick else args.cnn_rounds)
      fl = {r[0]: r for r in res}["flax.linen"]
      for impl, temp, ct in res:
        cnn_rows.append([dname, impl, temp, temp / fl[1], ct, ct / fl[2]])
    mem = "3 layers, 32x32x32x3" if not args.quick else "2 layers, 4x8x8x3"
    n = 2 if args.quick else 20
    xla = _results.platform_label("compile")
    tables.append(_results.table(
        "Small CNN train step (conv+BN+ReLU): temporary memory and compile time",
        ["dtype", "impl", f"temp bytes ({mem})", "temp ratio",
         f"compile s ({n} layers)", "compile ratio"], cnn_rows,
        formats=[None, None, "d", ".2f", ".2f", ".2f"],
        platform=f"{xla}: temporary bytes from the compiler's memory_analysis(); compile "
                 "time is host wall clock",
        note=("Temporary bytes from `compiled.memory_analysis()`; compile time is the median of "
              "interleaved `lower().compile()` calls on fresh shapes. Both sides use the "
              "model's dtype for BN (flax: `dtype=`; jaxbn: the input's).")))
  notes = [
      "Equal work: same inputs (float32 or bfloat16 x, float32 scale/bias), momentum 0.99, "
      "epsilon 1e-5; every implementation returns its output in the input dtype and its "
      "updated running statistics and is differentiated w.r.t. x, scale and bias; flax "
      "layers are built with `dtype` = the input dtype; haiku's and equinox's parameters are "
      "passed in the input's dtype (the dtype haiku creates them in; a float32 weight would "
      "make their bfloat16 output float32); equinox runs per example, channel-first, under "
      "`jax.vmap(axis_name='batch')` as its users call it (x transposed to NCHW outside the "
      "timed call). Variance algorithms differ by design (implementations table). torch runs "
      f"`F.batch_norm` on channels-last tensors"
      + (f" with {os.cpu_count()} threads." if torch_dev == "cpu" else
         f" on {torch_dev}." if torch_dev else "."),
  ]
  if torch_error:
    notes.append(f"{torch_name} unavailable: {torch_error}")
  if deadline.note():
    notes.append(deadline.note())
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
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds: skip the shapes that would not finish by then (results are "
                      "still written, the skipped ones named in the notes)")
  p.add_argument("--cnn-rounds", type=int, default=3,
                 help="interleaved compile rounds of the 20-layer CNN (median reported)")
  p.add_argument("--hugepages", choices=["off", "on", "both"], default="off",
                 help="'both' reruns the table in a child with glibc huge pages")
  p.add_argument("--shapes", default="",
                 help="NHWC shapes instead of the default set, e.g. 256x32x32x64,32x8x8x16")
  p.add_argument("--extra-shapes", default="",
                 help="NHWC shapes added to the set, e.g. 256x56x56x64 (on a GPU: past L2)")
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
  if jax.devices()[0].platform != "cpu":
    title += f", {jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind})"
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
