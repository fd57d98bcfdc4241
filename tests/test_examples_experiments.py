"""The experiments and results commands (examples/cnn/experiments.py, results.py) in quick mode.

Quick mode trains a tiny network for a few steps with one seed: it checks that every setting
runs and that the JSON, the markdown table and the plot are written and agree with each other,
not the accuracies (those are the committed full runs in examples/cnn/results/). The table's
arithmetic (mean ± sample std over seeds) is checked against NumPy on known values.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from examples.cnn import experiment_report, experiments, results

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG


@pytest.mark.slow
@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_quick_mode_writes_json_table_and_plot(name, tmp_path):
  doc = experiments.run(name, quick=True, out=str(tmp_path))
  _, items, info = experiments.settings(name, quick=True)
  assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.{e}" for e in ("json", "md", "png"))
  with open(tmp_path / f"{name}.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(doc))
  assert saved["quick"] and saved["seeds"] == [0]
  assert len(saved["runs"]) == len(items)
  assert all(r["steps"] == info["steps"] for r in saved["runs"])  # a fixed step budget
  assert all(0 <= r["running"] <= 1 for r in saved["runs"])
  md = (tmp_path / f"{name}.md").read_text()
  assert "quick mode" in md and saved["command"] in md
  for item in items:
    assert f"| {item.label} |" in md
  if name != "small_batches":  # BatchNorm rows are also evaluated with recomputed statistics
    assert any("recomputed" in r for r in saved["runs"])
  assert _png(tmp_path / f"{name}.png")


def test_full_settings_use_one_step_budget_and_three_seeds():
  """The committed experiments: every setting trains the same number of steps."""
  for name in experiments.EXPERIMENTS:
    base, items, info = experiments.settings(name, quick=False)
    assert base.steps == info["steps"] and base.steps >= 60
    assert all("steps" not in s.changes and "epochs" not in s.changes for s in items)
  _, items, info = experiments.settings("small_batches", quick=False)
  assert info["per_device"] == [2, 4, 8, 16, 32]
  assert {s.label for s in items} == {"local BN", "synced BN", "ghost BN", "batch renorm",
                                      "group norm", "layer norm"}


def test_table_cells_are_mean_and_sample_std():
  assert experiment_report.cell([0.90, 0.95, 1.00]) == "95.0 ± 5.0"
  values = [0.981, 0.9861, 0.9972]
  m, s = experiment_report.stats(values)
  assert m == pytest.approx(np.mean(values)) and s == pytest.approx(np.std(values, ddof=1))
  assert experiment_report.cell([0.5]) == "50.0 ± 0.0"


def test_small_batch_plot_labels_the_batch_sizes_once(tmp_path):
  """A log2 x-axis labelled 2, 4, 8, 16, 32 and nothing else (no overlapping minor labels)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = ["2", "4", "8", "16", "32"]
  doc = {"experiment": "small_batches", "seeds": [0, 1], "info": {"steps": 5},
         "settings": [{"label": "a", "group": g, "changes": {}} for g in groups],
         "runs": [{"setting": "a", "group": g, "seed": s, "running": 0.5 + 0.1 * s}
                  for g in groups for s in (0, 1)]}
  fig, ax = plt.subplots()
  experiment_report.plot(doc, str(tmp_path / "x.png"), ax=ax)
  fig.canvas.draw()
  labels = [t.get_text() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
  minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
  assert labels == groups and minor == []
  plt.close(fig)


@pytest.mark.slow
def test_results_quick_writes_table(tmp_path):
  doc = results.run("smoke", 1, ["batch", "nnx"], str(tmp_path), quick=True)
  assert [r["row"] for r in doc["runs"]] == ["batch", "nnx"]
  md = (tmp_path / "table.md").read_text()
  assert "| *(none)* |" in md and "| `--api nnx` |" in md
  readme = tmp_path / "README.md"
  readme.write_text("a\n<!-- results:begin (generated) -->\nold\n<!-- results:end -->\nb\n")
  results.update_readme(md, str(readme))
  text = readme.read_text()
  assert "old" not in text and md in text and text.startswith("a\n") and text.endswith("b\n")


def test_readme_tables_are_the_committed_results():
  """examples/cnn/README.md shows exactly what results/*.json hold (no hand-typed numbers)."""
  with open(experiment_report.README) as f:
    text = f.read()
  assert experiment_report.readme_with_results(text) == text, (
      "examples/cnn/README.md is stale: run `python -m examples.cnn.experiment_report --readme`")
  for name in experiments.EXPERIMENTS:
    assert f"<!-- experiment:{name}:begin -->" in text


def test_readme_results_table_is_the_committed_table():
  """The README's per-normalization table is results/table.json rendered (results.py)."""
  path = os.path.join(results.RESULTS_DIR, "table.json")
  with open(results.README) as f:
    text = f.read()
  with open(path) as f:
    doc = json.load(f)
  assert len(doc["seeds"]) >= 3
  assert results.markdown(doc) in text, (
      "run `python -m examples.cnn.results --update-readme` (or render results/table.json)")
