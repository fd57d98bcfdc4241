"""The batch-norm registry: every registered class is handled by every tool (freeze,
recompute, fold) in linen and nnx, and an unregistered batch-norm-like module is refused.

References: the eval-mode output computed in float64 NumPy from the layer's own variables
(freeze, fold) and the float64 population mean / biased variance of the layer's input over all
batches (recompute).

Tolerances: float32 data of size O(1-10) through one Dense layer of 3 inputs and a batch norm:
outputs ``atol = rtol = 256 * eps32 ~ 3e-5`` (a few roundings in the matmul, the rsqrt and the
affine, times the scale ~2 and inverse std ~1.5); population moments over 48 rows
``rtol = 64 * eps32``. A planted epsilon off by 1e-3 moves the outputs by ~3e-4 relative.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

EPS32 = float(jnp.finfo(jnp.float32).eps)
TOL = dict(rtol=256 * EPS32, atol=256 * EPS32)
EPSILON = 1e-3
BATCHES = [jax.random.normal(jax.random.key(i), (16, 3)) * 2 + 1 for i in range(3)]

LINEN = {
    "BatchNorm": jaxbn.linen.BatchNorm,
    "BatchRenorm": jaxbn.linen.BatchRenorm,
    "GhostBatchNorm": functools.partial(jaxbn.linen.GhostBatchNorm, virtual_batch_size=4),
    "FrozenBatchNorm": jaxbn.linen.FrozenBatchNorm,
    "flax.BatchNorm": nn.BatchNorm,
}
NNX = {
    "BatchNorm": jaxbn.nnx.BatchNorm,
    "BatchRenorm": jaxbn.nnx.BatchRenorm,
    "GhostBatchNorm": functools.partial(jaxbn.nnx.GhostBatchNorm, virtual_batch_size=4),
    "FrozenBatchNorm": jaxbn.nnx.FrozenBatchNorm,
    "flax.BatchNorm": nnx.BatchNorm,
}
FROZEN = "FrozenBatchNorm"


def _eval64(h, mean, var, scale, bias):
  h, mean, var, scale, bias = (np.asarray(a, np.float64) for a in (h, mean, var, scale, bias))
  return (h - mean) / np.sqrt(var + EPSILON) * scale + bias


def _population(h):
  h = np.asarray(h, np.float64)
  return h.mean(0), h.var(0)


# --------------------------------------------------------------------------------------------
# Linen.
# --------------------------------------------------------------------------------------------


class _LinenNet(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x, train: bool):
    return self.bn(use_running_average=not train, epsilon=EPSILON, momentum=0.9)(
        nn.Dense(4, name="dense")(x))


def _linen_variables(net):
  v = net.init(jax.random.key(0), BATCHES[0], train=False)
  r = np.random.default_rng(1)
  bn = {"params": {"scale": r.uniform(0.5, 2, 4), "bias": r.normal(size=4)},
        "batch_stats": {"mean": r.normal(size=4), "var": r.uniform(0.5, 2, 4)}}
  v = {"params": {**v["params"], "bn": jax.tree.map(jnp.float32, bn["params"])},
       "batch_stats": {"bn": jax.tree.map(jnp.float32, bn["batch_stats"])}}
  return v


def _named(bn_cls):
  return functools.partial(bn_cls, name="bn") if not isinstance(bn_cls, functools.partial) \
      else functools.partial(bn_cls.func, *bn_cls.args, **bn_cls.keywords, name="bn")


def _linen_h(v, x):
  d = v["params"]["dense"]
  return np.asarray(x, np.float64) @ np.asarray(d["kernel"], np.float64) + np.asarray(
      d["bias"], np.float64)


@pytest.mark.parametrize("name", list(LINEN))
def test_linen_tools_handle_every_registered_class(name):
  net = _LinenNet(_named(LINEN[name]))
  v = _linen_variables(net)
  x = BATCHES[0]
  p, s = v["params"]["bn"], v["batch_stats"]["bn"]
  want_eval = _eval64(_linen_h(v, x), s["mean"], s["var"], p["scale"], p["bias"])
  np.testing.assert_allclose(net.apply(v, x, train=False), want_eval, **TOL)

  # Freeze: training mode normalizes with the stored statistics and updates nothing.
  frozen = jaxbn.linen.freeze_batch_norm(net)
  y, upd = frozen.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, want_eval, **TOL)
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])

  # Recompute: population statistics of the layer's input (a frozen layer keeps its own).
  recompute = functools.partial(jaxbn.linen.recompute_batch_stats,
                                lambda v, b: net.apply(v, b, train=False), v, BATCHES,
                                progress=False)
  if name == FROZEN:  # not recomputed: here the only batch norm, so nothing to do
    with pytest.raises(ValueError, match=r"the forward pass called no BatchNorm layer"):
      recompute()
  else:
    got = recompute()["batch_stats"]["bn"]
    mean, var = _population(np.concatenate([_linen_h(v, b) for b in BATCHES]))
    np.testing.assert_allclose(got["mean"], mean, rtol=64 * EPS32, atol=64 * EPS32 * 8)
    np.testing.assert_allclose(got["var"], var, rtol=64 * EPS32)

  # Fold: one pair found; the folded model computes the eval-mode function.
  pairs = jaxbn.linen.find_conv_bn_pairs(net.apply, v, x, train=False)
  assert pairs == [jaxbn.linen.FoldPair(("dense",), ("bn",), EPSILON, (-1,))]
  folded_v = jaxbn.linen.fold_batch_norm_layers(v, pairs)
  assert "bn" not in folded_v["batch_stats"]
  np.testing.assert_allclose(jaxbn.linen.folded(net.apply)(folded_v, x, train=False),
                             want_eval, **TOL)


class _LinenCustomBN(nn.Module):
  """A batch-norm-like module that no tool knows: running statistics in ``batch_stats``."""

  use_running_average: bool = True
  epsilon: float = EPSILON
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x):
    mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[-1:])
    var = self.variable("batch_stats", "var", jnp.ones, x.shape[-1:])
    return (x - mean.value) / jnp.sqrt(var.value + self.epsilon)


def test_linen_tools_refuse_an_unregistered_batch_norm_like_module():
  class Custom(_LinenCustomBN):  # a fresh class, so registering it below stays local
    pass

  net = _LinenNet(functools.partial(Custom, name="bn"))
  v = net.init(jax.random.key(0), BATCHES[0], train=False)
  msg = (r"the module bn \(Custom\) has batch_stats 'mean' and 'var' like a batch norm, but "
         r"Custom is not registered.*jaxbn.linen.register_batch_norm\(Custom\)")
  with pytest.raises(TypeError, match=r"jaxbn.linen.freeze_batch_norm: " + msg):
    jaxbn.linen.freeze_batch_norm(net).apply(v, BATCHES[0], train=True)
  with pytest.raises(TypeError, match=r"jaxbn.linen.recompute_batch_stats: " + msg):
    jaxbn.linen.recompute_batch_stats(lambda v, b: net.apply(v, b, train=False), v, BATCHES,
                                      progress=False)
  with pytest.raises(TypeError, match=r"jaxbn.linen.find_conv_bn_pairs: " + msg):
    jaxbn.linen.find_conv_bn_pairs(net.apply, v, BATCHES[0], train=False)
  with pytest.raises(ValueError, match=r"register_batch_norm: `kind` must be one of"):
    jaxbn.linen.register_batch_norm(Custom, kind="other")
  with pytest.raises(TypeError, match=r"register_batch_norm: `cls` must be a flax.linen"):
    jaxbn.linen.register_batch_norm(int)


# --------------------------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------------------------


def _nnx_model(bn_cls):
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         bn_cls(4, epsilon=EPSILON, momentum=0.9, rngs=nnx.Rngs(1)))
  r = np.random.default_rng(1)
  bn = model.layers[1]
  bn.scale[...] = jnp.asarray(r.uniform(0.5, 2, 4), jnp.float32)
  bn.bias[...] = jnp.asarray(r.normal(size=4), jnp.float32)
  bn.mean[...] = jnp.asarray(r.normal(size=4), jnp.float32)
  bn.var[...] = jnp.asarray(r.uniform(0.5, 2, 4), jnp.float32)
  return model


def _nnx_h(model, x):
  lin = model.layers[0]
  return np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64) + np.asarray(
      lin.bias[...], np.float64)


@pytest.mark.parametrize("name", list(NNX))
def test_nnx_tools_handle_every_registered_class(name):
  model = _nnx_model(NNX[name])
  bn = model.layers[1]
  x = BATCHES[0]
  stats = {k: np.asarray(getattr(bn, k)[...]) for k in ("mean", "var")}
  want_eval = _eval64(_nnx_h(model, x), stats["mean"], stats["var"], bn.scale[...],
                      bn.bias[...])
  model.eval()
  np.testing.assert_allclose(model(x), want_eval, **TOL)
  model.train()

  frozen = jaxbn.nnx.freeze_batch_norm(model)
  np.testing.assert_allclose(frozen(x), want_eval, **TOL)  # train mode, stored statistics
  for k in ("mean", "var"):
    np.testing.assert_array_equal(getattr(bn, k)[...], stats[k])

  if name == FROZEN:  # not recomputed: here the only batch norm, so nothing to do
    with pytest.raises(ValueError, match=r"the forward pass called no BatchNorm layer"):
      jaxbn.nnx.recompute_batch_stats(model, BATCHES, progress=False)
  else:
    got = jaxbn.nnx.recompute_batch_stats(model, BATCHES, progress=False).layers[1]
    mean, var = _population(np.concatenate([_nnx_h(model, b) for b in BATCHES]))
    np.testing.assert_allclose(got.mean[...], mean, rtol=64 * EPS32, atol=64 * EPS32 * 8)
    np.testing.assert_allclose(got.var[...], var, rtol=64 * EPS32)

  pairs = jaxbn.nnx.find_conv_bn_pairs(model, x)
  assert pairs == [jaxbn.nnx.FoldPair(("layers", 0), ("layers", 1), EPSILON, (-1,))]
  fast = jaxbn.nnx.fold_batch_norm_layers(model, pairs)
  assert isinstance(fast.layers[1], jaxbn.nnx.FoldedBatchNorm)
  np.testing.assert_allclose(fast(x), want_eval, **TOL)


class _NnxCustomBN(nnx.Module):
  def __init__(self, n):
    self.mean = nnx.BatchStat(jnp.zeros(n))
    self.var = nnx.BatchStat(jnp.ones(n))

  def __call__(self, x):
    return (x - self.mean[...]) / jnp.sqrt(self.var[...] + EPSILON)


def test_nnx_tools_refuse_an_unregistered_batch_norm_like_module():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), _NnxCustomBN(4))
  msg = (r"the module at \('layers', 1\) \(_NnxCustomBN\) has `mean` and `var` nnx.BatchStat "
         r"like a batch norm, but _NnxCustomBN is not registered.*"
         r"jaxbn.nnx.register_batch_norm\(_NnxCustomBN\)")
  with pytest.raises(TypeError, match=r"jaxbn.nnx.freeze_batch_norm: " + msg):
    jaxbn.nnx.freeze_batch_norm(model)
  with pytest.raises(TypeError, match=r"jaxbn.nnx.recompute_batch_stats: " + msg):
    jaxbn.nnx.recompute_batch_stats(model, BATCHES, progress=False)
  with pytest.raises(TypeError, match=r"jaxbn.nnx.find_conv_bn_pairs: " + msg):
    jaxbn.nnx.find_conv_bn_pairs(model, BATCHES[0])
  with pytest.raises(TypeError, match=r"jaxbn.nnx.fold_batch_norm_layers: " + msg):
    jaxbn.nnx.fold_batch_norm_layers(model, [(("layers", 0), ("layers", 1))])


def test_the_twins_have_the_same_fields_and_registry():
  """linen and nnx tools read the one registry: the same kind for each class of either."""
  from jaxbn._layers import registry
  for row in registry.LAYERS:
    assert registry.kind_of(getattr(jaxbn.linen, row.name)) == row.kind
    assert registry.kind_of(getattr(jaxbn.nnx, row.name)) == row.kind
  assert registry.kind_of(nn.BatchNorm) == registry.kind_of(nnx.BatchNorm) == "trains"
  assert jaxbn.linen.FoldPair._fields == jaxbn.nnx.FoldPair._fields == (
      "layer", "bn", "epsilon", "kernel_axes")
  assert jaxbn.linen.FoldPair._field_defaults == jaxbn.nnx.FoldPair._field_defaults


def test_subclasses_need_no_registration_and_register_batch_norm_adds_a_class():
  class MyBatchNorm(jaxbn.nnx.BatchNorm):
    pass

  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), MyBatchNorm(4, rngs=nnx.Rngs(1)))
  assert type(jaxbn.nnx.freeze_batch_norm(model).layers[1]) is jaxbn.nnx.FrozenBatchNorm

  class Custom(_NnxCustomBN):  # a fresh class: registering it does not affect other tests
    pass

  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), Custom(4))
  with pytest.raises(TypeError, match=r"Custom is not registered"):
    jaxbn.nnx.freeze_batch_norm(model)
  assert jaxbn.nnx.register_batch_norm(Custom, kind="frozen") is Custom
  assert jaxbn.nnx.freeze_batch_norm(model).layers[1].mean is model.layers[1].mean  # kept


def test_tools_take_renorm_call_arguments():
  """A model that passes r_max/d_max to its BatchRenorm is frozen, folded and recomputed like
  any other (linen, nnx)."""
  class Net(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      self.bn = jaxbn.nnx.BatchRenorm(4, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.bn(self.lin(x), r_max=jnp.float32(2.0), d_max=jnp.float32(1.0))

  model = Net()
  model.bn.eval()
  want = model(BATCHES[0])
  model.bn.train()
  # Frozen and folded, the layer still takes the renorm call arguments (and ignores them).
  np.testing.assert_allclose(jaxbn.nnx.freeze_batch_norm(model)(BATCHES[0]), want, **TOL)
  pairs = jaxbn.nnx.find_conv_bn_pairs(model, BATCHES[0])
  np.testing.assert_allclose(jaxbn.nnx.fold_batch_norm_layers(model, pairs)(BATCHES[0]), want,
                             **TOL)
  new = jaxbn.nnx.recompute_batch_stats(model, BATCHES, progress=False)
  h = np.concatenate([_nnx_h(nnx.Sequential(model.lin), b) for b in BATCHES])
  np.testing.assert_allclose(new.bn.var[...], h.var(0), rtol=64 * EPS32)

  class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return jaxbn.linen.BatchRenorm(use_running_average=not train, name="bn")(
          nn.Dense(4, name="dense")(x), r_max=jnp.float32(2.0), d_max=jnp.float32(1.0))

  v = LinenNet().init(jax.random.key(0), BATCHES[0], train=False)
  new = jaxbn.linen.recompute_batch_stats(lambda v, b: LinenNet().apply(v, b, train=False), v,
                                          BATCHES, progress=False)
  h = np.concatenate([_linen_h(v, b) for b in BATCHES])
  np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], h.var(0), rtol=64 * EPS32)


# --------------------------------------------------------------------------------------------
# The one table: every exported class has a row, and the rows tell the truth.
# --------------------------------------------------------------------------------------------

# Exported NNX modules that are no layer of the table: what remains of a folded BN (x + bias).
_NOT_LAYERS = {"FoldedBatchNorm"}
_NNX_ARGS = {"num_features": 4, "num_groups": 2, "virtual_batch_size": 2, "in_features": 4,
             "out_features": 4, "kernel_size": (3, 3)}


def _exported_classes(module, base):
  return {n: getattr(module, n) for n in module.__all__
          if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base)}


def test_every_exported_class_has_a_row_and_a_class_holding_statistics_is_no_stateless():
  """A linen or nnx class missing from the table fails here; so does a row whose kind says
  'stateless' for a class that holds batch statistics, or a kind with statistics for one
  that holds none (checked on the NNX instances: their state is visible without a call)."""
  from jaxbn._layers import registry
  linen = _exported_classes(jaxbn.linen, nn.Module)
  nnx_classes = _exported_classes(jaxbn.nnx, nnx.Module)
  assert set(linen) | set(nnx_classes) - _NOT_LAYERS == {row.name for row in registry.LAYERS}
  for name, cls in {**linen, **nnx_classes}.items():
    assert name in _NOT_LAYERS or registry.row_of(cls).name == name
  for name, cls in nnx_classes.items():
    if name in _NOT_LAYERS:
      continue
    params = inspect.signature(cls).parameters
    layer = cls(**{n: v for n, v in _NNX_ARGS.items() if n in params}, rngs=nnx.Rngs(0))
    holds = any(isinstance(v, nnx.BatchStat) for _, v in nnx.iter_graph(layer))
    assert holds == (registry.kind_of(cls) != "stateless"), name


def test_every_nnx_class_shows_its_constructor_signature():
  """inspect.signature (help(), IDEs) shows the real parameters, flax.nnx.BatchNorm's order."""
  for name, cls in _exported_classes(jaxbn.nnx, nnx.Module).items():
    params = list(inspect.signature(cls).parameters)
    assert "args" not in params and "self" not in params, name
    assert params == list(inspect.signature(cls.__init__).parameters)[1:], name
  flax_order = list(inspect.signature(nnx.BatchNorm.__init__).parameters)[1:]
  assert list(inspect.signature(jaxbn.nnx.BatchNorm).parameters)[:len(flax_order)] == flax_order


def test_core_imports_nothing_above_it():
  """jaxbn/_core imports only jaxbn._core.* of jaxbn (no jaxbn, linen, nnx, _layers...)."""
  core = pathlib.Path(jaxbn.__file__).parent / "_core"
  bad = []
  for path in sorted(core.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = ["jaxbn._core" if node.level == 1 else ("jaxbn" if node.level else
                                                         node.module or "")]
      bad += [f"{path.name}:{node.lineno} {n}" for n in names
              if (n == "jaxbn" or n.startswith("jaxbn.")) and not n.startswith("jaxbn._core")]
  assert not bad, bad


# --------------------------------------------------------------------------------------------
# Every layer holding statistics, through every tool, as its kind says (linen and nnx).
# The layers of the tests above (trains/frozen) are checked there to the last digit; here every
# other row of the table, so a new row is exercised with no change to this test or the tools.
# --------------------------------------------------------------------------------------------

_COVERED = {"BatchNorm", "BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm"}
_X4 = [jax.random.normal(jax.random.key(10 + i), (4, 2, 2, 3)) * 2 + 1 for i in range(2)]


def _stateful_rows():
  from jaxbn._layers import registry
  return [row for row in registry.LAYERS
          if row.kind != "stateless" and row.name not in _COVERED]


def _randomized(tree, seed):
  """Every leaf replaced by random values of its shape (positive for var/scale/v); ints kept."""
  r = np.random.default_rng(seed)

  def leaf(path, a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    if re.search(r"\b(var|scale|v)\b", jax.tree_util.keystr(path)):
      return jnp.asarray(r.uniform(0.5, 2, a.shape), a.dtype)
    return jnp.asarray(r.normal(size=a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _bn_eval64(h, stats, params):
  h = np.asarray(h, np.float64)
  return ((h - np.asarray(stats["mean"], np.float64)) / np.sqrt(np.asarray(stats["var"]) + EPSILON)
          * np.asarray(params["scale"]) + np.asarray(params["bias"]))


def _h64(kernel, bias, x):
  return np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("name", [row.name for row in _stateful_rows()])
def test_linen_tools_treat_every_layer_holding_statistics_as_its_kind_says(name):
  from jaxbn._layers import registry
  t = registry.KINDS[registry.kind_of(getattr(jaxbn.linen, name))]
  cls = getattr(jaxbn.linen, name)
  fields = {f.name for f in dataclasses.fields(cls)}
  net = _LinenNet(functools.partial(cls, name="bn", **{
      n: v for n, v in _NNX_ARGS.items() if n in fields}))
  v = net.init(jax.random.key(0), _X4[0], train=False)
  v = {**v, "params": {**v["params"], "bn": _randomized(v["params"]["bn"], 1)},
       "batch_stats": {"bn": _randomized(v["batch_stats"]["bn"], 2)}}
  x, (p, s) = _X4[0], (v["params"]["bn"], v["batch_stats"]["bn"])
  own_eval = net.apply(v, x, train=False)
  h = _h64(v["params"]["dense"]["kernel"], v["params"]["dense"]["bias"], x)

  y, upd = jaxbn.linen.freeze_batch_norm(net).apply(v, x, train=True, mutable=["batch_stats"])
  want = _bn_eval64(h, s, p) if t.freeze == "frozen" else own_eval
  np.testing.assert_allclose(y, want, **TOL)
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])

  recompute = functools.partial(jaxbn.linen.recompute_batch_stats,
                                lambda v, b: net.apply(v, b, train=False), v, _X4,
                                progress=False)
  if t.recompute == "population":
    got = recompute()["batch_stats"]["bn"]
    hs = np.concatenate([_h64(v["params"]["dense"]["kernel"], v["params"]["dense"]["bias"], b)
                         for b in _X4]).reshape(-1, 4)
    np.testing.assert_allclose(got["var"], hs.var(0), rtol=64 * EPS32)
  else:  # kept: here the only layer, so there is nothing to recompute
    with pytest.raises(ValueError, match=r"the forward pass called no BatchNorm layer"):
      recompute()

  pairs = jaxbn.linen.find_conv_bn_pairs(net.apply, v, x, train=False)
  assert pairs == ([jaxbn.linen.FoldPair(("dense",), ("bn",), EPSILON, (-1,))] if t.fold
                   else [])

  replaced = jaxbn.linen.replace_batch_norm(net).apply(v, x, train=False)
  np.testing.assert_allclose(replaced, _bn_eval64(h, s, p) if t.replace else own_eval, **TOL)

  mask = jaxbn.linen.batch_norm_affine_mask(net.apply, v, x, train=False)
  assert all(mask["bn"][k] == t.affine for k in ("scale", "bias"))


@pytest.mark.parametrize("name", [row.name for row in _stateful_rows()])
def test_nnx_tools_treat_every_layer_holding_statistics_as_its_kind_says(name):
  from jaxbn._layers import registry
  cls = getattr(jaxbn.nnx, name)
  t = registry.KINDS[registry.kind_of(cls)]
  params = inspect.signature(cls).parameters
  extra = {n: v for n, v in _NNX_ARGS.items() if n in params and n != "num_features"}
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         cls(4, epsilon=EPSILON, momentum=0.9, rngs=nnx.Rngs(1), **extra))
  bn = model.layers[1]
  nnx.update(bn, _randomized(nnx.state(bn), 3))
  before = jax.tree.map(np.asarray, nnx.state(bn, nnx.BatchStat))
  x = _X4[0]
  h = _h64(model.layers[0].kernel[...], model.layers[0].bias[...], x)
  bn_eval = lambda: _bn_eval64(h, {"mean": bn.mean[...], "var": bn.var[...]},  # noqa: E731
                               {"scale": bn.scale[...], "bias": bn.bias[...]})
  model.eval()
  own_eval = model(x)
  model.train()

  frozen = jaxbn.nnx.freeze_batch_norm(model)
  frozen.train()
  np.testing.assert_allclose(frozen(x), bn_eval() if t.freeze == "frozen" else own_eval, **TOL)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(bn, nnx.BatchStat), before)
  assert type(jaxbn.nnx.unfreeze_batch_norm(frozen).layers[1]) is cls

  if t.recompute == "population":
    got = jaxbn.nnx.recompute_batch_stats(model, _X4, progress=False).layers[1]
    hs = np.concatenate([_h64(model.layers[0].kernel[...], model.layers[0].bias[...], b)
                         for b in _X4]).reshape(-1, 4)
    np.testing.assert_allclose(got.var[...], hs.var(0), rtol=64 * EPS32)
  else:
    with pytest.raises(ValueError, match=r"the forward pass called no BatchNorm layer"):
      jaxbn.nnx.recompute_batch_stats(model, _X4, progress=False)

  pairs = jaxbn.nnx.find_conv_bn_pairs(model, x)
  assert pairs == ([jaxbn.nnx.FoldPair(("layers", 0), ("layers", 1), EPSILON, (-1,))]
                   if t.fold else [])

  replaced = jaxbn.nnx.replace_batch_norm(model)
  assert (type(replaced.layers[1]) is jaxbn.nnx.BatchNorm) == t.replace
  only_bn = jaxbn.nnx.batch_norm_affine_filter(model)
  matched = {p for p, _ in nnx.to_flat_state(nnx.state(model, only_bn))}
  assert matched == ({("layers", 1, "scale"), ("layers", 1, "bias")} if t.affine else set())


def test_the_docs_table_of_layers_is_generated_from_the_registry():
  """The variants guide includes the table that the docs build writes from the registry:
  one line per row (a new layer's docs line is its row) and one per kind."""
  from jaxbn._layers import registry
  root = pathlib.Path(jaxbn.__file__).parent.parent
  guide = (root / "docs" / "guide" / "variants.md").read_text()
  assert "```{include} ../_generated/layers_table.md" in guide
  assert "_layers_table(" in (root / "docs" / "_ext" / "jaxbn_docs.py").read_text()
  table = "\n".join(registry.markdown_table())
  for row in registry.LAYERS:
    assert f"| `{row.name}` | {{py:func}}`~jaxbn.{row.core.__name__}` | {row.kind} |" in table
    assert hasattr(jaxbn, row.core.__name__), row.core.__name__  # the function is public
  for kind in registry.KINDS:
    assert f"\n| {kind} |" in table


def test_every_rows_fields_and_call_arguments_are_the_classes():
  """A row's own fields are fields of the linen class and constructor arguments of the nnx
  class; its call-time arguments are keyword arguments of both calls."""
  from jaxbn._layers import registry
  for row in registry.LAYERS:
    lcls, ncls = getattr(jaxbn.linen, row.name), getattr(jaxbn.nnx, row.name)
    fields = {f.name for f in dataclasses.fields(lcls)}
    assert set(row.fields) <= fields & set(inspect.signature(ncls).parameters), row.name
    for cls in (lcls, ncls):
      assert set(row.overrides) <= set(inspect.signature(cls.__call__).parameters), row.name


# The condition of each conditional variable in the rows, evaluated for a layer built with
# its defaults plus `config`.
_WHEN = {"use_scale": lambda c: True, "use_bias": lambda c: True, "use_tlu": lambda c: True,
         "learn_epsilon": lambda c: False, "momentum=None": lambda c: c.get("momentum", 0) is None,
         "momentum=None or debias": lambda c: c.get("momentum", 0) is None}
_REQUIRED = {"GhostBatchNorm": dict(virtual_batch_size=4), "BatchChannelNorm": dict(num_groups=1),
             "GroupNorm": dict(num_groups=1), "EvoNormS0": dict(num_groups=1)}


@pytest.mark.parametrize("config", [{}, {"momentum": None}], ids=["defaults", "momentum=None"])
def test_every_rows_variables_are_the_classes(config):
  """The docs' table of layers lists each row's variables: a linen class built with its
  defaults (and with momentum=None, where it has a momentum) creates exactly the row's
  variables whose condition holds, and the nnx class holds the same names as its state."""
  from jaxbn._layers import registry
  x = jnp.ones((8, 3, 3, 4))
  for row in registry.LAYERS:
    lcls, ncls = getattr(jaxbn.linen, row.name), getattr(jaxbn.nnx, row.name)
    fields = {f.name for f in dataclasses.fields(lcls)}
    if "momentum" in config and "momentum" not in fields:
      continue
    kw = {**_REQUIRED.get(row.name, {}), **config}
    if row.name in ("WSConv", "ScaledWSConv"):
      layer, module = lcls(features=4, kernel_size=(3, 3), **kw), ncls(4, 4, (3, 3),
                                                                       rngs=nnx.Rngs(0), **kw)
    else:
      mode = {"use_running_average": False} if "use_running_average" in fields else {}
      layer, module = lcls(**kw, **mode), ncls(4, rngs=nnx.Rngs(0), **kw)
    variables = layer.init(jax.random.key(0), x)
    want = sorted((v.collection, v.name) for v in row.variables
                  if not v.when or _WHEN[v.when](config))
    assert sorted((c, n) for c in variables for n in variables[c]) == want, (row.name, config)
    state = sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module)))
    assert state == sorted(n for _, n in want), (row.name, config)
