"""Renders the README's "Why, and when not" table; its numbers come from the result JSONs.

Usage::

    python docs/render_readme.py           # rewrite the generated block of README.md
    python docs/render_readme.py --check   # exit 1 if README.md's block is stale (tests, CI)

The block sits between ``<!-- BEGIN GENERATED why-table ... -->`` and
``<!-- END GENERATED why-table -->``. Each measured cell is read from
``benchmarks/results/<script>.json`` (written by ``benchmarks/<script>.py``); where that file or
table does not exist yet, the cell names the command that measures it instead of a number.
Every other row states a behaviour and names the test that checks it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))
from results_tables import load_results  # noqa: E402  (docs/_ext/results_tables.py)
README = os.path.join(ROOT, "README.md")
BEGIN = ("<!-- BEGIN GENERATED why-table: python docs/render_readme.py "
         "(numbers from benchmarks/results/*.json) -->")
END = "<!-- END GENERATED why-table -->"
SMALL_SHAPE = "(32, 8, 8, 16)"   # bench_core's small shape: per-kernel overhead dominates


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


def _per_dtype(t: Optional[Dict[str, Any]], column: str, **where: Any) -> Optional[str]:
  if t is None:
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
      "fwd_bwd_large": _per_dtype(step, "ratio to flax.linen", impl="jaxbn", **{
          "pass": "fwd+bwd", "shape": large}),
      "fwd_large": _per_dtype(step, "ratio to flax.linen", impl="jaxbn", **{
          "pass": "fwd", "shape": large}),
      "small": _per_dtype(step, "ratio to flax.linen", impl="jaxbn", **{
          "pass": "fwd+bwd", "shape": SMALL_SHAPE}),
  }


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
  if coll:
    coll_row = (f"| sync BN all-reduce per layer, forward + backward, C = {coll['C']} | "
                f"{coll['jaxbn']} | {coll['flax']} | [benchmarks](benchmarks/RESULTS.md) |")
  else:
    coll_row = ("| sync BN all-reduce per layer, forward + backward | not measured yet: "
                "`python benchmarks/bench_collectives.py` | | [benchmarks](benchmarks/RESULTS.md) |")
  rows = [
      "| | jaxbn | flax's `BatchNorm` | checked by |",
      "|---|---|---|---|",
      "| sync BN, masked or uneven device batches | global statistics, each device weighted by "
      "its valid count | averages the per-device means (flax #2417) | "
      "`tests/test_oracle_flax2417.py` |",
      "| float32 data far from zero (`1e4 + N(0, 1)`) | exact variance | 0 or garbage with its "
      "default fast variance | `tests/test_batch_norm.py`, `tests/test_docs.py` |",
      coll_row,
      "| train-step temporary memory, small CNN | " + _cell(m["memory"], "bench_core")
      + " | 1× | [benchmarks](benchmarks/RESULTS.md) |",
      "| BN forward+backward time, large NHWC | " + _cell(m["fwd_bwd_large"], "bench_core")
      + " | 1× | [benchmarks](benchmarks/RESULTS.md) |",
      "| BN training forward time, large NHWC | " + _cell(m["fwd_large"], "bench_core")
      + " | 1× | [benchmarks](benchmarks/RESULTS.md) |",
      "| **when not:** tiny activations `(32, 8, 8, 16)`, forward+backward | "
      + _cell(m["small"], "bench_core") + " | 1× | [benchmarks](benchmarks/RESULTS.md) |",
      "| **when not:** a test pins flax's exact bits | equal within float tolerance, not bit "
      "for bit | — | `tests/test_dropin.py` |",
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
  new = updated_readme(text, load_results(ROOT))
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
