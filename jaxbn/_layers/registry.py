"""The layer table: one row per jaxbn layer, and the one registry every layer tool reads.

A row (:class:`Layer`) says, without any framework: the class name (the same in
``jaxbn.linen`` and ``jaxbn.nnx``), the functional op it calls, its *kind*, its variables,
its own fields and its call-time overrides. The kind says what the tools of both frameworks
do with a layer (:data:`KINDS`, rendered with the rows into the docs' table by
:func:`markdown_table`): freeze (``freeze_batch_norm``), recompute (``recompute_batch_stats``),
fold (``find_conv_bn_pairs``, ``folded``), surgery (``replace_batch_norm``'s default targets,
so ``test_time_adaptation``'s) and TENT's filter (``batch_norm_affine_mask``/``_filter``).

* ``trains``: trained on batch statistics; eval is the per-feature affine map of the running
  ``mean``/``var`` (BatchNorm and its variants): frozen, recomputed, folded, replaced.
* ``frozen``: statistics fixed by design: left as it is and not recomputed; folded.
* ``adaptive``: BatchNorm's variables, never updated, normalizing with statistics that depend
  on the batch (test-time adaptation): frozen to the source statistics, recomputed, replaced;
  not folded.
* ``running``: running statistics, but an eval that is not BatchNorm's affine map (per-domain
  rows, EvoNorm-B0's variance, BN then GroupNorm): frozen by running in eval mode (no update;
  its ``scale``/``bias`` still train), its statistics left by recomputation; not folded, not
  replaced.
* ``stateless``: no statistics; no tool touches it.

A class's row is found by name (a class of ``jaxbn.linen``/``jaxbn.nnx`` named as a row,
flax's class named in a row's ``flax``) or by :func:`register` (``register_batch_norm`` of
either framework); subclasses inherit their base's. A test holds every exported class here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from jaxbn._core.adapt import adapt_batch_norm, split_batch_norm
from jaxbn._core.batch_channel_norm import batch_channel_norm
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.evonorm import evonorm_b0, evonorm_s0
from jaxbn._core.frn import filter_response_norm
from jaxbn._core.frozen import frozen_batch_norm
from jaxbn._core.ghost import ghost_batch_norm
from jaxbn._core.group_norm import group_norm, instance_norm
from jaxbn._core.layer_norm import layer_norm, rms_norm
from jaxbn._core.renorm import batch_renorm
from jaxbn._core.weight_standardization import standardize_weight


class Treatment(NamedTuple):
  """What the tools do with a layer of one kind (see the module docstring)."""

  freeze: str     # "frozen": becomes FrozenBatchNorm; "eval": runs in eval mode; "keep"
  recompute: str  # "population": statistics of its input over the data; "keep"
  fold: bool      # found by find_conv_bn_pairs and folded
  replace: bool   # a default target of replace_batch_norm (and test_time_adaptation)
  affine: bool    # its scale/bias are TENT's parameters (batch_norm_affine_mask/_filter)


KINDS = {
    "trains": Treatment("frozen", "population", True, True, True),
    "frozen": Treatment("keep", "keep", True, True, True),
    "adaptive": Treatment("frozen", "population", False, True, True),
    "running": Treatment("eval", "keep", False, False, True),
    "stateless": Treatment("keep", "keep", False, False, False),
}


class Var(NamedTuple):
  """One variable of a layer: linen ``collection/name``; nnx attribute ``name``."""

  collection: str  # "params" (nnx.Param) or "batch_stats" (nnx.BatchStat)
  name: str
  shape: str       # "C": the feature shape; "(D, C)": one row per domain; "()": a scalar
  when: str = ""   # when it exists, if not always ("use_scale", "momentum=None or debias")


_AFFINE = (Var("params", "scale", "C", "use_scale"), Var("params", "bias", "C", "use_bias"))
_STATS = (Var("batch_stats", "mean", "C"), Var("batch_stats", "var", "C"),
          Var("batch_stats", "count", "()", "momentum=None or debias"))
_BN = _STATS + _AFFINE
_CONV = (Var("params", "kernel", "conv"), Var("params", "bias", "out features", "use_bias"))


class Layer(NamedTuple):
  """One layer: its class name, functional op, kind, variables, fields and overrides.

  ``fields`` are the layer's own fields beyond those its framework's shared base gives
  (flax ``BatchNorm``'s for the BN family); ``overrides`` are the call's keyword arguments
  beyond ``x`` and ``use_running_average``; ``flax`` names flax's class of the same interface.
  """

  name: str
  core: Callable[..., Any]
  kind: str
  variables: tuple[Var, ...]
  fields: tuple[str, ...] = ()
  overrides: tuple[str, ...] = ("mask",)
  flax: Optional[str] = None
  summary: str = ""


LAYERS: list[Layer] = [
    Layer("BatchNorm", batch_norm, "trains", _BN,
          ("unbiased_running_var", "debias", "skip_nonfinite"),
          flax="BatchNorm", summary="batch normalization (Ioffe & Szegedy 2015)"),
    Layer("BatchRenorm", batch_renorm, "trains", _BN,
          ("r_max", "d_max", "r_min", "running_std"), ("mask", "r_max", "d_max"),
          summary="batch renormalization (Ioffe 2017)"),
    Layer("GhostBatchNorm", ghost_batch_norm, "trains", _BN,
          ("virtual_batch_size", "batch_axis", "stats_update"),
          summary="ghost (virtual) batch norm (Hoffer et al. 2017)"),
    Layer("BatchChannelNorm", batch_channel_norm, "running", _BN, ("num_groups", "group_size"),
          summary="batch norm, then group norm (Qiao et al. 2019)"),
    Layer("FrozenBatchNorm", frozen_batch_norm, "frozen", _BN, ("freeze_affine",),
          summary="batch norm with fixed statistics (detectron2)"),
    Layer("TestTimeBatchNorm", adapt_batch_norm, "adaptive", _BN, ("prior",),
          summary="test-time adapted batch norm (Schneider et al. 2020)"),
    Layer("SplitBatchNorm", split_batch_norm, "running",
          (Var("batch_stats", "mean", "(D, C)"), Var("batch_stats", "var", "(D, C)"),
           Var("batch_stats", "count", "(D,)", "momentum=None"),
           Var("params", "scale", "C or (D, C)", "use_scale"),
           Var("params", "bias", "C or (D, C)", "use_bias")),
          ("num_domains", "shared_affine", "skip_nonfinite"), ("domain", "mask"),
          summary="one set of statistics per domain (Chang et al. 2019; AdvProp)"),
    Layer("EvoNormB0", evonorm_b0, "running",
          (Var("batch_stats", "var", "C"), Var("batch_stats", "count", "()", "momentum=None"))
          + _AFFINE + (Var("params", "v", "C"),), ("v_init", "skip_nonfinite"),
          summary="EvoNorm-B0: batch variance and instance std (Liu et al. 2020)"),
    Layer("EvoNormS0", evonorm_s0, "stateless", _AFFINE + (Var("params", "v", "C"),),
          ("num_groups", "group_size", "v_init"), summary="EvoNorm-S0 (Liu et al. 2020)"),
    Layer("FilterResponseNorm", filter_response_norm, "stateless",
          _AFFINE + (Var("params", "tau", "C", "use_tlu"),
                     Var("params", "eps", "()", "learn_epsilon")),
          ("use_tlu", "learn_epsilon", "feature_axes"),
          summary="filter response normalization + TLU (Singh & Krishnan 2020)"),
    Layer("LayerNorm", layer_norm, "stateless", _AFFINE, ("reduction_axes", "feature_axes"),
          flax="LayerNorm", summary="layer normalization (Ba et al. 2016)"),
    Layer("RMSNorm", rms_norm, "stateless", _AFFINE[:1], ("reduction_axes", "feature_axes"),
          flax="RMSNorm", summary="RMS normalization (Zhang & Sennrich 2019)"),
    Layer("GroupNorm", group_norm, "stateless", _AFFINE,
          ("num_groups", "group_size", "reduction_axes"), flax="GroupNorm",
          summary="group normalization (Wu & He 2018)"),
    Layer("InstanceNorm", instance_norm, "stateless", _AFFINE, ("feature_axes",),
          flax="InstanceNorm", summary="instance normalization (Ulyanov et al. 2016)"),
    Layer("WSConv", standardize_weight, "stateless", _CONV, overrides=(),
          summary="weight-standardized convolution (Qiao et al. 2019)"),
    Layer("ScaledWSConv", standardize_weight, "stateless",
          _CONV + (Var("params", "gain", "out features"),), overrides=(),
          summary="scaled weight standardization (Brock et al. 2021)"),
]

_BY_NAME = {row.name: row for row in LAYERS}
_BY_FLAX = {row.flax: row for row in LAYERS if row.flax}
_REGISTERED: dict = {}  # class -> kind, from register()
_PACKAGES = ("jaxbn.linen", "jaxbn.nnx")


def register(fn: str, cls: Any, kind: str, base: type) -> type:
  """Registers a user class (of ``base``) with a kind; the body of ``register_batch_norm``."""
  if not (isinstance(cls, type) and issubclass(cls, base)):
    raise TypeError(f"{fn}: `cls` must be a {base.__module__.split('.')[0]}."
                    f"{base.__module__.split('.')[1]}.Module subclass, got {cls!r}.")
  if kind not in KINDS or kind == "stateless":
    raise ValueError(f"{fn}: `kind` must be one of {tuple(k for k in KINDS if k != 'stateless')}"
                     f", got {kind!r}.")
  _REGISTERED[cls] = kind
  return cls


def row_of(cls: type) -> Optional[Layer]:
  """The row of a jaxbn (or flax) layer class, searching its bases; None for others."""
  for c in cls.__mro__:
    module = getattr(c, "__module__", "") or ""
    if module.startswith(_PACKAGES) and c.__name__ in _BY_NAME:
      return _BY_NAME[c.__name__]
    if module.startswith("flax.") and c.__name__ in _BY_FLAX:
      return _BY_FLAX[c.__name__]
  return None


def kind_of(cls: type) -> Optional[str]:
  """The kind of a layer class: registered, or its row's; None for a class of no row."""
  for c in cls.__mro__:
    if c in _REGISTERED:
      return _REGISTERED[c]
  row = row_of(cls)
  return None if row is None else row.kind


def treatment(fn: str, module: Any, holds_stats: Callable[[], bool], where: str, what: str,
              framework: str) -> Treatment:
  """What the tool ``fn`` does with ``module``; refuses an unknown module holding statistics.

  Raises:
    TypeError: ``module``'s class has no row and is not registered, yet ``holds_stats()``.
  """
  kind = kind_of(type(module))
  if kind is not None:
    return KINDS[kind]
  if holds_stats():
    name = type(module).__name__
    raise TypeError(
        f"{fn}: the module {where} ({name}) has {what} like a batch norm, but {name} is not "
        f"registered, so this tool does not know how to treat it. Subclass "
        f"jaxbn.{framework}.BatchNorm, or register it: "
        f"jaxbn.{framework}.register_batch_norm({name}).")
  return KINDS["stateless"]


def markdown_table() -> list[str]:
  """The docs' table of layers (a Markdown table, one line per row; the user guide includes
  it, generated at build time by ``docs/_ext/jaxbn_docs.py``)."""
  lines = ["| layer (`jaxbn.linen`, `jaxbn.nnx`) | function (`jaxbn`) | kind | variables | "
           "own fields; call-time arguments | |", "|---|---|---|---|---|---|"]
  for row in LAYERS:
    names = ", ".join(f"`{v.collection}/{v.name}` {v.shape}" + (f" ({v.when})" if v.when else "")
                      for v in row.variables)
    lines.append(f"| `{row.name}` | {{py:func}}`~jaxbn.{row.core.__name__}` | {row.kind} | "
                 f"{names} | {', '.join(f'`{f}`' for f in row.fields) or '—'}; "
                 f"{', '.join(f'`{o}`' for o in row.overrides) or '—'} | {row.summary} |")
  lines += ["", "| kind | freeze | recompute | fold | replace (default) | TENT filter |",
            "|---|---|---|---|---|---|"]
  for kind, t in KINDS.items():
    lines.append(f"| {kind} | {t.freeze} | {t.recompute} | {'yes' if t.fold else 'no'} | "
                 f"{'yes' if t.replace else 'no'} | {'yes' if t.affine else 'no'} |")
  return lines
