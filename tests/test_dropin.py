"""Drop-in proof: a ResNet built with flax's BatchNorm and with jaxbn's is the same model.

The model (``tests/_resnet.py``) is written once with the norm injected by
``functools.partial``; only the class differs. Same variable trees and init values, same
train-mode outputs, statistics and gradients (float32 tolerance: the two differ only in the
order of floating-point operations), the same losses over several optax steps, the same under
``shard_map`` with a synchronized ``axis_name`` (both equal to one device on the global batch),
and checkpoints that restore across the two.
"""

from __future__ import annotations

import functools
import os
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx

sys.path.insert(0, os.path.dirname(__file__))
import _resnet  # noqa: E402

KINDS = ("flax", "jaxbn")
LINEN_BN = {"flax": nn.BatchNorm, "jaxbn": jaxbn.linen.BatchNorm}
NNX_BN = {"flax": nnx.BatchNorm, "jaxbn": jaxbn.nnx.BatchNorm}
N, HW, C = 16, 8, 3
TX = optax.sgd(0.1, momentum=0.9)


def _close(a, b, rtol, atol, what):
  flat_a, tree_a = jax.tree.flatten_with_path(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for (path, u), v in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol,
                               atol=atol, err_msg=f"{what} at {jax.tree_util.keystr(path)}")


def _rel_err(a, b):
  """Largest |a - b| / max|b| over the leaves (scale-aware, catches any wrong formula)."""
  errs = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - v))
                                         / max(float(np.max(np.abs(np.asarray(v, np.float64)))),
                                               1e-30)), a, b)
  return max(jax.tree.leaves(errs))


def _rel_l2(a, b):
  """||a - b|| / ||b|| over all leaves together."""
  d = sum(float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2))
          for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  n = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(b))
  return (d / n) ** 0.5


@pytest.fixture(scope="module")
def data():
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (N, HW, HW, C)) * 2.0 + 0.5
  labels = jax.random.randint(ky, (N,), 0, 10)
  return x, labels


@pytest.fixture(scope="module")
def linen_models():
  return {k: _resnet.ResNet(batch_norm=LINEN_BN[k]) for k in KINDS}


@pytest.fixture(scope="module")
def linen_shapes(linen_models, data):
  x, _ = data
  return {k: jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(1), x)
          for k, m in linen_models.items()}


@pytest.fixture(scope="module")
def linen_init(linen_shapes):
  """The same concrete variables for both models (random BN scale/bias, see _resnet.fill)."""
  v = _resnet.fill(linen_shapes["flax"])
  return {k: v for k in KINDS}


@pytest.fixture(scope="module")
def linen_steps(linen_models, linen_init, data):
  """Four optax steps per model: losses, first-step grads and stats, final variables."""
  x, labels = data
  out = {}
  for k, model in linen_models.items():
    step = jax.jit(_resnet.linen_train_step(model, TX))
    params, stats = linen_init[k]["params"], linen_init[k]["batch_stats"]
    opt_state, losses = TX.init(params), []
    for i in range(4):
      params, stats, opt_state, loss, grads = step(params, stats, opt_state, x, labels)
      losses.append(float(loss))
      if i == 0:
        loss0, stats1, grads0 = loss, stats, grads
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    out[k] = dict(loss0=loss0, stats1=stats1, grads=grads0, losses=losses, params=params,
                  stats=stats, logits=logits)
  return out


def test_same_variable_trees(linen_shapes):
  """Same names, nesting, shapes and dtypes (init values: see test_linen.py)."""
  f, j = linen_shapes["flax"], linen_shapes["jaxbn"]
  assert jax.tree.structure(f) == jax.tree.structure(j)
  assert jax.tree.leaves(f) == jax.tree.leaves(j)
  assert set(j["batch_stats"]["bn_init"]) == {"mean", "var"}
  assert set(j["params"]["bn_init"]) == {"scale", "bias"}
  assert len(jax.tree.leaves(j["batch_stats"])) == 2 * 6  # 6 BN layers, no extra variable


def test_same_train_outputs_stats_and_grads(linen_steps):
  f, j = linen_steps["flax"], linen_steps["jaxbn"]
  np.testing.assert_allclose(j["loss0"], f["loss0"], rtol=1e-5)
  # Statistics: running averages of batch moments; relative to their scale.
  _close(j["stats1"], f["stats1"], rtol=1e-5, atol=1e-6, what="batch_stats")
  assert _rel_err(j["grads"], f["grads"]) < 1e-5
  # Gradients through every layer are far from zero, so the relative check is meaningful.
  for leaf in jax.tree.leaves(f["grads"]):
    assert float(jnp.max(jnp.abs(leaf))) > 1e-4


def test_same_losses_over_optax_steps(linen_steps):
  f, j = linen_steps["flax"], linen_steps["jaxbn"]
  np.testing.assert_allclose(j["losses"], f["losses"], rtol=1e-5)
  assert f["losses"][-1] < f["losses"][0] - 0.1  # it trains
  assert _rel_err(j["params"], f["params"]) < 1e-4
  _close(j["stats"], f["stats"], rtol=1e-4, atol=1e-5, what="batch_stats after 4 steps")
  np.testing.assert_allclose(j["logits"], f["logits"], rtol=1e-4, atol=1e-4)


def test_checkpoints_restore_across(linen_models, linen_steps, data):
  x, _ = data
  for src, dst in (("flax", "jaxbn"), ("jaxbn", "flax")):
    saved = {"params": linen_steps[src]["params"], "batch_stats": linen_steps[src]["stats"]}
    blob = flax.serialization.to_bytes(saved)
    template = {"params": linen_steps[dst]["params"], "batch_stats": linen_steps[dst]["stats"]}
    restored = flax.serialization.from_bytes(template, blob)
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    # The other implementation runs the restored checkpoint to the same eval outputs.
    y_src = linen_models[src].apply(saved, x, train=False)
    y_dst = linen_models[dst].apply(restored, x, train=False)
    np.testing.assert_allclose(y_dst, y_src, rtol=1e-5, atol=1e-5)


def test_bfloat16_model(linen_init, linen_steps, data):
  """bf16 compute (flax's ``dtype=``): same dtypes; as close to float32 as flax is."""
  x, labels = data
  res = {}
  for k in KINDS:
    model = _resnet.ResNet(batch_norm=LINEN_BN[k], dtype=jnp.bfloat16)
    v = linen_init[k]
    loss_fn = jax.jit(jax.value_and_grad(functools.partial(_resnet.linen_loss, model),
                                         has_aux=True))
    (loss, stats), grads = loss_fn(v["params"], v["batch_stats"], x.astype(jnp.bfloat16),
                                   labels)
    res[k] = (loss, stats, grads)
  (lf, sf, gf), (lj, sj, gj) = res["flax"], res["jaxbn"]
  assert jax.tree.map(lambda a: a.dtype, sf) == jax.tree.map(lambda a: a.dtype, sj)
  np.testing.assert_allclose(lj, lf, rtol=2e-2)
  _close(sj, sf, rtol=3e-2, atol=1e-2, what="bf16 batch_stats")
  # Gradients: bf16 convolutions make both differ from float32 by a few percent; jaxbn's
  # must be as close to the float32 gradients as flax's (relative L2 over all parameters).
  g32 = linen_steps["flax"]["grads"]
  err_j, err_f = _rel_l2(gj, g32), _rel_l2(gf, g32)
  assert err_j < 0.1 and err_f < 0.1, (err_j, err_f)
  assert err_j <= 1.25 * err_f, (err_j, err_f)


def _sharded_step(model, mesh):
  def local(params, stats, x, labels):
    def loss_fn(p):
      loss, new = _resnet.linen_loss(model, p, stats, x, labels)
      return lax.pmean(loss, "batch"), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new, grads

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                               out_specs=(P(), P(), P())))


def test_same_under_shard_map_with_axis_name(linen_init, linen_steps, data):
  """8 devices, 2 examples each, statistics synced with axis_name='batch'."""
  x, labels = data
  mesh = jax.make_mesh((8,), ("batch",))
  xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
  ls = jax.device_put(labels, NamedSharding(mesh, P("batch")))
  # Reference: flax's BN on one device, the global batch (same initial variables).
  single = linen_steps["flax"]
  loss_ref, stats_ref, grads_ref = single["loss0"], single["stats1"], single["grads"]
  v = linen_init["flax"]
  res = {}
  for k in KINDS:
    model = _resnet.ResNet(batch_norm=LINEN_BN[k], axis_name="batch")
    res[k] = _sharded_step(model, mesh)(v["params"], v["batch_stats"], xs, ls)
  for k in KINDS:
    loss, stats, grads = res[k]
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, err_msg=k)
    _close(stats, stats_ref, rtol=1e-5, atol=1e-6, what=f"{k} synced batch_stats")
    assert _rel_err(grads, grads_ref) < 2e-5, k
  assert _rel_err(res["jaxbn"][2], res["flax"][2]) < 2e-5


def test_nnx_models_are_the_same(data):
  """The NNX pair: identical state, same training losses, checkpoints restore across."""
  x, labels = data
  abstract = {k: nnx.eval_shape(lambda k=k: _resnet.NNXResNet(NNX_BN[k], rngs=nnx.Rngs(0)))
              for k in KINDS}
  split = {k: nnx.split(abstract[k]) for k in KINDS}
  (_, sf), (_, sj) = split["flax"], split["jaxbn"]
  assert jax.tree.structure(sf) == jax.tree.structure(sj)
  assert jax.tree.leaves(sf) == jax.tree.leaves(sj)
  # Same seed, same structure: the same values (separate arrays, the models share nothing).
  models = {k: nnx.merge(g, _resnet.fill(s)) for k, (g, s) in split.items()}

  @nnx.jit
  def step(model, opt, x, labels):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = {}
  for k, model in models.items():
    opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
    losses[k] = [float(step(model, opt, x, labels)) for _ in range(3)]
  np.testing.assert_allclose(losses["jaxbn"], losses["flax"], rtol=1e-5)
  assert losses["flax"][-1] < losses["flax"][0]
  _close(nnx.state(models["jaxbn"], nnx.BatchStat), nnx.state(models["flax"], nnx.BatchStat),
         rtol=1e-4, atol=1e-5, what="nnx batch stats")

  # Checkpoints: each trained model's state restores into a fresh model of the other kind,
  # which then evaluates like the original.
  evaluate = nnx.jit(lambda m, x: m(x))
  for src, dst in (("flax", "jaxbn"), ("jaxbn", "flax")):
    blob = flax.serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(models[src])))
    g, s = split[dst]
    target = nnx.merge(g, _resnet.fill(s, seed=1))
    state = nnx.state(target)
    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(blob))
    nnx.update(target, state)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(target), nnx.state(models[src]))
    models[src].eval()
    target.eval()
    np.testing.assert_allclose(evaluate(target, x), evaluate(models[src], x), rtol=1e-5,
                               atol=1e-5)
