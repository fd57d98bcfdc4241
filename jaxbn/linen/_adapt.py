"""Adaptation tools for Linen: split (per-domain) BN, test-time BN adaptation, TENT's parameter
mask, and batch statistics for weight-averaged (EMA/SWA) parameters."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxbn
from jaxbn._core.checks import one_value_per_feature_ok
from jaxbn._layers.docs import ADAPT, fill_doc
from jaxbn.linen._common import BatchStatsFields, bn_variables, treatment


class _DomainFields(nn.Module):
  """SplitBatchNorm's first fields."""

  num_domains: int = 2
  shared_affine: bool = True


@fill_doc(**ADAPT, stats=" (``batch_stats``)", fw="linen")
class SplitBatchNorm(BatchStatsFields, _DomainFields):
  r"""Split (per-domain) batch norm for Linen: one set of running statistics per domain.

  {split}

  Attributes:
    {split_args}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.SplitBatchNorm(num_domains=2, use_running_average=False)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, upd = bn.apply(variables, x, domain=jnp.array([0, 0, 1, 1]),
    ...                   mutable=['batch_stats'])
    >>> upd['batch_stats']['mean'].shape
    (2, 2)
  """

  use_fast_variance: bool = False
  skip_nonfinite: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               domain: Any = 0, mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the statistics of ``domain`` (per batch or per example)."""
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    x = jnp.asarray(x)
    c = x.shape[self.axis]
    rows = (self.num_domains, c)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(rows, jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones(rows, jnp.float32))
    pshape = (c,) if self.shared_affine else rows

    def init_rows(fn):
      if self.shared_affine:
        return fn
      return lambda key, shape, dtype: jnp.broadcast_to(fn(key, shape[1:], dtype), shape)

    scale = (self.param("scale", init_rows(self.scale_init), pshape, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", init_rows(self.bias_init), pshape, self.param_dtype)
            if self.use_bias else None)
    init = self.is_initializing()
    counts = lambda: jnp.zeros((self.num_domains,), jnp.int32)
    count = self.variable("batch_stats", "count", counts) if self.momentum is None else None
    stats = jaxbn.BatchStats(mean.value, var.value, counts() if count is None else count.value)
    dtype = self.dtype or jnp.result_type(x, *[p for p in (scale, bias) if p is not None])
    with one_value_per_feature_ok(init):  # a one-row init batch creates the variables
      y, new = jaxbn.split_batch_norm(
          x, stats, scale, bias, domain=domain, training=not use_running_average,
          axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
          axis_name=None if init else self.axis_name,
          axis_index_groups=None if init else self.axis_index_groups, mask=mask, dtype=dtype,
          use_fast_variance=self.use_fast_variance, skip_nonfinite=self.skip_nonfinite)
    if not use_running_average and not init:
      mean.value, var.value = new.mean, new.var
      if count is not None:
        count.value = new.count
    return y


class _PriorField(nn.Module):
  """TestTimeBatchNorm's first field."""

  prior: float = 16.0


@fill_doc(**ADAPT, fw="linen")
class TestTimeBatchNorm(BatchStatsFields, _PriorField):
  r"""Batch norm that normalizes with source statistics mixed with the batch's (Schneider et al.).

  :func:`jaxbn.adapt_batch_norm` on the variables of ``flax.linen.BatchNorm``
  (``params/scale``, ``params/bias``, ``batch_stats/mean``, ``var``), which
  {test_time}

  Attributes:
    {test_time_args}
  """

  __test__ = False  # not a pytest test class

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x`` with the mixed statistics (nothing is updated)."""
    del use_running_average
    x, axis, stats, scale, bias, dtype, _ = bn_variables(self, x, "jaxbn.linen.TestTimeBatchNorm")
    init = self.is_initializing()
    y, _ = jaxbn.adapt_batch_norm(
        x, stats, scale, bias, prior=self.prior, axis=axis, epsilon=self.epsilon,
        axis_name=None if init else self.axis_name,
        axis_index_groups=None if init else self.axis_index_groups, mask=mask, dtype=dtype)
    return y


def test_time_adaptation(module: nn.Module, prior: float = 16.0, **overrides: Any) -> nn.Module:
  """``module`` with every batch norm adapted to each test batch (Schneider et al., 2020).

  :func:`jaxbn.linen.replace_batch_norm` with :class:`TestTimeBatchNorm`: each layer with
  BatchNorm's variables (its default targets: ``flax.linen.BatchNorm``, jaxbn's BatchNorm,
  BatchRenorm, GhostBatchNorm, FrozenBatchNorm; not SplitBatchNorm) normalizes with its running
  statistics mixed with the statistics of the current batch, weight ``N / (N + n)``;
  variables unchanged. ``prior=0`` is "BN adapt" with the target statistics only; the
  entropy-minimization step of TENT trains the BN affine parameters
  (:func:`batch_norm_affine_mask`) of this adapted model.

  Args:
    module: the trained model (unbound), e.g. someone else's.
    prior: ``N`` (default 16).
    **overrides: further fields of every :class:`TestTimeBatchNorm` (e.g. ``axis_name``).

  Returns:
    A Linen module with the variables of ``module``.
  """
  from jaxbn.linen._surgery import replace_batch_norm  # pylint: disable=import-outside-toplevel
  return replace_batch_norm(module, TestTimeBatchNorm, prior=prior, **overrides)


test_time_adaptation.__test__ = False  # not a pytest test function


@fill_doc(**ADAPT, fw="linen")
def batch_norm_affine_mask(apply_fn: Callable[..., Any], variables: Any, *args: Any,
                           **kwargs: Any) -> Any:
  """TENT's parameter filter: True for the ``scale``/``bias`` of batch-norm layers only.

  Traces ``apply_fn(variables, *args, **kwargs)`` abstractly (``jax.eval_shape``, nothing
  computed) and records which of the
  {with_stats} the call runs, so it works on models you do not own. Use it with ``optax.masked``
  or ``optax.multi_transform`` so that only these parameters train (Wang et al., 2021: "fully
  test-time adaptation by entropy minimization").

  Args:
    apply_fn: e.g. ``model.apply`` (called as ``apply_fn(variables, *args, **kwargs)``).
    variables: the model's variables (a dict with ``params``).
    *args: example inputs (shapes and dtypes are what matter).
    **kwargs: keyword arguments of the call (e.g. ``train=False``).

  Returns:
    A tree like ``variables['params']`` of Python bools.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
    >>> variables = Net().init(jax.random.key(0), jnp.ones((2, 2)))
    >>> mask = jaxbn.linen.batch_norm_affine_mask(Net().apply, variables, jnp.ones((2, 2)))
    >>> mask
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Dense_0': {'bias': False, 'kernel': False}}
    >>> tx = optax.multi_transform({True: optax.adam(1e-3), False: optax.set_to_zero()}, mask)
  """
  paths = set()

  def record(next_fun, a, kw, context):
    if (context.method_name == "__call__"
        and treatment("batch_norm_affine_mask", context.module).affine):
      paths.add(tuple(context.module.path))
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: apply_fn(v, *args, **kwargs), variables)
  if not paths:
    raise ValueError("batch_norm_affine_mask: the call ran no batch-norm layer; pass the "
                     "model's apply function and an example input.")

  def leaf(path, _):
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    return keys[-1] in ("scale", "bias") and keys[:-1] in paths

  return jax.tree_util.tree_map_with_path(leaf, dict(variables["params"]))


def swa_batch_stats(apply_fn: Any, variables: Any, averaged_params: Any, batches: Iterable,
                    **kwargs: Any) -> Any:
  """Batch statistics for weight-averaged parameters (EMA, SWA): PyTorch's ``update_bn``.

  Averaged weights were never used to compute the running statistics stored next to them
  (those belong to the last trained weights), so an averaged model must recompute them:
  this returns ``{**variables, 'params': averaged_params}`` with every BN layer's
  ``batch_stats`` recomputed as exact population statistics over ``batches``
  (:func:`jaxbn.linen.recompute_batch_stats`, whose keyword arguments it takes).

  Args:
    apply_fn: ``apply_fn(variables, batch)`` in inference mode, or the Module.
    variables: the model's variables (``batch_stats`` and anything else kept).
    averaged_params: the averaged ``params`` (e.g. ``optax.ema`` or a running mean of
      checkpoints).
    batches: training batches (no augmentation needed).
    **kwargs: ``mode``, ``num_batches``, ``progress``, ``mesh``, ``batch_spec``.

  Returns:
    New variables with ``averaged_params`` and their batch statistics.
  """
  import jaxbn.linen  # pylint: disable=import-outside-toplevel
  return jaxbn.linen.recompute_batch_stats(apply_fn, {**variables, "params": averaged_params},
                                           batches, **kwargs)
