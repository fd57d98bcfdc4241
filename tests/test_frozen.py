"""Frozen batch norm: the function, the layers, and converting whole linen/nnx models to
frozen batch norm and back with their variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

EPS = 1e-5


def _stats(c, seed=0):
  rng = np.random.default_rng(seed)
  return jaxbn.BatchStats(jnp.asarray(rng.normal(size=c), jnp.float32),
                          jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32), jnp.array(7))


def test_function_values_and_gradients():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, (5, 2, 3)).astype(np.float32)
  st = _stats(3)
  g, b = np.array([1.5, -0.5, 2.0], np.float32), np.array([0.1, 0.2, 0.3], np.float32)
  cot = rng.normal(size=x.shape)
  inv = 1 / np.sqrt(np.asarray(st.var, np.float64) + EPS)
  xh = (x - np.asarray(st.mean, np.float64)) * inv

  def loss(x, g, b, mean, var, freeze):
    y = jaxbn.frozen_batch_norm(x, jaxbn.BatchStats(mean, var, st.count), g, b,
                                freeze_affine=freeze)
    return jnp.sum(y * cot), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True),
                 static_argnums=5)
  for freeze in (True, False):
    (_, y), (gx, gg, gb, gm, gv) = grad(x, g, b, st.mean, st.var, freeze)
    np.testing.assert_allclose(y, xh * g + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, cot * g * inv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gm, 0.0)  # statistics never get a gradient
    np.testing.assert_array_equal(gv, 0.0)
    if freeze:
      np.testing.assert_array_equal(gg, 0.0)
      np.testing.assert_array_equal(gb, 0.0)
    else:
      np.testing.assert_allclose(gg, (cot * xh).sum((0, 1)), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(gb, cot.sum((0, 1)), rtol=1e-5, atol=1e-5)
  y16 = jaxbn.frozen_batch_norm(jnp.asarray(x, jnp.bfloat16), st, axis=-1)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), xh, atol=3e-2, rtol=1e-2)
  with pytest.raises(ValueError, match=r"frozen_batch_norm: `x` has 3 features on axis -1 "
                                       r"but `stats.mean` has shape \(4,\)"):
    jaxbn.frozen_batch_norm(x, _stats(4))
  with pytest.raises(ValueError, match=r"frozen_batch_norm: `epsilon` must be > 0"):
    jaxbn.frozen_batch_norm(x, st, epsilon=-1.0)


# ------------------------------------------------------------------ linen
def _linen_net():
  import flax.linen as nn
  import jaxbn.linen

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(6)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.5)(x)  # inline
      x = nn.relu(nn.Dense(6)(x))
      x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)  # flax's own
      x = jaxbn.linen.BatchRenorm(use_running_average=not train, momentum=0.5, debias=True)(x)
      x = jaxbn.linen.GhostBatchNorm(4, use_running_average=not train, momentum=0.5)(x)
      return nn.Dense(2)(x)

  return Net()


def test_linen_layer_and_model_conversion():
  import jaxbn.linen

  x = jnp.asarray(np.random.default_rng(2).normal(1.0, 2.0, (8, 5)), jnp.float32)
  net = _linen_net()
  frozen = jaxbn.linen.freeze_batch_norm(net)
  frozen_free = jaxbn.linen.freeze_batch_norm(net, freeze_affine=False)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731

  @jax.jit
  def run(key):
    variables = net.init(key, x, train=False)
    frozen_vars = frozen.init(key, x, train=False)
    _, upd = net.apply(variables, x * 2 + 1, train=True, mutable=["batch_stats"])
    variables = {**variables, **upd}  # non-trivial statistics
    loss = lambda m, v, train: jnp.sum(m.apply(v, x, train=train, mutable=["batch_stats"])[0]
                                       ** 2)  # noqa: E731
    y_eval = net.apply(variables, x, train=False)
    y_frozen, mutated = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    g_eval = jax.grad(lambda p: loss(net, {**variables, "params": p}, False))(
        variables["params"])
    g_frozen = jax.grad(lambda p: loss(frozen, {**variables, "params": p}, True))(
        variables["params"])
    g_free = jax.grad(lambda p: loss(frozen_free, {**variables, "params": p}, True))(
        variables["params"])
    return variables, frozen_vars, y_eval, y_frozen, mutated, g_eval, g_frozen, g_free

  variables, frozen_vars, y_eval, y_frozen, mutated, g_eval, g_frozen, g_free = run(
      jax.random.key(0))
  assert spec(frozen_vars) == spec(variables)  # the same variables: checkpoints load as is
  np.testing.assert_allclose(y_frozen, y_eval, rtol=1e-6, atol=1e-6)  # train == eval
  jax.tree.map(np.testing.assert_array_equal, mutated["batch_stats"],
               variables["batch_stats"])  # nothing updated in training mode
  bn_layers = ("BatchNorm_0", "BatchNorm_1", "BatchRenorm_0", "GhostBatchNorm_0")
  for name, grads in g_frozen.items():
    for leaf_f, leaf_e, leaf_free in zip(jax.tree.leaves(grads), jax.tree.leaves(g_eval[name]),
                                         jax.tree.leaves(g_free[name])):
      if name in bn_layers:
        np.testing.assert_array_equal(leaf_f, 0.0)  # frozen affine
        assert np.abs(np.asarray(leaf_e)).max() > 0
      else:
        np.testing.assert_allclose(leaf_f, leaf_e, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(leaf_free, leaf_e, rtol=1e-5, atol=1e-6)
  assert jaxbn.linen.unfreeze_batch_norm(frozen) is net
  # The layer itself: BatchNorm's variables (count too with debias), eval output always.
  layer = jaxbn.linen.FrozenBatchNorm(debias=True)
  bn = jaxbn.linen.BatchNorm(debias=True)
  v_bn = bn.init(jax.random.key(1), x, use_running_average=False)
  assert spec(layer.init(jax.random.key(1), x)) == spec(v_bn)
  v_bn = {**v_bn, **bn.apply(v_bn, x, use_running_average=False, mutable=["batch_stats"])[1]}
  np.testing.assert_allclose(layer.apply(v_bn, x * 3, use_running_average=False),
                             bn.apply(v_bn, x * 3, use_running_average=True), atol=1e-6)
  with pytest.raises(TypeError, match=r"freeze_batch_norm: `module` must be a "
                                      r"flax.linen.Module, got int"):
    jaxbn.linen.freeze_batch_norm(3)


# ------------------------------------------------------------------ nnx
def test_nnx_model_conversion_and_back():
  from flax import nnx
  import jaxbn.nnx

  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      nnx.Linear(5, 6, rngs=rngs), jaxbn.nnx.BatchNorm(6, momentum=0.5, rngs=rngs),
      nnx.Linear(6, 6, rngs=rngs), nnx.BatchNorm(6, momentum=0.5, rngs=rngs),
      jaxbn.nnx.BatchRenorm(6, momentum=0.5, debias=True, rngs=rngs),
      jaxbn.nnx.GhostBatchNorm(6, 4, momentum=0.5, rngs=rngs), nnx.Linear(6, 2, rngs=rngs))
  x = jnp.asarray(np.random.default_rng(3).normal(1.0, 2.0, (8, 5)), jnp.float32)
  model(x * 2 + 1)  # training step: non-trivial statistics
  bn_idx = (1, 3, 4, 5)
  frozen = jaxbn.nnx.freeze_batch_norm(model)
  assert all(type(frozen.layers[i]).__name__ == "FrozenBatchNorm" for i in bn_idx)
  s_model, s_frozen = nnx.state(model), nnx.state(frozen)
  assert jax.tree.structure(s_frozen) == jax.tree.structure(s_model)  # same paths and types
  jax.tree.map(np.testing.assert_array_equal, s_frozen, s_model)
  assert frozen.layers[4].count is model.layers[4].count  # the very same Variables

  y_eval = nnx.view(model, use_running_average=True)(x)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  @nnx.jit
  def step(m, x):
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    return m(x), nnx.grad(loss)(m)

  y_frozen, grads = step(frozen, x)  # training mode, under nnx.jit
  np.testing.assert_allclose(y_frozen, y_eval, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
  for i in bn_idx:
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads["layers"][i])
  assert np.abs(np.asarray(grads["layers"][0]["kernel"])).max() > 0

  # Back: the original classes and settings, the same Variables, training updates again.
  back = jaxbn.nnx.unfreeze_batch_norm(frozen)
  assert [type(back.layers[i]) for i in bn_idx] == [type(model.layers[i]) for i in bn_idx]
  assert back.layers[4].r_max == model.layers[4].r_max
  assert back.layers[5].virtual_batch_size == 4
  assert back.layers[1].mean is model.layers[1].mean
  back(x)
  assert not np.array_equal(model.layers[1].mean[...], before["layers"][1]["mean"])

  # split/merge of the frozen model, then back; a FrozenBatchNorm built directly.
  graphdef, state = nnx.split(jaxbn.nnx.freeze_batch_norm(model))
  merged = jaxbn.nnx.unfreeze_batch_norm(nnx.merge(graphdef, state))
  assert type(merged.layers[3]) is nnx.BatchNorm
  layer = jaxbn.nnx.FrozenBatchNorm(6, debias=True, rngs=nnx.Rngs(0))
  ref = jaxbn.nnx.BatchNorm(6, debias=True, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(layer)) == jax.tree.structure(nnx.state(ref))
  unfrozen = jaxbn.nnx.unfreeze_batch_norm(layer)
  assert type(unfrozen) is jaxbn.nnx.BatchNorm and unfrozen.debias


def test_frozen_batch_norm_freezes_the_affine_parameters_by_default():
  """The default (freeze_affine=True, detectron2's FrozenBatchNorm2d): scale and bias get no
  gradient; only x does."""
  x = jnp.arange(12.0).reshape(4, 3)
  st = jaxbn.BatchStats(jnp.ones(3), 2 * jnp.ones(3), jnp.zeros((), jnp.int32))
  gx, gs, gb = jax.grad(lambda x, s, b: jnp.sum(jaxbn.frozen_batch_norm(x, st, s, b) ** 2),
                        argnums=(0, 1, 2))(x, jnp.ones(3), jnp.zeros(3))
  assert float(jnp.abs(gx).sum()) > 0
  assert float(jnp.abs(gs).sum()) == 0.0 and float(jnp.abs(gb).sum()) == 0.0


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_frozen_batch_norm_names_a_wrong_sized_scale_or_bias(name):
  """A scale or bias of the wrong size is jaxbn's error naming the argument and the fix, not
  a broadcasting error (each argument is validated: neither is skipped)."""
  with pytest.raises(ValueError, match=rf"frozen_batch_norm: `x` has features of shape \(3,\) "
                                       rf"on the feature axis but `{name}` has shape \(4,\)"):
    jaxbn.frozen_batch_norm(jnp.ones((2, 3)), jaxbn.init_stats(3), **{name: jnp.ones(4)})
