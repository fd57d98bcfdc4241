"""Folding eval-mode BN into the Conv/Dense before it: functional, linen and nnx.

The references: the unfolded eval-mode computation (conv, then ``(y - μ)/√(σ²+ε)·γ + β``),
in float64 NumPy for the functional fold and in the original model for the tree folds, on a
ResNet-style model with grouped and depthwise convolutions, a projection shortcut, a dense
head and two BatchNorms that must not be folded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax

import jaxbn
import jaxbn.linen
import jaxbn.nnx

RNG = np.random.default_rng(0)


def _stats(c, rng=RNG):
  return (jaxbn.BatchStats(jnp.asarray(rng.normal(size=c) * 2, jnp.float32),
                           jnp.asarray(rng.uniform(0.01, 9.0, size=c), jnp.float32),
                           jnp.array(3, jnp.int32)),
          jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32),
          jnp.asarray(rng.normal(size=c), jnp.float32))


def _bn64(y, stats, scale, bias, eps, axis):
  shape = [1] * y.ndim
  shape[axis] = -1
  f = lambda v: np.asarray(v, np.float64).reshape(shape)
  out = (y - f(stats.mean)) / np.sqrt(f(stats.var) + eps)
  if scale is not None:
    out = out * f(scale)
  if bias is not None:
    out = out + f(bias)
  return out


def _conv64(x, w, groups, dn):
  """A grouped convolution at float32 HIGHEST precision, returned as float64."""
  y = lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                               (1, 1), "SAME", dimension_numbers=dn,
                               feature_group_count=groups,
                               precision=lax.Precision.HIGHEST)
  return np.asarray(y, np.float64)


# ------------------------------------------------------------------------------------------
# Functional.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,groups,with_bias,affine", [
    ("HWIO", 1, False, True),
    ("HWIO", 2, True, True),       # grouped
    ("HWIO", 6, True, False),      # depthwise, BN without scale/bias
    ("OIHW", 3, True, True),       # PyTorch's layout: output features on axis 0
])
def test_fold_conv_matches_unfolded(layout, groups, with_bias, affine):
  cin, cout = 6, 6
  x = RNG.normal(size=(2, 5, 5, cin) if layout == "HWIO" else (2, cin, 5, 5))
  if layout == "HWIO":
    w = RNG.normal(size=(3, 3, cin // groups, cout))
    dn, axis, caxis = ("NHWC", "HWIO", "NHWC"), -1, -1
  else:
    w = RNG.normal(size=(cout, cin // groups, 3, 3))
    dn, axis, caxis = ("NCHW", "OIHW", "NCHW"), 0, 1
  b = RNG.normal(size=cout) if with_bias else None
  stats, scale, beta = _stats(cout)
  scale, beta = (scale, beta) if affine else (None, None)
  eps = 1e-3
  wf, bf = jaxbn.fold_batch_norm(jnp.asarray(w, jnp.float32),
                                 None if b is None else jnp.asarray(b, jnp.float32),
                                 stats, scale, beta, epsilon=eps, axis=axis)
  assert wf.dtype == jnp.float32 and wf.shape == w.shape and bf.shape == (cout,)
  shape = [1] * 4
  shape[caxis] = -1
  y = _conv64(x, w, groups, dn)
  if b is not None:
    y = y + b.reshape(shape)
  ref = _bn64(y, stats, scale, beta, eps, caxis)
  got = _conv64(x, wf, groups, dn) + np.asarray(bf, np.float64).reshape(shape)
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_fold_dense_and_eval_affine():
  x = RNG.normal(size=(7, 5))
  w, b = RNG.normal(size=(5, 4)), RNG.normal(size=4)
  stats, scale, beta = _stats(4)
  k, c = jaxbn.eval_affine(stats, scale, beta, epsilon=1e-5)
  k64 = np.asarray(scale, np.float64) / np.sqrt(np.asarray(stats.var, np.float64) + 1e-5)
  np.testing.assert_allclose(k, k64, rtol=1e-6)
  np.testing.assert_allclose(c, np.asarray(beta) - np.asarray(stats.mean) * k64, rtol=1e-5,
                             atol=1e-6)
  wf, bf = jaxbn.fold_batch_norm(w.astype(np.float32), b.astype(np.float32), stats, scale,
                                 beta)
  ref = _bn64(x @ w + b, stats, scale, beta, 1e-5, -1)
  np.testing.assert_allclose(x @ np.asarray(wf, np.float64) + np.asarray(bf), ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())
  # bf16 kernels stay bf16; the arithmetic is float32.
  wb, _ = jaxbn.fold_batch_norm(jnp.asarray(w, jnp.bfloat16), None, stats)
  assert wb.dtype == jnp.bfloat16


def test_fold_errors():
  stats, _, _ = _stats(4)
  with pytest.raises(ValueError, match=r"fold_batch_norm: the kernel has \(3,\) output "
                                       r"features along axis -1 but the BN statistics have "
                                       r"shape \(4,\); pass the kernel's output-feature axis"):
    jaxbn.fold_batch_norm(jnp.ones((4, 3)), None, stats)
  with pytest.raises(ValueError, match=r"fold_batch_norm: `bias` has shape \(3,\) but the "
                                       r"kernel has \(4,\) output features"):
    jaxbn.fold_batch_norm(jnp.ones((3, 4)), jnp.ones(3), stats)
  with pytest.raises(TypeError, match=r"fold_batch_norm: `stats` must have `mean` and `var`"):
    jaxbn.fold_batch_norm(jnp.ones((3, 4)), None, (1, 2))
  with pytest.raises(ValueError, match=r"eval_affine: `epsilon` must be > 0"):
    jaxbn.eval_affine(stats, epsilon=0.0)
  with pytest.raises(ValueError, match=r"eval_affine: `scale` has shape \(2,\) but "
                                       r"`stats.mean` has shape \(4,\)"):
    jaxbn.eval_affine(stats, jnp.ones(2))
  with pytest.raises(TypeError, match=r"fold_batch_norm: `kernel` must be a floating-point"):
    jaxbn.fold_batch_norm(jnp.ones((3, 4), jnp.int32), None, stats)


# ------------------------------------------------------------------------------------------
# Linen: a ResNet-style model with flax's or jaxbn's BatchNorm.
# ------------------------------------------------------------------------------------------


class Block(nn.Module):
  filters: int
  norm: object
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters, (3, 3), feature_group_count=2)(y)        # grouped, with bias
    y = self.norm()(y)
    r = x
    if r.shape != y.shape:
      r = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(r)
      r = self.norm(name="proj_bn")(r)
    return nn.relu(r + y)


class ResNet(nn.Module):
  batch_norm: object = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train=False):
    norm = functools.partial(self.batch_norm, use_running_average=not train, epsilon=1e-3)
    x = nn.relu(norm(name="stem_bn")(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    x = Block(8, norm, name="b0")(x)
    x = Block(16, norm, (2, 2), name="b1")(x)
    x = norm(name="dw_bn")(nn.Conv(16, (3, 3), feature_group_count=16, use_bias=False,
                                   name="dw")(x))                      # depthwise
    c = nn.Conv(16, (1, 1), name="twice")(x)
    x = norm(name="twice_bn")(c) + c                                   # conv output read twice
    x = norm(name="add_bn")(x + 1.0)                                   # no layer before it
    x = nn.Dense(10, name="head")(x.mean((1, 2)))
    return norm(name="head_bn")(x)


EXPECTED = [(("stem",), ("stem_bn",)), (("b0", "Conv_0"), ("b0", "BatchNorm_0")),
            (("b0", "Conv_1"), ("b0", "BatchNorm_1")), (("b1", "Conv_0"), ("b1", "BatchNorm_0")),
            (("b1", "Conv_1"), ("b1", "BatchNorm_1")), (("b1", "proj"), ("b1", "proj_bn")),
            (("dw",), ("dw_bn",)), (("head",), ("head_bn",))]


def _trained(shapes, seed=0):
  """Concrete values for an abstract variable tree (``jax.eval_shape`` of an init), as after
  training: random kernels, statistics and affine parameters. (Filling shapes avoids
  compiling the random initializers, which takes seconds per model on CPU.)"""
  rng = np.random.default_rng(seed)

  def f(path, s):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    name = [n for n in names if n != "value"][-1]
    if name == "kernel":
      v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "mean":
      v = rng.normal(size=s.shape) * 0.5
    elif name == "var":
      v = rng.uniform(0.2, 4.0, size=s.shape)
    elif name == "scale":
      v = rng.uniform(0.5, 1.5, size=s.shape)
    elif name == "bias":
      v = rng.normal(size=s.shape) * 0.3
    else:
      v = np.zeros(s.shape)
    return jnp.asarray(v, s.dtype)
  return jax.tree_util.tree_map_with_path(f, shapes)


@pytest.fixture(scope="module")
def x_img():
  return jnp.asarray(RNG.normal(size=(2, 8, 8, 3)), jnp.float32)


def _count(jaxpr_text, prim):
  return jaxpr_text.count(f" {prim} ")


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm, jaxbn.linen.BatchNorm])
def test_linen_resnet_fold(bn_cls, x_img):
  model = ResNet(bn_cls)
  variables = _trained(jax.eval_shape(model.init, jax.random.key(0), x_img))
  pairs = jaxbn.linen.find_conv_bn_pairs(model.apply, variables, x_img, train=False)
  assert [(p.layer, p.bn) for p in pairs] == EXPECTED
  assert all(p.epsilon == 1e-3 and p.kernel_axes == (-1,) for p in pairs)
  folded_vars = jax.jit(lambda v: jaxbn.linen.fold_batch_norm_layers(v, pairs))(variables)
  # The folded BNs keep only a bias; the two others are untouched; the input is unchanged.
  assert set(folded_vars["batch_stats"]) == {"twice_bn", "add_bn"}
  assert set(folded_vars["params"]["stem_bn"]) == {"bias"}
  assert "mean" in variables["batch_stats"]["stem_bn"]
  eval_fn = jax.jit(jaxbn.linen.folded(model.apply), static_argnames="train")
  got = eval_fn(folded_vars, x_img, train=False)
  want = jax.jit(model.apply, static_argnames="train")(variables, x_img, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  # Only the two unfolded BNs still normalize (one rsqrt each).
  text = str(jax.make_jaxpr(jaxbn.linen.folded(model.apply))(folded_vars, x_img))
  assert _count(text, "rsqrt") == 2
  assert _count(str(jax.make_jaxpr(model.apply)(variables, x_img)), "rsqrt") == 10


def test_linen_fold_tuples_and_errors(x_img):
  class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False)(
          nn.Conv(4, (3, 3), name="c")(x))
      return jaxbn.linen.BatchNorm(use_running_average=True, epsilon=1e-2)(
          nn.ConvTranspose(4, (2, 2), transpose_kernel=True, name="t")(x))

  v = _trained(jax.eval_shape(Small().init, jax.random.key(1), x_img))
  pairs = jaxbn.linen.find_conv_bn_pairs(Small(), v, x_img)
  assert pairs[1].kernel_axes == (-2,) and pairs[1].epsilon == 1e-2
  folded_vars = jax.jit(lambda v: jaxbn.linen.fold_batch_norm_layers(
      v, [("c", "BatchNorm_0"), pairs[1]]))(v)
  want = jax.jit(Small().apply)(v, x_img)
  got = jax.jit(jaxbn.linen.folded(Small()))(folded_vars, x_img)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match=r"jaxbn.linen.fold_batch_norm_layers: no batch_stats\['c'\] "
                                       r"in `variables`: not a batch norm path, or already "
                                       r"folded"):
    jaxbn.linen.fold_batch_norm_layers(v, [("t", "c")])
  with pytest.raises(ValueError, match=r"no params\['nope'\]\['kernel'\] in `variables`"):
    jaxbn.linen.fold_batch_norm_layers(v, [("nope", "BatchNorm_0")])
  with pytest.raises(ValueError, match=r"reuses a layer or batch norm of an earlier pair"):
    jaxbn.linen.fold_batch_norm_layers(v, [("c", "BatchNorm_0"), ("t", "BatchNorm_0")])
  with pytest.raises(ValueError, match=r"cannot fold BatchNorm_0 into t: fold_batch_norm: the "
                                       r"kernel has \(2,\) output features along axis"):
    jaxbn.linen.fold_batch_norm_layers(v, [jaxbn.linen.FoldPair(("t",), ("BatchNorm_0",),
                                                         kernel_axes=(0,))])
  with pytest.raises(TypeError, match=r"each pair must be a FoldPair or a \(layer_path, "
                                      r"bn_path\) tuple"):
    jaxbn.linen.fold_batch_norm_layers(v, ["c"])
  with pytest.raises(ValueError, match=r"jaxbn.linen.fold_batch_norm_layers: `variables` must be the "
                                       r"model's variables with 'params'"):
    jaxbn.linen.fold_batch_norm_layers({"batch_stats": {}}, [])
  with pytest.raises(TypeError, match=r"a module path must be a tuple of names"):
    jaxbn.linen.fold_batch_norm_layers(v, [(("c", 0), "BatchNorm_0")])
  broken = jax.tree.map(lambda a: a, folded_vars)
  del broken["params"]["BatchNorm_0"]
  with pytest.raises(ValueError, match=r"jaxbn.linen.folded: the batch norm BatchNorm_0 "
                                       r"has neither running statistics nor a folded bias"):
    jaxbn.linen.folded(Small().apply)(broken, x_img)


# ------------------------------------------------------------------------------------------
# NNX.
# ------------------------------------------------------------------------------------------


class NNXResNet(nnx.Module):
  def __init__(self, bn_cls, rngs):
    bn = functools.partial(bn_cls, epsilon=1e-3, rngs=rngs)
    self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = bn(8)
    self.convs = nnx.List([nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs),
                           nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)])
    self.bns = nnx.List([bn(8), bn(8)])
    self.add_bn = bn(8)
    self.head = nnx.Linear(8, 10, rngs=rngs)
    self.head_bn = bn(10)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    y = nnx.relu(self.bns[0](self.convs[0](x)))
    x = nnx.relu(x + self.bns[1](self.convs[1](y)))
    x = self.add_bn(x * 2.0)
    return self.head_bn(self.head(x.mean((1, 2))))


def _nnx_model(bn_cls, seed=1):
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: NNXResNet(bn_cls, nnx.Rngs(0))))
  model = nnx.merge(graphdef, _trained(shapes, seed))
  model.eval()
  return model


@pytest.mark.parametrize("bn_cls", [nnx.BatchNorm, jaxbn.nnx.BatchNorm])
def test_nnx_resnet_fold(bn_cls, x_img):
  model = _nnx_model(bn_cls)
  pairs = jaxbn.nnx.find_conv_bn_pairs(model, x_img)
  assert [(p.layer, p.bn) for p in pairs] == [
      (("stem",), ("stem_bn",)), (("convs", 0), ("bns", 0)), (("convs", 1), ("bns", 1)),
      (("head",), ("head_bn",))]
  fast = jaxbn.nnx.fold_batch_norm_layers(model, pairs)
  assert type(fast.stem_bn) is jaxbn.nnx.FoldedBatchNorm and type(model.stem_bn) is bn_cls
  assert type(fast.add_bn) is bn_cls and fast.convs[1].bias is not None
  run = nnx.jit(lambda m, x: m(x))
  want = run(model, x_img)
  got = run(fast, x_img)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  view = nnx.view(fast, use_running_average=True)                # still answers like BN
  np.testing.assert_allclose(run(view, x_img), got, rtol=1e-6, atol=1e-6)
  # Pairs given as modules or path strings fold the same way.
  again = jaxbn.nnx.fold_batch_norm_layers(model, [(model.stem, "stem_bn"), ("convs/0", ("bns", 0))])
  assert type(again.bns[0]) is jaxbn.nnx.FoldedBatchNorm and type(again.bns[1]) is bn_cls
  np.testing.assert_allclose(run(again, x_img), want, rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(want).max()))


def test_nnx_fold_errors(x_img):
  model = _nnx_model(nnx.BatchNorm)
  with pytest.raises(ValueError, match=r"jaxbn.nnx.fold_batch_norm_layers: the module at \('stem',\) "
                                       r"is a Conv, not a batch norm"):
    jaxbn.nnx.fold_batch_norm_layers(model, [("stem_bn", "stem")])
  with pytest.raises(ValueError, match=r"the module at \('add_bn',\) \(BatchNorm\) has no "
                                       r"`kernel`"):
    jaxbn.nnx.fold_batch_norm_layers(model, [("add_bn", "stem_bn")])
  with pytest.raises(ValueError, match=r"no module at \('nope',\) or \('stem_bn',\)"):
    jaxbn.nnx.fold_batch_norm_layers(model, [("nope", "stem_bn")])
  with pytest.raises(ValueError, match=r"reuses a layer or batch norm of an earlier pair"):
    jaxbn.nnx.fold_batch_norm_layers(model, [("stem", "stem_bn"), ("head", "stem_bn")])
  with pytest.raises(ValueError, match=r"cannot fold \('bns', 0\) into \('convs', 0\): "
                                       r"fold_batch_norm: the kernel has \(3,\) output features"):
    jaxbn.nnx.fold_batch_norm_layers(model, [jaxbn.nnx.FoldPair(("convs", 0), ("bns", 0), kernel_axes=(0,))])
  with pytest.raises(TypeError, match=r"a module path must be a tuple such as \('blocks', 0, "
                                      r"'conv'\), a string 'blocks/0/conv' or the module"):
    jaxbn.nnx.fold_batch_norm_layers(model, [(3, "stem_bn")])
  with pytest.raises(TypeError, match=r"each pair must be a FoldPair or a \(layer, bn\) tuple"):
    jaxbn.nnx.fold_batch_norm_layers(model, ["stem"])
  for f in (jaxbn.nnx.fold_batch_norm_layers, jaxbn.nnx.find_conv_bn_pairs):
    with pytest.raises(TypeError, match=r"jaxbn.nnx.\w+: `model` must be an nnx.Module"):
      f(lambda x: x, [])
  with pytest.raises(ValueError, match=r"the module Conv given in `pairs` is not part of"):
    jaxbn.nnx.fold_batch_norm_layers(model, [(_nnx_model(nnx.BatchNorm).stem, "stem_bn")])


def test_old_layer_level_fold_names_warn_and_still_work(x_img):
  """`fold_batch_norm` in linen/nnx is deprecated for one release (it is the name of the
  array-level jaxbn.fold_batch_norm); the old calls give the same result as the new names."""
  model = _nnx_model(nnx.BatchNorm)
  pairs = jaxbn.nnx.find_conv_bn_pairs(model, x_img)
  with pytest.warns(DeprecationWarning, match=r"jaxbn.nnx.fold_batch_norm is deprecated.*"
                                              r"fold_batch_norm_layers"):
    old = jaxbn.nnx.fold_batch_norm(model, None, x_img)
  new = jaxbn.nnx.fold_batch_norm_layers(model, pairs)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   nnx.state(old), nnx.state(new)))
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"pass `pairs`, or "
                                                                         r"an example input"):
    jaxbn.nnx.fold_batch_norm(model)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))

  v = Net().init(jax.random.key(0), x_img)
  pairs = jaxbn.linen.find_conv_bn_pairs(Net(), v, x_img)
  with pytest.warns(DeprecationWarning, match=r"jaxbn.linen.fold_batch_norm is deprecated.*"
                                              r"fold_batch_norm_layers"):
    old = jaxbn.linen.fold_batch_norm(v, pairs)
  new = jaxbn.linen.fold_batch_norm_layers(v, pairs)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), old, new))
