"""The package installs like a library: one version, tested floors, complete wheel metadata.

The slow end-to-end check (sdist + wheel with build isolation, ``twine check``, the wheel in a
fresh venv running the README's example outside the repository) is ``.ci/package``; here the
wheel is built without isolation from a copy of the sources (a few seconds) and inspected.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

try:
  import tomllib
except ImportError:  # Python 3.10
  import tomli as tomllib

import jaxbn
from jaxbn import _version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _floor(requirement: str) -> tuple[str, str]:
  m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)", requirement.strip())
  assert m, f"{requirement!r} is not of the form 'name>=version'"
  return m.group(1).lower(), m.group(2)


def _minor(version: str) -> tuple[int, int]:
  major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
  return int(major), int(minor)


def test_version_has_a_single_source():
  assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
  attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "jaxbn._version.__version__"
  assert jaxbn.__version__ == _version.__version__, (
      "jaxbn/__init__.py must take __version__ from jaxbn/_version.py "
      "(`from jaxbn._version import __version__`)")


def test_dependency_floors_are_the_tested_versions():
  """Floors equal what CI installs (same major.minor), so a declared minimum is a tested one."""
  floors = dict(_floor(r) for r in PROJECT["dependencies"] if not r.startswith("numpy"))
  floors.update(_floor(r) for r in PROJECT["optional-dependencies"]["flax"])
  assert set(floors) == {"jax", "jaxlib", "flax"}
  for name, floor in floors.items():
    installed = importlib.metadata.version(name)
    assert _minor(floor) == _minor(installed), (
        f"pyproject says {name}>={floor} but CI tests {name} {installed}: set the floor to "
        f"{'.'.join(map(str, _minor(installed)))} (or add a min-versions CI job)")


def test_extras_install_every_benchmark_anchor_and_the_docs_toolchain():
  extras = PROJECT["optional-dependencies"]
  bench = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras["benchmarks"]}
  assert {"flax", "optax", "dm-haiku", "equinox", "keras", "torch"} <= bench
  assert "torch==2.13.0" in extras["benchmarks"]   # the CPU build CI uses (see the comment)
  docs = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras["docs"]}
  assert {"sphinx", "furo", "myst-nb", "sphinx-mathjax-offline"} <= docs


def test_project_urls_and_changelog():
  assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(
      PROJECT["urls"])
  changelog = (ROOT / "CHANGELOG.md").read_text()
  headers = re.findall(r"^## \[([^\]]+)\](.*)$", changelog, flags=re.M)
  assert headers[0] == ("Unreleased", "")
  released = {v: rest for v, rest in headers[1:]}
  assert "0.1.0" in released
  for v, rest in released.items():
    assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), f"## [{v}] needs ' - YYYY-MM-DD'"
  # A development version is not listed as released yet.
  base = re.match(r"\d+\.\d+\.\d+", _version.__version__).group(0)
  assert "dev" not in _version.__version__ or base not in released
  for v in ["Unreleased"] + list(released):
    assert re.search(rf"^\[{re.escape(v)}\]: ", changelog, flags=re.M), f"no link for [{v}]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  """A wheel built (no isolation, no network) from a copy of the sources."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "jaxbn", src / "jaxbn",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
       "--no-index", str(src), "-w", str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (path,) = out.glob("jaxbn-*.whl")
  return zipfile.ZipFile(path)


def test_wheel_has_every_module_and_py_typed_and_nothing_else(wheel):
  names = set(wheel.namelist())
  sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxbn").rglob("*.py")
             if "__pycache__" not in p.parts}
  assert sources - names == set(), "modules missing from the wheel"
  assert "jaxbn/py.typed" in names
  outside = {n.split("/")[0] for n in names} - {"jaxbn", f"jaxbn-{_version.__version__}.dist-info"}
  assert outside == set(), f"the wheel ships more than the package: {outside}"


def test_wheel_metadata(wheel):
  meta_name = f"jaxbn-{_version.__version__}.dist-info/METADATA"
  meta = email.parser.Parser().parsestr(wheel.read(meta_name).decode())
  assert meta["Version"] == _version.__version__
  requires = meta.get_all("Requires-Dist")
  assert "jax>=0.10" in requires and "jaxlib>=0.10" in requires
  assert any(r.startswith("flax>=0.12") and 'extra == "flax"' in r for r in requires)
  urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
  assert set(PROJECT["urls"]) <= set(urls)
  assert meta["License-Expression"] == "Apache-2.0"
  assert "jaxbn" in meta.get_payload()   # the README is the long description
