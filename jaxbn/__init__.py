"""jaxbn: Batch Normalization and its relatives for JAX, as pure functions of explicit state.

The functional core lives here (it imports JAX only, never flax). Flax layers are in
``jaxbn.linen`` and ``jaxbn.nnx``; multi-device helpers in ``jaxbn.parallel``.
"""

from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.ema import momentum_from_torch, update_stats
from jaxbn._core.moments import moments
from jaxbn._core.normalize import normalize
from jaxbn._core.types import BatchStats, Moments, init_stats

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "Moments",
    "batch_norm",
    "init_stats",
    "moments",
    "momentum_from_torch",
    "normalize",
    "update_stats",
]
