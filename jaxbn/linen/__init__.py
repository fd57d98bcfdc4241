"""Flax Linen layers backed by the jaxbn functional core.

Drop-in replacements for ``flax.linen`` normalization layers: same fields, same defaults, same
variables (and so the same checkpoints). Importing this module imports flax; ``import jaxbn``
alone does not.
"""

from jaxbn.linen._adapt import (SplitBatchNorm, TestTimeBatchNorm, batch_norm_affine_mask,
                                swa_batch_stats, test_time_adaptation)
from jaxbn.linen._batch_free import (EvoNormB0, EvoNormS0, FilterResponseNorm, ScaledWSConv,
                                     WSConv)
from jaxbn.linen import _batch_norm
from jaxbn.linen._batch_norm import *  # noqa: F403 (the batch norms: BatchNorm, ...)
from jaxbn.linen._freeze import freeze_batch_norm, unfreeze_batch_norm
from jaxbn.linen._frozen import FrozenBatchNorm
from jaxbn.linen._ghost import GhostBatchNorm
from jaxbn.linen._inference import (FoldPair, find_conv_bn_pairs, fold_batch_norm,
                                    fold_batch_norm_layers, folded, recompute_batch_stats)
from jaxbn.linen._norms import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from jaxbn.linen._common import register_batch_norm
from jaxbn.linen._renorm import BatchRenorm
from jaxbn.linen._surgery import replace_batch_norm, restore_batch_norm

__all__ = [
    *_batch_norm.__all__,
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    # the tools of the layers holding statistics (jaxbn._layers.registry says which, and how)
    "register_batch_norm",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "FoldPair",
    "find_conv_bn_pairs",
    "fold_batch_norm_layers",
    "folded",
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
    "restore_batch_norm",
    "test_time_adaptation",
    "batch_norm_affine_mask",
    "swa_batch_stats",
]
