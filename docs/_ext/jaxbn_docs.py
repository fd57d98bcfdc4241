"""Build-time helpers of the jaxbn docs: generated pages and the ``results-table`` directive.

``generate`` (called from ``conf.py``) writes into ``docs/_generated/``:

* ``api/<module>.rst`` — one page per public module, an ``autosummary`` over its ``__all__``
  (so a name added to or removed from ``__all__`` appears or disappears without editing the
  docs), and ``api/index.rst`` listing the modules that import. A module listed in ``conf.py``
  that does not exist yet is left out with a message; one that exists but fails to import fails
  the build.
* ``notebooks/*.ipynb`` — copies of ``notebooks/*.ipynb``, rendered with their stored outputs,
  and of their jupytext sources ``notebooks/*.py`` (linked from each notebook).
* ``experiments/tables.md`` — the example trainer's committed experiment tables and plots
  (``examples/cnn/results/NAME.md`` and ``NAME.png``).
* ``layers_table.md`` — the table of layers (name, function, kind, variables) from the layer
  registry ``jaxbn/_layers/registry.py``, included by the variants guide.
* ``benchmarks_tables.md`` — every ``benchmarks/results/*.json`` as Markdown tables, with the
  command, machine, versions and commit of its run, and the ``benchmarks/bench_*.py`` scripts
  that have no result file yet.

The directive ``.. results-table:: NAME`` (``{results-table} NAME`` in MyST) renders the table
of ``benchmarks/results/NAME.json`` whose title contains ``:table:``; if that file has not been
produced yet it says which command produces it instead of showing a number. A file that exists
but has no such table is a build warning (the page went stale).
"""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from results_tables import load_results, run_line, select_table, table_markdown

LOG = logging.getLogger(__name__)

# Benchmark results in this order on the benchmarks page; others follow alphabetically.
BENCH_ORDER = ["bench_core", "bench_variants", "bench_sync", "bench_collectives", "bench_model",
               "bench_fold"]


def read_version(root: str) -> str:
  """The version string of ``jaxbn/_version.py``, read without importing jaxbn."""
  with open(os.path.join(root, "jaxbn", "_version.py")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
      return ast.literal_eval(node.value)
  raise RuntimeError("jaxbn/_version.py defines no __version__")


def _write(path: str, text: str) -> None:
  """Writes only when the content changed (keeps Sphinx's incremental rebuilds incremental)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  with open(path, "w") as f:
    f.write(text)


def _api_pages(out: str, modules: Sequence[Tuple[str, str]]) -> None:
  present = []
  seen = {}  # id of a documented class -> the module whose page documents it
  for name, title in modules:
    try:
      mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name == name:
        print(f"jaxbn docs: module {name} does not exist (yet); its API page is left out")
        continue
      raise
    public = list(getattr(mod, "__all__", []))
    if not public:
      raise RuntimeError(f"jaxbn docs: {name} has no __all__; the API reference lists __all__")
    present.append(name)
    lines = [title, "=" * len(title), "", f".. automodule:: {name}", "   :no-members:", "",
             f".. currentmodule:: {name}", "", ".. autosummary::", "   :toctree: generated",
             "   :nosignatures:", ""]
    # A class exported by two modules (e.g. linen's and nnx's FoldPair, one shared type) is
    # documented once, on the first page; the second page names where (Sphinx would otherwise
    # describe one object twice).
    shared = []
    for n in public:
      obj = getattr(mod, n)
      if isinstance(obj, type) and id(obj) in seen:
        shared.append((n, seen[id(obj)]))
        continue
      if isinstance(obj, type):
        seen[id(obj)] = name
      lines.append(f"   {n}")
    if shared:
      lines += ["", "Also exported here, documented with the module that defines it first: "
                + ", ".join(f":class:`{n} <{m}.{n}>`" for n, m in shared) + "."]
    _write(os.path.join(out, f"{name}.rst"), "\n".join(lines) + "\n")
  index = ["API reference", "=============", "",
           "Generated from the docstrings of each module's public names (its ``__all__``).", "",
           ".. toctree::", "   :maxdepth: 1", ""] + [f"   {n}" for n in present]
  _write(os.path.join(out, "index.rst"), "\n".join(index) + "\n")


def _copy_notebooks(root: str, out: str) -> None:
  """Copies ``notebooks/*.ipynb`` and their paired jupytext sources (same stem, ``.py``), so
  a notebook's link to its source resolves (as a download)."""
  os.makedirs(out, exist_ok=True)
  src = os.path.join(root, "notebooks")
  stems = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(src, "*.ipynb"))}
  wanted = {f"{s}.ipynb" for s in stems}
  wanted |= {f"{s}.py" for s in stems if os.path.exists(os.path.join(src, f"{s}.py"))}
  for stale in set(os.listdir(out)) - wanted:
    os.remove(os.path.join(out, stale))
  for name in sorted(wanted):
    with open(os.path.join(src, name)) as f:
      _write(os.path.join(out, name), f.read())


def _benchmarks_page(root: str, path: str) -> None:
  results = load_results(root)
  names = [n for n in BENCH_ORDER if n in results] + sorted(set(results) - set(BENCH_ORDER))
  lines: List[str] = []
  if not names:
    lines += ["No benchmark results are committed yet. Run a script in `benchmarks/` (see "
              "below); it writes `benchmarks/results/<script>.json`, and the next docs build "
              "shows it here.", ""]
  for name in names:
    doc = results[name]
    lines += [f"## {doc.get('title') or name}", "", run_line(doc), ""]
    for t in doc.get("tables", []):
      lines += [f"### {t['title']}", ""] + table_markdown(t) + [""]
    for note in doc.get("notes", []):
      lines += [f"- {note}"]
    lines.append("")
  scripts = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(root, "benchmarks", "bench_*.py")))
  missing = [n for n in scripts if n not in results]
  if missing:
    lines += ["## Not yet measured", "",
              "These scripts have no committed result file yet: "
              + ", ".join(f"`python benchmarks/{n}.py`" for n in missing) + ".", ""]
  _write(path, "\n".join(lines))


def _experiments_page(root: str, out: str) -> None:
  """The examples' committed experiments: each ``examples/cnn/results/NAME.md`` table (written
  by ``python -m examples.cnn.experiments NAME``) with its ``NAME.png`` plot, and every
  ``examples/<name>/RESULTS.md`` (e.g. the adaptation demo)."""
  src = os.path.join(root, "examples", "cnn", "results")
  os.makedirs(out, exist_ok=True)
  lines: List[str] = []
  pages = sorted(glob.glob(os.path.join(src, "*.md")))
  pages += sorted(glob.glob(os.path.join(root, "examples", "*", "RESULTS.md")))
  for md in pages:
    name = os.path.splitext(os.path.basename(md))[0]
    with open(md) as f:
      body = f.read().strip().splitlines()
    title = name.replace("_", " ").capitalize()
    if body and body[0].startswith("#"):   # the file's own title: a level-2 heading here
      title = body[0].lstrip("#").strip()
      body = body[1:]
    if name == "RESULTS":                  # examples/<name>/RESULTS.md: no plot of that name
      name = os.path.basename(os.path.dirname(md))
    body = [("#" + l) if l.startswith("#") else l for l in body]   # keep levels below ours
    lines += [f"## {title}", ""] + body + [""]
    png = os.path.join(os.path.dirname(md), f"{name}.png")
    if os.path.exists(png):
      with open(png, "rb") as f:
        data = f.read()
      target = os.path.join(out, f"{name}.png")
      if not os.path.exists(target) or open(target, "rb").read() != data:
        with open(target, "wb") as f:
          f.write(data)
      lines += [f"![{name}]({name}.png)", ""]
  if not lines:
    lines = ["No experiment results are committed yet: "
             "`python -m examples.cnn.experiments NAME` writes them.", ""]
  _write(os.path.join(out, "tables.md"), "\n".join(lines))


def _layers_table(path: str) -> None:
  """The table of layers, from the one layer registry (``jaxbn._layers.registry``)."""
  from jaxbn._layers import registry  # pylint: disable=import-outside-toplevel
  _write(path, "\n".join(registry.markdown_table()) + "\n")


def generate(docs: str, root: str, api_modules: Sequence[Tuple[str, str]]) -> None:
  """Writes every generated page under ``docs/_generated`` (see the module docstring)."""
  gen = os.path.join(docs, "_generated")
  _layers_table(os.path.join(gen, "layers_table.md"))
  _api_pages(os.path.join(gen, "api"), api_modules)
  _copy_notebooks(root, os.path.join(gen, "notebooks"))
  _benchmarks_page(root, os.path.join(gen, "benchmarks_tables.md"))
  _experiments_page(root, os.path.join(gen, "experiments"))


class ResultsTable(SphinxDirective):
  """``.. results-table:: NAME`` with ``:table: TITLE-SUBSTRING``: a committed result table."""

  required_arguments = 1
  option_spec = {"table": directives.unchanged_required,
                 "columns": directives.unchanged_required,
                 "where": directives.unchanged_required}

  def run(self) -> List[nodes.Node]:
    name = self.arguments[0]
    want = self.options.get("table", "")
    root = os.path.dirname(os.fspath(self.env.srcdir))
    path = os.path.join(root, "benchmarks", "results", f"{name}.json")
    self.env.note_dependency(path)
    if not os.path.exists(path):
      text = (f"*Not measured yet on the committed tree: `python benchmarks/{name}.py` "
              f"produces this table (`benchmarks/results/{name}.json`).*")
      return self._parse([text])
    with open(path) as f:
      doc = json.load(f)
    tables = [t for t in doc.get("tables", []) if want in t["title"]]
    if not tables:
      LOG.warning(f"results-table: benchmarks/results/{name}.json has no table whose title "
                  f"contains {want!r}; titles: {[t['title'] for t in doc.get('tables', [])]}",
                  location=self.get_location())
      return []
    t = select_table(tables[0], self.options.get("columns"), self.options.get("where"))
    if isinstance(t, str):
      LOG.warning(f"results-table: benchmarks/results/{name}.json: {t}",
                  location=self.get_location())
      return []
    lines = [f"**{t['title']}**", ""] + table_markdown(t) + [
        "", f"*{run_line(doc)}*"]
    return self._parse(lines)

  def _parse(self, lines: List[str]) -> List[nodes.Node]:
    # Used from MyST pages: nested_parse reads the lines as Markdown there.
    container = nodes.container()
    self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]),
                            self.content_offset, container)
    return container.children


def _skip_fields(app, what, name, obj, skip, options):
  """Skips dataclass fields of Flax modules and NamedTuple fields as separate members.

  The class docstring documents them already (its ``Attributes:`` section); autodoc would list
  each a second time, without a description.
  """
  cls = getattr(app.env, "_jaxbn_current_class", None)
  if cls is not None and (name in getattr(cls, "__dataclass_fields__", {})
                          or name in getattr(cls, "_fields", ())):
    return True
  return None


def _remember_class(app, what, name, obj, options, lines):
  if what == "class":
    app.env._jaxbn_current_class = obj


def _flax_signature(app, what, name, obj, options, signature, return_annotation):
  """Drops flax's bookkeeping arguments ``parent`` and ``name`` from a module's signature."""
  if what == "class" and signature and hasattr(obj, "__dataclass_fields__") and \
      "parent" in getattr(obj, "__dataclass_fields__", {}):
    signature = re.sub(r", parent=.*?(?=, name=|\)$)", "", signature)
    signature = re.sub(r", name=None\)$", ")", signature)
  return signature, return_annotation


def setup(app) -> Dict[str, Any]:
  app.add_directive("results-table", ResultsTable)
  app.connect("autodoc-process-docstring", _remember_class)
  app.connect("autodoc-skip-member", _skip_fields)
  app.connect("autodoc-process-signature", _flax_signature)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
