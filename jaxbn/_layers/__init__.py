"""The framework-free layer level, between the functional core and the Flax wrappers.

``registry``: one row per layer (name, functional op, kind, variables, fields, call-time
overrides) and the one registry that the freeze / recompute / fold / surgery / adaptation tools
of ``jaxbn.linen`` and ``jaxbn.nnx`` read. ``recompute``: the recomputation driver (a recorder
that stands in for the BN layers, the pass over the batches, sharding). ``fold_tags``: the
jaxpr tags that find Conv/Dense -> BN pairs. It imports JAX and ``jaxbn._core`` only.
"""
