"""Benchmarks as code: each script's ``--quick`` run writes a well-formed JSON, RESULTS.md is
rendered from the committed JSON only, and a stale RESULTS.md is detected.

No timing is asserted (shared CI machines are noisy); what is asserted is that every script
runs, writes its tables with the run's metadata and each table's platform, that jaxbn itself
never appears as a failed row, that an installed anchor is measured (never an error row), that
a failing anchor would appear as a row with its error instead of vanishing, and that results
produced from uncommitted code are refused by the renderers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
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
    assert t.get("platform"), f"{script}: table {t['title']!r} does not name its platform"
    assert "GPU" not in t["platform"] and "TPU timing" not in t["platform"]  # a CPU run
  assert meta["code_dirty"] in (True, False) and isinstance(meta["dirty_paths"], list)
  if script == "bench_core":  # every anchor is a row: timed, or with the error that stopped it
    import bench_core  # noqa: PLC0415
    step = doc["tables"][0]
    col = {c: i for i, c in enumerate(step["columns"])}
    impls = {row[col["impl"]] for row in step["rows"]}
    assert impls == set(bench_core.ANCHORS) | {"torch (CPU)"}, impls
    modules = {"haiku": "haiku", "equinox": "equinox", "torch (CPU)": "torch"}
    for row in step["rows"]:  # an installed anchor is measured, not an error row
      mod = modules.get(row[col["impl"]])
      if mod and importlib.util.find_spec(mod) is not None:
        assert not row[col["error"]] and row[col["median ms"]] is not None, row
    titles = [t["title"] for t in doc["tables"]]
    assert any(t.startswith("Target ratios") for t in titles), titles
  if meta["code_dirty"]:  # run from a checkout with local edits: the renderer refuses it
    with pytest.raises(render_results.DirtyResultError, match="uncommitted code"):
      render_results.render(tmp_path)
    return
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


@pytest.fixture
def committed_code(monkeypatch):
  """Result files written by the test record committed code (the checkout may have edits)."""
  monkeypatch.setattr(_results, "code_changes", lambda root=None: [])
  monkeypatch.setattr(_results, "_STARTED_CODE", (_results._head(), []))


def test_render_check_detects_stale_file(tmp_path, committed_code):
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


def _git(cwd, *args):
  subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                 env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                          GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_changes_lists_uncommitted_code_but_not_outputs(tmp_path):
  """The dirty record: edits and new files of the library and the scripts, not the results."""
  for rel in ("jaxbn/core.py", "benchmarks/bench_x.py", "benchmarks/results/x.json",
              "benchmarks/RESULTS.md", "README.md"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("v1\n")
  _git(tmp_path, "init", "-q")
  _git(tmp_path, "add", ".")
  _git(tmp_path, "commit", "-q", "-m", "init")
  assert _results.code_changes(tmp_path) == []
  for rel in ("benchmarks/results/x.json", "benchmarks/RESULTS.md", "README.md"):
    (tmp_path / rel).write_text("v2\n")  # outputs: a rerun rewrites them
  assert _results.code_changes(tmp_path) == []
  (tmp_path / "jaxbn/core.py").write_text("v2\n")
  (tmp_path / "jaxbn/new_module.py").write_text("new\n")
  (tmp_path / "benchmarks/bench_x.py").unlink()
  assert _results.code_changes(tmp_path) == ["benchmarks/bench_x.py", "jaxbn/core.py",
                                             "jaxbn/new_module.py"]


def _demo_results(tmp_path, **meta):  # a result file, its metadata overridden by ``meta``
  results = tmp_path / "results"
  path = _results.write_results(
      "bench_demo", [_results.table("demo", ["impl", "ms"], [["x", 1.0]],
                                    platform="CPU timing (test)")],
      command="python benchmarks/bench_demo.py", out_dir=results)
  doc = json.loads(path.read_text())
  doc["meta"].update(meta)
  for key in [k for k, v in meta.items() if v is KeyError]:
    del doc["meta"][key]
  path.write_text(json.dumps(doc))
  return results


def test_render_refuses_results_from_uncommitted_code(tmp_path, capsys, committed_code):
  out = tmp_path / "RESULTS.md"
  results = _demo_results(tmp_path, code_dirty=True, dirty_paths=["jaxbn/_core/engine.py"])
  for extra in ([], ["--check"]):
    assert render_results.main([*extra, "--results", str(results), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bench_demo.json was produced from uncommitted code (jaxbn/_core/engine.py" in err
  assert not out.exists()
  clean = _demo_results(tmp_path / "clean", code_dirty=False, dirty_paths=[])
  assert render_results.main(["--results", str(clean), "--output", str(out)]) == 0
  text = out.read_text()
  assert "Platform: **CPU timing (test)**" in text and "Provenance not recorded" not in text
  # Written before the record existed: rendered with a warning, refused with --strict.
  legacy = _demo_results(tmp_path / "legacy", code_dirty=KeyError, dirty_paths=KeyError)
  assert render_results.main(["--results", str(legacy), "--output", str(out)]) == 0
  assert "**Provenance not recorded**" in out.read_text()
  assert render_results.main(["--strict", "--results", str(legacy), "--output", str(out)]) == 1


def test_run_gpu_refuses_a_machine_without_gpu(tmp_path):
  """benchmarks/run_gpu.sh stops at once (exit 2) where JAX sees no GPU, unless in smoke mode."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path), JAXBN_GPU_SMOKE="0",
             JAXBN_WHEELS=str(tmp_path / "none"))
  proc = subprocess.run(["bash", str(BENCH / "run_gpu.sh")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "JAX sees no GPU" in proc.stdout and (tmp_path / "run_gpu.log").exists()


def test_committed_results_md_is_rendered_from_committed_json():
  """RESULTS.md equals what benchmarks/results/*.json render (no hand-typed numbers)."""
  assert render_results.main(["--check"]) == 0, (
      "benchmarks/RESULTS.md is stale; run `python benchmarks/render_results.py`")


def test_tpu_stats_instrument_without_libtpu():
  """bench_tpu_stats' CPU half: its exactness column tells an exact algorithm from flax's
  raw moments, and its fusion detector reads an XLA:TPU-style fusion (no libtpu needed)."""
  import bench_tpu_stats as b  # noqa: PLC0415
  assert b.cpu_error(b.jaxbn_stats, 1e4, 0.0) < 1e-4
  assert b.cpu_error(b.two_pass, 1e4, 0.0) < 1e-4
  assert b.cpu_error(b.raw, 1e4, 0.0) > 1.0            # E[x²] − E[x]² at |μ|/σ = 1e4
  assert b.cpu_error(b.about_running_mean, 1e4, 0.0) > 1.0
  assert b.cpu_error(b.about_running_mean, 1e4, 1e4) < 1e-4
  hlo = ("%fused_computation.2 (p: bf16[8,4], q: bf16[4,4]) -> (f32[4], bf16[8,4]) {\n"
         "  %c = bf16[8,4] convolution(%p, %q)\n}\n\n"
         "ENTRY %main {\n"
         "  %f = (f32[4]{0}, bf16[8,4]{1,0}) fusion(%a, %b), kind=kOutput, "
         "calls=%fused_computation.2\n}\n")
  assert b.fused_into_conv(hlo, 4)
  assert not b.fused_into_conv(hlo.replace("convolution(", "add("), 4)
