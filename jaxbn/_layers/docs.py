"""Text that several public docstrings share, written once, and the decorator that fills it in
(``{name}`` marks; help() and the docs show the filled docstring)."""

from typing import Callable


def fill_doc(**parts: str) -> Callable:
  """Decorator: each ``{name}`` of the docstring becomes ``parts[name]``, in order (``fw`` last)."""
  def fill(f):
    if f.__doc__:  # None under python -OO
      for name, text in parts.items():
        f.__doc__ = f.__doc__.replace("{" + name + "}", text)
    return f
  return fill


# The Args of the recomputation options: recompute_stats, linen/nnx recompute_batch_stats.
RUN_ARGS = """mode: ``"train"`` (default) or ``"sequential"``.
    num_batches: use at most this many batches (default: all).
    progress: show a tqdm progress bar: None (default) when on a terminal, True always,
      False never.
    mesh: a ``jax.sharding.Mesh``: the step runs under ``jax.shard_map`` over it, the
      batches are sharded with ``batch_spec`` and the statistics are those of the global
      data. Needed when a layer uses ``axis_name``. Under plain ``jax.jit`` on sharded
      arrays no mesh is needed.
    batch_spec: ``PartitionSpec`` of every array of a batch (default: the leading axis over
      all mesh axes)."""

# What linen/nnx recompute_batch_stats do (``{fw}``: the framework).
RECOMPUTED = """sets each BatchNorm layer's ``mean`` and ``var`` to the exact mean and biased
  variance of its input over all the data — count-weighted across batches of different sizes
  and masks, and over all devices of ``mesh``. See :func:`jaxbn.recompute_stats` for the two
  modes (``"train"``: layer inputs as in training, one pass; ``"sequential"``: layer inputs as
  at inference, one pass per layer). The layers that train on batch statistics (kind
  ``trains`` of ``jaxbn._layers.registry``: ``jaxbn.{fw}.BatchNorm``, ``BatchRenorm``,
  ``GhostBatchNorm``, ``flax.{fw}.BatchNorm``...; see :func:`register_batch_norm`) and
  ``TestTimeBatchNorm`` (its source statistics) normalize with the statistics of the whole
  batch, whatever their ``use_running_average`` (so also renorm and ghost layers, without
  their corrections); ``mask=`` and ``unbiased_running_var`` are honoured. A
  ``FrozenBatchNorm``, and the layers whose eval is not batch norm's (kind ``running``:
  ``SplitBatchNorm``, ``EvoNormB0``, ``BatchChannelNorm``), keep their statistics and run as
  the model calls them."""

# What linen/nnx find_conv_bn_pairs keep.
FOUND_PAIRS = """the input of every batch norm whose eval is a per-feature affine map tagged (kinds
  ``trains`` and ``frozen`` of ``jaxbn._layers.registry``; not ``TestTimeBatchNorm``, whose
  statistics depend on the batch, nor the ``running`` kind, e.g. ``SplitBatchNorm``), and keeps
  the pairs where a layer's output goes straight into a batch norm and nowhere else, each
  module is called once, and the batch norm normalizes the trailing (channel) axes."""
