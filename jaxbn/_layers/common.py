"""What the layers of both frameworks share that needs no framework: flax's axis
canonicalization and flax's errors (its sentence first, jaxbn's explanation after)."""

from __future__ import annotations

from typing import Any

from jaxbn._core.checks import named_axes


def flax_axes(axis: Any, ndim: int) -> Any:
  """``axis`` deduplicated and sorted as flax canonicalizes it (``(-1, 2)`` of a rank-3 input
  is ``(2,)``); an int, or entries that are not valid axes, are left for the core to check."""
  if isinstance(axis, int) or not all(isinstance(a, int) and -ndim <= a < ndim for a in axis):
    return axis
  return tuple(sorted({a % ndim for a in axis}))


def flax_error(flax_sentence: str, explanation: str) -> ValueError:
  """flax's ``ValueError`` for a refused input, with jaxbn's explanation appended."""
  return ValueError(f"{flax_sentence} {explanation}")


def check_instance_axes(fn: str, ndim: int, feature_axes: Any) -> None:
  """flax InstanceNorm's check: the channel ``feature_axes`` leave out axis 0, the batch."""
  if 0 in named_axes(fn, "feature_axes", ndim, feature_axes):
    raise flax_error(
        "The channel axes cannot include the leading dimension as this is assumed to be the "
        "batch axis.", f"{fn}: `feature_axes`={feature_axes!r} includes axis 0; put the "
        f"batch first and pass the channel axis (e.g. -1 for NHWC, 1 for NCHW).")
