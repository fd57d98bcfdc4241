"""What the layers of both frameworks share that needs no framework: flax's axis
canonicalization and flax's errors (its sentence first, jaxbn's explanation after)."""

from __future__ import annotations

from typing import Any


def flax_axes(axis: Any, ndim: int) -> Any:
  """``axis`` deduplicated and sorted as flax canonicalizes it (``(-1, 2)`` of a rank-3 input
  is ``(2,)``); an int, or entries that are not valid axes, are left for the core to check."""
  if isinstance(axis, int) or not all(isinstance(a, int) and -ndim <= a < ndim for a in axis):
    return axis
  return tuple(sorted({a % ndim for a in axis}))


def flax_error(flax_sentence: str, explanation: str) -> ValueError:
  """flax's ``ValueError`` for a refused input, with jaxbn's explanation appended."""
  return ValueError(f"{flax_sentence} {explanation}")


def check_groups(fn: str, channels: int, num_groups, group_size, what: str, of: str) -> None:
  """flax GroupNorm's checks of ``num_groups``/``group_size`` (its sentences first)."""
  if (num_groups is None) == (group_size is None):
    raise flax_error(
        "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
        "specified, pass `num_groups=None` as argument to override the default `num_groups` "
        "value of 32.", f"{fn}: got num_groups={num_groups!r} and group_size={group_size!r}.")
  if group_size is not None:
    if not isinstance(group_size, int) or group_size <= 0 or channels % group_size:
      raise flax_error(
          f"Number of {what} ({channels}) is not multiple of the group size ({group_size}).",
          f"{fn}: `group_size`={group_size!r} must be a positive divisor of {of}.")
    num_groups = channels // group_size
  if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
    raise flax_error(
        f"Number of groups ({num_groups}) does not divide the number of channels ({channels}).",
        f"{fn}: `num_groups`={num_groups!r} must be a positive divisor of {of}.")
