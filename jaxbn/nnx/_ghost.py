"""``jaxbn.nnx.GhostBatchNorm``: ghost (virtual) batch norm over :func:`jaxbn.ghost_batch_norm`."""

from __future__ import annotations

from dataclasses import field
from typing import Optional

import jax

import jaxbn
from jaxbn.nnx._batch_norm import CALL_DOC, BatchNormFields
from jaxbn.nnx._common import bn_call, doc, layer_fields, resolve_mode


@layer_fields
class GhostBatchNorm(BatchNormFields):
  r"""Ghost batch normalization (Hoffer et al., 2017) for NNX, with BatchNorm's state.

  In training each consecutive slice of ``virtual_batch_size`` examples (along
  ``batch_axis`` of the per-device batch) is normalized with its own statistics; in
  evaluation the running statistics are used, whatever the batch size. See
  :func:`jaxbn.ghost_batch_norm` for the running-statistics rule (``stats_update``) and when
  to use it. Same constructor and state as :class:`jaxbn.nnx.BatchNorm` plus
  ``virtual_batch_size``, ``batch_axis`` and ``stats_update``.

  The other constructor arguments are :class:`jaxbn.nnx.BatchNorm`'s, with their meaning,
  except that ``use_fast_variance`` defaults to False (jaxbn's stable variance) and
  ``axis_name`` synchronizes only the running-statistics update.

  Args:
    virtual_batch_size: examples per virtual batch (must divide the per-device batch).
    batch_axis: the axis cut into virtual batches (default 0).
    stats_update: ``"average"`` (one update per call) or ``"sequential"`` (one per virtual
      batch, the paper's rule).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.GhostBatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> y = layer(x)
    >>> bool(jnp.allclose(y[4:].mean(0), 0, atol=1e-5))   # each virtual batch centered
    True
  """

  _fn = "jaxbn.nnx.GhostBatchNorm"
  virtual_batch_size: int = field(kw_only=False)
  use_fast_variance: bool = False  # (jaxbn's stable variance by default)
  skip_nonfinite: bool = True
  batch_axis: int = 0
  stats_update: str = "average"

  @doc(CALL_DOC, "Normalizes ``x`` per virtual batch (training) or with the running "
       "statistics (eval).", "")
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    use_running_average = resolve_mode(self._fn, use_running_average, self.use_running_average)
    return bn_call(self, jaxbn.ghost_batch_norm, self._fn, x, use_running_average, mask,
                   virtual_batch_size=self.virtual_batch_size,
                   batch_axis=self.batch_axis, stats_update=self.stats_update)
