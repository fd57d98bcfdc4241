"""Recomputed ("precise") population statistics against float64 NumPy references.

The models are small on purpose (each recomputation compiles its step once per batch shape):
Dense -> BN(eps 1e-3, scale, bias) -> tanh -> Dense -> BN(unbiased_running_var) on inputs of
shape (N, H, C), so the statistics reduce over two axes, with per-example masks and batches of
different sizes. The same float64 reference checks the functional, linen and nnx drivers.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

C_IN, C1, C2, H = 3, 4, 3, 2
EPS1, EPS2 = 1e-3, 1e-5


# ------------------------------------------------------------------------------------------
# Data and the float64 reference.
# ------------------------------------------------------------------------------------------


def _make_batches(sizes=(6, 6, 3), seed=0, offset=5.0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(sizes):
    x = (rng.normal(size=(n, H, C_IN)) * 2.0 + offset).astype(np.float32)
    mask = np.ones((n, 1, 1), bool)
    if i == 1:
      mask[: n // 2] = False          # half of the second batch does not count
      x[0] = np.nan                   # ... and holds NaN there
    out.append({"x": x, "mask": mask})
  return out


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(1)
  return {
      "w1": rng.normal(size=(C_IN, C1)).astype(np.float32),
      "g1": rng.uniform(0.5, 2.0, size=C1).astype(np.float32),
      "b1": rng.normal(size=C1).astype(np.float32),
      "w2": rng.normal(size=(C1, C2)).astype(np.float32),
  }


@pytest.fixture(scope="module")
def batches():
  return _make_batches()


def _moments64(h, mask):
  m = np.broadcast_to(mask, h.shape[:-1] + (1,))[..., 0]
  v = h[m]                                          # (valid entries, C)
  return v.mean(0), v.var(0), v


def reference(p, batches, mode):
  """Population (mean, var) of both BN inputs, float64; bn2's var unbiased (n - 1)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}

  def layer2_input(x, mask, pop1=None):
    h1 = x @ p["w1"]
    mean, var, _ = _moments64(h1, mask) if pop1 is None else (*pop1, None)
    y1 = (h1 - mean) / np.sqrt(var + EPS1) * p["g1"] + p["b1"]
    return h1, np.tanh(y1) @ p["w2"]

  xs = [(np.asarray(b["x"], np.float64), b["mask"]) for b in batches]
  h1_all = np.concatenate([_moments64(x @ p["w1"], m)[2] for x, m in xs])
  pop1 = (h1_all.mean(0), h1_all.var(0))
  use = None if mode == "train" else pop1
  h2s = [_moments64(layer2_input(x, m, use)[1], m) for x, m in xs]
  h2_all = np.concatenate([h[2] for h in h2s])
  batch_var_mean = np.mean([h[1] for h in h2s], axis=0)   # the common wrong estimate
  return pop1, (h2_all.mean(0), h2_all.var(0, ddof=1)), batch_var_mean


def _check(mean, var, ref_mean, ref_var, rtol=2e-5):
  scale = np.sqrt(ref_var)
  np.testing.assert_allclose(np.asarray(mean) / scale, ref_mean / scale, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(np.asarray(var), ref_var, rtol=rtol * 5)


# ------------------------------------------------------------------------------------------
# The accumulator.
# ------------------------------------------------------------------------------------------


def test_merge_moments_exact_over_uneven_masked_batches():
  rng = np.random.default_rng(2)
  acc = jaxbn.init_population_moments(3)
  valid = []
  for n in (5, 1, 9, 4):
    # |mean| / std = 1e4: E[x²] - E[x]² in float32 would have no correct digit left.
    x = (rng.normal(size=(n, 2, 3)) * 0.1 + 1e3).astype(np.float32)
    mask = rng.random((n, 2, 3)) < 0.7
    mask[..., 2] = False                      # feature 2 never has a valid entry
    acc = jaxbn.merge_moments(acc, jaxbn.moments(x, mask=mask))
    valid.append((x.astype(np.float64), mask))
  for f in range(2):
    v = np.concatenate([x[..., f][m[..., f]] for x, m in valid])
    np.testing.assert_allclose(float(acc.count[f]), v.size)
    np.testing.assert_allclose(float(acc.mean[f]), v.mean(), rtol=1e-7)
    np.testing.assert_allclose(float(acc.m2[f]) / v.size, v.var(), rtol=2e-3)
  old = jaxbn.BatchStats(jnp.array([7.0, 7.0, 7.0]), jnp.array([3.0, 3.0, 3.0]),
                         jnp.array(5, jnp.int32))
  s = jaxbn.population_stats(acc, old, unbiased_running_var=True)
  assert float(s.mean[2]) == 7.0 and float(s.var[2]) == 3.0 and int(s.count) == 5
  v0 = np.concatenate([x[..., 0][m[..., 0]] for x, m in valid])
  np.testing.assert_allclose(float(s.var[0]), v0.var(ddof=1), rtol=2e-3)


def test_merge_moments_shape_error():
  with pytest.raises(ValueError, match=r"merge_moments: batch moments have feature shape "
                                       r"\(2,\) but the accumulator has \(3,\)"):
    jaxbn.merge_moments(jaxbn.init_population_moments(3), jaxbn.moments(jnp.ones((4, 2))))
  with pytest.raises(ValueError, match=r"population_stats: the accumulator has feature shape"):
    jaxbn.population_stats(jaxbn.init_population_moments(3), jaxbn.init_stats(2))


# ------------------------------------------------------------------------------------------
# Functional models.
# ------------------------------------------------------------------------------------------


def _fmodel(axis_name=None):
  def apply(variables, batch, batch_norm):
    p, s = variables
    h, _ = batch_norm(batch["x"] @ p["w1"], s["bn1"], p["g1"], p["b1"], training=False,
                      mask=batch["mask"], epsilon=EPS1, axis_name=axis_name)
    h, _ = batch_norm(jnp.tanh(h) @ p["w2"], s["bn2"], training=False, mask=batch["mask"],
                      unbiased_running_var=True, axis_name=axis_name)
    return h
  return apply


def _fvars(params):
  return ({k: jnp.asarray(v) for k, v in params.items()},
          {"bn1": jaxbn.init_stats(C1), "bn2": jaxbn.init_stats(C2)._replace(
              count=jnp.array(11, jnp.int32))})


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_functional_matches_float64(params, batches, mode):
  variables = _fvars(params)
  before = jax.tree.map(np.asarray, variables)
  _, stats = jaxbn.recompute_stats(_fmodel(), variables, batches, mode=mode, progress=False)
  (m1, v1), (m2, v2), wrong = reference(params, batches, mode)
  _check(stats["bn1"].mean, stats["bn1"].var, m1, v1)
  _check(stats["bn2"].mean, stats["bn2"].var, m2, v2)
  # The test can tell the exact population variance from the mean of batch variances.
  assert np.max(np.abs(wrong - v2) / v2) > 100 * 2e-5
  assert int(stats["bn2"].count) == 11 and stats["bn2"].var.dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))


def test_modes_differ_and_num_batches(params, batches):
  (_, _), (_, v2_train), _ = reference(params, batches, "train")
  (_, _), (_, v2_seq), _ = reference(params, batches, "sequential")
  assert np.max(np.abs(v2_train - v2_seq) / v2_seq) > 1e-2   # the modes are distinguishable
  # num_batches: only the first two batches count.
  _, stats = jaxbn.recompute_stats(_fmodel(), _fvars(params), iter(batches), num_batches=2,
                                   progress=False)
  (m1, v1), (m2, v2), _ = reference(params, batches[:2], "train")
  _check(stats["bn1"].mean, stats["bn1"].var, m1, v1)
  _check(stats["bn2"].mean, stats["bn2"].var, m2, v2)


def test_sharded_with_axis_name_equals_global_batch(params):
  mesh = jax.make_mesh((8,), ("data",))
  data = _make_batches(sizes=(16, 16), seed=3)
  data[0]["mask"][:5] = False                      # devices 0-2 hold fewer valid entries
  _, stats = jaxbn.recompute_stats(_fmodel("data"), _fvars(params), data, mesh=mesh,
                                   batch_spec=P("data"), progress=False)
  (m1, v1), (m2, v2), _ = reference(params, data, "train")
  _check(stats["bn1"].mean, stats["bn1"].var, m1, v1)
  _check(stats["bn2"].mean, stats["bn2"].var, m2, v2)


def test_progress_bar(params, batches, capsys):
  jaxbn.recompute_stats(_fmodel(), _fvars(params), batches[:1], progress=None)
  assert capsys.readouterr().err == ""             # quiet when not on a terminal
  jaxbn.recompute_stats(_fmodel(), _fvars(params), batches[:1], progress=True)
  assert re.search(r"recompute_stats: .*1/1", capsys.readouterr().err)


def test_functional_errors(params, batches):
  f, v = _fmodel(), _fvars(params)
  with pytest.raises(ValueError, match=r"recompute_stats: `batches` yielded no batch"):
    jaxbn.recompute_stats(f, v, iter([]))
  with pytest.raises(TypeError, match=r"mode='sequential' makes one pass over the data per "
                                      r"BN layer, so `batches` must be re-iterable"):
    jaxbn.recompute_stats(f, v, (b for b in batches), mode="sequential")
  with pytest.raises(ValueError, match=r"`mode` must be one of \('train', 'sequential'\), "
                                       r"got 'eval'"):
    jaxbn.recompute_stats(f, v, batches, mode="eval")
  with pytest.raises(ValueError, match=r"`num_batches` must be a positive int or None"):
    jaxbn.recompute_stats(f, v, batches, num_batches=0)
  with pytest.raises(ValueError, match=r"`variables` holds no jaxbn.BatchStats"):
    jaxbn.recompute_stats(f, v[0], batches)
  with pytest.raises(ValueError, match=r"the forward pass called no BatchNorm layer"):
    jaxbn.recompute_stats(lambda v, b, bn: b["x"], v, batches)

  def copied(variables, batch, batch_norm):
    stats = variables[1]["bn1"]
    return batch_norm(batch["x"] @ variables[0]["w1"], stats._replace(mean=stats.mean + 0),
                      training=False)[0]

  def wrong_axis(variables, batch, batch_norm):
    return batch_norm(batch["x"], variables[1]["bn1"], training=False)[0]
  with pytest.raises(ValueError, match=r"recompute_stats: `x` has features of shape \(3,\) on "
                                       r"axis -1 but its `stats.mean` has shape \(4,\)"):
    jaxbn.recompute_stats(wrong_axis, v, batches)
  with pytest.raises(ValueError, match=r"was called with statistics that are not one of the "
                                       r"BatchStats of `variables`"):
    jaxbn.recompute_stats(copied, v, batches)
  with pytest.raises(ValueError, match=r"synchronizes its statistics over "
                                       r"axis_name='data', which is not bound here\. Pass mesh="):
    jaxbn.recompute_stats(_fmodel("data"), v, batches)
  def data_dependent(variables, batch, batch_norm):
    stats = variables[1]["bn1" if batch["x"].shape[0] > 4 else "bn2"]
    w = variables[0]["w1"] if batch["x"].shape[0] > 4 else variables[0]["w1"][:, :C2]
    return batch_norm(batch["x"] @ w, stats, training=False)[0]
  with pytest.raises(ValueError, match=r"recompute_stats: the BatchNorm layer "
                                       r"\"\[1\]\['bn2'\]\" was not called "
                                       r"when the model was first traced; the forward pass "
                                       r"must call the same BN layers for every batch"):
    jaxbn.recompute_stats(data_dependent, v, batches)

  class OnceThenEmpty:
    def __init__(self):
      self.calls = 0

    def __iter__(self):
      self.calls += 1
      return iter(batches if self.calls == 1 else [])
  with pytest.raises(ValueError, match=r"recompute_stats: `batches` yielded no batch on pass 2 "
                                       r"of 2; mode='sequential' needs an iterable that starts "
                                       r"over each time"):
    jaxbn.recompute_stats(f, v, OnceThenEmpty(), mode="sequential")
  with pytest.raises(TypeError, match=r"`batch_spec` must be a jax.sharding.PartitionSpec"):
    jaxbn.recompute_stats(f, v, batches, mesh=jax.make_mesh((8,), ("data",)),
                          batch_spec=("data",))


# ------------------------------------------------------------------------------------------
# Linen and NNX models (flax's and jaxbn's BatchNorm in the same model).
# ------------------------------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, mask=None, train=False):
    h = nn.Dense(C1, use_bias=False, name="d1")(x)
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS1, name="bn1")(h, mask=mask)
    h = nn.Dense(C2, use_bias=False, name="d2")(jnp.tanh(h))
    return jaxbn.linen.BatchNorm(use_running_average=not train, unbiased_running_var=True,
                                 name="bn2")(h, mask=mask)


def _linen_vars(params):
  v = jax.jit(LinenNet().init)(jax.random.key(0), jnp.ones((2, H, C_IN)))
  v = jax.tree.map(lambda a: a, v)
  v["params"]["d1"]["kernel"] = jnp.asarray(params["w1"])
  v["params"]["d2"]["kernel"] = jnp.asarray(params["w2"])
  v["params"]["bn1"] = {"scale": jnp.asarray(params["g1"]), "bias": jnp.asarray(params["b1"])}
  return v


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_linen_matches_float64(params, batches, mode):
  variables = _linen_vars(params)
  old_mean = np.asarray(variables["batch_stats"]["bn1"]["mean"])
  new = jaxbn.linen.recompute_batch_stats(
      lambda v, b: LinenNet().apply(v, b["x"], b["mask"]), variables, batches, mode=mode,
      progress=False)
  (m1, v1), (m2, v2), _ = reference(params, batches, mode)
  _check(new["batch_stats"]["bn1"]["mean"], new["batch_stats"]["bn1"]["var"], m1, v1)
  _check(new["batch_stats"]["bn2"]["mean"], new["batch_stats"]["bn2"]["var"], m2, v2)
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], old_mean)
  np.testing.assert_array_equal(new["params"]["d1"]["kernel"], params["w1"])


def test_linen_errors(params, batches):
  f = lambda v, b: LinenNet().apply(v, b["x"], b["mask"])
  with pytest.raises(ValueError, match=r"jaxbn.linen.recompute_batch_stats: `variables` must "
                                       r"be the model's variables dict with a 'batch_stats'"):
    jaxbn.linen.recompute_batch_stats(f, {"params": {}}, batches)
  with pytest.raises(TypeError, match=r"`apply_fn` must be a function of \(variables, \.\.\.\)"):
    jaxbn.linen.recompute_batch_stats(3, _linen_vars(params), batches)
  v = _linen_vars(params)
  del v["batch_stats"]["bn2"]
  with pytest.raises(ValueError, match=r"the BatchNorm layer bn2 has no 'mean'/'var' in "
                                       r"variables\['batch_stats'\]"):
    jaxbn.linen.recompute_batch_stats(f, v, batches)

  class Cell(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return nn.BatchNorm(use_running_average=True)(c), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Cell, variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True}, length=2)()(x, None)[0]

  shapes = jax.eval_shape(Scanned().init, jax.random.key(0), jnp.ones((4, 3)))
  v = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match=r"the BatchNorm layer ScanCell_0/BatchNorm_0 normalizes "
                                       r"features of shape \(3,\) but stores statistics of "
                                       r"shape \(2, 3\): layers inside nn.scan/nn.vmap"):
    jaxbn.linen.recompute_batch_stats(Scanned(), v, [jnp.ones((4, 3))])


class NNXNet(nnx.Module):
  def __init__(self, params):
    rngs = nnx.Rngs(0)
    self.d1 = nnx.Linear(C_IN, C1, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(C1, epsilon=EPS1, rngs=rngs)
    self.d2 = nnx.Linear(C1, C2, use_bias=False, rngs=rngs)
    self.bn2 = jaxbn.nnx.BatchNorm(C2, unbiased_running_var=True, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.d1.kernel[...] = jnp.asarray(params["w1"])
    self.d2.kernel[...] = jnp.asarray(params["w2"])
    self.bn1.scale[...] = jnp.asarray(params["g1"])
    self.bn1.bias[...] = jnp.asarray(params["b1"])

  def __call__(self, x, mask=None):
    h = self.drop(jnp.tanh(self.bn1(self.d1(x), mask=mask)))   # must be off while recomputing
    return self.bn2(self.d2(h), mask=mask)


def test_nnx_matches_float64(params, batches):
  model = NNXNet(params)                  # in training mode: dropout on, BN batch statistics
  new = jaxbn.nnx.recompute_batch_stats(model, batches, forward=lambda m, b: m(b["x"], b["mask"]),
                                        progress=False)
  (m1, v1), (m2, v2), _ = reference(params, batches, "train")
  _check(new.bn1.mean[...], new.bn1.var[...], m1, v1)
  _check(new.bn2.mean[...], new.bn2.var[...], m2, v2)
  assert float(jnp.abs(model.bn1.mean[...]).sum()) == 0.0       # the input is unchanged
  assert type(new.bn1) is nnx.BatchNorm and type(new.bn2) is jaxbn.nnx.BatchNorm
  assert new.drop.deterministic is False and new.bn1.use_running_average is False
  with pytest.raises(TypeError, match=r"jaxbn.nnx.recompute_batch_stats: `model` must be an "
                                      r"nnx.Module"):
    jaxbn.nnx.recompute_batch_stats(lambda x: x, batches)
  with pytest.raises(TypeError, match=r"`forward` must be a function \(model, batch\)"):
    jaxbn.nnx.recompute_batch_stats(model, batches, forward=3)
  model.bn1.mean = nnx.BatchStat(jnp.zeros((2, C1)))             # as inside nnx.vmap/scan
  with pytest.raises(ValueError, match=r"the BatchNorm layer at \('bn1',\) normalizes features "
                                       r"of shape \(4,\) but stores statistics of shape "
                                       r"\(2, 4\): layers inside nnx.scan/nnx.vmap"):
    jaxbn.nnx.recompute_batch_stats(model, batches, forward=lambda m, b: m(b["x"], b["mask"]))
