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

# The per-example norm layers of linen and nnx (LayerNorm, RMSNorm, GroupNorm, InstanceNorm):
# what flax's settings mean (each framework adds its own after it), and the call's docstring.
FLAX_SETTINGS = """The settings shared with flax's layer mean what they mean there: ``epsilon``
  (added to the variance, default 1e-6), ``dtype`` (of the result; default inferred as flax
  does), ``param_dtype`` (default float32), ``use_bias``/``use_scale`` (learn
  ``bias``/``scale``), ``bias_init``/``scale_init`` (zeros/ones), ``axis_name``/
  ``axis_index_groups`` (mapped axes across which the reduced axes are sharded, groups of
  them), ``use_fast_variance`` (default True, as flax, where it selects the fast ``E[x²] −
  E[x]²``; jaxbn computes the same exact one-pass statistics either way)"""

NORM_CALL = """Applies {} normalization.

    Args:
      x: the input{}.
      mask: optional bool array broadcastable to ``x``: which entries count in the statistics.

    Returns:
      The normalized input, shaped like ``x``.
    """

# The settings of linen/nnx FilterResponseNorm and EvoNormB0 (Attributes / Args entries).
FRN_SETTINGS = """epsilon: constant ``ε`` (default 1e-6, the paper's); the floor with ``learn_epsilon``.
    dtype: result dtype (default: inferred from input and parameters, as flax).
    param_dtype: parameter dtype (default float32).
    use_bias, use_scale: learn ``β`` / ``γ``.
    use_tlu: apply the thresholded linear unit ``max(y, τ)`` (default True).
    learn_epsilon: learn an extra ``|eps|`` added to ``ε`` (the paper's learned-ε variant).
    bias_init, scale_init, tau_init: initializers (zeros, ones, zeros).
    eps_init: initializer of the learned ``eps`` (default constant 1e-4)."""

B0_SETTINGS = """axis: the channel axis (default -1).
    momentum: weight of the old running value (default 0.99, flax's convention); None: the
      cumulative average over all updates (adds ``count``).
    epsilon: added to both variances (default 1e-5).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as flax's BatchNorm.
    v_init: initializer of ``v`` (default ones).
    axis_name, axis_index_groups: synchronize the batch variance over mapped axes.
    unbiased_running_var: store ``var·n/(n−1)`` (timm's running variance).
    skip_nonfinite: (jaxbn) True (default): a feature whose batch statistics are not finite
      keeps its running statistics; False: the NaN enters them (flax's behaviour)."""

# What linen/nnx find_conv_bn_pairs keep.
FOUND_PAIRS = """the input of every batch norm whose eval is a per-feature affine map tagged (kinds
  ``trains`` and ``frozen`` of ``jaxbn._layers.registry``; not ``TestTimeBatchNorm``, whose
  statistics depend on the batch, nor the ``running`` kind, e.g. ``SplitBatchNorm``), and keeps
  the pairs where a layer's output goes straight into a batch norm and nowhere else, each
  module is called once, and the batch norm normalizes the trailing (channel) axes."""

# What the linen/nnx adaptation layers and tools say alike (``{fw}``: the framework).
ADAPT = dict(
    split=""":func:`jaxbn.split_batch_norm` with ``num_domains`` rows of
  statistics{stats}: ``mean`` and ``var`` of shape ``(num_domains, C)``;
  ``scale``/``bias`` shared (``(C,)``, default) or per domain (``shared_affine=False``:
  ``(num_domains, C)``, AdvProp's auxiliary BN / domain-specific BN). The call takes
  ``domain``: an int (the whole batch) or an int array with one domain per example; otherwise
  the call and the other arguments are ``flax.{fw}.BatchNorm``'s (``use_fast_variance``
  defaults to False: jaxbn's stable variance).""",
    split_args="""num_domains: number of domains (default 2).
    shared_affine: one ``scale``/``bias`` for all domains (default True).
    skip_nonfinite: (jaxbn) True (default): a feature whose batch statistics are not finite
      keeps its running statistics; False: the NaN enters them (flax's behaviour).""",
    test_time="""it reads and never updates: ``prior`` (``N``) weighs the stored statistics
  against the ``n`` examples of the batch, ``N / (N + n)``. Usually not written in a model but
  swapped in: :func:`test_time_adaptation`. The other arguments are
  ``flax.{fw}.BatchNorm``'s.""",
    test_time_args="""prior: ``N >= 0`` (default 16): 0 uses the batch statistics only.
    use_running_average, momentum: accepted (drop-in), unused; so is the call's mode argument.""",
    with_stats="""layers holding statistics (every kind of ``jaxbn._layers.registry`` but
  ``stateless``: ``flax.{fw}.BatchNorm``, jaxbn's BatchNorm, BatchRenorm, GhostBatchNorm,
  FrozenBatchNorm, SplitBatchNorm, TestTimeBatchNorm, EvoNormB0, BatchChannelNorm, registered
  classes)""",
)
