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


# The BN-family layers' docstrings (jaxbn.linen/jaxbn.nnx BatchNorm, BatchRenorm, GhostBatchNorm,
# FrozenBatchNorm, BatchChannelNorm), written once: ``bn_doc(fw)`` fills the texts, then the
# words of framework ``fw`` (the ``{word}`` marks inside the texts).
BN_MATH = r""".. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
     \text{running} \leftarrow m \cdot \text{running} + (1 - m) \cdot \text{batch}"""

BAD_DATA = """``momentum`` outside ``[0, 1]`` is refused; bad data (see
  :func:`jaxbn.batch_norm`): a feature whose batch statistics are not finite keeps its
  running statistics (``skip_nonfinite``), and a training call with one value per feature
  raises a ``ValueError``"""

# BatchNorm's entries from ``momentum`` to ``use_fast_variance``, then jaxbn's extras.
BN_ARGS = """momentum: weight of the old value in the running averages (flax convention, PyTorch's
      is ``1 - momentum``); 1 keeps them as they are; None (jaxbn) a cumulative average,
      which adds an int32 {count}.
    epsilon: added to the variance (default 1e-5).
    dtype: output dtype (default: inferred from the input and parameters, as flax).
    param_dtype: dtype of ``scale`` and ``bias`` (default float32).
    use_bias: add the learned ``bias``.
    use_scale: multiply by the learned ``scale``.
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis name(s) to synchronize the statistics over (``shard_map``,
      ``pmap``, ``vmap``); not needed under ``jax.jit`` on sharded arrays.
    axis_index_groups: synchronize within these groups of axis indices only.
    use_fast_variance: flax's one-pass ``E[x²] − E[x]²`` (default), guarded by an exact
      fallback; False: jaxbn's stable variance."""

BN_EXTRAS = """unbiased_running_var: (jaxbn) store PyTorch's unbiased running variance.
    debias: (jaxbn) zero-debiased running averages; adds an int32 {count}.
    skip_nonfinite: (jaxbn) True (default): a feature whose batch statistics are not finite
      (a NaN/Inf in the batch) keeps its running statistics, the others update; False:
      flax's behaviour (the NaN enters them)."""

STABLE = """The other {fields} are :class:`jaxbn.{fw}.BatchNorm`'s, with their meaning,
  except that ``use_fast_variance`` defaults to False (jaxbn's stable variance)"""

RENORM = r""".. math::
     y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta,
     \quad r = \operatorname{clip}\Big(\frac{\sigma_B}{\sigma}\Big),
     \ d = \operatorname{clip}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

  with ``r``, ``d`` held constant in the gradient (see :func:`jaxbn.batch_renorm` for the
  math, the running-statistics rule and when to use it). Same {fields} as
  :class:`jaxbn.{fw}.BatchNorm` plus the clipping bounds, and the *same {variables}*
  ({names}),
  so a batch norm checkpoint loads into it unchanged and inference is identical to batch
  norm's.

  ``r_max`` and ``d_max`` can be given at call time as (traced) arrays, which overrides
  ``self.r_max``/``self.d_max`` without recompiling: this is how to ramp them with
  :func:`jaxbn.renorm_schedule`.

  {stable}.

  {args}:
    r_max: upper clip of ``r`` (default 3). Call-time ``r_max`` overrides it.
    d_max: clip of ``|d|`` (default 5). Call-time ``d_max`` overrides it.
    r_min: lower clip of ``r`` (default ``1 / r_max``).
    running_std: average ``sqrt(var_B + ε)`` (paper, Keras) instead of the variance."""

GHOST = """In training each consecutive slice of ``virtual_batch_size`` examples (along
  ``batch_axis`` of the per-device batch) is normalized with its own statistics; evaluation
  uses the running statistics like batch norm, whatever the batch size. See
  :func:`jaxbn.ghost_batch_norm` for the running-statistics rule (``stats_update``) and when
  to use it. Same {fields} as :class:`jaxbn.{fw}.BatchNorm`
  plus ``virtual_batch_size``, ``batch_axis`` and ``stats_update``, and the same {variables}
  (a batch norm checkpoint loads unchanged).

  {stable};
  ``axis_name`` synchronizes only the running-statistics update.

  {args}:
    virtual_batch_size: examples per virtual batch (must divide the per-device batch).
    batch_axis: the axis cut into virtual batches (default 0).
    stats_update: ``"average"`` (one update per call) or ``"sequential"`` (one per virtual
      batch, the paper's rule)."""

FROZEN = r""".. math::
     y = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}\, \gamma + \beta

  Always normalizes with the stored running statistics, never updates them, and (with
  ``freeze_affine=True``, the default) stops the gradient of ``scale`` and ``bias`` too, so
  the layer is a fixed affine map of ``x`` in training and in evaluation. Same
  {fields} and {variables} as :class:`jaxbn.{fw}.BatchNorm` (and
  ``flax.{fw}.BatchNorm``), so it loads their checkpoints; ``use_running_average`` and the
  call's ``mask`` are accepted and ignored, so call sites need not change. See
  :func:`jaxbn.frozen_batch_norm` for when to use it, and :func:`freeze_batch_norm` to convert
  a whole model. ``scale`` and ``bias`` stay {params}, so exclude them from
  weight decay if they must not move at all.

  The other {fields} are :class:`jaxbn.{fw}.BatchNorm`'s; ``use_running_average``,
  ``momentum``, ``axis_name``, ``axis_index_groups``, ``use_fast_variance`` and
  ``unbiased_running_var`` are accepted and unused (no statistics are
  computed){frozen_skip}.

  {args}:
    freeze_affine: also stop the gradient of ``scale`` and ``bias`` (default True)."""

BCN = r""".. math::
     y = \gamma\,\mathrm{GN}\Big(\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\Big) + \beta

  :func:`jaxbn.batch_channel_norm`: the batch norm (running statistics as
  :class:`BatchNorm`'s, no affine) then a group norm per example over ``num_groups`` channel
  groups with ``scale``/``bias``. :class:`BatchNorm`'s {fields}, call and {variables}
  ({names}),
  plus the groups; channels last. Its eval is not an affine map: the tools run it in eval
  mode (freeze), leave its statistics (recompute) and do not fold it (kind ``running``).

  {args}:
    num_groups: channel groups (default 32); None with ``group_size``.
    group_size: channels per group instead of ``num_groups``."""

# The calls' Args, then their Returns and Raises (FrozenBatchNorm's: FROZEN_CALL).
CALL_ARGS = """Args:
      x: the input, feature axis {x_axis}.
      use_running_average: {call_mode}
      mask: optional bool array broadcastable to ``x``: which entries count in the batch
        statistics."""

CALL_END = """Returns:
      The normalized input, shaped like ``x``.

    Raises:
      ValueError: {raises}"""

FROZEN_CALL = """Args:
      x: the input, feature axis {x_axis}.
      use_running_average: ignored (accepted so that BatchNorm call sites work unchanged).
      mask: ignored (no statistics are computed).
      **ignored: other call arguments of the layer this one replaces (e.g. BatchRenorm's
        ``r_max``/``d_max``), ignored.

    Returns:
      The normalized input, shaped like ``x``."""

# Each framework's words in the texts above.
WORDS = {
    "linen": dict(
        args="Attributes", fields="fields", count="``batch_stats/count``",
        variables="variables", params="in the ``params`` collection",
        names="``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``",
        frozen_skip=", and so is ``skip_nonfinite``", x_axis="(or axes) ``self.axis``",
        call_mode="""if True, use the stored statistics (eval); if False, the batch
        statistics, updating the stored ones (the ``batch_stats`` collection must be
        mutable). Give it here or to the constructor, not both.""",
        raises="""``use_running_average`` given neither or both times (flax's message
        first), features that do not match the variables, or an invalid argument."""),
    "nnx": dict(
        args="Args", fields="constructor arguments", count="``count`` ``nnx.BatchStat``",
        variables="state", params="``nnx.Param`` (same state)",
        names="``scale``, ``bias``: ``nnx.Param``; ``mean``, ``var``: ``nnx.BatchStat``",
        frozen_skip="; it has no ``skip_nonfinite``",
        x_axis="``self.axis`` of size ``num_features``",
        call_mode="overrides the attribute of the same name for this call.",
        raises="""no mode is set (flax's message first), ``x`` has the wrong number of
        features, or an invalid argument."""),
}


def bn_doc(fw: str) -> Callable:
  """Class decorator: ``fill_doc`` with the BN-family texts above, then ``WORDS[fw]`` and
  ``fw``, on the class and on its own ``__call__``."""
  fill = fill_doc(bn_math=BN_MATH, bad_data=BAD_DATA, bn_args=BN_ARGS, bn_extras=BN_EXTRAS,
                  renorm=RENORM, ghost=GHOST, frozen=FROZEN, bcn=BCN, stable=STABLE,
                  call_args=CALL_ARGS, call_end=CALL_END, frozen_call=FROZEN_CALL,
                  **WORDS[fw], fw=fw)

  def fill_class(cls: type) -> type:
    if "__call__" in vars(cls):
      fill(cls.__call__)
    return fill(cls)
  return fill_class


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
FRN_SETTINGS = """epsilon: constant ``ε`` (default 1e-6, the paper's); the floor with
      ``learn_epsilon``.
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
  defaults to False: jaxbn's stable variance); ``momentum=None`` (a cumulative average per
  domain) adds an int32 ``count`` of shape ``(num_domains,)``.""",
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
