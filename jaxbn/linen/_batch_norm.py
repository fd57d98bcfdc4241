"""``jaxbn.linen.BatchNorm``: flax.linen's BatchNorm interface over :func:`jaxbn.batch_norm`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxbn._core.batch_norm import batch_norm
from jaxbn.linen._common import bn_call


class BatchNorm(nn.Module):
  r"""Batch normalization for Linen, a drop-in replacement for ``flax.linen.BatchNorm``.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}

  Same fields, defaults, call signature and variables as ``flax.linen.BatchNorm``
  (``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``, same shapes and
  dtypes), so replacing the import changes no other line of a model and no checkpoint. The
  computation is :func:`jaxbn.batch_norm` (flax's BatchNorm is never called), which brings:

  * a closed-form fused backward pass that keeps only ``x`` and per-feature vectors (less
    temporary memory, fewer passes over the activations);
  * float32 accumulation of bf16/fp16 input without writing an up-cast copy of ``x``;
  * with ``axis_name``: one collective forward, one backward; masked batches weighted by
    their true counts across devices (flax averages per-device masked means).

  As in flax, during ``init`` the running statistics are not updated and no collective is
  issued (``axis_name`` need not be bound), and the mode comes from ``use_running_average``
  given either to the constructor or to the call (exactly one of them).

  Variance: ``use_fast_variance`` keeps flax's default ``True`` and meaning: the one-pass
  ``E[x²] − E[x]²`` in float32 (clamped at 0), so swapping the import reproduces flax's
  numbers on ordinary data. Where that formula loses its digits (some feature with
  ``mean² > 1000·var``, e.g. float32 data ``1e4 ± 1e-2``, where flax returns variance 0) jaxbn
  falls back to the exact two-pass variance (a ``lax.cond``; with ``axis_name`` the
  cross-device merge of fast mode stays one-pass, as in flax). ``use_fast_variance=False``
  selects jaxbn's stable variance everywhere (two passes fused with the float32 up-cast,
  and with ``axis_name`` an exact merge of the per-device moments): the better choice when
  inputs are not centered and statistics are synchronized. ``benchmarks/bench_model.py``
  reports what it costs in a ResNet train step.

  Differences from flax, all on the side of accuracy or stability: statistics and the
  normalization are always computed in at least float32, also with
  ``force_float32_reductions=False`` (which here only selects ``param_dtype`` for the stored
  running statistics, as in flax); the updated statistics keep the dtype they were created
  with (flax's turn from a bf16 ``param_dtype`` into float32 after the first update of float32
  input); masked statistics with ``axis_name`` are weighted by each device's count of valid
  entries; and ``momentum`` must be in ``[0, 1)`` or None.

  Attributes:
    use_running_average: if True, normalize with the stored running statistics (eval mode);
      if False with the batch statistics, and update the running ones (training mode). Give
      it here or at call time, not both.
    axis: the feature axis (or axes) of the input (default -1, channels-last).
    momentum: weight of the old value in the running averages (flax/Keras convention;
      PyTorch's ``p`` is ``1 - p``, see :func:`jaxbn.momentum_from_torch`). ``None`` (jaxbn
      extra): cumulative average over all updates (PyTorch's ``momentum=None``); this creates
      an int32 ``batch_stats/count`` variable.
    epsilon: small float added to the variance (default 1e-5).
    dtype: dtype of the result (default: inferred from the input and the parameters, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: if True, add the learned ``bias`` (β).
    use_scale: if True, multiply by the learned ``scale`` (γ).
    bias_init: initializer for ``bias`` (default zeros).
    scale_init: initializer for ``scale`` (default ones).
    axis_name: name(s) of mapped axes (``shard_map``/``pmap``/``vmap``) to synchronize the
      batch statistics over. Not needed under plain ``jax.jit`` on sharded arrays.
    axis_index_groups: synchronize within these groups of axis indices only.
    use_fast_variance: flax's ``E[x²] − E[x]²`` variance (default True, as flax); False
      selects jaxbn's stable variance.
    force_float32_reductions: True (default): running statistics stored in float32; False:
      in ``param_dtype``. Reductions always run in at least float32 in jaxbn.
    unbiased_running_var: (jaxbn extra) store PyTorch's unbiased running variance
      ``var·n/(n−1)`` instead of flax's biased one.
    debias: (jaxbn extra) zero-debiased running averages (see :func:`jaxbn.update_stats`);
      creates an int32 ``batch_stats/count`` variable.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (4,), 'var': (4,)}, 'params': {'bias': (4,), 'scale': (4,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)

    In a model, inject it as flax's examples do:
    ``norm = functools.partial(jaxbn.linen.BatchNorm, use_running_average=not train,
    momentum=0.9, axis_name='batch')``.

    Inside ``nn.scan`` (a stack of blocks with one BatchNorm each), give ``batch_stats`` a
    layer axis like ``params`` and split the param RNGs; a mutable ``batch_stats`` then
    comes back stacked, one row per layer:

    >>> import flax.linen as nn
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, h, _):
    ...     return nn.relu(jaxbn.linen.BatchNorm(use_running_average=False)(nn.Dense(4)(h))), None
    >>> Stack = nn.scan(Block, variable_axes={'params': 0, 'batch_stats': 0},
    ...                 split_rngs={'params': True}, length=3)
    >>> variables = Stack().init(jax.random.key(2), x, None)
    >>> variables['batch_stats']['BatchNorm_0']['mean'].shape
    (3, 4)
    >>> (h, _), updates = Stack().apply(variables, x, None, mutable=['batch_stats'])

    One BatchNorm shared by every step of a loop (``nn.scan`` over time, flax issue #2052)
    carries ``batch_stats`` through the loop. A carried collection must exist before the
    loop starts, so create it by broadcasting during ``init``:

    >>> class Step(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, c, x):
    ...     return c, jaxbn.linen.BatchNorm(use_running_average=False)(x)
    >>> class OverTime(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, xs):
    ...     if self.is_initializing():
    ...       kw = dict(variable_broadcast=['params', 'batch_stats'])
    ...     else:
    ...       kw = dict(variable_broadcast='params', variable_carry='batch_stats')
    ...     return nn.scan(Step, split_rngs={'params': False}, **kw)()(None, xs)[1]
    >>> xs = jnp.stack([x, 2 * x])
    >>> variables = OverTime().init(jax.random.key(3), xs)
    >>> ys, updates = OverTime().apply(variables, xs, mutable=['batch_stats'])

    ``nn.vmap`` with ``variable_axes={'params': 0, 'batch_stats': 0}`` gives each ensemble
    member its own statistics; with ``variable_axes={'params': None, 'batch_stats': None}``,
    ``axis_name=`` on ``nn.vmap`` and the same ``axis_name`` on the BatchNorm (a tuple for
    nested maps, flax issue #3319), one set of statistics over the whole mapped batch.
  """

  use_running_average: Optional[bool] = None
  axis: Axes = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  # jaxbn extras (flax has no such fields).
  unbiased_running_var: bool = False
  debias: bool = False

  @nn.compact
  def __call__(
      self,
      x: jax.typing.ArrayLike,
      use_running_average: Optional[bool] = None,
      *,
      mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    During ``init`` the running statistics are not updated and ``axis_name`` is not used,
    so the init input need not match the data and the axis name need not be bound.

    Args:
      x: the input, feature axis (or axes) ``self.axis``.
      use_running_average: if True, use the stored statistics (eval); if False, the batch
        statistics, updating the stored ones (the ``batch_stats`` collection must be
        mutable). Give it here or to the constructor, not both.
      mask: optional bool array broadcastable to ``x``: which entries count in the batch
        statistics.

    Returns:
      The normalized input, shaped like ``x``.

    Raises:
      ValueError: ``use_running_average`` given neither or both at construction and call
        time (flax's message), ``x``'s features do not match the existing variables, or an
        invalid ``axis``/``epsilon``/``momentum``/``mask``/unbound ``axis_name``.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    return bn_call(self, batch_norm, "jaxbn.linen.BatchNorm", x, use_running_average, mask)
