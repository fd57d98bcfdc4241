"""Flax NNX layers backed by the jaxbn functional core.

Drop-in replacements for ``flax.nnx`` normalization layers: same constructor, same attributes
(``scale``, ``bias``, ``mean``, ``var``) and so the same state. Importing this module imports
flax; ``import jaxbn`` alone does not.
"""

from jaxbn.nnx._adapt import (SplitBatchNorm, TestTimeBatchNorm, batch_norm_affine_filter,
                              swa_batch_stats, test_time_adaptation)
from jaxbn.nnx._batch_free import (EvoNormB0, EvoNormS0, FilterResponseNorm, ScaledWSConv,
                                   WSConv)
from jaxbn.nnx import _batch_norm
from jaxbn.nnx._batch_norm import *  # noqa: F403 (the batch norms: BatchNorm, ...)
from jaxbn.nnx._common import promote_dtype, register_batch_norm
from jaxbn.nnx._freeze import freeze_batch_norm, unfreeze_batch_norm
from jaxbn.nnx._frozen import FrozenBatchNorm
from jaxbn.nnx._ghost import GhostBatchNorm
from jaxbn.nnx._inference import (FoldPair, FoldedBatchNorm, find_conv_bn_pairs,
                                  fold_batch_norm, fold_batch_norm_layers,
                                  recompute_batch_stats)
from jaxbn.nnx._norms import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from jaxbn.nnx._renorm import BatchRenorm
from jaxbn.nnx._surgery import replace_batch_norm

__all__ = [
    *_batch_norm.__all__,
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "promote_dtype",
    # the tools of the layers holding statistics (jaxbn._layers.registry says which, and how)
    "register_batch_norm",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "FoldPair",
    "FoldedBatchNorm",
    "find_conv_bn_pairs",
    "fold_batch_norm_layers",
    "recompute_batch_stats",
    # batch-independent norms and split / test-time batch norm
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "ScaledWSConv",
    "WSConv",
    "SplitBatchNorm",
    "TestTimeBatchNorm",
    # beyond one layer: model surgery, adaptation, weight averaging
    "replace_batch_norm",
    "test_time_adaptation",
    "batch_norm_affine_filter",
    "swa_batch_stats",
]
