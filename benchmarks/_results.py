"""Benchmark results as data: every number in ``RESULTS.md`` comes from a JSON file written here.

A benchmark script builds its tables as plain lists and calls :func:`write_results`, which
stores ``benchmarks/results/<name>.json``::

    {"name": ..., "title": ..., "meta": run_metadata(command),
     "tables": [{"title", "note", "columns": [...], "rows": [[...], ...], "formats": [...]}],
     "notes": [...]}

``render_results.py`` turns every such file into ``RESULTS.md``; nobody types a number into
it. ``formats`` (optional, one per column) is a Python format spec such as ``".2f"`` used when
rendering; ``None`` in a row renders as an em dash (e.g. an anchor that failed, whose error
is in the row's last column).

Quick runs (``--quick``) write to ``benchmarks/out/`` (git-ignored) unless ``--out`` says
otherwise, so a smoke run never overwrites the committed results of a full run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load() -> Optional[float]:
  return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# When and under what load the run started (a benchmark imports this module first thing).
_STARTED = (_now(), _load())
RESULTS_DIR = HERE / "results"
QUICK_DIR = HERE / "out"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version(module)
  except Exception:  # not installed
    return None


def run_metadata(command: str) -> Dict[str, Any]:
  """Where, when and how a benchmark ran: everything a reader needs to trust or redo a number.

  Args:
    command: the exact command line that produced the results (as a user would type it).

  Returns:
    A JSON-serializable dict: ``command``, ``date_utc`` and ``finished_utc`` (ISO 8601, when
    the run started and ended), ``git_commit`` and
    ``git_dirty`` (uncommitted changes to tracked files when the run started), ``machine``
    (CPU model, core count, OS, Python), ``versions`` (jax, jaxlib, flax, optax, numpy, torch
    and the optional anchors, ``None`` where not installed), ``devices`` (JAX platform, kind and
    count), ``env`` (``GLIBC_TUNABLES``, ``XLA_FLAGS``) and ``load_avg_1min`` /
    ``load_avg_1min_end`` (the machine's load when the run started and ended: above the core
    count, other work competed for the CPU).
  """
  import jax  # imported late so that scripts can configure devices first
  devs = jax.devices()
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "command": command,
      "date_utc": _STARTED[0],
      "finished_utc": _now(),
      "git_commit": _git("rev-parse", "HEAD"),
      "git_dirty": None if status is None else bool(status),
      "machine": {
          "cpu": _cpu_model(),
          "cores": os.cpu_count(),
          "os": f"{platform.system()} {platform.release()}",
          "python": platform.python_version(),
      },
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                            "dm-haiku", "equinox", "keras")},
      "devices": {"platform": devs[0].platform,
                  "kind": getattr(devs[0], "device_kind", ""),
                  "count": len(devs)},
      "env": {k: os.environ.get(k, "") for k in ("GLIBC_TUNABLES", "XLA_FLAGS")},
      # 1-minute load average when the run started: on a shared machine, a load above the core
      # count means the timings were taken while other work competed for the CPU.
      "load_avg_1min": _STARTED[1],
      "load_avg_1min_end": _load(),
  }


def _clean(v: Any) -> Any:
  """JSON-safe cell: numpy scalars become Python numbers, NaN/inf become strings."""
  if hasattr(v, "item") and not isinstance(v, (str, bytes)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  if isinstance(v, (list, tuple)):
    return str(tuple(v))
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return str(v)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, note: str = "",
          formats: Optional[Sequence[Optional[str]]] = None) -> Dict[str, Any]:
  """One table: validates that every row has one cell per column and cleans the cells.

  Raises:
    ValueError: a row's length differs from ``len(columns)``, or ``formats`` has the wrong
      length.
  """
  columns = [str(c) for c in columns]
  out_rows: List[List[Any]] = []
  for i, row in enumerate(rows):
    row = list(row)
    if len(row) != len(columns):
      raise ValueError(f"table {title!r}: row {i} has {len(row)} cells for {len(columns)} "
                       f"columns {columns}; give one value per column (None for a missing one)")
    out_rows.append([_clean(v) for v in row])
  if formats is not None and len(formats) != len(columns):
    raise ValueError(f"table {title!r}: `formats` has {len(formats)} entries for "
                     f"{len(columns)} columns; give one format spec (or None) per column")
  return {"title": title, "note": note, "columns": columns, "rows": out_rows,
          "formats": list(formats) if formats is not None else [None] * len(columns)}


def default_dir(quick: bool) -> pathlib.Path:
  """``benchmarks/results`` for full runs, ``benchmarks/out`` (git-ignored) for ``--quick``."""
  return QUICK_DIR if quick else RESULTS_DIR


def command_line() -> str:
  """The command that started this process, relative to the repository root when possible."""
  script = pathlib.Path(sys.argv[0]).resolve()
  try:
    script = script.relative_to(HERE.parent)
  except ValueError:
    pass
  return " ".join(["python", str(script), *sys.argv[1:]])


def write_results(name: str, tables: List[Dict[str, Any]], *, command: str,
                  notes: Sequence[str] = (), title: Optional[str] = None,
                  out_dir: Optional[os.PathLike] = None) -> pathlib.Path:
  """Writes ``<out_dir>/<name>.json`` with the run's metadata, tables and notes.

  Args:
    name: file stem, e.g. ``"bench_core"``; ``render_results.py`` orders sections by it.
    tables: dicts from :func:`table` (or with the same keys: ``title``, ``note``, ``columns``,
      ``rows``, optional ``formats``).
    command: the exact command line of the run (see :func:`command_line`).
    notes: free-text notes rendered under the section (what is compared, equal-work caveats).
    title: section title in ``RESULTS.md`` (default: ``name``).
    out_dir: destination folder (default ``benchmarks/results``), created if missing.

  Returns:
    The path written.

  Raises:
    ValueError: ``name`` is not a plain file stem, or a table is malformed.
  """
  if not name or "/" in name or name.startswith("."):
    raise ValueError(f"write_results: `name` must be a plain file stem, got {name!r}")
  checked = []
  for t in tables:
    missing = {"title", "columns", "rows"} - set(t)
    if missing:
      raise ValueError(f"write_results: a table lacks {sorted(missing)}; build it with "
                       "_results.table(title, columns, rows)")
    checked.append(table(t["title"], t["columns"], t["rows"], note=t.get("note", ""),
                         formats=t.get("formats")))
  doc = {"name": name, "title": title or name, "meta": run_metadata(command),
         "tables": checked, "notes": [str(n) for n in notes]}
  out = pathlib.Path(out_dir) if out_dir is not None else RESULTS_DIR
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
  print(f"# wrote {path}", file=sys.stderr)
  return path


def print_table(t: Dict[str, Any]) -> None:
  """Prints one table as Markdown on stdout (so a run shows its numbers as it goes)."""
  from render_results import render_table  # same formatting as RESULTS.md
  print(render_table(t), flush=True)


def add_output_args(parser) -> None:
  """Adds ``--out DIR`` (where the JSON goes) to a benchmark's argument parser."""
  parser.add_argument("--out", default=None,
                      help="folder for the result JSON (default: benchmarks/results, or "
                           "benchmarks/out with --quick)")


def output_dir(args) -> pathlib.Path:
  """The folder chosen by ``--out``, else :func:`default_dir` for ``args.quick``."""
  if getattr(args, "out", None):
    return pathlib.Path(args.out)
  return default_dir(bool(getattr(args, "quick", False)))


def error_text(e: BaseException) -> str:
  """A one-line error for a table cell: type and the first line of the message."""
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {msg}"[:160]
