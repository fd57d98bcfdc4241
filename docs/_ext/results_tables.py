"""Benchmark result files (``benchmarks/results/*.json``) as Markdown: no Sphinx needed.

Used by the docs build (``jaxbn_docs``) and tested in ``tests/test_docs.py``. The file format is
``benchmarks/_results.py``'s: ``{"name", "title", "meta", "tables": [{"title", "note",
"columns", "rows", "formats"}], "notes"}``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional, Union


def load_results(root: str) -> Dict[str, Dict[str, Any]]:
  """Every ``benchmarks/results/*.json``, keyed by file stem."""
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "benchmarks", "results", "*.json"))):
    with open(path) as f:
      out[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
  return out


def _cell(v: Any, spec: Optional[str]) -> str:
  if v is None:
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if spec and isinstance(v, (int, float)):
    try:
      return format(v, spec)
    except (TypeError, ValueError):
      pass
  if isinstance(v, float):
    return format(v, ".4g")
  return str(v).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Dict[str, Any]) -> List[str]:
  """One result table (``_results.table`` format) as Markdown lines, without its title."""
  cols = t["columns"]
  formats = t.get("formats") or [None] * len(cols)
  lines = []
  if t.get("note"):
    lines += [t["note"], ""]
  lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cols) + " |")
  lines.append("|" + "---|" * len(cols))
  for row in t["rows"]:
    lines.append("| " + " | ".join(_cell(v, f) for v, f in zip(row, formats)) + " |")
  return lines


def run_line(doc: Dict[str, Any]) -> str:
  """Where and how a result file was produced, in one sentence."""
  meta = doc.get("meta", {})
  mach = meta.get("machine", {})
  ver = meta.get("versions", {})
  dev = meta.get("devices", {})
  commit = (meta.get("git_commit") or "?")[:10]
  dirty = " (with uncommitted changes)" if meta.get("git_dirty") else ""
  return (f"Produced by `{meta.get('command', '?')}` on {meta.get('date_utc', '?')}: "
          f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
          f"{dev.get('count', '?')} {dev.get('platform', '?')} device(s); "
          f"jax {ver.get('jax')}, flax {ver.get('flax')}; commit `{commit}`{dirty}.")


def select_table(t: Dict[str, Any], columns: Optional[str],
                 where: Optional[str]) -> Union[Dict[str, Any], str]:
  """The table restricted to ``columns`` ("a, b") and to rows matching ``where`` ("col=v; ...").

  Returns the new table, or an error message when a column does not exist.
  """
  cols = t["columns"]
  rows = t["rows"]
  for cond in filter(None, (c.strip() for c in (where or "").split(";"))):
    key, _, value = cond.partition("=")
    key, value = key.strip(), value.strip()
    if key not in cols:
      return f"`:where:` names column {key!r}, not among {cols}"
    i = cols.index(key)
    rows = [r for r in rows if str(r[i]) == value]
  keep = list(range(len(cols)))
  if columns:
    names = [c.strip() for c in columns.split(",")]
    bad = [c for c in names if c not in cols]
    if bad:
      return f"`:columns:` names {bad}, not among {cols}"
    keep = [cols.index(c) for c in names]
  formats = t.get("formats") or [None] * len(cols)
  return {"title": t["title"], "note": t.get("note", ""), "columns": [cols[i] for i in keep],
          "formats": [formats[i] for i in keep], "rows": [[r[i] for i in keep] for r in rows]}
