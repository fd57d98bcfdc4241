"""Tables and plots of the experiments' JSON (``experiments.py``), and nothing else.

:func:`render` writes ``<name>.md`` and ``<name>.png`` from the document that
``experiments.run`` wrote to ``<name>.json``; ``python -m examples.cnn.experiment_report
results/NAME.json`` re-renders them without training. Every number in the tables and plots is
the mean (± sample standard deviation, ``ddof=1``) over the seeds of the JSON's runs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import numpy as np


def stats(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value; NaN mean for none)."""
  a = np.asarray(values, np.float64)
  if not len(a):
    return float("nan"), 0.0
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def cell(values: list[float]) -> str:
  """``"97.2 ± 0.4"``: a percentage mean ± std over the seeds."""
  if not values:
    return "–"
  m, s = stats(values)
  return f"{100 * m:.1f} ± {100 * s:.1f}"


def _labels(doc: dict[str, Any]) -> list[str]:
  seen: list[str] = []
  for s in doc["settings"]:
    if s["label"] not in seen:
      seen.append(s["label"])
  return seen


def _groups(doc: dict[str, Any]) -> list[str]:
  seen: list[str] = []
  for s in doc["settings"]:
    if s["group"] and s["group"] not in seen:
      seen.append(s["group"])
  return seen


def values(doc: dict[str, Any], label: str, key: str = "running", group: str = "") -> list[float]:
  """The per-seed values of ``key`` for the runs of ``label`` (and ``group``)."""
  return [r[key] for r in doc["runs"] if r["setting"] == label and r["group"] == group
          and key in r]


def table(doc: dict[str, Any]) -> str:
  """The markdown table: settings by per-device batch, or by running/recomputed statistics."""
  groups = _groups(doc)
  if groups:
    head = "| setting | " + " | ".join(f"{g} / device" for g in groups) + " |"
    rows = [f"| {label} | " + " | ".join(cell(values(doc, label, group=g)) for g in groups) +
            " |" for label in _labels(doc)]
  else:
    head = "| setting | running statistics | recomputed statistics |"
    rows = [f"| {label} | {cell(values(doc, label))} | "
            f"{cell(values(doc, label, 'recomputed'))} |" for label in _labels(doc)]
  sep = "|" + "---|" * (head.count("|") - 1)
  return "\n".join([head, sep] + rows)


def markdown(doc: dict[str, Any]) -> str:
  """The whole ``<name>.md``: what was run, the table, and where it came from."""
  m = doc["machine"]
  quick = " **(quick mode: a pipeline check, not a result)**" if doc["quick"] else ""
  if not doc.get("complete", True):
    done = {r["setting"] + r["group"] for r in doc["runs"]}
    quick += (f" **(interrupted: {len(done)} of {len(doc['settings'])} settings finished; "
              f"the others are missing)**")
  return (
      f"#### {doc['experiment']}{quick}\n\n"
      f"Test accuracy (%), mean ± std over seeds {', '.join(map(str, doc['seeds']))} "
      f"({doc['description']}; {doc['train_examples']} training / {doc['test_examples']} "
      f"test digits with pixel noise {doc['base_config']['noise']}).\n\n"
      f"{table(doc)}\n\n"
      f"Command: `{doc['command']}` ({doc['wall_seconds']:.0f} s wall). Machine: "
      f"{m['cpu'] or 'unknown CPU'}, {m['cpu_count']} cores shared with other jobs, "
      f"{m['devices']} simulated {m['platform']} devices; jax {m['jax']}, flax {m['flax']}, "
      f"commit {m['commit'] or 'unknown'}, {doc['date']}.\n")


def plot(doc: dict[str, Any], path: str, ax: Optional[Any] = None) -> None:
  """Accuracy with error bars (± std over seeds): against the per-device batch (a log2 axis
  labelled with the batch sizes themselves) or as grouped bars (running vs recomputed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  if ax is None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import FixedLocator, NullLocator  # pylint: disable=import-outside-toplevel

  own = ax is None
  if own:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
  groups, labels = _groups(doc), _labels(doc)
  if groups:
    xs = [int(g) for g in groups]
    for label in labels:
      ms = [stats(values(doc, label, group=g)) for g in groups]
      ax.errorbar(xs, [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o",
                  capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())  # no minor tick labels under the batch sizes
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("examples per device (8 devices)")
  else:
    keys = [k for k in ("running", "recomputed") if any(k in r for r in doc["runs"])]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
      ms = [stats(values(doc, label, key)) if values(doc, label, key) else (np.nan, 0.0)
            for label in labels]
      pos = np.arange(len(labels)) + (i - (len(keys) - 1) / 2) * width
      ax.bar(pos, [100 * m for m, _ in ms], width, yerr=[100 * s for _, s in ms], capsize=3,
             label=f"{key} statistics")
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=15, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{doc['experiment']}: {doc['info']['steps']} steps per run, "
               f"{len(doc['seeds'])} seed(s), ± std", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if own:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(doc: dict[str, Any], out: str) -> None:
  """Writes ``<out>/<name>.md`` and ``<out>/<name>.png`` from the experiment's document."""
  name = doc["experiment"]
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(markdown(doc))
  plot(doc, os.path.join(out, f"{name}.png"))


def load(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def readme_with_results(text: str, results_dir: str = RESULTS_DIR) -> str:
  """``text`` with each ``<!-- experiment:NAME:begin -->`` … ``end`` block replaced by the
  markdown of ``results_dir/NAME.json`` (blocks without a JSON are left as they are)."""
  import re  # pylint: disable=import-outside-toplevel

  def fill(m):
    path = os.path.join(results_dir, f"{m.group(2)}.json")
    if not os.path.exists(path):
      return m.group(0)
    return m.group(1) + markdown(load(path)) + m.group(3)

  return re.sub(r"(<!-- experiment:(\w+):begin -->\n).*?(<!-- experiment:\w+:end -->)", fill,
                text, flags=re.S)


def main(argv: list[str]) -> int:
  """``--readme``: refresh README.md's experiment blocks; else re-render the given JSONs."""
  if argv[:1] == ["--readme"]:
    with open(README) as f:
      text = f.read()
    with open(README, "w") as f:
      f.write(readme_with_results(text))
    return 0
  for p in argv:
    render(load(p), os.path.dirname(os.path.abspath(p)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
