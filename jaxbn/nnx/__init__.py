"""Flax NNX layers backed by the jaxbn functional core.

Drop-in replacements for ``flax.nnx`` normalization layers: same constructor, same attributes
(``scale``, ``bias``, ``mean``, ``var``) and so the same state. Importing this module imports
flax; ``import jaxbn`` alone does not.
"""

from jaxbn.nnx._batch_norm import BatchNorm

__all__ = [
    "BatchNorm",
]
