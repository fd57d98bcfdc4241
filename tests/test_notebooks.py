"""The notebooks in notebooks/: committed with outputs, up to date, and executing headless.

CI executes each notebook with nbclient in its quick mode (``JAXBN_NB_QUICK=1``: smaller
experiments, the same code). The notebooks check their own claims with ``assert`` cells (jaxbn
against NumPy references), so an execution error is a real failure.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import build_notebooks  # noqa: E402  pylint: disable=wrong-import-position

NAMES = sorted(build_notebooks.NOTEBOOKS)


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_all_three_notebooks_exist():
  assert NAMES == ["01_batch_norm_from_scratch.ipynb", "02_normalization_compared.ipynb",
                   "03_sync_batch_norm.ipynb"]
  assert all(os.path.isfile(os.path.join(NOTEBOOKS, n)) for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs_and_up_to_date(name):
  nb = _read(name)
  nbformat.validate(nb)
  built = build_notebooks.build(name)
  assert [(c.cell_type, c.source) for c in nb.cells] == \
      [(c.cell_type, c.source) for c in built.cells], (
          f"{name} differs from notebooks/build_notebooks.py; run "
          f"`python notebooks/build_notebooks.py {name[:2]}`")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "every code cell was executed"
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "plots are committed"


@pytest.mark.parametrize("name", NAMES)
def test_executes_headless_in_quick_mode(name, monkeypatch):
  monkeypatch.setenv("JAXBN_NB_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = copy.deepcopy(_read(name))
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "Traceback" not in text
