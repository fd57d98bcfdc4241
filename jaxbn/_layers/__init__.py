"""The framework-free layer level, between the functional core and the Flax wrappers: the one
registry of layers that the tools of ``jaxbn.linen`` and ``jaxbn.nnx`` read (``registry``), the
recomputation driver (``recompute``), the fold tags (``fold_tags``) and what both frameworks'
layers share (``common``, ``docs``). It imports JAX and ``jaxbn._core`` only.
"""
