"""Frozen batch normalization: fixed statistics (and affine), for fine-tuning."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._core import checks
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.docstrings import fill_args
from jaxbn._core.normalize import normalize
from jaxbn._core.types import BatchStats


def frozen_batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    axis: checks.Axes = -1,
    epsilon: ArrayLike = 1e-5,
    dtype: Optional[DTypeLike] = None,
    freeze_affine: bool = True,
) -> jax.Array:
  r"""Batch norm with frozen statistics: an affine map, the same in training and inference.

  .. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  The running statistics are never updated and get no gradient; with ``freeze_affine=True``
  (default, detectron2's ``FrozenBatchNorm2d``) ``scale`` and ``bias`` get none either
  (``stop_gradient``), so only ``x`` is differentiated. ``freeze_affine=False`` keeps
  ``γ``/``β`` trainable on top of fixed statistics. One fused elementwise pass, no reduction
  and no communication, so it costs what inference BN costs.

  When to use: fine-tuning a pretrained batch-norm network (detection, segmentation) with
  batches too small to re-estimate statistics, or when train and eval must behave the same;
  it keeps the pretrained statistics instead of replacing them by noisy ones. To convert
  every BatchNorm of a model, see ``jaxbn.linen.freeze_batch_norm`` and
  ``jaxbn.nnx.freeze_batch_norm``.

  With ``freeze_affine=True`` the parameters' gradients are zero but an optimizer with weight
  decay would still shrink them: exclude them from the optimizer (e.g. ``optax.masked``).

  Args:
    stats: the frozen :class:`BatchStats` (``count`` is ignored).
    dtype: output dtype (default ``x.dtype``); arithmetic runs in at least float32.
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True).

  Returns:
    The normalized array, shaped like ``x``.

  Raises:
    ValueError / TypeError: as :func:`jaxbn.batch_norm` (non-float ``x``, bad ``axis``,
      ``stats``/``scale``/``bias`` that do not match the features, ``epsilon <= 0``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> stats = jaxbn.BatchStats(jnp.array([1.0, 2.0]), jnp.array([4.0, 9.0]), jnp.array(0))
    >>> x = jnp.array([[3.0, 5.0]])
    >>> jaxbn.frozen_batch_norm(x, stats, epsilon=1e-12).tolist()
    [[1.0, 1.0]]
    >>> g = jax.grad(lambda s: jaxbn.frozen_batch_norm(x, stats, s).sum())(jnp.ones(2))
    >>> g.tolist()                           # scale frozen by default
    [0.0, 0.0]

  References:
    Wu, Kirillov, Massa, Lo & Girshick, detectron2 (2019), ``FrozenBatchNorm2d``.
  """
  fn = "frozen_batch_norm"
  x, _, _ = checks.validate_bn_args(fn, x, stats, scale, bias, axis, epsilon)
  sg = lax.stop_gradient
  if freeze_affine:
    scale = None if scale is None else sg(jnp.asarray(scale))
    bias = None if bias is None else sg(jnp.asarray(bias))
  return normalize(x, sg(stats.mean), sg(stats.var), scale, bias, axis=axis,
                   epsilon=epsilon, dtype=dtype)


fill_args(batch_norm, frozen_batch_norm)
