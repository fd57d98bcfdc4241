"""jaxbn: Batch Normalization and its relatives for JAX, as pure functions of explicit state.

The functional core lives here (it imports JAX only, never flax). Flax layers are in
``jaxbn.linen`` and ``jaxbn.nnx``; multi-device helpers in ``jaxbn.parallel``.
"""

from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.ema import momentum_from_torch, update_stats
from jaxbn._core.fold import eval_affine, fold_batch_norm
from jaxbn._core.frozen import frozen_batch_norm
from jaxbn._core.ghost import ghost_batch_norm
from jaxbn._core.moments import moments
from jaxbn._core.normalize import normalize
from jaxbn._core.precise import (PopulationMoments, init_population_moments, merge_moments,
                                 population_stats, recompute_stats)
from jaxbn._core.group_norm import group_norm, instance_norm
from jaxbn._core.layer_norm import layer_norm, rms_norm
from jaxbn._core.renorm import batch_renorm, renorm_schedule
from jaxbn._core.torch_interop import (BatchNormVariables, from_torch_batch_norm,
                                       kernel_from_torch, kernel_to_torch,
                                       to_torch_batch_norm, torch_batch_norm_config)
from jaxbn._core.types import BatchStats, Moments, init_stats

__version__ = "0.1.0"

__all__ = [
    # inference and interop (precise statistics, folding, PyTorch)
    "BatchNormVariables",
    "PopulationMoments",
    "eval_affine",
    "fold_batch_norm",
    "from_torch_batch_norm",
    "init_population_moments",
    "kernel_from_torch",
    "kernel_to_torch",
    "merge_moments",
    "population_stats",
    "recompute_stats",
    "to_torch_batch_norm",
    "torch_batch_norm_config",
    # core
    "BatchStats",
    "Moments",
    "batch_norm",
    "batch_renorm",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "group_norm",
    "init_stats",
    "instance_norm",
    "layer_norm",
    "moments",
    "momentum_from_torch",
    "normalize",
    "renorm_schedule",
    "rms_norm",
    "update_stats",
]
