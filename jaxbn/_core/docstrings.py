"""Argument documentation written once: a function's docstring takes the ``Args`` entries it
does not write itself from a related function's (e.g. ``momentum`` from :func:`batch_norm`)."""

from __future__ import annotations

import inspect
import re
from typing import Callable, Union

_ENTRY = re.compile(r"^    \**(\w+):.*(?:\n      .*)*", re.M)  # name, then its indented lines


def _split(doc: str) -> tuple[str, dict[str, str], str]:
  """A Google-style docstring as (text before ``Args:``, its entries by name, text after)."""
  head, _, rest = doc.partition("\n  Args:\n")
  entries, _, tail = rest.partition("\n\n")
  return head, {m.group(1): m.group(0) for m in _ENTRY.finditer(entries)}, tail


def fill_args(source: Union[Callable, tuple], *functions: Callable) -> None:
  """Completes each function's ``Args`` with ``source``'s entries, in its signature order.

  ``source`` is a function or a tuple of them (the first that documents a name wins).
  Entries a function writes itself take precedence. Every parameter must end up documented
  and every entry must name a parameter (checked at import time).
  """
  sources = source if isinstance(source, tuple) else (source,)
  if any(s.__doc__ is None for s in sources):  # python -OO
    return
  shared = {k: v for s in reversed(sources) for k, v in _split(s.__doc__)[1].items()}
  for f in functions:
    head, own, tail = _split(f.__doc__)
    names = list(inspect.signature(f).parameters)
    undocumented = [n for n in names if n not in own and n not in shared]
    if undocumented or set(own) - set(names):
      raise AssertionError(f"{f.__name__}: no Args entry for {undocumented}, or an entry for "
                           f"no parameter in {sorted(set(own) - set(names))}")
    args = "\n".join(own.get(n) or shared[n] for n in names)
    f.__doc__ = f"{head}\n  Args:\n{args}\n\n{tail}"
