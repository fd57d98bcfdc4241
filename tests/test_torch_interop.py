"""PyTorch interop: state-dict conventions (NumPy only) and parity with torch itself (optional).

The torch tests build ``torch.nn`` modules on the CPU and check that the imported statistics
reproduce torch's eval outputs, that jaxbn's training update with torch's conventions
(momentum ``1 - p``, unbiased running variance) reproduces torch's running statistics, and
that a ResNet conv+BN block loaded into a linen model (and then folded) gives torch's
outputs.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn

# Tolerances (tests/README.md: |err| <= k·cond·u(dtype)·(|expected| + scale)). The float32 data
# here have |mean|/std <= ~6, so cond_offset² <= ~40 and 4·40·u32 ≈ 1e-5: outputs and
# statistics use rtol/atol 1e-5 (2e-5 where values reach ~2), gradients 1e-4 (× log2(n) of the
# sums); rtol 1e-6/atol 1e-6 where two float32 evaluations of the same formula are compared
# (a few ulps); no bfloat16 here.
import jaxbn.linen

RNG = np.random.default_rng(0)


def _random_bn(c=5):
  stats = jaxbn.BatchStats(jnp.asarray(RNG.normal(size=c), jnp.float32),
                           jnp.asarray(RNG.uniform(0.5, 3.0, size=c), jnp.float32),
                           jnp.array(42, jnp.int32))
  return (stats, jnp.asarray(RNG.uniform(0.5, 2, size=c), jnp.float32),
          jnp.asarray(RNG.normal(size=c), jnp.float32))


# ------------------------------------------------------------------------------------------
# Conventions, NumPy only.
# ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_variance_conversion():
  stats, scale, bias = _random_bn()
  sd = jaxbn.interop.to_torch_batch_norm(stats, scale, bias, prefix="layer1.0.bn1")
  assert sorted(sd) == ["layer1.0.bn1." + k for k in
                        ("bias", "num_batches_tracked", "running_mean", "running_var", "weight")]
  assert sd["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
  back = jaxbn.interop.from_torch_batch_norm(sd, "layer1.0.bn1.")          # trailing dot optional
  for a, b in zip(jax.tree.leaves((stats, scale, bias)), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # PyTorch stores the unbiased variance: with batch_count=n, var * n/(n-1) out, (n-1)/n in.
  n = 4
  sd_u = jaxbn.interop.to_torch_batch_norm(stats, prefix="bn", batch_count=n)
  np.testing.assert_allclose(sd_u["bn.running_var"], np.asarray(stats.var) * n / (n - 1),
                             rtol=1e-7)
  back_b = jaxbn.interop.from_torch_batch_norm(sd_u, "bn", batch_count=n)
  np.testing.assert_allclose(back_b.stats.var, stats.var, rtol=1e-6)
  assert back_b.scale is None and back_b.bias is None                # affine=False
  assert int(back_b.stats.count) == 42


def test_state_dict_errors():
  stats, _, _ = _random_bn()
  with pytest.raises(ValueError, match=r"from_torch_batch_norm: no 'bn2\.running_mean'/"
                                       r"'bn2\.running_var' in the state dict \(keys with that "
                                       r"prefix: \[\]\)\. Check `prefix`; a PyTorch layer built "
                                       r"with track_running_stats=False"):
    jaxbn.interop.from_torch_batch_norm(jaxbn.interop.to_torch_batch_norm(stats, prefix="bn1"), "bn2")
  with pytest.raises(ValueError, match=r"`batch_count` is the number of entries per feature in "
                                       r"a training batch .* must be > 1, got 1"):
    jaxbn.interop.to_torch_batch_norm(stats, batch_count=1)
  with pytest.raises(TypeError, match=r"from_torch_batch_norm: `source` must be a state dict"):
    jaxbn.interop.from_torch_batch_norm([1, 2])
  with pytest.raises(TypeError, match=r"to_torch_batch_norm: `stats` must be a jaxbn.BatchStats"):
    jaxbn.interop.to_torch_batch_norm((1, 2, 3))
  with pytest.raises(ValueError, match=r"kernel_from_torch: expected a weight of rank >= 2"):
    jaxbn.interop.kernel_from_torch(np.ones(3))
  with pytest.raises(ValueError, match=r"kernel_to_torch: expected a kernel of rank >= 2"):
    jaxbn.interop.kernel_to_torch(np.ones(3))
  with pytest.raises(ValueError, match=r"torch_batch_norm_config: the module was built with "
                                       r"track_running_stats=False"):
    jaxbn.interop.torch_batch_norm_config(types.SimpleNamespace(track_running_stats=False))


def test_kernel_layouts_and_config():
  w = RNG.normal(size=(8, 3, 5, 7))                                  # OIHW
  k = jaxbn.interop.kernel_from_torch(w)
  assert k.shape == (5, 7, 3, 8)
  np.testing.assert_array_equal(k[2, 4, 1, 6], w[6, 1, 2, 4])
  np.testing.assert_array_equal(jaxbn.interop.kernel_to_torch(k), w)
  lin = RNG.normal(size=(4, 9))                                      # Linear (out, in)
  np.testing.assert_array_equal(jaxbn.interop.kernel_from_torch(lin), lin.T)
  cfg = jaxbn.interop.torch_batch_norm_config(types.SimpleNamespace(
      momentum=None, eps=1e-3, affine=False, track_running_stats=True))
  assert cfg == {"momentum": None, "epsilon": 1e-3, "axis": 1, "unbiased_running_var": True,
                 "use_scale": False, "use_bias": False}
  fcfg = jaxbn.interop.torch_batch_norm_config(types.SimpleNamespace(
      momentum=None, eps=1e-3, affine=False, track_running_stats=True), functional=True)
  assert fcfg == {"momentum": None, "epsilon": 1e-3, "axis": 1, "unbiased_running_var": True}


# ------------------------------------------------------------------------------------------
# Parity with torch.
# ------------------------------------------------------------------------------------------


def _t2n(t):
  return t.detach().cpu().numpy()


def test_torch_batch_norm_eval_training_and_export():
  torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch (CPU)")
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm2d(6, momentum=0.3, eps=1e-3)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 2.0)
    bn.bias.normal_()
  bn.train()
  for _ in range(3):
    bn(torch.randn(4, 6, 3, 3) * 3 + 2)
  stats, scale, bias = jaxbn.interop.from_torch_batch_norm(bn)               # a module works too
  assert int(stats.count) == 3
  cfg = jaxbn.interop.torch_batch_norm_config(bn)
  assert cfg["momentum"] == 0.7

  x = torch.randn(4, 6, 3, 3) * 3 + 2
  bn.eval()
  want_eval = _t2n(bn(x))
  got_eval, _ = jaxbn.batch_norm(jnp.asarray(_t2n(x)), stats, scale, bias, training=False,
                                 axis=1, epsilon=cfg["epsilon"])
  np.testing.assert_allclose(got_eval, want_eval, rtol=1e-5, atol=1e-5)

  # One more training step with PyTorch's conventions gives PyTorch's running statistics:
  # the functional form of the config goes straight into jaxbn.batch_norm.
  bn.train()
  want_train = _t2n(bn(x))
  options = jaxbn.interop.torch_batch_norm_config(bn, functional=True)
  got_train, new = jaxbn.batch_norm(jnp.asarray(_t2n(x)), stats, scale, bias, training=True,
                                    **options)
  np.testing.assert_allclose(got_train, want_train, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.mean, _t2n(bn.running_mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, _t2n(bn.running_var), rtol=1e-5)
  assert int(new.count) == int(bn.num_batches_tracked) == 4

  # Export back into a fresh torch layer: the same eval outputs.
  fresh = torch.nn.BatchNorm2d(6, eps=1e-3)
  fresh.load_state_dict({k: torch.from_numpy(v)
                         for k, v in jaxbn.interop.to_torch_batch_norm(new, scale, bias).items()})
  fresh.eval()
  want, _ = jaxbn.batch_norm(jnp.asarray(_t2n(x)), new, scale, bias, training=False, axis=1,
                             epsilon=1e-3)
  np.testing.assert_allclose(_t2n(fresh(x)), want, rtol=1e-5, atol=1e-5)
  assert int(fresh.num_batches_tracked) == 4


def test_torch_batch_norm_config_functional_form_runs_batch_norm_like_torch():
  """``batch_norm(**torch_batch_norm_config(m, functional=True))`` for an affine-free module
  with the cumulative average (momentum=None): torch's outputs and running statistics."""
  torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch (CPU)")
  torch.manual_seed(1)
  bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False, eps=1e-4)
  stats, scale, bias = jaxbn.interop.from_torch_batch_norm(bn)
  assert scale is None and bias is None
  options = jaxbn.interop.torch_batch_norm_config(bn, functional=True)
  bn.train()
  for _ in range(2):
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    want = _t2n(bn(x))
    got, stats = jaxbn.batch_norm(jnp.asarray(_t2n(x)), stats, scale, bias, training=True,
                                  **options)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.mean, _t2n(bn.running_mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.var, _t2n(bn.running_var), rtol=1e-5)


class LinenBlock(nn.Module):
  """The linen twin of the torch block below (NHWC)."""

  @nn.compact
  def __call__(self, x):
    bn = lambda name: jaxbn.linen.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)
    y = nn.relu(bn("bn1")(nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv1")(x)))
    y = bn("bn2")(nn.Conv(8, (3, 3), padding=1, feature_group_count=2, use_bias=False,
                          name="conv2")(y))
    return nn.relu(x + y)


def test_torch_resnet_block_loads_and_folds():
  torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch (CPU)")
  torch.manual_seed(1)

  class TorchBlock(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
      self.bn1 = torch.nn.BatchNorm2d(8)
      self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
      self.bn2 = torch.nn.BatchNorm2d(8)

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(x + self.bn2(self.conv2(y)))

  block = TorchBlock()
  block.train()
  with torch.no_grad():
    for _ in range(2):
      block(torch.randn(4, 8, 6, 6) + 1)
    for bn in (block.bn1, block.bn2):
      bn.weight.uniform_(0.5, 2.0)
      bn.bias.normal_()
  block.eval()
  x = torch.randn(2, 8, 6, 6)
  want = _t2n(block(x)).transpose(0, 2, 3, 1)                       # NCHW -> NHWC

  sd = block.state_dict()
  params, batch_stats = {}, {}
  for i in (1, 2):
    stats, scale, bias = jaxbn.interop.from_torch_batch_norm(sd, f"bn{i}")
    params[f"conv{i}"] = {"kernel": jnp.asarray(jaxbn.interop.kernel_from_torch(sd[f"conv{i}.weight"]))}
    params[f"bn{i}"] = {"scale": scale, "bias": bias}
    batch_stats[f"bn{i}"] = {"mean": stats.mean, "var": stats.var}
  variables = {"params": params, "batch_stats": batch_stats}
  xj = jnp.asarray(_t2n(x).transpose(0, 2, 3, 1))
  got = jax.jit(LinenBlock().apply)(variables, xj)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  pairs = jaxbn.linen.find_conv_bn_pairs(LinenBlock(), variables, xj)
  assert [(p.layer, p.bn) for p in pairs] == [(("conv1",), ("bn1",)), (("conv2",), ("bn2",))]
  folded = jaxbn.linen.fold_batch_norm_layers(variables, pairs)
  np.testing.assert_allclose(jax.jit(jaxbn.linen.folded(LinenBlock()))(folded, xj), want,
                             rtol=1e-4, atol=1e-4)

  # The functional fold on PyTorch's OIHW weight equals torch's own fusion.
  from torch.nn.utils.fusion import fuse_conv_bn_eval
  fused = fuse_conv_bn_eval(block.conv2, block.bn2)
  stats, scale, bias = jaxbn.interop.from_torch_batch_norm(sd, "bn2")
  w, b = jaxbn.fold_batch_norm(_t2n(block.conv2.weight), None, stats, scale, bias, axis=0)
  np.testing.assert_allclose(w, _t2n(fused.weight), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b, _t2n(fused.bias), rtol=1e-5, atol=1e-6)


def test_import_jaxbn_imports_neither_torch_nor_flax():
  import subprocess
  import sys
  code = ("import sys, jaxbn; jaxbn.interop.from_torch_batch_norm; "
          "assert 'torch' not in sys.modules and 'flax' not in sys.modules, 'imported'")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr


def test_keras_conventions_of_the_readme_table():
  """Keras 3: momentum is the old value's weight (0.99), epsilon 1e-3, biased moving variance."""
  import os
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras", reason="the Keras conventions check needs keras")
  if keras.backend.backend() != "jax":
    pytest.skip(reason="keras was imported with a non-JAX backend")
  layer = keras.layers.BatchNormalization()
  layer.build((None, 4))
  assert (layer.momentum, layer.epsilon) == (0.99, 1e-3)
  x = (RNG.normal(size=(6, 4)) * 2 + 1).astype(np.float32)
  gamma = RNG.uniform(0.5, 2, size=4).astype(np.float32)
  beta = RNG.normal(size=4).astype(np.float32)
  y, (mm, mv) = layer.stateless_call([gamma, beta],
                                     [v.value for v in layer.non_trainable_variables], x,
                                     training=True)
  want, stats = jaxbn.batch_norm(x, jaxbn.init_stats(4), gamma, beta, training=True,
                                 momentum=0.99, epsilon=1e-3)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mm, stats.mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mv, stats.var, rtol=1e-5)              # biased, as jaxbn's
  y_eval, _ = layer.stateless_call([gamma, beta], [mm, mv], x, training=False)
  np.testing.assert_allclose(y_eval, jaxbn.normalize(x, mm, mv, gamma, beta, epsilon=1e-3),
                             rtol=1e-5, atol=1e-5)
