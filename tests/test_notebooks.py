"""The notebooks in notebooks/: text sources, generated notebooks in sync, executing headless.

Each ``notebooks/NN_name.py`` (jupytext percent format) is the source of ``NN_name.ipynb``,
which is committed executed, with outputs. CI checks that every pair agrees cell by cell,
and executes each notebook with nbclient in its quick mode (``JAXBN_NB_QUICK=1``: smaller
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
jupytext = pytest.importorskip("jupytext", reason="the notebooks extra is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import build  # noqa: E402  pylint: disable=wrong-import-position

NAMES = [os.path.basename(build.notebook_path(s)) for s in build.sources()]


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_three_sources_and_their_notebooks():
  assert NAMES == ["01_batch_norm_from_scratch.ipynb", "02_normalization_compared.ipynb",
                   "03_sync_batch_norm.ipynb"]
  assert all(os.path.isfile(os.path.join(NOTEBOOKS, n)) for n in NAMES)
  assert not os.path.exists(os.path.join(NOTEBOOKS, "build_notebooks.py"))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_in_sync_with_its_source(name):
  nb = _read(name)
  source = build.read_source(os.path.join(NOTEBOOKS, name[:-6] + ".py"))
  assert build.cells(nb) == build.cells(source), (
      f"{name} differs from {name[:-6]}.py; run `python notebooks/build.py {name[:2]}`")
  assert build.out_of_sync() == []


@pytest.mark.parametrize("name", NAMES)
def test_title_first_then_banner_then_setup_that_installs_from_a_clone(name):
  """The page opens with its title; the banner names the source; the setup cell installs
  jaxbn from a clone outside the repository (jaxbn is not on PyPI)."""
  nb = build.read_source(os.path.join(NOTEBOOKS, name[:-6] + ".py"))
  title, banner, setup = nb.cells[:3]
  assert title.cell_type == "markdown" and title.source.startswith("# ")
  assert banner.cell_type == "markdown" and f"notebooks/{name[:-6]}.py" in banner.source
  assert "edit the `.py` file" in banner.source
  assert setup.cell_type == "code"
  assert 'os.path.isfile(os.path.join(_repo, "jaxbn", "__init__.py"))' in setup.source
  assert '_url = "https://github.com/jaxbn/jaxbn"' in setup.source
  assert '"git", "clone", "--depth", "1", _url, _repo' in setup.source
  assert '"pip", "install", "-q", "-e",\n                  _repo + "[examples]"' in setup.source
  assert "jaxbn[examples]\"" not in setup.source  # the unpublished package name


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
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
  nb = copy.deepcopy(build.read_source(os.path.join(NOTEBOOKS, name[:-6] + ".py")))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "Traceback" not in text
