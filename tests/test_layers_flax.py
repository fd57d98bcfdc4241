"""Drop-in, exactly: jaxbn's layers against flax 0.12's own layers (the oracle here).

Fields and constructor arguments equal flax's (names, kinds, defaults); flax's
``promote_dtype`` behaviour; complex input as flax.linen handles it; ``momentum=1``; and, where
flax refuses an input, flax's error type with flax's message first.

Tolerances (float32, outputs of size O(1) after normalization over n <= 16 entries): both
sides compute in float32, so they differ by a few roundings of the mean, variance and rsqrt:
``atol = 64 * eps32 ~ 8e-6``. A planted epsilon off by 1e-3 moves the outputs by ~1e-4 (data of
variance ~4): 12x the bound.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

ATOL32 = 64 * float(jnp.finfo(jnp.float32).eps)

TWINS = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]
# jaxbn's additions (no flax counterpart).
EXTRAS = {"BatchNorm": {"unbiased_running_var", "debias", "skip_nonfinite"}}


@pytest.mark.parametrize("name", TWINS)
def test_linen_fields_are_flax_fields_with_flax_defaults(name):
  theirs = {f.name: f for f in dataclasses.fields(getattr(nn, name)) if f.init}
  ours = {f.name: f for f in dataclasses.fields(getattr(jaxbn.linen, name)) if f.init}
  assert set(theirs) <= set(ours)
  for field, f in theirs.items():
    assert ours[field].default == f.default, (name, field)
    assert ours[field].kw_only == f.kw_only, (name, field)
  assert set(ours) - set(theirs) == EXTRAS.get(name, set())
  # Same positional order, so positional construction means the same thing.
  order = [f for f in ours if f in theirs]
  assert order == list(theirs)


@pytest.mark.parametrize("name", TWINS)
def test_nnx_constructors_take_flax_arguments_with_flax_defaults(name):
  theirs = inspect.signature(getattr(nnx, name).__init__).parameters
  ours = inspect.signature(getattr(jaxbn.nnx, name).__init__).parameters
  assert set(theirs) <= set(ours)
  for arg, p in theirs.items():
    assert ours[arg].kind == p.kind, (name, arg)
    if arg != "promote_dtype":  # jaxbn's own copy; its behaviour is tested below
      assert ours[arg].default == p.default, (name, arg)
  assert set(ours) - set(theirs) == EXTRAS.get(name, set())
  assert [a for a in ours if a in theirs] == list(theirs)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_call_signatures_are_flax_call_signatures(name, framework):
  flax_mod, ours_mod = (nn, jaxbn.linen) if framework == "linen" else (nnx, jaxbn.nnx)
  sig = lambda cls: [(p.name, p.kind, p.default)  # noqa: E731
                     for p in inspect.signature(cls.__call__).parameters.values()]
  assert sig(getattr(ours_mod, name)) == sig(getattr(flax_mod, name))


def test_default_promote_dtype_behaves_as_flax():
  from flax.nnx.nn import dtypes as flax_dtypes  # the oracle only; jaxbn does not import it
  dts = [jnp.int8, jnp.int32, jnp.bool_, jnp.bfloat16, jnp.float16, jnp.float32,
         jnp.complex64]
  for a in dts:
    for b in dts + [None]:
      args = (jnp.ones(2, a), None if b is None else jnp.ones(2, b))
      for dtype in (None, jnp.bfloat16):
        want = flax_dtypes.promote_dtype(args, dtype=dtype)
        got = jaxbn.nnx.promote_dtype(args, dtype=dtype)
        assert [None if w is None else w.dtype for w in want] == [
            None if g is None else g.dtype for g in got], (a, b, dtype)
  for call in (flax_dtypes.promote_dtype, jaxbn.nnx.promote_dtype):
    with pytest.raises(ValueError, match=r"^Dtype must be inexact: "):
      call((jnp.ones(2),), dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Complex input and momentum=1, as flax.
# --------------------------------------------------------------------------------------------


def _complex_x():
  k1, k2 = jax.random.split(jax.random.key(3))
  return (jax.random.normal(k1, (16, 3)) * 2 + 1
          + 1j * (jax.random.normal(k2, (16, 3)) - 0.5)).astype(jnp.complex64)


def test_complex_input_turns_the_running_mean_complex_as_flax_linen():
  x = _complex_x()
  flax_bn, ours = nn.BatchNorm(momentum=0.9), jaxbn.linen.BatchNorm(momentum=0.9)
  init = lambda m: jax.eval_shape(  # noqa: E731  (abstract: eager init is slow)
      functools.partial(m.init, use_running_average=False), jax.random.key(0), x)
  assert init(ours) == init(flax_bn)  # float32 variables at init, as flax
  v = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
       "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  y_f, u_f = flax_bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y_o, u_o = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert u_o["batch_stats"]["mean"].dtype == u_f["batch_stats"]["mean"].dtype == jnp.complex64
  assert u_o["batch_stats"]["var"].dtype == u_f["batch_stats"]["var"].dtype == jnp.float32
  assert y_o.dtype == y_f.dtype == jnp.complex64
  np.testing.assert_allclose(y_o, y_f, atol=ATOL32)
  for k in ("mean", "var"):
    np.testing.assert_allclose(u_o["batch_stats"][k], u_f["batch_stats"][k], atol=ATOL32)
  # The complex statistics round-trip: the next step and eval take them as flax does.
  v2 = {**v, **u_f}
  np.testing.assert_allclose(ours.apply(v2, x, use_running_average=True),
                             flax_bn.apply(v2, x, use_running_average=True), atol=ATOL32)
  _, u2_o = ours.apply(v2, 2 * x, use_running_average=False, mutable=["batch_stats"])
  _, u2_f = flax_bn.apply(v2, 2 * x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(u2_o["batch_stats"]["mean"], u2_f["batch_stats"]["mean"],
                             atol=4 * ATOL32)


def test_complex_input_nnx_keeps_the_complex_mean_that_flax_nnx_drops():
  """jaxbn.nnx stores what flax.linen stores (flax.nnx 0.12 casts the mean back to float32,
  losing its imaginary part)."""
  x = _complex_x()
  ours = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  y = ours(x)
  v = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
       "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  y_f, u_f = nn.BatchNorm(momentum=0.9).apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"])
  assert ours.mean[...].dtype == jnp.complex64 and ours.var[...].dtype == jnp.float32
  np.testing.assert_allclose(y, y_f, atol=ATOL32)
  np.testing.assert_allclose(ours.mean[...], u_f["batch_stats"]["mean"], atol=ATOL32)
  np.testing.assert_allclose(ours.var[...], u_f["batch_stats"]["var"], atol=ATOL32)
  assert np.abs(np.imag(ours.mean[...])).max() > 1e-2  # the imaginary part is kept
  ours.eval()
  np.testing.assert_allclose(
      ours(x), nn.BatchNorm(momentum=0.9).apply({**v, **u_f}, x, use_running_average=True),
      atol=ATOL32)


def test_momentum_one_trains_on_batch_statistics_and_keeps_the_running_ones():
  x = jax.random.normal(jax.random.key(1), (16, 3)) * 2 + 1
  old = {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([0.5, 2.0, 3.0])}
  v = {"params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
       "batch_stats": old}
  y_f, u_f = nn.BatchNorm(momentum=1.0).apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"])
  y_o, u_o = jaxbn.linen.BatchNorm(momentum=1.0).apply(v, x, use_running_average=False,
                                                       mutable=["batch_stats"])
  np.testing.assert_allclose(y_o, y_f, atol=ATOL32)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(u_f["batch_stats"][k], old[k])
    np.testing.assert_array_equal(u_o["batch_stats"][k], old[k])
  # The output uses the batch statistics (not the running ones): float64 reference.
  x64 = np.asarray(x, np.float64)
  ref = ((x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5) * np.asarray(v["params"]["scale"])
         + np.asarray(v["params"]["bias"]))
  np.testing.assert_allclose(y_o, ref, atol=ATOL32)

  theirs = nnx.BatchNorm(3, momentum=1.0, rngs=nnx.Rngs(0))
  ours = jaxbn.nnx.BatchNorm(3, momentum=1.0, rngs=nnx.Rngs(0))
  for m in (theirs, ours):
    m.mean[...], m.var[...] = old["mean"], old["var"]
  np.testing.assert_allclose(ours(x), theirs(x), atol=ATOL32)
  np.testing.assert_array_equal(ours.mean[...], old["mean"])
  np.testing.assert_array_equal(ours.var[...], old["var"])


# --------------------------------------------------------------------------------------------
# Refused inputs: flax's error type and sentence first.
# --------------------------------------------------------------------------------------------

X4 = jnp.ones((2, 4, 4, 6))
LINEN_REFUSED = [
    ("GroupNorm", dict(num_groups=2, group_size=3)),
    ("GroupNorm", dict(num_groups=None)),
    ("GroupNorm", dict(num_groups=None, group_size=4)),
    ("GroupNorm", dict(num_groups=4)),
    ("GroupNorm", dict(num_groups=2, reduction_axes=(1, 2))),
    ("InstanceNorm", dict(feature_axes=(0, -1))),
    ("BatchNorm", dict()),  # no use_running_average anywhere
]
NNX_REFUSED = [
    ("GroupNorm", dict(num_groups=2, group_size=3)),
    ("GroupNorm", dict(num_groups=None)),
    ("GroupNorm", dict(num_groups=None, group_size=4)),
    ("GroupNorm", dict(num_groups=4)),
    ("InstanceNorm", dict(feature_axes=(0, -1))),
    ("BatchNorm", dict(use_running_average=None)),
]


def _flax_then_ours(make_flax, make_ours):
  with pytest.raises(Exception) as theirs:
    make_flax()
  with pytest.raises(Exception) as ours:
    make_ours()
  assert type(ours.value) is type(theirs.value)
  flax_msg, our_msg = str(theirs.value), str(ours.value)
  if "\n" in flax_msg:  # flax.nnx BatchNorm: its first sentence, then a list of options
    flax_msg = flax_msg.split(" Consider")[0]
  assert our_msg.startswith(flax_msg), (our_msg, flax_msg)
  assert re.search(r"jaxbn\.(linen|nnx)\.\w+: ", our_msg[len(flax_msg):]), our_msg


@pytest.mark.parametrize("name,cfg", LINEN_REFUSED, ids=str)
def test_linen_refusals_keep_flax_type_and_sentence_first(name, cfg):
  _flax_then_ours(lambda: getattr(nn, name)(**cfg).init(jax.random.key(0), X4),
                  lambda: getattr(jaxbn.linen, name)(**cfg).init(jax.random.key(0), X4))


@pytest.mark.parametrize("name,cfg", NNX_REFUSED, ids=str)
def test_nnx_refusals_keep_flax_type_and_sentence_first(name, cfg):
  _flax_then_ours(lambda: getattr(nnx, name)(6, **cfg, rngs=nnx.Rngs(0))(X4),
                  lambda: getattr(jaxbn.nnx, name)(6, **cfg, rngs=nnx.Rngs(0))(X4))


# --------------------------------------------------------------------------------------------
# Only public flax names (a flax upgrade must not break the wrappers).
# --------------------------------------------------------------------------------------------

PUBLIC_FLAX_MODULES = {"flax", "flax.linen", "flax.nnx", "flax.core", "flax.typing",
                       "flax.errors", "flax.struct", "flax.serialization"}


def test_wrappers_import_only_public_flax_modules():
  import ast
  import pathlib
  root = pathlib.Path(jaxbn.linen.__file__).parent.parent
  files = sorted((root / "linen").glob("*.py")) + sorted((root / "nnx").glob("*.py"))
  assert len(files) >= 10
  for path in files:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flax"):
        assert node.module in PUBLIC_FLAX_MODULES, (path.name, node.module)
        for alias in node.names:  # `from flax.nnx import module` would hide a private path
          assert not alias.name.startswith("_"), (path.name, alias.name)
          if node.module == "flax.nnx":
            assert hasattr(nnx, alias.name), (path.name, alias.name)
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith("flax"):
            assert alias.name in PUBLIC_FLAX_MODULES, (path.name, alias.name)
      elif isinstance(node, ast.Attribute) and node.attr in ("_can_update", "_raw_value",
                                                              "_trace_state", "_var_metadata"):
        raise AssertionError(f"{path.name}: private flax attribute {node.attr}")


def test_repeated_feature_axes_are_accepted_as_flax_does():
  """flax canonicalizes ``axis=(-1, 2)`` of a rank-3 input to ``(2,)``; so do the layers."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 3)) * 2 + 1
  v = nn.BatchNorm(axis=(-1, 2)).init(jax.random.key(0), x, use_running_average=False)
  y_f, u_f = nn.BatchNorm(axis=(-1, 2)).apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"])
  y_o, u_o = jaxbn.linen.BatchNorm(axis=(-1, 2)).apply(v, x, use_running_average=False,
                                                       mutable=["batch_stats"])
  np.testing.assert_allclose(y_o, y_f, atol=ATOL32)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=ATOL32), u_o, u_f)
  ours = jaxbn.nnx.BatchNorm(3, axis=(-1, 2), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(ours(x), y_f, atol=ATOL32)


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm", "GhostBatchNorm"])
def test_one_missing_mode_message_per_framework(name):
  """Every BN-family layer: flax's sentence for its framework, then the same explanation."""
  x = jnp.ones((4, 3))
  extra = {"virtual_batch_size": 2} if name == "GhostBatchNorm" else {}
  with pytest.raises(ValueError) as linen_err:
    getattr(jaxbn.linen, name)(**extra).init(jax.random.key(0), x)
  with pytest.raises(ValueError) as nnx_err:
    getattr(jaxbn.nnx, name)(3, **extra, use_running_average=None, rngs=nnx.Rngs(0))(x)
  linen_msg, nnx_msg = str(linen_err.value), str(nnx_err.value)
  assert linen_msg.startswith('Parameter "use_running_average" must be passed to the '
                              f'constructor or at call time. jaxbn.linen.{name}: give '
                              '`use_running_average` (True: normalize with the stored '
                              'statistics, eval; False: with the batch statistics')
  assert nnx_msg.startswith(f"No `use_running_average` argument was provided to {name}. "
                            f"jaxbn.nnx.{name}: give `use_running_average` (True: normalize "
                            "with the stored statistics, eval; False: with the batch "
                            "statistics")
