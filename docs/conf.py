"""Sphinx configuration of the jaxbn documentation site.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (what ``.ci/docs``
runs). Nothing is fetched from the internet at build or view time: MathJax comes from the
``sphinx-mathjax-offline`` package, the theme's assets from ``furo``, notebooks are rendered
from their stored outputs (never executed here).

Pages generated at build time (into ``docs/_generated/``, git-ignored): the API reference
(one page per public name, listed from each module's ``__all__``), the notebooks (copied from
``notebooks/``) and the benchmark tables (from ``benchmarks/results/*.json``).
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)                       # document the source tree, not an installed copy
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import jaxbn_docs  # noqa: E402  (docs/_ext/jaxbn_docs.py)

# The API reference: (module, title) in the order of the sidebar.
API_MODULES = [
    ("jaxbn", "Functional core: jaxbn"),
    ("jaxbn.linen", "Flax linen layers: jaxbn.linen"),
    ("jaxbn.nnx", "Flax NNX layers: jaxbn.nnx"),
    ("jaxbn.parallel", "Devices and hosts: jaxbn.parallel"),
    ("jaxbn.interop", "PyTorch conversion: jaxbn.interop"),
    ("jaxbn.testing", "Checking compiled programs: jaxbn.testing"),
]
jaxbn_docs.generate(DOCS, ROOT, API_MODULES)

project = "jaxbn"
author = "jaxbn developers"
copyright = "2026, jaxbn developers"
version = release = jaxbn_docs.read_version(ROOT)

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",   # copies MathJax 3 into _static/mathjax and points mathjax_path at it
    "myst_nb",                  # Markdown pages and .ipynb notebooks (stored outputs)
    "jaxbn_docs",               # the results-table directive
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_generated/benchmarks_tables.md",
                    "_generated/experiments/tables.md", "_generated/layers_table.md"]
templates_path = ["_templates"]

# Markdown (MyST): $math$ and $$math$$ in pages and notebooks, heading anchors for links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks: rendered with the outputs stored in the .ipynb; never executed by the docs build.
nb_execution_mode = "off"
nb_merge_streams = True

# API reference from the docstrings (Google style).
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"   # types only where the docstring documents
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False  # True fails on some signatures ("pop from empty list")
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True   # "Attributes:" as a field list: no duplicate of the documented fields
add_module_names = False
python_use_unqualified_type_names = True   # "Array", not "jax.jaxlib._jax.Array"

html_theme = "furo"
html_title = f"jaxbn {release}"
html_static_path = ["_static"]
html_css_files = ["jaxbn.css"]
html_show_sourcelink = False
html_copy_source = False   # no _sources/ copy: the pages are the product
html_theme_options = {"navigation_with_keys": True}

# Broken references to jaxbn's own names fail the build (-W); references to other libraries'
# types (jax.Array, flax's Module, typing) cannot resolve offline and are not checked.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!jaxbn\b).*"),
                        # private bases (e.g. jaxbn.nnx._common.Layer) have no page by design
                        (r"py:class", r"jaxbn(\.\w+)*\._\w+(\.\w+)*")]
