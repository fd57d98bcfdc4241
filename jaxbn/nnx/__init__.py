"""Flax NNX layers backed by the jaxbn functional core.

Drop-in replacements for ``flax.nnx`` normalization layers: same constructor, same attributes
(``scale``, ``bias``, ``mean``, ``var``) and so the same state. Importing this module imports
flax; ``import jaxbn`` alone does not.
"""

from jaxbn.nnx._batch_norm import BatchNorm
from jaxbn.nnx._frozen import FrozenBatchNorm, freeze_batch_norm, unfreeze_batch_norm
from jaxbn.nnx._ghost import GhostBatchNorm
from jaxbn.nnx._norms import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from jaxbn.nnx._renorm import BatchRenorm
from jaxbn.nnx._inference import (FoldPair, FoldedBatchNorm, find_conv_bn_pairs,
                                  fold_batch_norm, recompute_batch_stats)

__all__ = [
    "BatchNorm",
    # variants (jaxbn.nnx._renorm, _ghost, _norms, _frozen)
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    # after training: recomputed statistics and folding (jaxbn.nnx._inference)
    "FoldPair",
    "FoldedBatchNorm",
    "find_conv_bn_pairs",
    "fold_batch_norm",
    "recompute_batch_stats",
]
