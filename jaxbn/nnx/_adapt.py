"""Adaptation tools for NNX (the twins of ``jaxbn.linen``'s): split (per-domain) BN, test-time
BN adaptation, TENT's parameter filter, and batch statistics for weight-averaged parameters."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.typing import Dtype, Initializer

import jaxbn
from jaxbn._core.checks import epsilon_value, momentum_value
from jaxbn._layers.docs import ADAPT, fill_doc
from jaxbn.nnx._common import (Layer, init_affine, init_bn_layer, mode, plain_dtype, treatment,
                               value, write_stats)
from jaxbn.nnx._surgery import replace_batch_norm


@fill_doc(**ADAPT, stats=" (``nnx.BatchStat``)", fw="nnx")
class SplitBatchNorm(Layer):
  r"""Split (per-domain) batch norm for NNX: one set of running statistics per domain.

  {split}

  Args:
    num_features: number of features (``C``).
    {split_args}
    rngs: ``nnx.Rngs``.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.SplitBatchNorm(2, num_domains=3, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(8.0).reshape(4, 2), domain=2)
    >>> bn.mean[...].shape
    (3, 2)
  """

  def __init__(self, num_features: int, *, num_domains: int = 2, shared_affine: bool = True,
               use_running_average: bool = False, axis: int = -1, momentum: float = 0.99,
               epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = False,
               skip_nonfinite: bool = True, rngs: nnx.Rngs):
    args = dict(locals())
    epsilon_value("jaxbn.nnx.SplitBatchNorm", epsilon)
    momentum_value("jaxbn.nnx.SplitBatchNorm", momentum)
    rows = (num_domains, num_features)
    self.mean = nnx.BatchStat(jnp.zeros(rows, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(rows, jnp.float32))
    counts = jnp.zeros((num_domains,), jnp.int32)  # stored for a cumulative average only
    self.count = nnx.BatchStat(counts) if momentum is None else nnx.data(None)
    shape = (num_features,) if shared_affine else rows
    init_affine(self, shape, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs)
    for name, arg in args.items():  # the settings, after the state (not use_bias/use_scale)
      if name not in ("self", "use_bias", "use_scale", "bias_init", "scale_init", "rngs"):
        setattr(self, name, arg)

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               domain: Any = 0, mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the statistics of ``domain``; updates them in training."""
    use_ra = mode(self, use_running_average)
    x = jnp.asarray(x)
    scale, bias = value(self.scale), value(self.bias)
    count = jnp.zeros((self.num_domains,), jnp.int32) if self.count is None else self.count[...]
    stats = jaxbn.BatchStats(self.mean[...], self.var[...], count)
    y, new = jaxbn.split_batch_norm(
        x, stats, scale, bias, domain=domain, training=not use_ra, axis=self.axis,
        momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        dtype=plain_dtype(self.dtype, x, scale, bias), use_fast_variance=self.use_fast_variance,
        skip_nonfinite=self.skip_nonfinite)
    if not use_ra:
      write_stats(self, new, "jaxbn.nnx.SplitBatchNorm")
    return y


@fill_doc(**ADAPT, fw="nnx")
class TestTimeBatchNorm(Layer):
  r"""Test-time adapted batch norm for NNX: source statistics mixed with the batch's.

  :func:`jaxbn.adapt_batch_norm` on the state of ``flax.nnx.BatchNorm`` (``scale``, ``bias``:
  ``nnx.Param``; ``mean``, ``var``: ``nnx.BatchStat``), which
  {test_time}

  Args:
    num_features: number of features.
    {test_time_args}
    rngs: ``nnx.Rngs``.
  """

  __test__ = False  # not a pytest test class

  def __init__(self, num_features: int, *, prior: float = 16.0,
               use_running_average: bool = True, axis: int = -1, momentum: float = 0.99,
               epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, rngs: nnx.Rngs):
    init_bn_layer(self, "jaxbn.nnx.TestTimeBatchNorm", locals())

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the mixed statistics (nothing is updated)."""
    del use_running_average
    x = jnp.asarray(x)
    scale, bias = value(self.scale), value(self.bias)
    stats = jaxbn.BatchStats(self.mean[...], self.var[...], jnp.zeros((), jnp.int32))
    y, _ = jaxbn.adapt_batch_norm(
        x, stats, scale, bias, prior=self.prior, axis=self.axis, epsilon=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask,
        dtype=plain_dtype(self.dtype, x, scale, bias))
    return y


def test_time_adaptation(model: Any, prior: float = 16.0, **overrides: Any) -> Any:
  """A copy of ``model`` whose batch norms adapt to each test batch (Schneider et al., 2020).

  :func:`jaxbn.nnx.replace_batch_norm` with :class:`TestTimeBatchNorm` (state moved over,
  ``model`` unchanged), as :func:`jaxbn.linen.test_time_adaptation`.

  Args:
    model: the trained NNX model.
    prior: ``N`` (default 16); 0 uses the batch statistics only.
    **overrides: further constructor arguments of every :class:`TestTimeBatchNorm`.

  Returns:
    The adapted copy.
  """
  return replace_batch_norm(model, TestTimeBatchNorm, prior=prior, **overrides)


test_time_adaptation.__test__ = False  # not a pytest test function


@fill_doc(**ADAPT, fw="nnx")
def batch_norm_affine_filter(model: Any) -> Any:
  """TENT's parameter filter: an NNX filter matching the BN layers' ``scale``/``bias`` only.

  Matches the ``nnx.Param`` named ``scale`` or ``bias`` of the
  {with_stats} in ``model``'s graph, e.g. for ``nnx.Optimizer(model, tx, wrt=filter)`` or
  ``nnx.state(model, filter)``.

  Args:
    model: the NNX model.

  Returns:
    An NNX filter (a callable ``(path, value) -> bool``).

  Example:
    >>> import jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> only_bn = jaxbn.nnx.batch_norm_affine_filter(model)
    >>> sorted('.'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, only_bn)))
    ['layers.1.bias', 'layers.1.scale']
  """
  paths = {tuple(p) for p, node in nnx.iter_graph(model)
           if treatment("jaxbn.nnx.batch_norm_affine_filter", node, p).affine}

  def match(path, value):
    return (isinstance(value, nnx.Param) and len(path) > 0 and path[-1] in ("scale", "bias")
            and tuple(path[:-1]) in paths)

  return match


def swa_batch_stats(model: Any, averaged_params: Any, batches: Iterable, **kwargs: Any) -> Any:
  """A copy of ``model`` with weight-averaged parameters and their batch statistics.

  The NNX twin of :func:`jaxbn.linen.swa_batch_stats` (PyTorch's ``update_bn``): sets the
  ``nnx.Param`` state ``averaged_params`` (e.g. an EMA of ``nnx.state(model, nnx.Param)``) on
  a copy, then recomputes every BN layer's statistics over ``batches``
  (:func:`jaxbn.nnx.recompute_batch_stats`, whose keyword arguments it takes).

  Args:
    model: the NNX model (not modified).
    averaged_params: an ``nnx.State`` of the averaged parameters.
    batches: training batches.
    **kwargs: ``forward``, ``mode``, ``num_batches``, ``progress``, ``mesh``, ``batch_spec``.

  Returns:
    The new model.
  """
  import jaxbn.nnx  # pylint: disable=import-outside-toplevel
  work = nnx.clone(model)
  nnx.update(work, averaged_params)
  return jaxbn.nnx.recompute_batch_stats(work, batches, **kwargs)
