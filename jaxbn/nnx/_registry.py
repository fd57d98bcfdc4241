"""The batch-norm family of NNX layers: the one list that the frozen, recompute and fold
tools read.

Every class here normalizes at inference with its ``mean`` and ``var`` ``nnx.BatchStat``
(``(x - mean) / sqrt(var + epsilon) * scale + bias``) and has flax ``BatchNorm``'s
attributes (``mean``, ``var``, ``scale``, ``bias``, ``num_features``, ``axis``, ``epsilon``,
``dtype``, ``axis_name``, ``axis_index_groups``). Its *kind* says what the tools do with it:

* ``"trains"`` (BatchNorm, BatchRenorm, GhostBatchNorm, ``flax.nnx.BatchNorm``): trains
  on batch statistics. :func:`freeze_batch_norm` freezes it; :func:`recompute_batch_stats`
  sets its statistics to the population statistics of its input (in ``mode="train"`` it
  normalizes with the statistics of the whole batch, for all four classes);
  :func:`find_conv_bn_pairs` and :func:`fold_batch_norm_layers` fold it.
* ``"frozen"`` (FrozenBatchNorm): its statistics are fixed by design. It is left as it is by
  freezing and by recomputation (it runs as itself, as it did in training) and it is folded.

A module that is not registered but has ``mean`` and ``var`` ``nnx.BatchStat`` attributes is
refused by every tool with a ``TypeError`` (never skipped silently):
:func:`register_batch_norm` adds it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from flax import nnx

from jaxbn.nnx._batch_norm import BatchNorm
from jaxbn.nnx._frozen import FrozenBatchNorm
from jaxbn.nnx._ghost import GhostBatchNorm
from jaxbn.nnx._renorm import BatchRenorm

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
    Entry(nnx.BatchNorm, "trains"),
]


def register_batch_norm(cls: type, *, kind: str = "trains") -> type:
  """Registers a NNX batch-norm class with the frozen, recompute and fold tools.

  The class must have flax ``BatchNorm``'s attributes and state, normalize at inference with
  its running statistics, and take the input as the first argument of ``__call__``.
  Subclasses of a registered class need no registration.

  Args:
    cls: a ``flax.nnx.Module`` subclass.
    kind: ``"trains"`` (trained on batch statistics: frozen, recomputed and folded by the
      tools) or ``"frozen"`` (fixed statistics: only folded).

  Returns:
    ``cls`` (so this can decorate a class definition).

  Raises:
    TypeError: ``cls`` is not a NNX module class.
    ValueError: an unknown ``kind``.

  Example:
    >>> import jaxbn.nnx
    >>> @jaxbn.nnx.register_batch_norm
    ... class MyBatchNorm(jaxbn.nnx.BatchNorm):   # (a subclass would not need it)
    ...   pass
  """
  if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
    raise TypeError(f"jaxbn.nnx.register_batch_norm: `cls` must be a flax.nnx.Module "
                    f"subclass, got {cls!r}.")
  if kind not in KINDS:
    raise ValueError(f"jaxbn.nnx.register_batch_norm: `kind` must be one of {KINDS}, got "
                     f"{kind!r}.")
  _ENTRIES.insert(0, Entry(cls, kind))
  return cls


def registered() -> tuple[Entry, ...]:
  """The registered classes, most recently registered first."""
  return tuple(_ENTRIES)


def kind_of(fn: str, node: Any, path: Any = ()) -> Optional[str]:
  """The registered kind of ``node`` (at graph ``path``); None for what is no batch norm.

  Raises:
    TypeError: ``node`` is not registered but has ``mean`` and ``var`` ``nnx.BatchStat``s.
  """
  for entry in _ENTRIES:
    if isinstance(node, entry.cls):
      return entry.kind
  if (isinstance(node, nnx.Module) and isinstance(getattr(node, "mean", None), nnx.BatchStat)
      and isinstance(getattr(node, "var", None), nnx.BatchStat)):
    name = type(node).__name__
    raise TypeError(
        f"{fn}: the module at {tuple(path)} ({name}) has `mean` and `var` nnx.BatchStat like a "
        f"batch norm, but {name} is not registered, so this tool does not know how to treat "
        f"it. Subclass jaxbn.nnx.BatchNorm, or register it: "
        f"jaxbn.nnx.register_batch_norm({name}).")
  return None
