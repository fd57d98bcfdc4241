"""Layer, RMS, group and instance norm: float64 NumPy references (values, masks, gradients),
side by side with flax.linen and flax.nnx, model-parallel statistics, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbn
from tests import _reference as R

SHAPE = (2, 3, 4, 8)
# Tolerances (tests/README.md): |err| <= 4·cond·u(dtype)·(|expected| + rms), cond from the
# data's offset over the reduced axes (R.norm_cond); the reduced axes used below.
REDS = [(3,), (1, 2, 3), (2, 3), (1, 2)]


def _cond(x, dtype=np.float32, mask=None):
  """The worst R.norm_cond over the reductions of this file (one bound for all cases)."""
  x = np.where(np.isfinite(x), x, 0.0)
  return max(R.norm_cond(x, red, dtype, mask=mask) for red in REDS)


def _data(seed, shape=SHAPE, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * rng.uniform(0.5, 3, shape[-1]) + 5.0).astype(dtype)


def _param(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _keep(shape, axes):
  return tuple(d if i in axes else 1 for i, d in enumerate(shape))


def np_norm(x, red, scale=None, bias=None, mask=None, eps=1e-6, center=True, g=None):
  """Float64 reference: statistics over ``red`` (keepdims) of the valid entries.

  ``scale``/``bias`` are already broadcastable to ``x``. Given a cotangent ``g`` also returns
  the closed-form dL/dx of L = sum(y * g).
  """
  x = np.asarray(x, np.float64)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  xv = np.where(w > 0, x, 0.0)
  xo = np.where((w > 0) | np.isfinite(x), x, 0.0)
  n = w.sum(red, keepdims=True)
  mu = (w * xv).sum(red, keepdims=True) / np.maximum(n, 1) if center else 0.0
  v = (w * (xv - mu) ** 2).sum(red, keepdims=True) / np.maximum(n, 1)
  s = 1.0 / np.sqrt(v + eps)
  xh = (xo - mu) * s
  k = 1.0 if scale is None else np.asarray(scale, np.float64)
  y = xh * k + (0.0 if bias is None else bias)
  if g is None:
    return y
  gp = g * k
  if center:
    dx = s * (gp - w * (gp.sum(red, keepdims=True) + xh * (gp * xh).sum(red, keepdims=True))
              / np.maximum(n, 1))
  else:
    dx = s * (gp - w * xo * s * s * (gp * xo).sum(red, keepdims=True) / np.maximum(n, 1))
  return y, dx


def np_group(x, groups, red, **kw):
  """Group norm by its definition: (..., C) -> (..., G, C/G), statistics over ``red`` (which
  contains the last axis) and the group's channels."""
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  redg = tuple(a for a in red if a != x.ndim - 1) + (x.ndim,)
  kw = {k: (v.reshape(v.shape[:-1] + (groups, c // groups)) if isinstance(v, np.ndarray)
            and v.shape[-1:] == (c,) else v) for k, v in kw.items()}
  if "mask" in kw and kw["mask"] is not None and kw["mask"].shape[-1] == 1:
    kw["mask"] = kw["mask"][..., None]
  out = np_norm(xg, redg, **kw)
  if isinstance(out, tuple):
    return tuple(o.reshape(x.shape) for o in out)
  return out.reshape(x.shape)


# ------------------------------------------------------------------ values vs float64
def _cases():
  x = _data(0)
  sc, bi = _param(1, (8,)), _param(2, (8,))
  sc34, bi34 = _param(3, (4, 8)), _param(4, (4, 8))
  sc3 = _param(5, (3,))
  mask = np.random.default_rng(6).random((2, 3, 4, 1)) > 0.3
  mask[0, 0] = False  # an example/channel slice without valid entries for some norms
  xn = x.copy()
  xn[~np.broadcast_to(mask, x.shape)] = np.nan  # masked entries may hold NaN
  last = (3,)
  cases = {
      "ln": (lambda: jaxbn.layer_norm(x, sc, bi), np_norm(x, last, sc, bi)),
      "ln_red123": (lambda: jaxbn.layer_norm(x, sc, bi, reduction_axes=(1, 2, 3)),
                    np_norm(x, (1, 2, 3), sc, bi)),
      "ln_feat23": (lambda: jaxbn.layer_norm(x, sc34, bi34, reduction_axes=(2, 3),
                                             feature_axes=(2, 3)),
                    np_norm(x, (2, 3), sc34, bi34)),
      "ln_fast": (lambda: jaxbn.layer_norm(x, sc, bi, use_fast_variance=True),
                  np_norm(x, last, sc, bi)),
      "ln_mask": (lambda: jaxbn.layer_norm(xn, sc, bi, reduction_axes=(1, 2, 3), mask=mask),
                  np_norm(xn, (1, 2, 3), sc, bi, mask=mask)),
      "rms": (lambda: jaxbn.rms_norm(x, sc), np_norm(x, last, sc, center=False)),
      "rms_mask": (lambda: jaxbn.rms_norm(xn, sc, reduction_axes=(1, 2, 3), mask=mask),
                   np_norm(xn, (1, 2, 3), sc, mask=mask, center=False)),
      "in": (lambda: jaxbn.instance_norm(x, sc, bi), np_norm(x, (1, 2), sc, bi)),
      "in_nchw": (lambda: jaxbn.instance_norm(x, sc3.reshape(3), None, feature_axes=1),
                  np_norm(x, (2, 3), sc3.reshape(1, 3, 1, 1))),
      "in_mask": (lambda: jaxbn.instance_norm(xn, sc, bi, mask=mask),
                  np_norm(xn, (1, 2), sc, bi, mask=mask)),
      "gn4": (lambda: jaxbn.group_norm(x, sc, bi, num_groups=4),
              np_group(x, 4, (1, 2, 3), scale=sc, bias=bi)),
      "gn_size2": (lambda: jaxbn.group_norm(x, sc, bi, num_groups=None, group_size=2),
                   np_group(x, 4, (1, 2, 3), scale=sc, bias=bi)),
      # reduction_axes keeping more than the batch axis (where flax.nnx 0.12 is wrong)
      "gn_keep1": (lambda: jaxbn.group_norm(x, sc, bi, num_groups=2, reduction_axes=(2, 3)),
                   np_group(x, 2, (2, 3), scale=sc, bias=bi)),
      "gn_mask": (lambda: jaxbn.group_norm(xn, sc, bi, num_groups=2, mask=mask),
                  np_group(xn, 2, (1, 2, 3), scale=sc, bias=bi, mask=mask)),
      "gn1_is_ln": (lambda: jaxbn.group_norm(x, sc, bi, num_groups=1),
                    np_norm(x, (1, 2, 3), sc, bi)),
  }
  return cases


def test_functions_match_float64_reference():
  cases = _cases()
  x, mask = _data(0), np.random.default_rng(6).random((2, 3, 4, 1)) > 0.3
  cond = max(_cond(x), _cond(x, mask=mask))
  outs = jax.jit(lambda: {k: f() for k, (f, _) in cases.items()})()
  for name, (_, ref) in cases.items():
    out = np.asarray(outs[name])
    assert out.dtype == np.float32, name
    assert np.all(np.isfinite(out)), name  # masked NaNs and empty slices never leak
    ok = np.isfinite(ref)
    R.assert_close(out[ok], ref[ok], np.float32, cond=cond, what=name)


def test_bf16_input_float32_statistics():
  # Large offset relative to the spread: statistics in bf16 would be off by ~1e-2 relative.
  x = jnp.asarray(_data(7) * 0.1 + 30.0, jnp.bfloat16)
  x64 = np.asarray(x, np.float64)
  sc = _param(1, (8,))

  @jax.jit
  def run(x):
    return (jaxbn.layer_norm(x, sc, reduction_axes=(1, 2, 3)), jaxbn.rms_norm(x, sc),
            jaxbn.group_norm(x, sc, num_groups=2))

  ln, rms, gn = run(x)
  assert ln.dtype == rms.dtype == gn.dtype == jnp.bfloat16
  for out, ref in ((ln, np_norm(x64, (1, 2, 3), sc)), (rms, np_norm(x64, (3,), sc,
                                                                    center=False)),
                   (gn, np_group(x64, 2, (1, 2, 3), scale=sc))):
    # bf16 output: one rounding (cond ≈ 1 + cond_offset²·u32/u_bf16).
    R.assert_close(out, ref, jnp.bfloat16, cond=_cond(x64, jnp.bfloat16))
  f32 = jaxbn.layer_norm(x, sc, reduction_axes=(1, 2, 3), dtype=jnp.float32)
  assert f32.dtype == jnp.float32
  R.assert_close(f32, np_norm(x64, (1, 2, 3), sc), jnp.float32, cond=_cond(x64))


@pytest.mark.parametrize("name", ["ln", "rms", "gn_keep1", "in_mask"])
def test_gradients_match_closed_form(name):
  x = _data(8)
  sc, bi = _param(9, (8,)), _param(10, (8,))
  g = np.random.default_rng(11).normal(size=x.shape)
  mask = np.random.default_rng(12).random((2, 3, 4, 1)) > 0.3
  fns = {
      "ln": (lambda x, s, b: jaxbn.layer_norm(x, s, b),
             lambda: np_norm(x, (3,), sc, bi, g=g), (0, 1, 2)),
      "rms": (lambda x, s, b: jaxbn.rms_norm(x, s),
              lambda: np_norm(x, (3,), sc, center=False, g=g), (0, 1, 2)),
      "gn_keep1": (lambda x, s, b: jaxbn.group_norm(x, s, b, num_groups=2,
                                                    reduction_axes=(2, 3)),
                   lambda: np_group(x, 2, (2, 3), scale=sc, bias=bi, g=g), (0, 1, 2)),
      "in_mask": (lambda x, s, b: jaxbn.instance_norm(x, s, b, mask=mask),
                  lambda: np_norm(x, (1, 2), sc, bi, mask=mask, g=g), (0, 1, 2)),
  }
  fn, ref, _ = fns[name]
  loss = lambda x, s, b: jnp.sum(fn(x, s, b) * g)  # noqa: E731
  gx, gs, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, sc, bi)
  y_ref, gx_ref = ref()
  # Gradients: float32, cond = log2(n)·cond_offset² (R.stats_cond-like); dx relative to the
  # un-cancelled term g·scale/std (its RMS is the slack near zero).
  c = np.log2(x.size / 8) * _cond(x)
  R.assert_close(gx, gx_ref, jnp.float32, cond=c, scale=float(np.sqrt(np.mean(
      (g * sc) ** 2)) / np.std(x)), what="dx")
  xh = (y_ref - (0 if name == "rms" else bi)) / sc  # the normalized input
  R.assert_close(gs, (g * xh).sum((0, 1, 2)), jnp.float32, cond=c, what="dscale")
  if name != "rms":
    R.assert_close(gb, g.sum((0, 1, 2)), jnp.float32, cond=c, what="dbias")


# ------------------------------------------------------------------ flax side by side
LINEN_CASES = [
    ("LayerNorm", {}), ("LayerNorm", {"reduction_axes": (1, 2, 3), "use_bias": False}),
    ("LayerNorm", {"dtype": jnp.bfloat16}), ("RMSNorm", {}),
    ("GroupNorm", {"num_groups": 4}),
    ("GroupNorm", {"num_groups": None, "group_size": 2, "reduction_axes": (2, 3)}),
    ("InstanceNorm", {}), ("InstanceNorm", {"feature_axes": 1, "use_fast_variance": False}),
]


def test_linen_drop_in_for_flax():
  import flax.linen as nn
  import jaxbn.linen

  x = jnp.asarray(_data(13))
  key = jax.random.key(0)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  ours_all = {i: getattr(jaxbn.linen, n)(**kw) for i, (n, kw) in enumerate(LINEN_CASES)}
  theirs_all = {i: getattr(nn, n)(**kw) for i, (n, kw) in enumerate(LINEN_CASES)}
  v_ours, v_theirs = jax.jit(lambda key: ({i: m.init(key, x) for i, m in ours_all.items()},
                                          {i: m.init(key, x) for i, m in theirs_all.items()}))(
                                              key)
  variables_all = {}
  for i, (name, kw) in enumerate(LINEN_CASES):
    assert spec(v_ours[i]) == spec(v_theirs[i]), (name, kw)  # same variables: checkpoints
    for a, b in zip(jax.tree.leaves(v_ours[i]), jax.tree.leaves(v_theirs[i])):
      np.testing.assert_array_equal(a, b)
    # Random parameters, so that scale/bias are checked too.
    variables_all[i] = jax.tree.map(
        lambda a: a + jax.random.normal(jax.random.key(i), a.shape, a.dtype), v_theirs[i])

  @jax.jit
  def run(variables):
    return ({i: ours_all[i].apply(variables[i], x) for i in ours_all},
            {i: theirs_all[i].apply(variables[i], x) for i in theirs_all})

  y_ours, y_theirs = run(variables_all)
  for i, (name, kw) in enumerate(LINEN_CASES):
    assert y_ours[i].dtype == y_theirs[i].dtype, (name, kw)
    # Two implementations, each within 4·cond·u of float64: k = 8 between them.
    dt = jnp.bfloat16 if kw.get("dtype") == jnp.bfloat16 else jnp.float32
    R.assert_close(np.asarray(y_ours[i], np.float32), np.asarray(y_theirs[i], np.float32), dt,
                   k=8, cond=_cond(np.asarray(x, np.float64), dt), what=f"{name} {kw}")


def test_nnx_drop_in_for_flax_and_equal_to_linen():
  from flax import nnx
  import flax.linen as nn
  import jaxbn.linen
  import jaxbn.nnx

  x = jnp.asarray(_data(14))
  cases = [("LayerNorm", {}), ("RMSNorm", {"epsilon": 1e-3}), ("GroupNorm", {"num_groups": 4}),
           ("InstanceNorm", {}), ("GroupNorm", {"num_groups": 2, "reduction_axes": (2, 3)})]
  models = {}
  for i, (name, kw) in enumerate(cases):
    ours = getattr(jaxbn.nnx, name)(8, **kw, rngs=nnx.Rngs(0))
    theirs = getattr(nnx, name)(8, **kw, rngs=nnx.Rngs(0))
    s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs), name
    for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs)):
      np.testing.assert_array_equal(a, b)  # same initial values (keys drawn as flax)
    nnx.update(ours, jax.tree.map(lambda a: a + 0.5, s_ours))
    nnx.update(theirs, jax.tree.map(lambda a: a + 0.5, s_theirs))
    models[i] = (nnx.split(ours), nnx.split(theirs),
                 getattr(jaxbn.linen, name)(**kw), getattr(nn, name)(**kw))

  @jax.jit
  def run(states):
    out = {}
    for i, ((gd_o, _), (gd_t, _), lin_o, lin_t) in models.items():
      s_o, s_t = states[i]
      params = {"params": nnx.to_pure_dict(s_o)}
      out[i] = (nnx.merge(gd_o, s_o)(x), nnx.merge(gd_t, s_t)(x), lin_o.apply(params, x),
                lin_t.apply(params, x))
    return out

  outs = run({i: (m[0][1], m[1][1]) for i, m in models.items()})
  for i, (name, kw) in enumerate(cases):
    y, y_flax_nnx, y_linen, y_flax_linen = outs[i]
    c = _cond(np.asarray(x, np.float64))  # float32; k = 8 between two implementations
    R.assert_close(y, y_linen, jnp.float32, cond=c, what=f"{name} nnx vs linen")
    R.assert_close(y, y_flax_linen, jnp.float32, k=8, cond=c, what=f"{name} vs flax.linen")
    if "reduction_axes" in kw:
      # flax.nnx.GroupNorm 0.12 repeats the statistics along the wrong axis here (linen is
      # right): check the float64 definition, and that flax.nnx is indeed off.
      st = nnx.to_pure_dict(models[i][0][1])
      ref = np_group(np.asarray(x), 2, (2, 3), scale=np.asarray(st["scale"]),
                     bias=np.asarray(st["bias"]))
      R.assert_close(y, ref, jnp.float32, cond=c, what=name)
      assert np.abs(np.asarray(y_flax_nnx) - ref).max() > 0.1
    else:
      R.assert_close(y, y_flax_nnx, jnp.float32, k=8, cond=c, what=f"{name} vs flax.nnx")


def test_model_parallel_statistics_with_axis_name():
  """Features sharded over 8 devices: layer/RMS norm with ``axis_name`` equal the unsharded
  ones (the statistics are combined across devices, weighted by counts with a mask)."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("m",))
  x = _data(15, shape=(4, 16))
  sc = _param(16, (16,))
  mask = np.random.default_rng(17).random((4, 16)) > 0.4

  def body(x, sc, mask):
    return (jaxbn.layer_norm(x, sc, axis_name="m"), jaxbn.rms_norm(x, sc, axis_name="m"),
            jaxbn.layer_norm(x, sc, mask=mask, axis_name="m"))

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "m"), P("m"), P(None, "m")),
                             out_specs=(P(None, "m"),) * 3))
  put = lambda a, *s: jax.device_put(a, NamedSharding(mesh, P(*s)))  # noqa: E731
  ln, rms, ln_m = fn(put(x, None, "m"), put(sc, "m"), put(mask, None, "m"))
  # float32 bound, cond from the offset of each row (masked rows: the valid entries).
  c = max(R.norm_cond(x, (1,), np.float32), R.norm_cond(x, (1,), np.float32, mask=mask))
  R.assert_close(ln, np_norm(x, (1,), sc), jnp.float32, cond=c, what="layer_norm")
  R.assert_close(rms, np_norm(x, (1,), sc, center=False), jnp.float32, cond=c, what="rms")
  R.assert_close(ln_m, np_norm(x, (1,), sc, mask=mask), jnp.float32, cond=c,
                 what="masked layer_norm")


def test_errors():
  from flax import nnx
  import jaxbn.nnx

  x = jnp.ones((2, 4, 6))
  with pytest.raises(ValueError, match=r"group_norm: give exactly one of `num_groups` and "
                                       r"`group_size`, got num_groups=32 and group_size=2"):
    jaxbn.group_norm(x, group_size=2)
  with pytest.raises(ValueError, match=r"group_norm: give exactly one"):
    jaxbn.group_norm(x, num_groups=None)
  with pytest.raises(ValueError, match=r"group_norm: `num_groups`=4 must be a positive divisor "
                                       r"of the 6 channels"):
    jaxbn.group_norm(x, num_groups=4)
  with pytest.raises(ValueError, match=r"group_norm: `group_size`=4 must be a positive "
                                       r"divisor"):
    jaxbn.group_norm(x, num_groups=None, group_size=4)
  with pytest.raises(ValueError, match=r"group_norm: `reduction_axes`=\(1,\) must include the "
                                       r"last axis .* e\.g\. \(1, 2\)"):
    jaxbn.group_norm(x, num_groups=2, reduction_axes=(1,))
  with pytest.raises(ValueError, match=r"instance_norm: `feature_axes`=\(0, 2\) includes axis "
                                       r"0"):
    jaxbn.instance_norm(x, feature_axes=(0, 2))
  with pytest.raises(ValueError, match=r"layer_norm: `scale` has shape \(4,\) but `x` has "
                                       r"shape \(6,\) along `feature_axes`=-1"):
    jaxbn.layer_norm(x, jnp.ones(4))
  with pytest.raises(ValueError, match=r"rms_norm: `reduction_axes`=5 is out of range for "
                                       r"`x` of rank 3"):
    jaxbn.rms_norm(x, reduction_axes=5)
  with pytest.raises(ValueError, match=r"layer_norm: `mask` of shape \(3,\) does not "
                                       r"broadcast to `x` of shape \(2, 4, 6\)"):
    jaxbn.layer_norm(x, mask=jnp.ones(3, bool))
  with pytest.raises(ValueError, match=r"instance_norm: `epsilon` must be > 0"):
    jaxbn.instance_norm(x, epsilon=0.0)
  with pytest.raises(TypeError, match=r"group_norm: `x` must be a floating-point"):
    jaxbn.group_norm(jnp.ones((2, 4), jnp.int32), num_groups=2)
  with pytest.raises(ValueError, match=r"layer_norm: `axis_name`='m': the axis name 'm' is "
                                       r"not bound"):
    jaxbn.layer_norm(x, axis_name="m")
  with pytest.raises(ValueError, match=r"jaxbn.nnx.GroupNorm: `num_groups`=4 must be a "
                                       r"positive divisor of num_features=6"):
    jaxbn.nnx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))


def test_plain_jit_on_a_sharded_batch():
  """Under jax.jit on an explicitly batch-sharded input (no axis_name), every variant gives
  the single-device values and gradients; ghost BN keeps virtual batches on one device."""
  mesh = jax.make_mesh((8,), ("b",))
  x = _data(18, shape=(16, 2, 2, 8))
  sc, bi = _param(19, (8,)), _param(20, (8,))
  st = jaxbn.init_stats(8)
  fns = {
      "group_norm": lambda x, s, b: jaxbn.group_norm(x, s, b, num_groups=4),
      "instance_norm": lambda x, s, b: jaxbn.instance_norm(x, s, b),
      "layer_norm": lambda x, s, b: jaxbn.layer_norm(x, s, b),
      "rms_norm": lambda x, s, b: jaxbn.rms_norm(x, s) + b,
      "batch_renorm": lambda x, s, b: jaxbn.batch_renorm(x, st, s, b, training=True,
                                                          r_max=1.5, d_max=0.5)[0],
      "ghost_batch_norm": lambda x, s, b: jaxbn.ghost_batch_norm(
          x, st, s, b, training=True, virtual_batch_size=2)[0],
      "frozen_batch_norm": lambda x, s, b: jaxbn.frozen_batch_norm(x, st, s, b,
                                                                   freeze_affine=False),
  }

  def run(x, s, b):
    return {k: jax.grad(lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b))), argnums=(0, 1, 2))(
        x, s, b) for k, f in fns.items()}

  ref = jax.jit(run)(x, sc, bi)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("b")))
    out = jax.jit(run)(xs, sc, bi)
    with pytest.raises(ValueError, match=r"ghost_batch_norm: the batch axis is sharded over 8 "
                                         r"devices but cut into 4 virtual batches of 4"):
      jax.jit(lambda x: jaxbn.ghost_batch_norm(x, st, training=True,
                                               virtual_batch_size=4))(xs)
  for k in fns:
    for a, b in zip(out[k], ref[k]):
      # Sharded vs unsharded gradients: two float32 evaluations (k = 8), cond as gradients.
      R.assert_close(a, b, jnp.float32, k=8, cond=np.log2(16) * _cond(x), what=k)
