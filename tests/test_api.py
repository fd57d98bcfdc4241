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
