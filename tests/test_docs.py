"""The README and the documentation say only what is true.

* The README's and the getting-started page's ``python`` code blocks run as written.
* The README's generated "why" table is current, and its numbers are read from the benchmark
  result JSONs (never typed by hand).
* The "why" page's claim about flax's variance far from zero holds (flax 0.12.8), next to
  jaxbn's side (the masked-sync claim is tested in ``tests/test_oracle_flax2417.py``).
* Every ``jaxbn.x.y`` name written in the docs exists and is not deprecated.
* The docs tooling (internal link check, result tables) reports what it should.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def python_blocks(path: pathlib.Path) -> list[str]:
  """The fenced ```python blocks of a Markdown file (```{code-block} fragments are not run)."""
  return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", ["README.md", "docs/getting_started.md"])
def test_python_code_blocks_run_as_written(page):
  blocks = python_blocks(ROOT / page)
  assert blocks, f"{page} has no ```python block"
  namespace: dict = {"__name__": "__docs__"}
  for i, code in enumerate(blocks):
    try:
      exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
    except Exception as e:  # name the page and block that failed
      raise AssertionError(f"{page}, python block {i} failed: {e!r}\n{code}") from e


def _doc_pages() -> list[pathlib.Path]:
  return [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted(DOCS.rglob("*.md"))


def test_every_jaxbn_name_in_the_docs_exists_and_is_not_deprecated():
  """`jaxbn.x.y` written anywhere in the README, CONTRIBUTING or docs/ resolves, silently.

  Code fragments that do not run alone (```{code-block} python) are checked this way: a
  renamed or moved function fails here instead of rotting in the docs.
  """
  import importlib
  import warnings
  names = set()
  for page in _doc_pages():
    if "_build" in page.parts or "_generated" in page.parts:
      continue
    found = re.findall(r"\bjaxbn(?:\.[A-Za-z_]\w*)+", page.read_text())
    names |= {n for n in found if n.rsplit(".", 1)[-1] not in ("md", "rst", "py", "json")}
  assert "jaxbn.batch_norm" in names
  missing, deprecated = [], []
  for name in sorted(names):
    parts = name.split(".")
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      obj, i = None, len(parts)
      while i > 0:   # the longest importable module prefix, then attributes
        try:
          obj = importlib.import_module(".".join(parts[:i]))
          break
        except ModuleNotFoundError:
          i -= 1
      try:
        for attr in parts[i:]:
          obj = getattr(obj, attr)
      except AttributeError:
        missing.append(name)
    if any(issubclass(w.category, DeprecationWarning) and "jaxbn" in str(w.message)
           for w in caught):
      deprecated.append(name)
  assert not missing, f"names in the docs that do not exist: {missing}"
  assert not deprecated, f"deprecated names in the docs: {deprecated}"


def test_readme_example_is_at_most_15_lines():
  swap = python_blocks(ROOT / "README.md")[0]
  assert len(swap.strip().splitlines()) <= 15


def test_readme_quick_start_commands_are_unchanged():
  text = (ROOT / "README.md").read_text()
  assert 'pip install -e ".[examples]" && python -m examples.cnn.main' in text
  assert 'pip install -e ".[test]" && python -m pytest' in text


def test_readme_why_table_is_current():
  render = _load("render_readme", DOCS / "render_readme.py")
  assert render.main(["--check"]) == 0, "run `python docs/render_readme.py` and commit README.md"


def _fake_bench_core():
  step_cols = ["shape", "dtype", "pass", "impl", "median ms", "ratio to flax.linen",
               "roofline ms", "% of roofline", "error"]
  rows = [
      ["(256, 32, 32, 64)", "float32", "fwd+bwd", "jaxbn", 1.0, 0.81, 1, 1, ""],
      ["(64, 56, 56, 64)", "float32", "fwd+bwd", "jaxbn", 1.0, 0.93, 1, 1, ""],
      ["(64, 56, 56, 64)", "float32", "fwd+bwd", "flax.linen", 1.0, 1.0, 1, 1, ""],
      ["(32, 8, 8, 16)", "float32", "fwd+bwd", "jaxbn", 1.0, 1.27, 1, 1, ""],
      ["(256, 32, 32, 64)", "bfloat16", "fwd", "jaxbn", 1.0, 0.456, 1, 1, ""],
  ]
  cnn_cols = ["dtype", "impl", "temp bytes", "temp ratio", "compile s", "compile ratio"]
  cnn = [["float32", "jaxbn", 7, 0.7, 1, 1], ["bfloat16", "jaxbn", 6, 0.664, 1, 1],
         ["float32", "flax.linen", 10, 1.0, 1, 1]]
  return {"bench_core": {"tables": [
      {"title": "BN training step, NHWC, jit (15 rounds)", "columns": step_cols, "rows": rows},
      {"title": "Small CNN train step (conv+BN+ReLU): temporary memory and compile time",
       "columns": cnn_cols, "rows": cnn}]}}


def test_readme_numbers_come_from_the_result_json():
  render = _load("render_readme", DOCS / "render_readme.py")
  m = render.measured(_fake_bench_core())
  assert m["fwd_bwd_large"] == "0.81–0.93× (f32)"      # the flax row and the small shape excluded
  assert m["small"] == "1.27× (f32)"
  assert m["fwd_large"] == "0.46× (bf16)"
  assert m["memory"] == "0.70× (f32), 0.66× (bf16)"
  missing = render.render({})
  assert "not measured yet: `python benchmarks/bench_core.py`" in missing
  assert not re.search(r"\d\.\d\d×", missing)           # no number without a result file


def test_readme_collective_bytes_come_from_the_result_json():
  render = _load("render_readme", DOCS / "render_readme.py")
  cols = ["implementation", "C", "all-reduces", "bytes at 8 devices", "bytes at 64 devices",
          "bytes in the correction branch", "independent of devices"]
  rows = [["jaxbn_stable", 64, 2, 1024, 1024, 512, True],
          ["jaxbn_stable", 256, 2, 4096, 4096, 2048, True],
          ["flax", 256, 2, 5120, 5120, 0, True],
          ["flax", 64, 2, 1280, 1280, 0, True]]
  doc = {"bench_collectives": {"tables": [
      {"title": "All-reduced bytes per device, one BN layer's forward + backward",
       "columns": cols, "rows": rows}]}}
  c = render.collectives(doc)
  assert c == {"C": "256",
               "jaxbn": "4,096 B at 8, 64 devices (+2,048 B when the rare exact correction runs)",
               "flax": "5,120 B at 8, 64 devices"}
  rows[1][4] = 8192   # grows with the device count: each count is shown
  assert render.collectives(doc)["jaxbn"].startswith("4,096 B at 8 devices; 8,192 B at 64")
  assert "bench_collectives.py" in render.render({})


def test_results_table_selection_and_errors():
  ext = _load("results_tables", DOCS / "_ext" / "results_tables.py")
  t = _fake_bench_core()["bench_core"]["tables"][0]
  sel = ext.select_table(t, "shape, ratio to flax.linen", "impl=jaxbn; pass=fwd+bwd")
  assert sel["columns"] == ["shape", "ratio to flax.linen"]
  assert sel["rows"] == [["(256, 32, 32, 64)", 0.81], ["(64, 56, 56, 64)", 0.93],
                         ["(32, 8, 8, 16)", 1.27]]
  assert "not among" in ext.select_table(t, "nope", None)
  assert "not among" in ext.select_table(t, None, "nope=1")
  md = ext.table_markdown(sel)
  assert md[0] == "| shape | ratio to flax.linen |" and md[2] == "| (256, 32, 32, 64) | 0.81 |"


def test_link_check_finds_missing_pages_anchors_and_remote_assets(tmp_path):
  links = _load("check_links", DOCS / "check_links.py")
  (tmp_path / "a.html").write_text(
      '<h1 id="top">A</h1><a href="b.html#sec">ok</a><a href="b.html#nope">bad anchor</a>'
      '<a href="c.html">missing</a><a href="https://example.org/">external link: fine</a>'
      '<script src="https://cdn.example.org/mathjax.js"></script><img src="img/x.png">')
  (tmp_path / "b.html").write_text('<section id="sec"></section><a href="a.html#top">back</a>')
  errors = links.check(str(tmp_path))
  assert len(errors) == 4, errors
  assert any("no id 'nope'" in e for e in errors)
  assert any("missing file c.html" in e for e in errors)
  assert any("from another host" in e for e in errors)
  assert any("img/x.png" in e for e in errors)


# --- The "why" page's claims about flax, next to jaxbn's side of each comparison (the
# masked-sync claim, flax #2417, is tested in tests/test_oracle_flax2417.py). ---

def test_why_claim_flax_fast_variance_loses_every_digit_far_from_zero_jaxbn_does_not():
  """float32 data 1e4 + N(0, 1): flax's default one-pass variance vs float64.

  E[x²] ≈ 1e8 has an ulp of 8 in float32, so E[x²] − E[x]² keeps no digit of a variance of 1:
  flax returns 0 for most features (relative error 1 or more). jaxbn's variance: the bound
  1e-5 is ~100 float32 eps (1.2e-7) — the reduction's rounding over 1024 rows — and a planted
  error fails it (the unbiased n/(n−1) factor alone is 1e-3; an epsilon of 1e-3 added to the
  variance is 1e-3).
  """
  import flax.linen as nn
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.normal(size=(1024, 8)), jnp.float32)
  true_var = np.var(np.asarray(x, np.float64), axis=0)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
  _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  flax_var = np.asarray(upd["batch_stats"]["var"])
  assert np.sum(flax_var == 0.0) > flax_var.size / 2        # most features: variance 0
  assert np.all(np.abs(flax_var / true_var - 1) >= 1.0)     # every feature off by >= 100%
  for fast in (False, True):
    _, st = jaxbn.batch_norm(x, jaxbn.init_stats(8), training=True, momentum=0.0,
                             use_fast_variance=fast)
    assert np.max(np.abs(np.asarray(st.var) / true_var - 1)) <= 1e-5, fast
