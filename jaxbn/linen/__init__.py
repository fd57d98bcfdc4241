"""Flax Linen layers backed by the jaxbn functional core.

Drop-in replacements for ``flax.linen`` normalization layers: same fields, same defaults, same
variables (and so the same checkpoints). Importing this module imports flax; ``import jaxbn``
alone does not.
"""

from jaxbn.linen._batch_norm import BatchNorm

__all__ = [
    "BatchNorm",
]
