"""Every bad input gets a clear error naming the function, the argument and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = jnp.ones((4, 3))
S = jaxbn.init_stats(3)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(axis=2), ValueError, r"batch_norm: `axis`=2 is out of range for `x` of rank 2"),
    (dict(axis=(0, 0)), ValueError, r"`axis`=\(0, 0\) repeats an axis"),
    (dict(axis=1.0), TypeError, r"batch_norm: `axis` must be an int or a tuple of ints, got 1.0"),
    (dict(axis="c"), TypeError, r"`axis` must be an int or a tuple of ints, got 'c'"),
    (dict(momentum=1.5), ValueError, r"`momentum` must be in \[0, 1\].*momentum_from_torch"),
    (dict(momentum=-0.1), ValueError, r"`momentum` must be in \[0, 1\]"),
    (dict(epsilon=0.0), ValueError, r"`epsilon` must be > 0"),
    (dict(epsilon=-1e-5), ValueError, r"`epsilon` must be > 0"),
    (dict(axis_name="batch"), ValueError,
     r"`axis_name`='batch': the axis name 'batch' is not bound.*shard_map"),
    (dict(mask=jnp.ones((5, 3), bool)), ValueError,
     r"`mask` of shape \(5, 3\) does not broadcast to `x` of shape \(4, 3\)"),
    (dict(mask=jnp.ones((4, 3))), TypeError, r"`mask` must be a bool array"),
])
def test_batch_norm_errors(kwargs, exc, pattern):
  with pytest.raises(exc, match=pattern):
    jaxbn.batch_norm(X, S, training=True, **kwargs)


def test_feature_count_mismatch_names_the_fix():
  with pytest.raises(ValueError, match=r"`x` has 3 features on axis -1 but `stats.mean` has "
                     r"shape \(5,\); create the stats with jaxbn.init_stats\(3\)"):
    jaxbn.batch_norm(X, jaxbn.init_stats(5), training=True)
  with pytest.raises(ValueError, match=r"`scale` has shape \(4,\)"):
    jaxbn.batch_norm(X, S, jnp.ones(4), training=True)
  with pytest.raises(ValueError, match=r"`bias` has shape \(2,\)"):
    jaxbn.batch_norm(X, S, None, jnp.ones(2), training=False)


def test_integer_and_bool_input_rejected():
  with pytest.raises(TypeError, match=r"batch_norm: `x` must be a floating-point.*int32"):
    jaxbn.batch_norm(jnp.ones((4, 3), jnp.int32), S, training=True)
  with pytest.raises(TypeError, match=r"moments: `x` must be a floating-point.*bool"):
    jaxbn.moments(jnp.ones((4, 3), bool))


def test_training_must_be_a_python_bool():
  with pytest.raises(TypeError, match=r"`training` must be a Python bool"):
    jax.jit(lambda t: jaxbn.batch_norm(X, S, training=t))(True)
  with pytest.raises(TypeError, match=r"`training` must be a Python bool"):
    jaxbn.batch_norm(X, S, training=None)


def test_stats_type_and_init_stats_dtype():
  with pytest.raises(TypeError, match=r"`stats` must be a jaxbn.BatchStats.*init_stats\(3\)"):
    jaxbn.batch_norm(X, {"mean": 0, "var": 1}, training=True)
  with pytest.raises(ValueError, match=r"init_stats: `dtype` must be a floating dtype"):
    jaxbn.init_stats(3, jnp.int32)


def test_scalar_input_and_normalize_errors():
  with pytest.raises(ValueError, match=r"at least one dimension"):
    jaxbn.moments(jnp.float32(1.0))
  with pytest.raises(ValueError, match=r"normalize: `x` has features of shape \(3,\) "
                     r"on the feature axis but `mean` has shape \(2,\)"):
    jaxbn.normalize(X, jnp.zeros(2), jnp.ones(3))
  with pytest.raises(ValueError, match=r"normalize: `epsilon` must be > 0"):
    jaxbn.normalize(X, jnp.zeros(3), jnp.ones(3), epsilon=0)


def test_update_stats_errors():
  m = jaxbn.Moments(jnp.zeros(2), jnp.ones(2), jnp.ones(2))
  with pytest.raises(ValueError, match=r"update_stats: batch moments have feature shape \(2,\)"):
    jaxbn.update_stats(S, m)
  with pytest.raises(ValueError, match=r"update_stats: `momentum` must be in \[0, 1\]"):
    jaxbn.update_stats(jaxbn.init_stats(2), m, momentum=2.0)


def test_misspelled_axis_name_inside_vmap():
  with pytest.raises(ValueError, match=r"the axis name 'bathc' is not bound"):
    jax.vmap(lambda x: jaxbn.batch_norm(x, S, training=True, axis_name="bathc"),
             axis_name="batch")(jnp.ones((2, 4, 3)))
