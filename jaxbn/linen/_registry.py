"""The batch-norm family of Linen layers: the one list that the frozen, recompute and fold
tools read.

Every class here normalizes at inference with ``batch_stats/mean`` and ``batch_stats/var``
(``(x - mean) / sqrt(var + epsilon) * scale + bias``) and has flax ``BatchNorm``'s fields
(``axis``, ``epsilon``, ``dtype``, ``use_scale``, ``use_bias``, ``axis_name``,
``axis_index_groups``). Its *kind* says what the tools do with it:

* ``"trains"`` (BatchNorm, BatchRenorm, GhostBatchNorm, ``flax.linen.BatchNorm``): trains
  on batch statistics. :func:`freeze_batch_norm` freezes it; :func:`recompute_batch_stats`
  sets its statistics to the population statistics of its input (in ``mode="train"`` it
  normalizes with the statistics of the whole batch, for all four classes);
  :func:`find_conv_bn_pairs` and :func:`fold_batch_norm_layers` fold it.
* ``"frozen"`` (FrozenBatchNorm): its statistics are fixed by design. It is left as it is by
  freezing and by recomputation (it runs as itself, as it did in training) and it is folded.

A module that is not registered but has ``batch_stats/mean`` and ``batch_stats/var`` is
refused by every tool with a ``TypeError`` (never skipped silently):
:func:`register_batch_norm` adds it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from flax import linen as nn

from jaxbn.linen._batch_norm import BatchNorm
from jaxbn.linen._frozen import FrozenBatchNorm
from jaxbn.linen._ghost import GhostBatchNorm
from jaxbn.linen._renorm import BatchRenorm

KINDS = ("trains", "frozen")


class Entry(NamedTuple):
  """A registered class and its kind (see the module docstring)."""

  cls: type
  kind: str


_ENTRIES: list[Entry] = [
    Entry(FrozenBatchNorm, "frozen"),
    Entry(BatchNorm, "trains"),
    Entry(BatchRenorm, "trains"),
    Entry(GhostBatchNorm, "trains"),
    Entry(nn.BatchNorm, "trains"),
]


def register_batch_norm(cls: type, *, kind: str = "trains") -> type:
  """Registers a Linen batch-norm class with the frozen, recompute and fold tools.

  The class must have flax ``BatchNorm``'s fields and variables, normalize at inference
  with its running statistics, and take the input as the first argument of ``__call__``.
  Subclasses of a registered class need no registration.

  Args:
    cls: a ``flax.linen.Module`` subclass.
    kind: ``"trains"`` (trained on batch statistics: frozen, recomputed and folded by the
      tools) or ``"frozen"`` (fixed statistics: only folded).

  Returns:
    ``cls`` (so this can decorate a class definition).

  Raises:
    TypeError: ``cls`` is not a Linen module class.
    ValueError: an unknown ``kind``.

  Example:
    >>> import jaxbn.linen
    >>> @jaxbn.linen.register_batch_norm
    ... class MyBatchNorm(jaxbn.linen.BatchNorm):   # (a subclass would not need it)
    ...   pass
  """
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise TypeError(f"jaxbn.linen.register_batch_norm: `cls` must be a flax.linen.Module "
                    f"subclass, got {cls!r}.")
  if kind not in KINDS:
    raise ValueError(f"jaxbn.linen.register_batch_norm: `kind` must be one of {KINDS}, got "
                     f"{kind!r}.")
  _ENTRIES.insert(0, Entry(cls, kind))
  return cls


def registered() -> tuple[Entry, ...]:
  """The registered classes, most recently registered first."""
  return tuple(_ENTRIES)


def kind_of(fn: str, module: Any) -> Optional[str]:
  """The registered kind of a bound ``module``; None for a module that is no batch norm.

  Raises:
    TypeError: ``module`` is not registered but holds ``batch_stats/mean`` and ``var``.
  """
  for entry in _ENTRIES:
    if isinstance(module, entry.cls):
      return entry.kind
  if (isinstance(module, nn.Module) and module.scope is not None
      and module.has_variable("batch_stats", "mean")
      and module.has_variable("batch_stats", "var")):
    name = type(module).__name__
    raise TypeError(
        f"{fn}: the module {'/'.join(module.path)} ({name}) has batch_stats 'mean' and 'var' "
        f"like a batch norm, but {name} is not registered, so this tool does not know how to "
        f"treat it. Subclass jaxbn.linen.BatchNorm, or register it: "
        f"jaxbn.linen.register_batch_norm({name}).")
  return None
