"""Builds the notebooks of this folder from their jupytext sources, executed, with outputs.

    python notebooks/build.py             # every NN_*.py -> NN_*.ipynb, executed (full mode)
    python notebooks/build.py 02          # only the notebooks whose name contains 02
    python notebooks/build.py --check     # exit 1 if a notebook's cells differ from its .py
    python notebooks/build.py 03 --markdown-only   # text edits only: keep the outputs

The source of truth is the ``NN_name.py`` file (jupytext "percent" format: ``# %%`` starts a
code cell, ``# %% [markdown]`` a text cell); the ``.ipynb`` next to it is generated, committed
with its outputs (plots included) so that it renders on GitHub and in the docs. Each notebook
reads ``JAXBN_NB_QUICK=1`` to shrink its experiments: that is how tests/test_notebooks.py
executes them in CI, and checks that every ``.ipynb`` matches its ``.py``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import jupytext
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def sources() -> list[str]:
  """The notebook sources, ``NN_*.py``, sorted."""
  return sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))


def notebook_path(source: str) -> str:
  return source[:-3] + ".ipynb"


def read_source(source: str) -> nbformat.NotebookNode:
  """The notebook (cells without outputs) that ``source`` defines."""
  nb = jupytext.read(source, fmt="py:percent")
  nb.metadata["kernelspec"] = dict(KERNELSPEC)
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata.pop("jupytext", None)
  return nb


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
  """``(cell_type, source)`` of every cell: what must agree between a pair."""
  return [(c.cell_type, c.source) for c in nb.cells]


def out_of_sync() -> list[str]:
  """Names of the notebooks whose cells differ from their source (or that are missing)."""
  stale = []
  for source in sources():
    path = notebook_path(source)
    if not os.path.exists(path) or cells(nbformat.read(path, as_version=4)) != cells(
        read_source(source)):
      stale.append(os.path.basename(path))
  return stale


def with_outputs_of(nb: nbformat.NotebookNode, old: nbformat.NotebookNode
                    ) -> nbformat.NotebookNode:
  """``nb`` with the outputs of ``old``'s code cells, which must be the same code cells."""
  new_code = [c for c in nb.cells if c.cell_type == "code"]
  old_code = [c for c in old.cells if c.cell_type == "code"]
  if [c.source for c in new_code] != [c.source for c in old_code]:
    raise SystemExit("the code cells changed: execute the notebook instead of --markdown-only")
  for new, prev in zip(new_code, old_code):
    new.outputs, new.execution_count = prev.outputs, prev.execution_count
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
  """Runs every cell in a fresh kernel started in this folder (raises on the first error)."""
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": HERE}}).execute()
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("only", nargs="*", help="build only notebooks whose name contains these")
  parser.add_argument("--check", action="store_true",
                      help="only check that every .ipynb matches its .py")
  parser.add_argument("--markdown-only", action="store_true",
                      help="only text cells changed: take them from the .py, keep the outputs")
  args = parser.parse_args(argv)
  if args.check:
    stale = out_of_sync()
    for name in stale:
      print(f"{name} differs from its .py source: run `python notebooks/build.py "
            f"{name[:2]}`", file=sys.stderr)
    return 1 if stale else 0
  for source in sources():
    name = os.path.basename(notebook_path(source))
    if args.only and not any(s in name for s in args.only):
      continue
    t = time.time()
    if args.markdown_only:
      nb = with_outputs_of(read_source(source),
                           nbformat.read(notebook_path(source), as_version=4))
    else:
      nb = execute(read_source(source))
    nbformat.validate(nb)
    nbformat.write(nb, notebook_path(source))
    print(f"{name}: executed in {time.time() - t:.0f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
