"""Tests for README/docs claims that had none: remat, synced group/instance norm, signatures.

Each test is named after the claim it checks; references are float64 NumPy (not jaxbn).
"""

from __future__ import annotations

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import parallel
from tests import _reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ jax.checkpoint (remat)
def _model(remat, policy=None):
  """loss(W, scale, bias) = Σ dy · BN(x @ W); the BN block optionally under jax.checkpoint."""

  def block(h, scale, bias):
    return jaxbn.batch_norm(h, jaxbn.init_stats(h.shape[-1]), scale, bias, training=True)

  if remat:
    block = jax.checkpoint(block, policy=policy)

  def loss(w, scale, bias, x, dy):
    y, stats = block(x @ w, scale, bias)
    return jnp.sum(y * dy) + 0.0 * jnp.sum(stats.mean), stats

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def test_jax_checkpoint_of_a_model_with_bn_gives_the_gradients_without_remat_and_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  w = rng.normal(size=(5, 4)).astype(np.float32)
  scale = (rng.normal(size=4) * 0.3 + 1).astype(np.float32)
  bias = rng.normal(size=4).astype(np.float32)
  dy = rng.normal(size=(32, 4)).astype(np.float32)
  plain, stats_plain = _model(False)(w, scale, bias, x, dy)
  # float64 reference: h = x W, closed-form BN gradients, dW = xᵀ dh.
  h64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  dh, ds, db = ref.grads(h64, scale, bias, dy)
  dw = np.asarray(x, np.float64).T @ dh
  _, _, var = ref.moments(h64)
  raw = scale / np.sqrt(var + 1e-5) * dy
  dh_scale = float(np.sqrt(np.mean(raw ** 2)))
  # float32 gradients: log2(n)·cond_offset² (tests/README.md); dW sums 32 rows of dh more.
  cond = ref.stats_cond(h64, order=2) * np.log2(32)
  for policy in (None, jax.checkpoint_policies.nothing_saveable,
                 jax.checkpoint_policies.dots_saveable):
    (gw, gs, gb), stats = _model(True, policy)(w, scale, bias, x, dy)
    for got, want, s, what in ((gw, dw, dh_scale * np.sqrt(32) * np.abs(x).max(), "dW"),
                               (gs, ds, None, "dscale"), (gb, db, None, "dbias")):
      ref.assert_close(got, want, jnp.float32, cond=cond, scale=s, what=f"{what} ({policy})")
    for a, b in zip((gw, gs, gb), plain):  # remat recomputes the same float32 program
      ref.assert_close(a, b, jnp.float32, cond=cond, what="remat vs no remat")
    for a, b in zip(stats, stats_plain):  # the running statistics are the same, too
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ synced group/instance norm
@pytest.mark.parametrize("norm", ["group_norm", "instance_norm"])
def test_group_and_instance_norm_with_axis_name_equal_float64_on_the_global_data(norm):
  """Height sharded over 8 devices; statistics synced with axis_name equal the global ones."""
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(2, 16, 3, 8)) * 2 + rng.normal(size=(1, 1, 1, 8)) * 3).astype(np.float32)
  scale = (rng.normal(size=8) * 0.3 + 1).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32)
  groups = 4 if norm == "group_norm" else 8  # instance norm = one channel per group

  def f(x):
    if norm == "group_norm":
      return jaxbn.group_norm(x, scale, bias, num_groups=groups, axis_name="data")
    return jaxbn.instance_norm(x, scale, bias, axis_name="data")

  mesh = parallel.data_mesh()
  spec = P(None, "data")
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  y = np.asarray(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))(xs))
  x64 = np.asarray(x, np.float64)
  y_ref = ref.group_norm(x64, groups, 1e-6, scale, bias)
  # Per (example, group) statistics of 16·3·(8/groups) values: float32 output bound with the
  # condition factor of those groups (statistics per group, features = (example, group)).
  gx = x64.reshape(2, 16 * 3, groups, 8 // groups).transpose(1, 3, 0, 2).reshape(-1, 2 * groups)
  ref.assert_close(y, y_ref, jnp.float32, cond=ref.bn_output_cond(gx, jnp.float32),
                   what=f"synced {norm}")
  # Unsynced on the same shards is per-shard normalization: it must differ (the sync matters).
  def unsynced(x):
    if norm == "group_norm":
      return jaxbn.group_norm(x, scale, bias, num_groups=groups)
    return jaxbn.instance_norm(x, scale, bias)
  y_local = np.asarray(jax.jit(jax.shard_map(unsynced, mesh=mesh, in_specs=spec,
                                             out_specs=spec))(xs))
  assert not ref.close(y_local, y_ref, jnp.float32, cond=ref.bn_output_cond(gx, jnp.float32))


# ------------------------------------------------------------------ frozen_batch_norm
def test_frozen_batch_norm_signature_and_it_normalizes_with_the_given_stats_only():
  params = inspect.signature(jaxbn.frozen_batch_norm).parameters
  # What the function takes (README must say the same; it has no mask or axis_name: frozen
  # statistics need neither).
  assert "mask" not in params and "axis_name" not in params
  assert {"x", "stats", "scale", "bias", "axis", "epsilon", "freeze_affine"} <= set(params)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 4)).astype(np.float32) * 3
  stats = jaxbn.BatchStats(jnp.asarray(rng.normal(size=4), jnp.float32),
                           jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
                           jnp.asarray(3, jnp.int32))
  scale = (rng.normal(size=4) * 0.3 + 1).astype(np.float32)
  bias = rng.normal(size=4).astype(np.float32)
  y = jaxbn.frozen_batch_norm(x, stats, scale, bias, epsilon=1e-3)
  expect = ((np.asarray(x, np.float64) - np.asarray(stats.mean, np.float64))
            / np.sqrt(np.asarray(stats.var, np.float64) + 1e-3) * scale + bias)
  # float32 affine map of x: x − mean rounds at u·|x|, |x|/sqrt(var) ≲ 12 here (cond 12).
  ref.assert_close(y, expect, jnp.float32, cond=12, what="frozen output")


# ------------------------------------------------------------------ documented signatures
_CALL = re.compile(r"(?:\bpartial\(\s*)?\bjaxbn\.((?:linen\.|nnx\.|parallel\.)?[A-Za-z_]\w*)"
                   r"\s*(\(|,)")


def _balanced_args(text, start):
  """Top-level comma-separated arguments from text[start] (just after '(') to its ')'."""
  depth, cur, out = 1, [], []
  for ch in text[start:start + 2000]:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        break
    if ch == "," and depth == 1:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  out.append("".join(cur))
  return out


def _resolve(dotted):
  obj = jaxbn
  for part in dotted.split("."):
    obj = getattr(obj, part, None)
    if obj is None:
      return None
  return obj


def _documented_calls():
  """(file, public name, keyword) for every `jaxbn.<name>(..., key=...)` in README/docs."""
  files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
  for path in files:
    if "_build" in path.parts or "_generated" in path.parts:
      continue
    text = path.read_text()
    for m in _CALL.finditer(text):
      obj = _resolve(m.group(1))
      if obj is None or not callable(obj):
        continue
      for token in _balanced_args(text, m.end()):
        key, eq, _ = token.partition("=")
        key = key.strip()
        if eq and key.isidentifier() and not token.strip().startswith("=="):
          yield path.relative_to(ROOT), m.group(1), obj, key


def test_every_keyword_of_a_documented_jaxbn_call_is_a_real_parameter():
  """`jaxbn.f(..., key=...)` (or partial(jaxbn.linen.X, key=...)) in README/docs: f takes key."""
  wrong, seen = [], 0
  for path, name, obj, key in _documented_calls():
    params = inspect.signature(obj).parameters
    seen += 1
    if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
      wrong.append(f"{path}: `jaxbn.{name}(..., {key}=...)` but it has no parameter {key!r}")
  assert seen > 0, "no documented jaxbn call with keywords found in README.md/docs"
  assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------ the variants guide's table
def _keyword_table():
  """{function: {keyword: claimed}} from the `mask`/`axis_name` table of docs/guide/variants.md."""
  text = (ROOT / "docs" / "guide" / "variants.md").read_text()
  header = re.search(r"^\| function \|(.*)\|\s*$", text, re.M)
  assert header, "variants.md: the `mask`/`axis_name` table is missing"
  keywords = [k.strip().strip("`") for k in header.group(1).split("|")]
  rows = {}
  for line in text[header.end():].splitlines()[2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    name = cells[0].strip("`")
    claims = {}
    for k, cell in zip(keywords, cells[1:]):
      assert cell.split()[0] in ("yes", "no"), (name, k, cell)
      claims[k] = cell.split()[0] == "yes"
    rows[name] = claims
  return rows


def test_variants_guide_says_which_functions_take_mask_and_axis_name_as_their_signatures_do():
  """Each yes/no of the table is the function's signature (inspect.signature), and every
  function of the guide's layer table has a row."""
  from jaxbn._layers import registry
  rows = _keyword_table()
  assert {"mask", "axis_name"} <= set(next(iter(rows.values())))
  for name, claims in rows.items():
    params = inspect.signature(getattr(jaxbn, name)).parameters
    for keyword, claimed in claims.items():
      assert (keyword in params) == claimed, (
          f"docs/guide/variants.md says {name} {'takes' if claimed else 'does not take'} "
          f"`{keyword}`; its signature says otherwise")
  layer_functions = {row.core.__name__ for row in registry.LAYERS} - {"standardize_weight"}
  assert layer_functions <= set(rows), layer_functions - set(rows)


# ------------------------------------------------------------------ conftest.py
def test_hypothesis_runs_derandomized_with_no_example_database():
  """The root conftest's default profile: the same examples on every run and machine."""
  from hypothesis import settings
  current = settings()
  assert current.derandomize and current.database is None and current.deadline is None
