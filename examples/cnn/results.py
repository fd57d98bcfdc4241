"""The per-normalization results table of examples/cnn/README.md, over several seeds.

``python -m examples.cnn.results [--preset digits] [--seeds 3] [--rows NAME,...] [--quick]``
trains every row of :data:`ROWS` (flags on top of the preset) once per seed, writes
``results/table.json`` (every run: flags, seed, accuracies, steps, times, machine) and
``results/table.md`` (mean ± standard deviation over the seeds), and with ``--update-readme``
replaces the table between the ``results:begin``/``results:end`` markers of README.md with it.
``--quick`` (smoke preset, one seed, two rows, output in a temporary folder unless ``--out``)
checks the pipeline; CI runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python examples/cnn/results.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cnn import configs  # noqa: E402  (no JAX import yet)
from examples.cnn import experiment_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

# (row name, command-line flags, config changes)
ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("batch", "*(none)*", {}),
    ("batch-shard_map", "`--devices 8 --parallel shard_map`", dict(devices=8,
                                                                  parallel="shard_map")),
    ("batch-jit8", "`--devices 8 --parallel jit`", dict(devices=8, parallel="jit")),
    ("batch-pmap", "`--devices 8 --parallel pmap`", dict(devices=8, parallel="pmap")),
    ("nnx", "`--api nnx`", dict(api="nnx")),
    ("bf16", "`--dtype bfloat16`", dict(dtype="bfloat16")),
    ("flax", "`--norm flax` (flax.linen.BatchNorm)", dict(norm="flax")),
    ("renorm", "`--norm renorm`", dict(norm="renorm")),
    ("ghost", "`--norm ghost` (virtual batch 16)", dict(norm="ghost")),
    ("group", "`--norm group`", dict(norm="group")),
    ("layer", "`--norm layer`", dict(norm="layer")),
    ("none", "`--norm none`", dict(norm="none")),
)


def run(preset: str, seeds: int, rows: Sequence[str], out: str, quick: bool = False
        ) -> dict[str, Any]:
  """Trains the rows, writes ``table.json`` and ``table.md`` into ``out``; returns the JSON."""
  from examples.cnn import train  # pylint: disable=import-outside-toplevel
  from examples.cnn.experiments import _machine  # pylint: disable=import-outside-toplevel
  chosen = [r for r in ROWS if r[0] in rows]
  os.makedirs(out, exist_ok=True)
  runs, t_all = [], time.time()
  for name, flags, changes in chosen:
    for seed in range(seeds):
      config = configs.get_config(preset).replace(seed=seed, checkpoint_every=-1,
                                                  overwrite=True, **changes)
      with tempfile.TemporaryDirectory() as workdir:
        _, s = train.train_and_evaluate(config, workdir)
      runs.append({"row": name, "flags": flags, "seed": seed, "steps": s["steps"],
                   "epochs": s["epochs"], "test_accuracy": s["test_accuracy"],
                   "test_accuracy_recomputed": s.get("test_accuracy_recomputed"),
                   "train_seconds": round(s["train_seconds"], 1),
                   "wall_seconds": round(s["wall_seconds"], 1)})
      print(f"{name:<16} seed {seed}: {s['test_accuracy']:.2%} ({s['wall_seconds']:.0f} s)",
            flush=True)
  cmd = f"python -m examples.cnn.results --preset {preset} --seeds {seeds}"
  if [r[0] for r in chosen] != [r[0] for r in ROWS]:
    cmd += f" --rows {','.join(r[0] for r in chosen)}"
  doc = {"preset": preset, "config": dataclasses.asdict(configs.get_config(preset)),
         "seeds": list(range(seeds)), "quick": quick, "command": cmd + (" --quick" if quick
                                                                        else ""),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "wall_seconds": round(time.time() - t_all, 1), "machine": _machine(), "runs": runs,
         "rows": [{"row": n, "flags": f} for n, f, _ in chosen]}
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump(doc, f, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(markdown(doc))
  return doc


def markdown(doc: dict[str, Any]) -> str:
  """The README table: mean ± std over seeds of the test accuracy and the times."""
  lines = ["| command flags | steps | train (s) | wall (s) | test acc. % (running stats) | "
           "test acc. % (recomputed stats) |", "|---|---|---|---|---|---|"]
  for row in doc["rows"]:
    rs = [r for r in doc["runs"] if r["row"] == row["row"]]
    if not rs:
      continue
    acc = experiment_report.cell([r["test_accuracy"] for r in rs])
    rec = [r["test_accuracy_recomputed"] for r in rs if r["test_accuracy_recomputed"] is not None]
    mean = lambda k: sum(r[k] for r in rs) / len(rs)
    lines.append(f"| {row['flags']} | {rs[0]['steps']} | {mean('train_seconds'):.0f} | "
                 f"{mean('wall_seconds'):.0f} | {acc} | {experiment_report.cell(rec)} |")
  m = doc["machine"]
  lines += ["", f"Preset `{doc['preset']}`, seeds {', '.join(map(str, doc['seeds']))} (mean ± "
            f"std); command `{doc['command']}`; {doc['date']}; {m['cpu'] or 'unknown CPU'}, "
            f"{m['cpu_count']} cores shared with other jobs; jax {m['jax']}, flax {m['flax']}, "
            f"commit {m['commit'] or 'unknown'}. Times are means per run, upper bounds on a "
            f"busy machine.", ""]
  return "\n".join(lines)


def update_readme(table_md: str, readme: str = README) -> None:
  """Replaces the text between ``<!-- results:begin -->`` and ``<!-- results:end -->``."""
  with open(readme) as f:
    text = f.read()
  pattern = re.compile(r"(<!-- results:begin[^>]*-->\n).*?(<!-- results:end -->)", re.S)
  if not pattern.search(text):
    raise ValueError(f"results: {readme} has no <!-- results:begin --> ... "
                     f"<!-- results:end --> markers.")
  with open(readme, "w") as f:
    f.write(pattern.sub(lambda m: m.group(1) + table_md + m.group(2), text))


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m examples.cnn.results",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="digits", choices=sorted(configs.CONFIGS),
                 help="the preset every row starts from (default: digits)")
  p.add_argument("--seeds", type=int, default=3, help="seeds per row (default: 3)")
  p.add_argument("--rows", default=",".join(r[0] for r in ROWS),
                 help="comma-separated rows to run (default: all)")
  p.add_argument("--out", default=None, help=f"output folder (default: {RESULTS_DIR})")
  p.add_argument("--update-readme", action="store_true",
                 help="write the table into README.md between the results markers")
  p.add_argument("--quick", action="store_true",
                 help="smoke preset, 1 seed, rows batch and nnx: a pipeline check (CI)")
  args = p.parse_args(argv)
  rows = args.rows.split(",")
  unknown = sorted(set(rows) - {r[0] for r in ROWS})
  if unknown:
    p.error(f"--rows: unknown {', '.join(unknown)}; choose from "
            f"{', '.join(r[0] for r in ROWS)}")
  if args.quick:
    args.preset, args.seeds, rows = "smoke", 1, ["batch", "nnx"]
    args.out = args.out or tempfile.mkdtemp(prefix="jaxbn-results-")
  from examples.cnn import main as main_lib  # pylint: disable=import-outside-toplevel
  main_lib.set_cpu_devices(8)
  doc = run(args.preset, args.seeds, rows, os.path.abspath(args.out or RESULTS_DIR),
            quick=args.quick)
  if args.update_readme and not args.quick:
    with open(os.path.join(os.path.abspath(args.out or RESULTS_DIR), "table.md")) as f:
      update_readme(f.read())
  print(f"wrote table.json and table.md in {os.path.abspath(args.out or RESULTS_DIR)} "
        f"({doc['wall_seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
