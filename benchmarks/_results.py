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

Provenance: the metadata records ``code_dirty`` and ``dirty_paths``, the uncommitted (modified,
staged or untracked) files among the paths that change what a benchmark measures
(:data:`CODE_PATHS`: the library, the benchmark scripts, the test model they import), when the
run started and when it ended, plus code changed by a commit during the run.
``render_results.py`` refuses such a result: a number in ``RESULTS.md`` belongs to a commit.
Uncommitted results, ``RESULTS.md`` or README do not count (they are the outputs).

Platform: every table names what produced its numbers (``platform``, e.g. "CPU timing (2-core
VM: ...)", "XLA:CPU compile (memory_analysis)", "GPU timing (NVIDIA H100 80GB HBM3)"); see
:func:`platform_label`. A CPU run never labels a number as an accelerator's.
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


RESULTS_DIR = HERE / "results"
QUICK_DIR = HERE / "out"
ROOT = HERE.parent
# Paths whose uncommitted content changes what a benchmark measures (relative to the repository
# root). Under benchmarks/, only code counts: results/, out/ and RESULTS.md are outputs.
CODE_PATHS = ("jaxbn", "benchmarks", "tests/_resnet.py")
_CODE_SUFFIXES_UNDER_BENCHMARKS = (".py", ".sh")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git(*args: str, root: Optional[os.PathLike] = None, strip: bool = True) -> Optional[str]:
  try:
    out = subprocess.run(["git", *args], cwd=root or ROOT, capture_output=True, text=True,
                         timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() if strip else out.stdout


def _affects_numbers(path: str) -> bool:
  if path.startswith("benchmarks/"):
    return (path.endswith(_CODE_SUFFIXES_UNDER_BENCHMARKS)
            and not path.startswith(("benchmarks/results/", "benchmarks/out/")))
  return True


def code_changes(root: Optional[os.PathLike] = None) -> Optional[List[str]]:
  """Uncommitted files that change what the benchmarks measure, or None outside a git tree.

  Modified, staged, deleted, renamed and untracked files under :data:`CODE_PATHS` (untracked
  ones too: a new module of the library changes the numbers as much as an edit does). Results,
  ``RESULTS.md`` and files git ignores do not count.
  """
  out = _git("status", "--porcelain", "-z", "--untracked-files=all", "--", *CODE_PATHS,
             root=root, strip=False)
  if out is None:
    return None
  paths = set()
  entries = iter(out.split("\0"))
  for entry in entries:  # "XY path", and after a rename or copy its source as the next entry
    if len(entry) < 4:
      continue
    names = [entry[3:]]
    if "R" in entry[:2] or "C" in entry[:2]:
      names.append(next(entries, ""))
    paths.update(p for p in names if p and _affects_numbers(p))
  return sorted(paths)


def _head(root: Optional[os.PathLike] = None) -> Optional[str]:
  return _git("rev-parse", "HEAD", root=root)


# When, under what load and on which code the run started (a benchmark imports this module
# before it imports jaxbn, so the record describes the code the run loads).
_STARTED = (_now(), _load())
_STARTED_CODE = (_head(), code_changes())


def _version(module: str) -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version(module)
  except Exception:  # not installed
    return None


def _is_vm() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " hypervisor" in line for line in f)
  except OSError:
    return False


def platform_label(kind: str = "") -> str:
  """What produced a number, for the reader: the device and, if given, the kind of measurement.

  Args:
    kind: ``"timing"`` (wall clock of a run), ``"compile"`` (a compiler's report, e.g.
      ``memory_analysis()``), ``"hlo"`` (counted in the compiled program) or ``""`` (just the
      device).

  Returns:
    For example ``"CPU timing (2-core VM: Intel(R) Xeon(R) Processor)"``, ``"XLA:CPU compile
    (2-core VM: ...)"`` or ``"GPU timing (NVIDIA H100 80GB HBM3)"``. A label names the platform
    the process ran on, never another: a CPU run is never labelled as a GPU or TPU number.
  """
  import jax  # late: scripts configure devices first
  dev = jax.devices()[0]
  plat = dev.platform
  if plat == "cpu":
    where = f"{os.cpu_count()}-core {'VM' if _is_vm() else 'machine'}: {_cpu_model()}"
  else:
    where = getattr(dev, "device_kind", "") or plat
  name = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "rocm": "GPU", "tpu": "TPU"}.get(
      plat, plat.upper())
  xla = {"CPU": "XLA:CPU", "GPU": "XLA:GPU", "TPU": "XLA:TPU"}.get(name, f"XLA:{name}")
  what = {"timing": f"{name} timing", "compile": f"{xla} compile",
          "hlo": f"{xla} compiled-HLO count", "": name}[kind]
  return f"{what} ({where})"


def _accelerator(devs) -> Optional[Dict[str, Any]]:
  """The GPU as nvidia-smi names it (name, memory) next to JAX's device_kind; None on CPU."""
  if devs[0].platform not in ("gpu", "cuda", "rocm"):
    return None
  info: Dict[str, Any] = {"device_kind": getattr(devs[0], "device_kind", "")}
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    if out.returncode == 0 and out.stdout.strip():
      name, mem, driver = [c.strip() for c in out.stdout.strip().splitlines()[0].split(",")][:3]
      info.update(nvidia_smi_name=name, memory_total=mem, driver=driver)
  except (OSError, subprocess.SubprocessError, ValueError):
    pass
  return info


def run_metadata(command: str) -> Dict[str, Any]:
  """Where, when and how a benchmark ran: everything a reader needs to trust or redo a number.

  Args:
    command: the exact command line that produced the results (as a user would type it).

  Returns:
    A JSON-serializable dict: ``command``, ``date_utc`` and ``finished_utc`` (ISO 8601, when
    the run started and ended), ``git_commit`` / ``git_commit_end`` (HEAD at the start and
    the end), ``git_describe`` (``git describe --always --dirty --tags``), ``git_dirty``
    (uncommitted tracked changes outside the benchmark outputs), ``code_dirty`` and
    ``dirty_paths`` (see the module docstring: what makes ``render_results.py`` refuse the
    result), ``platform`` (:func:`platform_label`), ``machine``
    (CPU model, core count, OS, Python), ``versions`` (jax, jaxlib, flax, optax, numpy, torch
    and the optional anchors, ``None`` where not installed), ``devices`` (JAX platform, kind and
    count), ``env`` (``GLIBC_TUNABLES``, ``XLA_FLAGS``) and ``load_avg_1min`` /
    ``load_avg_1min_end`` (the machine's load when the run started and ended: above the core
    count, other work competed for the CPU).
  """
  import jax  # imported late so that scripts can configure devices first
  devs = jax.devices()
  head_start, dirty_start = _STARTED_CODE
  head_end, dirty_end = _head(), code_changes()
  dirty = None
  if head_start is None and os.environ.get("JAXBN_SOURCE_COMMIT"):
    # A copy of the tree without .git (e.g. a lent GPU machine): the commit and the dirty flag
    # as `python benchmarks/_results.py --source-env` printed them on the checkout it came from.
    head_start = head_end = os.environ["JAXBN_SOURCE_COMMIT"]
    flag = os.environ.get("JAXBN_SOURCE_DIRTY_PATHS")
    if flag is not None:
      dirty = set(filter(None, flag.split(",")))
  if dirty_start is not None and dirty_end is not None:
    dirty = set(dirty_start) | set(dirty_end)
    if head_start and head_end and head_start != head_end:  # a commit landed during the run
      changed = _git("diff", "--name-only", head_start, head_end, "--", *CODE_PATHS)
      dirty |= {p for p in (changed or "").splitlines() if _affects_numbers(p)}
  # Tracked changes outside the outputs (results/, RESULTS.md, README's generated table).
  status = _git("status", "--porcelain", "--untracked-files=no", strip=False)
  outputs = ("benchmarks/results/", "benchmarks/RESULTS.md", "README.md")
  other = None if status is None else [
      ln[3:] for ln in status.splitlines() if ln[3:] and not ln[3:].startswith(outputs)]
  return {
      "command": command,
      "date_utc": _STARTED[0],
      "finished_utc": _now(),
      "git_commit": head_start,
      "git_commit_end": head_end,
      "git_describe": (_git("describe", "--always", "--dirty", "--tags")
                       or os.environ.get("JAXBN_SOURCE_DESCRIBE")),
      # Uncommitted tracked changes outside the benchmark outputs when the run ended.
      "git_dirty": None if other is None else bool(other),
      # Uncommitted (or committed-during-the-run) changes to the code that makes the numbers:
      # render_results.py refuses results with code_dirty true.
      "code_dirty": None if dirty is None else bool(dirty),
      "dirty_paths": None if dirty is None else sorted(dirty),
      "platform": platform_label(),
      "machine": {
          "cpu": _cpu_model(),
          "cores": os.cpu_count(),
          "os": f"{platform.system()} {platform.release()}",
          "python": platform.python_version(),
      },
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                            "dm-haiku", "equinox", "keras")},
      "accelerator": _accelerator(devs),
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
          formats: Optional[Sequence[Optional[str]]] = None,
          platform: Optional[str] = None) -> Dict[str, Any]:
  """One table: validates that every row has one cell per column and cleans the cells.

  ``platform`` names what produced the numbers (:func:`platform_label`, or a sentence such as
  "TPU compile estimate (libtpu AOT on a CPU machine, no TPU)"); ``write_results`` fills in the
  run's device when a table gives none.

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
  out = {"title": title, "note": note, "columns": columns, "rows": out_rows,
         "formats": list(formats) if formats is not None else [None] * len(columns)}
  if platform:
    out["platform"] = str(platform)
  return out


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
                         formats=t.get("formats"),
                         platform=t.get("platform") or platform_label()))
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


def source_env() -> str:
  """Shell assignments that carry this checkout's provenance to a copy of it without ``.git``."""
  dirty = code_changes() or []
  return (f"JAXBN_SOURCE_COMMIT={_head()} "
          f"JAXBN_SOURCE_DESCRIBE={_git('describe', '--always', '--dirty', '--tags')} "
          f"JAXBN_SOURCE_DIRTY_PATHS={','.join(dirty)}")


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="Benchmark result provenance.")
  parser.add_argument("--source-env", action="store_true",
                      help="print JAXBN_SOURCE_* assignments for a run on a copy without .git")
  parser.add_argument("--check-clean", action="store_true",
                      help="exit 1 (listing them) if code that changes the numbers is "
                           "uncommitted")
  a = parser.parse_args()
  if a.source_env:
    print(source_env())
  if a.check_clean:
    changed = code_changes()
    if changed:
      print("Uncommitted code that changes benchmark numbers (commit it first):\n  "
            + "\n  ".join(changed), file=sys.stderr)
      sys.exit(1)
