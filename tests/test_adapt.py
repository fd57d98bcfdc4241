"""Adaptation statistics against float64 NumPy: test-time BN mixing (Schneider et al. 2020),
split (per-domain) BN, the TENT parameter mask/filter, and batch statistics for averaged
(EMA/SWA) parameters; linen and nnx layers against the functional core.

Tolerances: float64 vs float64 references at 1e-10 (a few hundred ulps); float32 vs float64 at
2e-5 absolute on O(1) normalized outputs and 1e-5 relative on statistics (float32 eps 1.2e-7 ×
~100). A planted error — the weight n/(N+n) swapped, n counted in entries instead of examples,
a between-means term in the variance, a domain's mask dropped — moves results by >= 1e-2.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors, nnx
from jax.test_util import check_grads

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests._resnet import NNXResNet, ResNet

TOL64 = 1e-10
TOL32 = 2e-5


def _x(seed, shape=(8, 3, 3, 4), scale=2.0, offset=1.0):
  return np.random.default_rng(seed).normal(size=shape) * scale + offset


def _source(c=4, seed=10):
  rng = np.random.default_rng(seed)
  return rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)


# ----------------------------------------------------------------- test-time BN adaptation
def test_mix_stats_is_the_papers_weighted_average_float64():
  mu_s, var_s = _source()
  mu_t, var_t = _source(seed=11)
  count = np.array([5.0, 5.0, 0.0, 5.0])  # feature 2 had no valid target entry
  with jax.enable_x64(True):
    src = jaxbn.BatchStats(jnp.asarray(mu_s), jnp.asarray(var_s), jnp.zeros((), jnp.int32))
    w = jaxbn.source_weight(16.0, 5.0)
    np.testing.assert_allclose(w, 16 / 21, rtol=0, atol=TOL64)
    mixed = jaxbn.mix_stats(src, jaxbn.Moments(jnp.asarray(mu_t), jnp.asarray(var_t),
                                               jnp.asarray(count)), 0.75)
    exp_mu = np.where(count > 0, 0.75 * mu_s + 0.25 * mu_t, mu_s)
    exp_var = np.where(count > 0, 0.75 * var_s + 0.25 * var_t, var_s)
    np.testing.assert_allclose(mixed.mean, exp_mu, rtol=0, atol=TOL64)
    np.testing.assert_allclose(mixed.var, exp_var, rtol=0, atol=TOL64)
  assert float(jaxbn.source_weight(0.0, 0.0)) == 1.0  # nothing at all: keep the source


@pytest.mark.parametrize("masked", [False, True])
def test_adapt_batch_norm_float64_reference(masked):
  x = _x(0)
  mu_s, var_s = _source()
  g, b = _source(seed=12)
  # mask whole examples (n = valid examples) and, in one example, some positions
  mask = None
  if masked:
    mask = np.ones(x.shape[:-1] + (1,), bool)
    mask[[1, 5]] = False
    mask[2, 0] = False
  with jax.enable_x64(True):
    stats = jaxbn.BatchStats(jnp.asarray(mu_s), jnp.asarray(var_s), jnp.zeros((), jnp.int32))
    y, mixed = jaxbn.adapt_batch_norm(x, stats, g, b, prior=4.0, epsilon=1e-3, mask=mask)
    w = np.ones(x.shape[:-1] + (1,)) if mask is None else mask.astype(float)
    entries = w.sum()
    mu_t = (w * x).sum((0, 1, 2)) / entries
    var_t = (w * (x - mu_t) ** 2).sum((0, 1, 2)) / entries
    n = entries / 9.0  # examples: valid entries per feature / positions per example
    ws = 4.0 / (4.0 + n)
    mu, var = ws * mu_s + (1 - ws) * mu_t, ws * var_s + (1 - ws) * var_t
    np.testing.assert_allclose(mixed.mean, mu, rtol=0, atol=TOL64)
    np.testing.assert_allclose(mixed.var, var, rtol=0, atol=TOL64)
    np.testing.assert_allclose(y, (x - mixed.mean) / np.sqrt(mixed.var + 1e-3) * g + b,
                               rtol=0, atol=TOL64)
    check_grads(jax.jit(lambda x, g: jaxbn.adapt_batch_norm(
        x, stats, g, None, prior=4.0, epsilon=1e-3)[0]), (x[:3, :2, :2], g), order=1,
                modes=["rev"])


def test_adapt_batch_norm_limits_are_batch_norm_train_and_eval():
  x = jnp.asarray(_x(1), jnp.float32)
  mu_s, var_s = _source()
  stats = jaxbn.BatchStats(jnp.asarray(mu_s, jnp.float32), jnp.asarray(var_s, jnp.float32),
                           jnp.zeros((), jnp.int32))
  y0, _ = jaxbn.adapt_batch_norm(x, stats, prior=0.0)
  yt, _ = jaxbn.batch_norm(x, stats, training=True)
  np.testing.assert_allclose(y0, yt, rtol=0, atol=TOL32)
  yinf, _ = jaxbn.adapt_batch_norm(x, stats, prior=1e30)
  ye, _ = jaxbn.batch_norm(x, stats, training=False)
  np.testing.assert_allclose(yinf, ye, rtol=0, atol=TOL32)


def test_adapt_batch_norm_prior_inf_is_eval_with_the_running_statistics():
  """prior=inf (documented as eval) used to give inf/inf = NaN: the mixed statistics are the
  running ones bit for bit, the output equals eval-mode batch norm, also traced and masked."""
  x = jnp.asarray(_x(1), jnp.float32)
  mu_s, var_s = _source()
  stats = jaxbn.BatchStats(jnp.asarray(mu_s, jnp.float32), jnp.asarray(var_s, jnp.float32),
                           jnp.zeros((), jnp.int32))
  assert float(jaxbn.source_weight(jnp.inf, 7.0)) == 1.0
  ye, _ = jaxbn.batch_norm(x, stats, training=False)
  mask = (jnp.arange(x.shape[0]) % 2 == 0).reshape((-1,) + (1,) * (x.ndim - 1))
  for y, mixed in (jaxbn.adapt_batch_norm(x, stats, prior=float("inf")),
                   jax.jit(lambda p: jaxbn.adapt_batch_norm(x, stats, prior=p, mask=mask))(
                       jnp.float32(jnp.inf))):
    np.testing.assert_array_equal(mixed.mean, stats.mean)
    np.testing.assert_array_equal(mixed.var, stats.var)
    np.testing.assert_allclose(y, ye, rtol=0, atol=TOL32)


# ----------------------------------------------------------------- split BN
def _stacked(d=3, c=4, seed=20):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(d, c)), rng.uniform(0.5, 2.0, size=(d, c))


def test_split_batch_norm_per_example_domains_float64():
  x = _x(2, shape=(9, 2, 4))
  dom = np.array([0, 2, 0, 2, 2, 0, 0, 2, 0])  # domain 1 absent
  mu, var = _stacked()
  g = np.random.default_rng(3).normal(size=(3, 4))  # per-domain scale
  with jax.enable_x64(True):
    stats = jaxbn.BatchStats(jnp.asarray(mu), jnp.asarray(var), jnp.zeros(3, jnp.int32))
    y, new = jaxbn.split_batch_norm(x, stats, g, None, domain=jnp.asarray(dom), training=True,
                                    momentum=0.75, epsilon=1e-3)
    for d in (0, 2):
      xd = x[dom == d]
      m, v = xd.mean((0, 1)), xd.var((0, 1))
      np.testing.assert_allclose(y[dom == d], (xd - m) / np.sqrt(v + 1e-3) * g[d], rtol=0,
                                 atol=TOL64)
      np.testing.assert_allclose(new.mean[d], 0.75 * mu[d] + 0.25 * m, rtol=0, atol=TOL64)
      np.testing.assert_allclose(new.var[d], 0.75 * var[d] + 0.25 * v, rtol=0, atol=TOL64)
    np.testing.assert_array_equal(new.mean[1], mu[1])  # absent domain: unchanged
    np.testing.assert_array_equal(new.count, [1, 0, 1])
    # eval: each example with its domain's running statistics
    ye, _ = jaxbn.split_batch_norm(x, stats, g, None, domain=jnp.asarray(dom), training=False,
                                   epsilon=1e-3)
    np.testing.assert_allclose(ye, (x - mu[dom][:, None]) / np.sqrt(var[dom][:, None] + 1e-3)
                               * g[dom][:, None], rtol=0, atol=TOL64)


def test_split_batch_norm_scalar_traced_domain_is_batch_norm_on_that_row():
  x = jnp.asarray(_x(3), jnp.float32)
  mu, var = _stacked()
  stats = jaxbn.BatchStats(jnp.asarray(mu, jnp.float32), jnp.asarray(var, jnp.float32),
                           jnp.zeros(3, jnp.int32))
  f = jax.jit(lambda x, d: jaxbn.split_batch_norm(x, stats, domain=d, training=True,
                                                  momentum=0.9))
  y, new = f(x, 1)
  row = jax.tree.map(lambda a: a[1], stats)
  y1, new1 = jaxbn.batch_norm(x, row, training=True, momentum=0.9)
  # (jit vs eager: XLA may fuse differently, a few float32 ulps on O(3) values)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y1), rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(new.mean[1]), np.asarray(new1.mean), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.mean)[[0, 2]], mu[[0, 2]].astype(np.float32))


def test_split_batch_norm_layers_equal_functional():
  x = jnp.asarray(_x(4, shape=(6, 4)), jnp.float32)
  dom = jnp.array([0, 1, 1, 0, 1, 0])
  bn = jaxbn.linen.SplitBatchNorm(num_domains=2, shared_affine=False, momentum=0.9,
                                  use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {
      "batch_stats": {"mean": (2, 4), "var": (2, 4)},
      "params": {"bias": (2, 4), "scale": (2, 4)}}
  y, upd = bn.apply(variables, x, domain=dom, mutable=["batch_stats"])
  stats = jaxbn.BatchStats(jnp.zeros((2, 4)), jnp.ones((2, 4)), jnp.zeros(2, jnp.int32))
  yf, newf = jaxbn.split_batch_norm(x, stats, jnp.ones((2, 4)), jnp.zeros((2, 4)), domain=dom,
                                    training=True, momentum=0.9)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(yf))
  np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["mean"]), np.asarray(newf.mean))
  layer = jaxbn.nnx.SplitBatchNorm(4, num_domains=2, shared_affine=False, momentum=0.9,
                                   rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(layer(x, domain=dom)), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(layer.var[...]), np.asarray(newf.var))


@pytest.mark.parametrize("per_example", [False, True])
def test_split_batch_norm_layers_momentum_none_is_each_domains_cumulative_average(per_example):
  """momentum=None keeps a per-domain count: the running mean and variance are the plain
  averages of each domain's batch statistics over the steps that saw it (float64 NumPy).
  A layer that dropped the count would hold the last batch's statistics (off by >= 0.5)."""
  rng = np.random.default_rng(7)
  xs = [rng.normal(size=(6, 3)) * (1 + i) + 2 * i for i in range(3)]
  doms = [np.array([0, 1, 1, 0, 1, 0]) if per_example else np.full(6, i % 2) for i in range(3)]
  bn = jaxbn.linen.SplitBatchNorm(num_domains=2, momentum=None, use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.ones((6, 3)))
  layer = jaxbn.nnx.SplitBatchNorm(3, num_domains=2, momentum=None, rngs=nnx.Rngs(0))
  for x, dom in zip(xs, doms):
    d = jnp.asarray(dom) if per_example else int(dom[0])
    _, upd = bn.apply(variables, jnp.asarray(x, jnp.float32), domain=d, mutable=["batch_stats"])
    variables = {**variables, **upd}
    layer(jnp.asarray(x, jnp.float32), domain=d)
  for k in range(2):
    seen = [x[dom == k] for x, dom in zip(xs, doms) if (dom == k).any()]
    mean = np.mean([b.mean(0) for b in seen], 0)
    var = np.mean([b.var(0) for b in seen], 0)
    for got in (variables["batch_stats"], {"mean": layer.mean[...], "var": layer.var[...],
                                           "count": layer.count[...]}):
      np.testing.assert_allclose(np.asarray(got["mean"][k]), mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(got["var"][k]), var, rtol=1e-5)
      assert int(got["count"][k]) == len(seen)


def test_nnx_split_batch_norm_checks_its_arguments_when_built_and_hints_under_shared_vmap():
  with pytest.raises(ValueError, match=r"jaxbn\.nnx\.SplitBatchNorm: `epsilon`"):
    jaxbn.nnx.SplitBatchNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"jaxbn\.nnx\.SplitBatchNorm: `momentum`"):
    jaxbn.nnx.SplitBatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0))
  layer = jaxbn.nnx.SplitBatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TraceContextError,
                     match=r"(?s)^jaxbn\.nnx\.SplitBatchNorm: cannot write the running "
                           r"statistics.*axis_name='batch'\)"):
    nnx.vmap(lambda x: layer(x), in_axes=0)(jnp.ones((4, 5, 3)))


# ----------------------------------------------------------------- whole models
class _Net(nn.Module):
  """Someone else's model: Dense -> flax BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(4)(x))


def _net_variables(seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
                     "BatchNorm_0": {"scale": jnp.asarray(1 + 0.2 * rng.normal(size=4),
                                                          jnp.float32),
                                     "bias": jnp.asarray(0.1 * rng.normal(size=4),
                                                         jnp.float32)}},
          "batch_stats": {"BatchNorm_0": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                                          "var": jnp.asarray(rng.uniform(0.5, 2, 4),
                                                             jnp.float32)}}}


def test_test_time_adaptation_of_an_unmodified_model_linen_and_nnx():
  x = jnp.asarray(_x(5, shape=(12, 3)), jnp.float32)
  v = _net_variables()
  adapted = jaxbn.linen.test_time_adaptation(_Net(), prior=6.0)
  y = adapted.apply(v, x)
  p, s = v["params"], v["batch_stats"]["BatchNorm_0"]
  h = np.asarray(x, np.float64) @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(
      p["Dense_0"]["bias"], np.float64)
  w = 6.0 / (6.0 + 12.0)
  mu = w * np.float64(s["mean"]) + (1 - w) * h.mean(0)
  var = w * np.float64(s["var"]) + (1 - w) * h.var(0)
  ref = (h - mu) / np.sqrt(var + 1e-5) * np.float64(p["BatchNorm_0"]["scale"]) + np.float64(
      p["BatchNorm_0"]["bias"])
  np.testing.assert_allclose(y, ref, rtol=0, atol=TOL32)
  # nnx: the same model written in NNX, converted with its state
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0)))
  nnx.update(model.layers[0], nnx.State(v["params"]["Dense_0"]))
  nnx.update(model.layers[1], nnx.State({**v["params"]["BatchNorm_0"], **s}))
  tta = jaxbn.nnx.test_time_adaptation(model, prior=6.0)
  assert isinstance(tta.layers[1], jaxbn.nnx.TestTimeBatchNorm)
  np.testing.assert_allclose(np.asarray(tta(x)), np.asarray(y), rtol=0, atol=1e-6)


def test_tent_mask_selects_exactly_the_batch_norm_affine_parameters():
  model = ResNet(stage_sizes=(1,), num_filters=4)
  x = jnp.ones((2, 6, 6, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  mask = jaxbn.linen.batch_norm_affine_mask(model.apply, variables, x, train=False)
  flat = {jax.tree_util.keystr(k): m for k, m in jax.tree_util.tree_leaves_with_path(mask)}
  chosen = sorted(k for k, m in flat.items() if m)
  assert chosen == sorted(f"['{layer}']['{p}']" for layer in
                          ("bn_init", "ResNetBlock_0']['BatchNorm_0",
                           "ResNetBlock_0']['BatchNorm_1")
                          for p in ("bias", "scale"))
  # with optax.multi_transform, an update changes only those
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["params"])
  tx = optax.multi_transform({True: optax.sgd(0.1), False: optax.set_to_zero()}, mask)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == mask
  # nnx: the filter picks the BatchNorms' scale/bias of the NNX twin
  nmodel = nnx.eval_shape(lambda: NNXResNet(nnx.BatchNorm, stage_sizes=(1,), num_filters=4,
                                             rngs=nnx.Rngs(0)))  # abstract: nothing computed
  chosen = nnx.state(nmodel, jaxbn.nnx.batch_norm_affine_filter(nmodel))
  paths = sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(chosen))
  assert paths == sorted(f"{layer}.{p}" for layer in
                         ("bn_init", "blocks.0.bn1", "blocks.0.bn2")
                         for p in ("bias", "scale"))


def test_swa_batch_stats_are_the_averaged_models_population_statistics():
  a, b = _net_variables(0), _net_variables(1)
  avg = jax.tree.map(lambda u, v: 0.25 * u + 0.75 * v, a["params"], b["params"])
  batches = [jnp.asarray(_x(i, shape=(16, 3)), jnp.float32) for i in range(3)]
  new = jaxbn.linen.swa_batch_stats(_Net(), a, avg, batches, progress=False)
  jax.tree.map(np.testing.assert_array_equal, new["params"], avg)
  k = np.float64(avg["Dense_0"]["kernel"])
  h = np.concatenate([np.float64(x) @ k + np.float64(avg["Dense_0"]["bias"]) for x in batches])
  st = new["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(st["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st["var"], h.var(0), rtol=1e-5)
  # nnx twin
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
  averaged = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(averaged, {"layers": {0: avg["Dense_0"], 1: avg["BatchNorm_0"]}})
  out = jaxbn.nnx.swa_batch_stats(model, averaged, batches, progress=False)
  np.testing.assert_allclose(np.asarray(out.layers[1].mean[...]), st["mean"], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.layers[1].var[...]), st["var"], rtol=1e-6)
  assert float(jnp.abs(model.layers[1].mean[...]).sum()) == 0.0  # input model unchanged


def test_errors_name_the_argument():
  stats = jaxbn.init_stats(4)
  with pytest.raises(ValueError, match=r"adapt_batch_norm: `prior` \(N\) must be >= 0"):
    jaxbn.adapt_batch_norm(jnp.ones((2, 4)), stats, prior=-1.0)
  with pytest.raises(ValueError, match=r"split_batch_norm: `stats` must be a jaxbn.BatchStats "
                                       r"stacked over a leading domain axis"):
    jaxbn.split_batch_norm(jnp.ones((2, 4)), stats, domain=0, training=True)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), stats)
  with pytest.raises(ValueError, match=r"split_batch_norm: `domain` must be an int scalar"):
    jaxbn.split_batch_norm(jnp.ones((2, 4)), stacked, domain=jnp.zeros(3, jnp.int32),
                           training=True)


def test_adaptation_demo_table_is_rendered_from_its_json(tmp_path):
  """The committed RESULTS.md is exactly what examples/adaptation/run.py renders from
  results.json (no number typed by hand)."""
  import pathlib
  import shutil
  from examples.adaptation import run
  here = pathlib.Path(run.__file__).parent
  shutil.copy(here / "results.json", tmp_path / "results.json")
  run.main(["--render-only", "--out", str(tmp_path)])
  assert (tmp_path / "RESULTS.md").read_text() == (here / "RESULTS.md").read_text()
