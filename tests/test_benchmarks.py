"""Benchmarks as code: each script's ``--quick`` run writes a well-formed JSON, RESULTS.md is
rendered from the committed JSON only, and a stale RESULTS.md is detected.

No timing is asserted (shared CI machines are noisy); what is asserted is that every script
runs, writes its tables with the run's metadata, that jaxbn itself never appears as a failed
row, and that a failing anchor would appear as a row with its error instead of vanishing.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _results  # noqa: E402
import render_results  # noqa: E402

SCRIPTS = ["bench_core", "bench_variants", "bench_sync", "bench_collectives", "bench_model",
           "bench_fold"]


def _run_quick(script, out_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("JAX_NUM_CPU_DEVICES", None)  # each script sets up its own devices
  proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out",
                         str(out_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, (f"{script} --quick failed (rc {proc.returncode}):\n"
                                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads((out_dir / f"{script}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_results_json(script, tmp_path):
  doc = _run_quick(script, tmp_path)
  assert doc["name"] == script
  meta = doc["meta"]
  assert meta["command"].endswith(f"benchmarks/{script}.py --quick --out {tmp_path}")
  assert meta["versions"]["jax"] and meta["versions"]["flax"]
  assert meta["machine"]["cores"] >= 1 and meta["devices"]["count"] >= 1
  assert len(meta["git_commit"] or "") == 40
  assert doc["tables"], f"{script} wrote no table"
  for t in doc["tables"]:
    assert t["rows"], f"{script}: table {t['title']!r} is empty"
    cols = t["columns"]
    for row in t["rows"]:
      assert len(row) == len(cols)
      cells = dict(zip(cols, row))
      names = " ".join(str(v) for v in row[:5])
      # jaxbn's own rows must never be error rows.
      if "jaxbn" in names and "error" in cells:
        assert not cells["error"], f"{script}: jaxbn row failed: {row}"
  if script == "bench_core":  # every anchor is a row: timed, or with the error that stopped it
    import bench_core  # noqa: PLC0415
    step = doc["tables"][0]
    impls = {row[step["columns"].index("impl")] for row in step["rows"]}
    assert impls == set(bench_core.ANCHORS) | {"torch (CPU)"}, impls
  text = render_results.render(tmp_path)
  assert f"## {doc['title']}" in text and meta["command"] in text


def test_failing_anchor_is_a_row_not_an_omission(monkeypatch):
  """bench_core: an anchor that raises is listed with its error (not silently dropped)."""
  import bench_core  # noqa: PLC0415

  def broken(c, dtype):
    raise RuntimeError("anchor exploded")

  monkeypatch.setitem(bench_core.ANCHORS, "broken-anchor", broken)
  impls, failed = bench_core.available()
  assert "broken-anchor" not in impls
  assert failed["broken-anchor"] == "RuntimeError: anchor exploded"


def test_table_rejects_ragged_rows():
  with pytest.raises(ValueError, match=r"row 1 has 2 cells for 3 columns"):
    _results.table("t", ["a", "b", "c"], [[1, 2, 3], [1, 2]])
  with pytest.raises(ValueError, match=r"`formats` has 1 entries for 2 columns"):
    _results.table("t", ["a", "b"], [[1, 2]], formats=[".2f"])


def test_render_check_detects_stale_file(tmp_path):
  results = tmp_path / "results"
  path = _results.write_results(
      "bench_demo", [_results.table("demo", ["impl", "ms"], [["x", 1.23456], ["y", None]],
                                    formats=[None, ".2f"])],
      command="python benchmarks/bench_demo.py", out_dir=results)
  assert path == results / "bench_demo.json"
  out = tmp_path / "RESULTS.md"
  assert render_results.main(["--results", str(results), "--output", str(out)]) == 0
  text = out.read_text()
  assert "GENERATED" in text and "| x | 1.23 |" in text and "| y | — |" in text
  assert render_results.main(["--check", "--results", str(results), "--output", str(out)]) == 0
  out.write_text(text.replace("1.23", "1.32"))  # a hand-typed number
  assert render_results.main(["--check", "--results", str(results), "--output", str(out)]) == 1


def test_committed_results_md_is_rendered_from_committed_json():
  """RESULTS.md equals what benchmarks/results/*.json render (no hand-typed numbers)."""
  assert render_results.main(["--check"]) == 0, (
      "benchmarks/RESULTS.md is stale; run `python benchmarks/render_results.py`")
