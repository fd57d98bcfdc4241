"""Ghost (virtual) batch norm: float64 NumPy reference per virtual batch, both running-stat
rules, gradients, layouts, synchronized running statistics, errors and the layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbn
from tests import _reference as R

# Tolerances (tests/README.md: |err| <= k·cond·u(dtype)·(|expected| + scale)). The float32
# data here have |mean|/std <= ~6, so cond_offset² <= ~40 and 4·40·u32 ≈ 1e-5: outputs and
# statistics use rtol/atol 1e-5 (2e-5 where values reach ~2), gradients 1e-4 (× log2(n) of the
# sums); rtol 1e-6/atol 1e-6 where two float32 evaluations of the same formula are compared
# (a few ulps); bfloat16 goes through tests/_reference.assert_close.
EPS = 1e-5
M = 0.7
C = 3


def np_ghost(x, vbs, gamma, beta, g=None, mask=None, eps=EPS):
  """Float64 reference on (B, H, C): BN over each slice of ``vbs`` examples (and H).

  Returns y, the per-virtual-batch (n, mean, biased var) and, given a cotangent ``g``, the
  closed-form gradients of sum(y * g) for x, gamma, beta.
  """
  x = np.asarray(x, np.float64)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  xv = np.where(w > 0, x, 0.0)  # for the statistics
  xo = np.where((w > 0) | np.isfinite(x), x, 0.0)  # masked non-finite entries count as 0
  y = np.empty_like(x)
  dx = np.zeros_like(x)
  moments = []
  for s in range(0, x.shape[0], vbs):
    sl = slice(s, s + vbs)
    xs, ws = xv[sl], w[sl]
    n = ws.sum((0, 1))
    mu = (ws * xs).sum((0, 1)) / n
    v = (ws * (xs - mu) ** 2).sum((0, 1)) / n
    inv = 1 / np.sqrt(v + eps)
    xh = (xo[sl] - mu) * inv
    y[sl] = xh * gamma + beta
    moments.append((n, mu, v))
    if g is not None:
      gs = g[sl]
      dx[sl] = gamma * inv * (gs - ws * (gs.sum((0, 1)) + xh * (gs * xh).sum((0, 1))) / n)
  grads = None
  if g is not None:
    xh_all = (y - beta) / gamma
    grads = (dx, (g * xh_all).sum((0, 1)), g.sum((0, 1)))
  return y, moments, grads


def np_update(mean, var, moments, rule, momentum=M, unbiased=False):
  if rule == "average":
    n = sum(m[0] for m in moments)
    mu = sum(m[0] * m[1] for m in moments) / n
    dof = sum(m[0] - 1 for m in moments) if unbiased else n
    v = sum(m[0] * m[2] for m in moments) / dof
    return momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * v
  for n, mu, v in moments:  # the paper's rule: one update per virtual batch
    v = v * n / (n - 1) if unbiased else v
    mean, var = momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * v
  return mean, var


def _data(seed, shape=(12, 2, C)):
  rng = np.random.default_rng(seed)
  # Different virtual batches get different offsets: per-slice statistics matter.
  offsets = np.repeat(rng.normal(0, 3, (shape[0] // 4, 1, C)), 4, axis=0)
  return (rng.normal(size=shape) * np.array([1.0, 2.0, 0.5]) + offsets).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("rule", "unbiased"))
def _train_step(x, stats, scale, bias, mask, cot, *, rule, unbiased):
  def loss(x, scale, bias):
    y, new = jaxbn.ghost_batch_norm(x, stats, scale, bias, training=True, virtual_batch_size=4,
                                    momentum=M, epsilon=EPS, mask=mask, stats_update=rule,
                                    unbiased_running_var=unbiased)
    return jnp.sum(y * cot), (y, new)

  (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias)
  return y, new, grads


@pytest.mark.parametrize("rule,masked,unbiased", [("average", False, False),
                                                  ("sequential", True, True),
                                                  ("average", True, True)])
def test_matches_float64_reference(rule, masked, unbiased):
  gamma = np.array([1.5, 0.5, -1.0], np.float32)
  beta = np.array([0.1, -0.2, 0.3], np.float32)
  stats = jaxbn.init_stats(C)
  mean, var = np.zeros(C), np.ones(C)
  mask = None
  if masked:
    mask = np.ones((12, 2, 1), bool)
    mask[[0, 5, 6], 1] = False
    mask[9] = False
  for step in range(2):
    x = _data(step)
    if masked:
      x[9, 0] = np.inf  # masked entries must not matter, even non-finite ones
    cot = np.random.default_rng(50 + step).normal(size=x.shape)
    y, stats, (gx, gs, gb) = _train_step(x, stats, gamma, beta,
                                         None if mask is None else jnp.asarray(mask), cot,
                                         rule=rule, unbiased=unbiased)
    y_ref, moments, (gx_ref, gs_ref, gb_ref) = np_ghost(x, 4, gamma, beta, cot, mask)
    mean, var = np_update(mean, var, moments, rule, unbiased=unbiased)
    ok = np.isfinite(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(gx)))
    np.testing.assert_allclose(np.asarray(gx)[ok], gx_ref[ok], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gs, gs_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, gb_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5, atol=1e-6)
    assert int(stats.count) == (step + 1) * (3 if rule == "sequential" else 1)
    mean, var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)


def test_layouts_single_slice_and_inference():
  x = _data(3)
  st = jaxbn.BatchStats(jnp.array([0.5, 1.0, -1.0]), jnp.array([2.0, 1.0, 0.5]), jnp.array(2))
  ghost = functools.partial(jaxbn.ghost_batch_norm, training=True, momentum=M)

  @jax.jit
  def run(x, st):
    return dict(
        plain=ghost(x, st, virtual_batch_size=4),
        # Channels first, batch on axis 1: the same numbers, moved.
        moved=ghost(jnp.moveaxis(x, -1, 0), st, virtual_batch_size=4, batch_axis=1, axis=0),
        # One virtual batch (= the batch) is batch norm.
        one=ghost(x, st, virtual_batch_size=12),
        bn=jaxbn.batch_norm(x, st, training=True, momentum=M),
        # bf16: output bf16, float32 statistics.
        bf16=ghost(x.astype(jnp.bfloat16), st, virtual_batch_size=4),
        bf16_input_in_f32=ghost(x.astype(jnp.bfloat16).astype(jnp.float32), st,
                                virtual_batch_size=4))

  out = run(x, st)
  y, new = out["plain"]
  np.testing.assert_allclose(np.moveaxis(np.asarray(out["moved"][0]), 0, -1), y, atol=1e-6)
  np.testing.assert_allclose(out["moved"][1].var, new.var, rtol=1e-6)
  np.testing.assert_allclose(out["one"][0], out["bn"][0], atol=1e-6)
  np.testing.assert_allclose(out["one"][1].var, out["bn"][1].var, rtol=1e-6)
  y16, s16 = out["bf16"]
  assert y16.dtype == jnp.bfloat16 and s16.var.dtype == jnp.float32
  # Same quantized input in float32: the bf16 output is that one rounded once; cond from the
  # offsets of the virtual batches of 4 (statistics over the 4 examples and H).
  xq = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  cond = R.norm_cond(xq.reshape((3, 4) + xq.shape[1:]), (1, 2), jnp.bfloat16, eps=EPS)
  R.assert_close(y16, out["bf16_input_in_f32"][0], jnp.bfloat16, cond=cond, what="bf16 ghost")
  # Inference: running statistics, any batch size, stats returned unchanged.
  y_eval, same = jaxbn.ghost_batch_norm(x[:3], st, training=False, virtual_batch_size=4)
  assert same is st
  ref = (x[:3] - st.mean) / np.sqrt(np.asarray(st.var) + EPS)
  np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)


def test_axis_name_synchronizes_only_the_running_statistics():
  """8 devices x 4 examples, virtual batches of 2: outputs per device and slice, running
  statistics averaged over all devices' slices (identical on every device)."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("b",))
  x = _data(4, shape=(32, 2, C))
  st = jaxbn.init_stats(C)
  g = jnp.array([1.0, -2.0, 0.5])
  cot = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

  def body(x, g, cot):
    def loss(x, g):
      y, new = jaxbn.ghost_batch_norm(x, st, g, training=True, virtual_batch_size=2,
                                      momentum=M, axis_name="b")
      return jnp.sum(y * cot), (y, new)
    (_, (y, new)), (gx, gg) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, g)
    return y, new, gx, gg

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("b"), P(), P("b")),
                             out_specs=(P("b"), P(), P("b"), P())))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))  # noqa: E731
  y, new, gx, gg = fn(put(x), g, put(cot))
  y_ref, moments, (gx_ref, gg_ref, _) = np_ghost(x, 2, np.asarray(g), 0.0, cot)
  mean, var = np_update(np.zeros(C), np.ones(C), moments, "average")
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gg, gg_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, var, rtol=1e-5)


@pytest.mark.parametrize("rule", ["average", "sequential"])
@pytest.mark.parametrize("spec", [P("data", None, None), P("data", None, "model"),
                                  P(None, None, "model")])
def test_plain_jit_on_an_explicitly_sharded_batch_equals_the_float64_reference(rule, spec):
  """Plain ``jax.jit`` on a (2 data x 4 model) explicit mesh, the batch and/or the features
  split: outputs per virtual batch and both running-statistics rules as the float64 reference
  (the sequential rule scans the per-virtual-batch moments, which a split batch axis splits;
  the average rule pools moments whose counts are not split with the features)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  c = 4
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(16, 2, c)) * 2 + np.repeat(rng.normal(0, 3, (4, 1, c)), 4, 0))
  x = x.astype(np.float32)
  f = jax.jit(lambda x, st: jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=4,
                                                   momentum=M, epsilon=EPS, stats_update=rule))
  with jax.set_mesh(mesh):
    y, new = f(jax.device_put(x, NamedSharding(mesh, spec)), jaxbn.init_stats(c))
  assert y.sharding.spec == spec
  y_ref, moments, _ = np_ghost(x, 4, 1.0, 0.0)
  mean, var = np_update(np.zeros(c), np.ones(c), moments, rule)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, var, rtol=1e-5)


def test_virtual_batches_spanning_devices_under_plain_jit_are_refused():
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.device_put(np.ones((16, C), np.float32), NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match=r"ghost_batch_norm: the batch axis is sharded over 8 devices but cut "
                        r"into 2 virtual batches of 8; virtual batches must not span devices.*"
                        r"divides the per-device batch of 2"):
    jax.jit(lambda x: jaxbn.ghost_batch_norm(x, jaxbn.init_stats(C), training=True,
                                             virtual_batch_size=8))(x)


def test_errors():
  x = jnp.ones((10, C))
  st = jaxbn.init_stats(C)
  with pytest.raises(ValueError, match=r"ghost_batch_norm: the batch axis 0 of `x` has 10 "
                                       r"entries, not a multiple of `virtual_batch_size`=4\. "
                                       r".*\(e\.g\. 2\)"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=4)
  with pytest.raises(ValueError, match=r"`virtual_batch_size` must be a positive Python int"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=0)
  with pytest.raises(ValueError, match=r"`batch_axis`=1 is also a feature axis"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=5, batch_axis=1)
  with pytest.raises(ValueError, match=r"`batch_axis`=2 is out of range for `x` of rank 2"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=5, batch_axis=2)
  with pytest.raises(ValueError, match=r"`stats_update` must be one of \('average', "
                                       r"'sequential'\), got 'ema'"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=5, stats_update="ema")
  with pytest.raises(ValueError, match=r"ghost_batch_norm: `x` has 3 features on axis -1 but "
                                       r"`stats.mean` has shape \(2,\)"):
    jaxbn.ghost_batch_norm(x, jaxbn.init_stats(2), training=True, virtual_batch_size=5)
  with pytest.raises(ValueError, match=r"ghost_batch_norm: `mask` of shape \(3, 1\) does not "
                                       r"broadcast"):
    jaxbn.ghost_batch_norm(x, st, training=True, virtual_batch_size=5,
                           mask=jnp.ones((3, 1), bool))


def test_linen_and_nnx_layers():
  import flax.linen as nn
  from flax import nnx
  import jaxbn.linen
  import jaxbn.nnx

  x = _data(6)
  layer = jaxbn.linen.GhostBatchNorm(4, momentum=M, stats_update="sequential")
  variables = layer.init(jax.random.key(0), x[:5], use_running_average=False)  # any size
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  flax_vars = nn.BatchNorm().init(jax.random.key(0), x[:5], use_running_average=False)
  assert spec(variables) == spec(flax_vars)
  y_core, st = jaxbn.ghost_batch_norm(x, jaxbn.init_stats(C), training=True,
                                      virtual_batch_size=4, momentum=M,
                                      stats_update="sequential")
  y_linen, upd = jax.jit(functools.partial(layer.apply, use_running_average=False,
                                           mutable=["batch_stats"]))(variables, x)
  model = jaxbn.nnx.GhostBatchNorm(C, 4, momentum=M, stats_update="sequential",
                                   rngs=nnx.Rngs(0))
  y_nnx = model(x)
  np.testing.assert_allclose(y_linen, y_core, atol=1e-5)  # jit vs eager: rounding only
  np.testing.assert_allclose(y_nnx, y_core, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], st.var, rtol=1e-6)
  np.testing.assert_allclose(model.var[...], st.var, rtol=1e-6)
  model.eval()
  y_eval, _ = jaxbn.batch_norm(x[:3], st, training=False)
  np.testing.assert_allclose(model(x[:3]), y_eval, atol=1e-6)
