"""Public API surface: exports, docstrings, and no flax import from the core."""

import subprocess
import sys

import jaxbn


def test_import_jaxbn_does_not_import_flax():
  code = "import sys, jaxbn; jaxbn.batch_norm; assert 'flax' not in sys.modules, 'flax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_has_a_docstring():
  for name in jaxbn.__all__:
    obj = getattr(jaxbn, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_stats_pytree_roundtrip():
  import jax
  s = jaxbn.init_stats((2, 3))
  leaves, tree = jax.tree.flatten(s)
  assert len(leaves) == 3 and jax.tree.unflatten(tree, leaves) == s
  assert s.mean.shape == (2, 3) and s.var.shape == (2, 3) and s.count.shape == ()


def test_submodules_load_lazily_and_import_jaxbn_alone_imports_no_flax():
  """`import jaxbn; jaxbn.linen.BatchNorm` works (PEP 562); `import jaxbn` loads no flax."""
  code = ("import sys, jaxbn\n"
          "assert 'flax' not in sys.modules and 'jaxbn.linen' not in sys.modules\n"
          "jaxbn.parallel.data_mesh; jaxbn.interop.from_torch_batch_norm\n"
          "assert 'flax' not in sys.modules, 'parallel/interop imported flax'\n"
          "import flax.linen, flax.nnx\n"
          "assert issubclass(jaxbn.linen.BatchNorm, flax.linen.Module)\n"
          "assert issubclass(jaxbn.nnx.BatchNorm, flax.nnx.Module)\n")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_moved_torch_names_warn_and_still_work():
  import warnings
  import pytest
  for name in ("BatchNormVariables", "from_torch_batch_norm", "kernel_from_torch",
               "kernel_to_torch", "to_torch_batch_norm", "torch_batch_norm_config"):
    with pytest.warns(DeprecationWarning, match=rf"jaxbn\.{name} moved to jaxbn\.interop"):
      old = getattr(jaxbn, name)
    assert old is getattr(jaxbn.interop, name)
    assert name not in jaxbn.__all__
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxbn.batch_norm  # a current name: no warning
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    jaxbn.nope


def test_version_is_single_sourced():
  from importlib import metadata
  from jaxbn._version import __version__
  assert jaxbn.__version__ == __version__ == metadata.version("jaxbn")


def test_momentum_one_keeps_running_statistics_as_flax_does():
  """flax accepts momentum=1.0 (running statistics frozen while training on the batch)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 5
  stats = jaxbn.BatchStats(jnp.array([1., 2., 3.]), jnp.array([4., 5., 6.]),
                           jnp.array(2, jnp.int32))
  for debias in (False, True):
    y, new = jaxbn.batch_norm(x, stats, training=True, momentum=1.0, debias=debias)
    np.testing.assert_array_equal(np.asarray(new.mean), np.asarray(stats.mean))
    np.testing.assert_array_equal(np.asarray(new.var), np.asarray(stats.var))
  layer = nn.BatchNorm(use_running_average=False, momentum=1.0)
  v = layer.init(jax.random.key(1), x)
  y_flax, upd = layer.apply(v, x, mutable=["batch_stats"])
  y_jaxbn, new = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True, momentum=1.0,
                                  use_fast_variance=True)
  # Same output on the batch statistics (float32: a few ulp of |y| <= 4), same frozen stats.
  np.testing.assert_allclose(np.asarray(y_jaxbn), np.asarray(y_flax), rtol=0,
                             atol=16 * np.finfo(np.float32).eps * 4)
  np.testing.assert_array_equal(np.asarray(new.mean), np.asarray(upd["batch_stats"]["mean"]))
  np.testing.assert_array_equal(np.asarray(new.var), np.asarray(upd["batch_stats"]["var"]))
  assert jaxbn.momentum_from_torch(0.0) == 1.0
