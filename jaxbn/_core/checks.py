"""Validation of static facts, done before any computation.

Every message names the function and the argument, what was received, what was expected and
how to fix it, so that users never see a broadcasting error from deep inside JAX.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn._core import collectives
from jaxbn._core.types import BatchStats

Axes = Union[int, Sequence[int]]
AxisName = Union[None, str, Sequence[Any]]


def feature_axes(fn: str, ndim: int, axis: Axes, name: str = "axis") -> tuple[int, ...]:
  """Normalizes ``axis`` (feature axis or axes) to sorted non-negative ints.

  ``name`` is the argument's name in the caller's signature (``axis``, ``feature_axes``,
  ``reduction_axes``...), used in the error messages.
  """
  axes = tuple(axis) if np.iterable(axis) else (axis,)  # (not an int: the loop says so)
  if ndim == 0:
    raise ValueError(f"{fn}: `x` must have at least one dimension, got a scalar.")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)):
      raise TypeError(f"{fn}: `{name}` must be an int or a tuple of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{fn}: `{name}`={axis!r} is out of range for `x` of rank {ndim}; use an axis in "
          f"[{-ndim}, {ndim - 1}] (e.g. axis=-1 for NHWC, axis=1 for NCHW)."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{fn}: `{name}`={axis!r} repeats an axis.")
  return tuple(sorted(out))


def reduction_axes(ndim: int, feat: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in feat)


def float_input(fn: str, x: Any, name: str = "x") -> None:
  dtype = jnp.result_type(x)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
    raise TypeError(
        f"{fn}: `{name}` must be a floating-point (or complex) array, got dtype {dtype}; "
        f"convert it first, e.g. `{name}.astype(jnp.float32)`."
    )


def momentum_value(fn: str, momentum: Any) -> None:
  """Checks a concrete momentum is in [0, 1]; traced values are accepted unchecked.

  ``momentum=1`` keeps the running statistics as they are while training on batch statistics
  (flax accepts it too).
  """
  if momentum is None or isinstance(momentum, jax.core.Tracer):
    return
  try:
    m = float(momentum)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: `momentum` must be a float in [0, 1] or None, got {momentum!r}.")
  if not 0.0 <= m <= 1.0:
    raise ValueError(
        f"{fn}: `momentum` must be in [0, 1] (flax convention: the weight of the old running "
        f"value), got {m}. A PyTorch momentum p converts to 1 - p "
        f"(jaxbn.momentum_from_torch); use momentum=None for a cumulative average."
    )


def epsilon_value(fn: str, epsilon: Any) -> None:
  if isinstance(epsilon, jax.core.Tracer):
    return
  try:
    e = float(epsilon)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: `epsilon` must be a positive float, got {epsilon!r}.")
  if not e > 0.0:
    raise ValueError(
        f"{fn}: `epsilon` must be > 0 (it keeps 1/sqrt(var + epsilon) finite), got {e}; "
        f"the usual value is 1e-5."
    )


def _bound_names() -> str:
  """The mapped axis names bound here, for error messages (best effort)."""
  try:
    from jax._src import core as _jcore  # private: only used to word an error message
    names = list(_jcore.get_axis_env().axis_sizes)
  except Exception:  # pragma: no cover - JAX internals moved
    return ""
  if not names:
    return " No mapped axis is bound here."
  return f" The axis names bound here are {tuple(names)!r}."


def axis_name_bound(fn: str, axis_name: AxisName, axis_index_groups: Any = None) -> None:
  """Raises a clear error for an axis name that no enclosing map binds, or bad groups.

  ``axis_index_groups`` must partition the indices ``0 .. size-1`` of the (combined)
  ``axis_name`` axis into groups of equal size, and the enclosing map must support grouped
  collectives (``jax.pmap``, ``jax.shard_map(check_vma=False)``; not ``jax.shard_map``'s
  default ``check_vma=True`` nor ``jax.vmap``).
  """
  if axis_name is None:
    if axis_index_groups is not None:
      raise ValueError(
          f"{fn}: `axis_index_groups`={axis_index_groups!r} was given without `axis_name`; "
          f"groups select devices along a mapped axis, so also pass the axis name, e.g. "
          f"axis_name='batch'."
      )
    return
  names = collectives.names(axis_name)
  if not names:
    raise ValueError(f"{fn}: `axis_name` is an empty tuple; pass None to synchronize nothing.")
  for name in names:
    try:
      lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"{fn}: `axis_name`={axis_name!r}: the axis name {name!r} is not bound here. "
          f"Call it inside jax.shard_map(mesh=...), jax.pmap(axis_name=...) or "
          f"jax.vmap(axis_name=...) that defines {name!r}, check the spelling, or pass "
          f"axis_name=None (under plain jax.jit on sharded arrays no name is needed)."
          f"{_bound_names()}"
      ) from None
  if axis_index_groups is not None:
    _groups_partition(fn, axis_name, axis_index_groups, collectives.axis_size(axis_name))
    _groups_supported(fn, names, axis_index_groups)


def _groups_partition(fn: str, axis_name: AxisName, groups: Any, size: int) -> None:
  """Checks that ``groups`` partitions ``range(size)`` into groups of equal size."""
  try:
    flat = [list(g) for g in groups]
    ok = all(isinstance(i, (int, np.integer)) for g in flat for i in g)
  except TypeError:
    ok = False
  if not ok or not flat:
    raise TypeError(
        f"{fn}: `axis_index_groups` must be a list of lists of device indices along "
        f"`axis_name`={axis_name!r}, e.g. [[0, 1], [2, 3]], got {groups!r}."
    )
  seen = [int(i) for g in flat for i in g]
  problems = [f"indices {bad} {what}" for bad, what in (
      (sorted({i for i in seen if not 0 <= i < size}), f"are outside [0, {size - 1}]"),
      (sorted({i for i in seen if seen.count(i) > 1}), "appear more than once"),
      (sorted(set(range(size)) - set(seen)), "are in no group")) if bad]
  if problems:
    raise ValueError(
        f"{fn}: `axis_index_groups`={groups!r} does not partition the {size} indices of "
        f"`axis_name`={axis_name!r}: {'; '.join(problems)}. Every index 0..{size - 1} must "
        f"be in exactly one group."
    )
  if len({len(g) for g in flat}) != 1:
    raise ValueError(
        f"{fn}: `axis_index_groups`={groups!r} has groups of sizes "
        f"{[len(g) for g in flat]}; JAX requires groups of equal size."
    )


def _groups_supported(fn: str, names: tuple, groups: Any) -> None:
  """Turns JAX's bare NotImplementedError for grouped collectives into a clear one.

  Traces a grouped ``psum`` of a scalar that nothing uses (removed by dead-code elimination
  where it is supported).
  """
  try:
    lax.psum(lax.axis_index(names) * 0, names,
             axis_index_groups=[[int(i) for i in g] for g in groups])
  except NotImplementedError:
    raise NotImplementedError(
        f"{fn}: `axis_index_groups` is not supported by JAX here: jax.shard_map with its "
        f"default check_vma=True and jax.vmap do not implement grouped collectives. Give "
        f"the groups their own mesh axis instead, e.g. jax.make_mesh((2, 4), ('group', "
        f"'data')) with in_specs=P(('group', 'data')) and axis_name='data' synchronizes "
        f"within each group of 4 devices; or use jax.pmap(axis_name=...) or "
        f"jax.shard_map(..., check_vma=False), where `axis_index_groups` works."
    ) from None


def feature_shape_matches(fn: str, name: str, value: Any, expected: tuple[int, ...],
                          hint: str) -> None:
  if value is None:
    return
  shape = tuple(jnp.shape(value))
  size = int(np.prod(expected))
  if shape != expected and not (len(shape) == 1 and shape[0] == size):
    raise ValueError(
        f"{fn}: `x` has features of shape {expected} on the feature axis but `{name}` has "
        f"shape {shape}; {hint}"
    )


def mask_broadcasts(fn: str, mask: Any, x_shape: tuple[int, ...]) -> None:
  if mask is None:
    return
  mshape = tuple(jnp.shape(mask))
  try:
    out = jnp.broadcast_shapes(mshape, x_shape)  # (symbolic dimensions too)
  except ValueError:
    out = None
  if out != tuple(x_shape):
    raise ValueError(
        f"{fn}: `mask` of shape {mshape} does not broadcast to `x` of shape {x_shape}; give "
        f"it the shape of `x`, or keep the batch dimensions and use size 1 elsewhere (e.g. "
        f"mask[:, None, None, None] for a per-example mask on NHWC input)."
    )
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(
        f"{fn}: `mask` must be a bool array (True = the entry counts), got dtype "
        f"{jnp.result_type(mask)}; use `mask.astype(bool)`."
    )


def static_bool(fn: str, name: str, value: Any) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(
      f"{fn}: `{name}` must be a Python bool (it selects the computation at trace time), got "
      f"{type(value).__name__}. Pass training=True/False, or mark it static in jax.jit "
      f"(static_argnames=...)."
  )


def feature_vectors(fn: str, fshape: tuple[int, ...], **vectors: Any) -> None:
  """Checks optional float vectors with one entry per feature (None is skipped)."""
  for name, v in vectors.items():
    if v is not None:
      float_input(fn, v, name)
    feature_shape_matches(fn, name, v, fshape,
                          "pass a vector with one entry per feature, or the right `axis`.")


def validate_bn_args(fn: str, x: Any, stats: Any, scale: Any, bias: Any, axis: Axes,
                     epsilon: Any, momentum: Any = None
                     ) -> tuple[jax.Array, tuple[int, ...], tuple[int, ...]]:
  """Checks the arguments every BN-family function shares.

  Returns ``(x as an array, feature axes, feature shape)``.
  """
  x = jnp.asarray(x)
  float_input(fn, x)
  feat = feature_axes(fn, x.ndim, axis)
  fshape = tuple(x.shape[a] for a in feat)
  shown = fshape if len(fshape) > 1 else fshape[0]
  if not isinstance(stats, BatchStats):
    raise TypeError(
        f"{fn}: `stats` must be a jaxbn.BatchStats, got {type(stats).__name__}; create it with "
        f"jaxbn.init_stats({shown}).")
  if tuple(jnp.shape(stats.mean)) != fshape or tuple(jnp.shape(stats.var)) != fshape:
    raise ValueError(
        f"{fn}: `x` has {shown} features on axis {axis!r} but `stats.mean` has shape "
        f"{tuple(jnp.shape(stats.mean))}; create the stats with jaxbn.init_stats({shown}) or "
        f"pass the right `axis`.")
  feature_vectors(fn, fshape, scale=scale, bias=bias)
  epsilon_value(fn, epsilon)
  momentum_value(fn, momentum)
  return x, feat, fshape


def named_axes(fn: str, name: str, ndim: int, axes: Axes) -> tuple[int, ...]:
  """``feature_axes`` for an argument called ``name`` (its messages name it)."""
  return feature_axes(fn, ndim, axes, name=name)


def affine_params(fn: str, scale: Any, bias: Any, shape: tuple[int, ...], where: str) -> None:
  """Checks ``scale`` and ``bias`` (either may be None) against ``x``'s ``shape`` along
  ``where`` (the layers' ``feature_axes``)."""
  for name, v in (("scale", scale), ("bias", bias)):
    if v is None:
      continue
    float_input(fn, v, name)
    got = tuple(jnp.shape(v))
    if got != shape and got != (int(np.prod(shape)),):
      raise ValueError(
          f"{fn}: `{name}` has shape {got} but `x` has shape {shape} along {where}; pass one "
          f"entry per feature (shape {shape}), or set `feature_axes` to the axes it follows.")


def per_example_args(fn: str, x: Any, reduction_axes: Axes, feature_axes: Axes,
                      scale: Any, bias: Any):
  """Validates layer/RMS norm's arguments; returns ``(x, reduction axes, feature axes)``."""
  x = jnp.asarray(x)
  float_input(fn, x)
  red = named_axes(fn, "reduction_axes", x.ndim, reduction_axes)
  feat = named_axes(fn, "feature_axes", x.ndim, feature_axes)
  affine_params(fn, scale, bias, tuple(x.shape[a] for a in feat),
                f"`feature_axes`={feature_axes!r}")
  return x, red, feat


# --------------------------------------------------------------------------------------------
# One value per feature in training.
# --------------------------------------------------------------------------------------------

_ONE_VALUE_OK = contextvars.ContextVar("jaxbn_one_value_per_feature_ok", default=False)


@contextlib.contextmanager
def one_value_per_feature_ok(ok: bool = True):
  """Within this block (at trace time) a training call with one value per feature does not
  raise. For flax linen's ``init`` only, where a one-row dummy batch is the usual way to
  create the variables (nothing is updated during ``init``)."""
  token = _ONE_VALUE_OK.set(bool(ok) or _ONE_VALUE_OK.get())
  try:
    yield
  finally:
    _ONE_VALUE_OK.reset(token)


def more_than_one_value(fn: str, x_shape: Sequence[Any], red: Sequence[int], axis_name: Any,
                        axis_index_groups: Any = None, *, virtual_batch: bool = False) -> None:
  """Checks ``axis_name`` (:func:`axis_name_bound`), then raises when the batch statistics
  would see exactly one value per feature.

  The static count is the number of entries of ``x`` along the reduced axes ``red``, times
  the number of devices ``axis_name`` synchronizes over (the group size with
  ``axis_index_groups``). A symbolic shape (``jax.export``) is not checked; an empty batch
  (0 values) is allowed (it leaves the running statistics unchanged).
  """
  axis_name_bound(fn, axis_name, axis_index_groups)
  if _ONE_VALUE_OK.get():
    return
  try:
    local = int(math.prod(x_shape[a] for a in red))
  except Exception:  # noqa: BLE001 - a symbolic dimension
    return
  devices = 1 if virtual_batch else collectives.axis_size(axis_name, axis_index_groups)
  if local * devices != 1:
    return
  if virtual_batch:
    what = (f"each virtual batch of `x` (shape {tuple(x_shape)}) has 1 entry per feature "
            f"(`virtual_batch_size` times the other reduced axes; virtual batches are not "
            f"synchronized over devices)")
    fixes = ("use a larger `virtual_batch_size`, switch to jaxbn.batch_norm (which "
             "synchronizes over devices with axis_name=...)")
  else:
    synced = ("" if axis_name is None else
              f", synchronized over {devices} device (axis_name={axis_name!r})")
    what = (f"`x` of shape {tuple(x_shape)} has 1 entry per feature along the axes "
            f"{tuple(red)} that the statistics reduce over{synced}")
    fixes = "use a larger batch, synchronize the statistics over devices with axis_name=..."
  raise ValueError(
      f"{fn}: expected more than 1 value per feature when training: {what}. The batch "
      f"variance of one value is 0, so every output would be `bias` and the running "
      f"variance would be pulled toward 0. Fixes: evaluate with the running statistics "
      f"(training=False; layers: use_running_average=True or model.eval()), {fixes}, or "
      f"use a norm without batch statistics (jaxbn.group_norm, jaxbn.layer_norm).")
