"""Renders the README's "Why, and when not" table; its numbers come from the result JSONs.

Usage::

    python docs/render_readme.py           # rewrite the generated block of README.md
    python docs/render_readme.py --check   # exit 1 if README.md's block is stale (tests, CI)

The block sits between ``<!-- BEGIN GENERATED why-table ... -->`` and
``<!-- END GENERATED why-table -->``. Each measured cell is read from
``benchmarks/results/<script>.json`` (written by ``benchmarks/<script>.py``); where that file or
table does not exist yet, the cell names the command that measures it instead of a number.
Every other row states a behaviour and names the test that checks it. Every row names its
platform: "CPU timing (2-core VM)" for a wall-clock time, "XLA:CPU compile" for the compiler's
memory report, "XLA:CPU compiled-HLO count", "CUDA lowering count" (StableHLO lowered for GPU on
a CPU machine), "TPU compile estimate" (libtpu's cost model, no TPU), "CPU test" for a behaviour
CI checks; no row claims an accelerator measurement from a CPU run.

Results produced from uncommitted code (``code_dirty`` in their metadata) are refused: the
render and ``--check`` exit 1 (see ``benchmarks/render_results.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from results_tables import load_results  # noqa: E402  (docs/_ext/results_tables.py)
from render_results import provenance_problem  # noqa: E402  (benchmarks/render_results.py)
README = os.path.join(ROOT, "README.md")
BEGIN = ("<!-- BEGIN GENERATED why-table: python docs/render_readme.py "
         "(numbers from benchmarks/results/*.json) -->")
END = "<!-- END GENERATED why-table -->"
SMALL_SHAPE = "(32, 8, 8, 16)"   # bench_core's small shape: per-kernel overhead dominates
# bench_core's paired ratio (median over rounds of t_jaxbn / t_flax); older results named it so:
PAIRED = ("per-round ratio to flax.linen (median)", "ratio to flax.linen")
# The results files whose numbers this table shows.
SOURCES = ("bench_core", "bench_collectives", "bench_accel_cuda", "bench_accel_tpu")


def _table(results: Dict[str, Any], name: str, title_part: str) -> Optional[Dict[str, Any]]:
  doc = results.get(name)
  if doc is None:
    return None
  for t in doc.get("tables", []):
    if title_part in t["title"]:
      return t
  return None


def _rows(t: Dict[str, Any], **where: Any) -> List[Dict[str, Any]]:
  out = []
  for r in t["rows"]:
    row = dict(zip(t["columns"], r))
    if all(f(row[k]) if callable(f) else row.get(k) == f for k, f in where.items()):
      out.append(row)
  return out


def _range(values: List[float]) -> str:
  values = [v for v in values if isinstance(v, (int, float))]
  if not values:
    return "—"
  lo, hi = min(values), max(values)
  return f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}×"


def _column(t: Optional[Dict[str, Any]], names) -> Optional[str]:
  for n in ([names] if isinstance(names, str) else names):
    if t is not None and n in t["columns"]:
      return n
  return None


def _per_dtype(t: Optional[Dict[str, Any]], column, **where: Any) -> Optional[str]:
  column = _column(t, column)
  if t is None or column is None:
    return None
  parts = []
  for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
    rows = _rows(t, dtype=dtype, **where)
    if rows:
      parts.append(f"{_range([r[column] for r in rows])} ({short})")
  return ", ".join(parts) if parts else None


def measured(results: Dict[str, Any]) -> Dict[str, Optional[str]]:
  """The measured cells, or None where the result file/table is missing."""
  step = _table(results, "bench_core", "BN training step")
  cnn = _table(results, "bench_core", "Small CNN train step")
  large: Callable[[str], bool] = lambda s: s != SMALL_SHAPE
  return {
      "memory": _per_dtype(cnn, "temp ratio", impl="jaxbn"),
      "fwd_bwd_large": _per_dtype(step, PAIRED, impl="jaxbn", **{
          "pass": "fwd+bwd", "shape": large}),
      "fwd_large": _per_dtype(step, PAIRED, impl="jaxbn", **{
          "pass": "fwd", "shape": large}),
      "small": _per_dtype(step, PAIRED, impl="jaxbn", **{
          "pass": "fwd+bwd", "shape": SMALL_SHAPE}),
  }


def _short(label: str) -> str:
  """'CPU timing (2-core VM: Intel Xeon)' -> 'CPU timing (2-core VM)'."""
  head, _, rest = label.partition(" (")
  if not rest:
    return label
  inner = rest.split(":", 1)[0].split(";", 1)[0].rstrip(")")
  return f"{head} ({inner})"


def platform(results: Dict[str, Any], name: str, title_part: str, kind: str) -> str:
  """The platform of a table's numbers: its own label, or one derived from its run (older JSON).

  ``kind`` is the measurement ("timing", "compile", "hlo") used for results that predate the
  per-table label; the device always comes from the run's metadata, never assumed.
  """
  t = _table(results, name, title_part)
  if t is not None and t.get("platform"):
    return _short(t["platform"])
  meta = results.get(name, {}).get("meta", {})
  dev, mach = meta.get("devices", {}), meta.get("machine", {})
  plat = str(dev.get("platform", "?")).upper()
  xla = f"XLA:{plat}"
  what = {"timing": f"{plat} timing", "compile": f"{xla} compile",
          "hlo": f"{xla} compiled-HLO count"}[kind]
  where = f"{mach.get('cores', '?')} cores" if plat == "CPU" else dev.get("kind", "?")
  return f"{what} ({where})"


def accelerator_rows(results: Dict[str, Any]) -> List[str]:
  """ResNet-50 rows from bench_accel (CUDA lowering counts, TPU compile estimates), if any."""
  out = []
  t = _table(results, "bench_accel_cuda", "CUDA lowering count: ResNet-50")
  cells = {}
  if t is not None and {"layer", "mode", "case/if", "optimization barriers"} <= set(t["columns"]):
    for impl in ("jaxbn.BatchNorm(default)", "flax.BatchNorm(fast)"):
      rows = _rows(t, layer=impl, mode="shard_map") or _rows(t, layer=impl)
      if rows and isinstance(rows[0]["case/if"], int):
        cells[impl] = (f"{rows[0]['case/if']} conditionals, {rows[0]['optimization barriers']} "
                       f"optimization barriers ({rows[0]['mode']})")
  if len(cells) == 2:
    out.append("| ResNet-50 train step on GPU: run-time conditionals (each a host sync on "
               "XLA:GPU) and optimization barriers | "
               f"{cells['jaxbn.BatchNorm(default)']} | {cells['flax.BatchNorm(fast)']} | "
               "CUDA lowering count (lowered on a CPU machine; not a GPU timing) | "
               "[benchmarks](benchmarks/RESULTS.md) |")
  else:
    out.append("| ResNet-50 train step on GPU: run-time conditionals and optimization barriers "
               "| not measured yet: `python benchmarks/bench_accel.py --part cuda` | | "
               "CUDA lowering count "
               "| [benchmarks](benchmarks/RESULTS.md) |")
  t = _table(results, "bench_accel_tpu", "TPU compile estimate")
  own = "norm's own / flax fast's"
  cell = None
  if t is not None and {"topology", "model", "layer", "mode", own} <= set(t["columns"]):
    rows = [r for r in _rows(t, model="resnet50", layer="jaxbn.BatchNorm(default)")
            if isinstance(r[own], (int, float))]
    if rows:
      r = rows[0]
      cell = f"{r[own]:.2f}× of flax fast's ({r['topology']}, {r['mode']})"
  out.append("| ResNet-50 synced train step on TPU: BN's own estimated cycles (minus the "
             "no-norm step) | " + (cell or "not measured yet: `TPU_SKIP_MDS_QUERY=1 "
                                   "JAX_PLATFORMS=cpu unshare --net python "
                                   "benchmarks/bench_accel.py --part tpu`")
             + " | 1× | TPU compile estimate (libtpu cost model on a CPU machine; not a TPU "
             "timing) | [benchmarks](benchmarks/RESULTS.md) |")
  return out


def collectives(results: Dict[str, Any]) -> Optional[Dict[str, str]]:
  """All-reduced bytes of one synced BN layer (fwd + bwd) at the largest C, jaxbn vs flax."""
  t = _table(results, "bench_collectives", "All-reduced bytes per device")
  if t is None:
    return None
  counts = [c for c in t["columns"] if c.startswith("bytes at ") and c.endswith(" devices")]
  c_max = max(r[t["columns"].index("C")] for r in t["rows"])
  out = {"C": str(c_max)}
  for impl, key in (("jaxbn_stable", "jaxbn"), ("flax", "flax")):
    rows = _rows(t, implementation=impl, C=c_max)
    if not rows:
      return None
    sizes = [rows[0][c] for c in counts]
    devs = ", ".join(c[len("bytes at "):-len(" devices")] for c in counts)
    if len(set(sizes)) == 1:
      out[key] = f"{sizes[0]:,} B at {devs} devices"
    else:
      out[key] = "; ".join(f"{v:,} B at {c[len('bytes at '):]}" for v, c in zip(sizes, counts))
    extra = rows[0].get("bytes in the correction branch")
    if key == "jaxbn" and extra:
      out[key] += f" (+{extra:,} B when the rare exact correction runs)"
  return out


def _cell(value: Optional[str], script: str) -> str:
  return f"{value} of flax's" if value else f"not measured yet: `python benchmarks/{script}.py`"


def render(results: Dict[str, Any]) -> str:
  m = measured(results)
  coll = collectives(results)
  step_p = platform(results, "bench_core", "BN training step", "timing")
  mem_p = platform(results, "bench_core", "Small CNN train step", "compile")
  coll_p = platform(results, "bench_collectives", "All-reduced bytes per device", "hlo")
  bench = "[benchmarks](benchmarks/RESULTS.md)"
  if coll:
    coll_row = (f"| sync BN all-reduce per layer, forward + backward, C = {coll['C']} | "
                f"{coll['jaxbn']} | {coll['flax']} | {coll_p}, simulated devices | {bench} |")
  else:
    coll_row = ("| sync BN all-reduce per layer, forward + backward | not measured yet: "
                "`python benchmarks/bench_collectives.py` | | compiled-HLO count | "
                f"{bench} |")
  rows = [
      "| | jaxbn | flax's `BatchNorm` | platform | checked by |",
      "|---|---|---|---|---|",
      "| sync BN, masked or uneven device batches | global statistics, each device weighted by "
      "its valid count | averages the per-device means (flax #2417) | CPU test (CI) | "
      "`tests/test_oracle_flax2417.py` |",
      "| float32 data far from zero (`1e4 + N(0, 1)`) | exact variance | 0 or garbage with its "
      "default fast variance | CPU test (CI) | `tests/test_batch_norm.py`, "
      "`tests/test_docs.py` |",
      coll_row,
      *accelerator_rows(results),
      "| train-step temporary memory, small CNN | " + _cell(m["memory"], "bench_core")
      + f" | 1× | {mem_p}: memory_analysis() | {bench} |",
      "| BN forward+backward time, large NHWC | " + _cell(m["fwd_bwd_large"], "bench_core")
      + f" | 1× | {step_p} | {bench} |",
      "| BN training forward time, large NHWC | " + _cell(m["fwd_large"], "bench_core")
      + f" | 1× | {step_p} | {bench} |",
      "| **when not:** tiny activations `(32, 8, 8, 16)`, forward+backward | "
      + _cell(m["small"], "bench_core") + f" | 1× | {step_p} | {bench} |",
      "| **when not:** a test pins flax's exact bits | equal within float tolerance, not bit "
      "for bit | — | CPU test (CI) | `tests/test_dropin.py` |",
      "",
      "Times are the median over interleaved rounds of t_jaxbn / t_flax from the same round "
      "(ranges over shapes; < 1× is faster), measured on the platform named: a CPU timing says "
      "nothing about a GPU or TPU, whose rows are compiler counts and estimates.",
  ]
  return "\n".join([BEGIN] + rows + [END])


def updated_readme(text: str, results: Dict[str, Any]) -> str:
  """``text`` with its generated block replaced; raises if the markers are missing."""
  i, j = text.find(BEGIN), text.find(END)
  if i < 0 or j < i:
    raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
  return text[:i] + render(results) + text[j + len(END):]


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
  args = p.parse_args(argv)
  with open(README) as f:
    text = f.read()
  results = load_results(ROOT)
  problems = [p for p in (provenance_problem(results[n]) for n in SOURCES if n in results) if p]
  if problems:
    print("render_readme: refusing results from a dirty tree:\n  - " + "\n  - ".join(problems),
          file=sys.stderr)
    return 1
  new = updated_readme(text, results)
  if args.check:
    if new != text:
      print("README.md's why-table is stale: run `python docs/render_readme.py` and commit.",
            file=sys.stderr)
      return 1
    return 0
  if new != text:
    with open(README, "w") as f:
      f.write(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
