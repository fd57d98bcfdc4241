"""What the NNX layers share: parameters and statistics, dtype promotion and the BN call."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import errors, nnx
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxbn._core import checks
from jaxbn._core.types import BatchStats, init_stats

MISSING_MODE = (
    "No `use_running_average` argument was provided to {name}. Pass it to the constructor, "
    "to the call (`layer(x, use_running_average=True/False)`), or use `model.train()` / "
    "`model.eval()` / `nnx.view(model, use_running_average=...)`.")

# The settings every BN-family layer stores, in the order its constructor takes them.
BN_CONFIG = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype",
             "use_bias", "use_scale", "axis_name", "axis_index_groups", "use_fast_variance",
             "promote_dtype", "unbiased_running_var", "debias")


def output_dtype(promote_dtype: PromoteDtypeFn, arrays: tuple, dtype: Optional[Dtype]):
  """The dtype flax.nnx would compute in, found abstractly (no array is cast)."""
  specs = tuple(None if a is None else jax.ShapeDtypeStruct((), jnp.result_type(a))
                for a in arrays)
  out = jax.eval_shape(lambda *a: promote_dtype(a, dtype=dtype), *specs)
  return out[0].dtype


def init_affine(mdl: nnx.Module, num_features: int, *, use_scale: bool, use_bias: bool,
                scale_init: Initializer, bias_init: Initializer, param_dtype: Dtype,
                rngs: nnx.Rngs, scale_metadata: Mapping[str, Any],
                bias_metadata: Mapping[str, Any]) -> None:
  """Creates ``scale`` and ``bias`` (``nnx.Param``, or None), keys drawn in flax's order."""
  shape = (num_features,)
  if use_scale:
    mdl.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
  else:
    mdl.scale = nnx.data(None)
  if use_bias:
    mdl.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
  else:
    mdl.bias = nnx.data(None)


def store(mdl: nnx.Module, args: Mapping[str, Any], names: Sequence[str]) -> None:
  """Stores the constructor arguments ``names`` (taken from ``args``) as attributes."""
  for name in names:
    setattr(mdl, name, args[name])


def init_norm(mdl: nnx.Module, args: Mapping[str, Any], names: Sequence[str]) -> None:
  """A per-example norm's constructor: ``scale`` and ``bias``, then the settings ``names``.

  ``args`` are the constructor's arguments by name (its ``locals()``).
  """
  init_affine(mdl, args["num_features"], use_scale=args["use_scale"],
              use_bias=args["use_bias"], scale_init=args["scale_init"],
              bias_init=args["bias_init"], param_dtype=args["param_dtype"], rngs=args["rngs"],
              scale_metadata=args["scale_metadata"], bias_metadata=args["bias_metadata"])
  store(mdl, args, names)


def init_bn_state(mdl: nnx.Module, num_features: int, *, momentum: Any, debias: bool,
                  use_scale: bool, use_bias: bool, scale_init: Initializer,
                  bias_init: Initializer, param_dtype: Dtype, rngs: nnx.Rngs,
                  scale_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any]) -> None:
  """Creates a BN-family layer's state exactly as ``jaxbn.nnx.BatchNorm`` (and flax) does.

  ``mean``, ``var`` (``nnx.BatchStat``), ``count`` (int32 ``nnx.BatchStat`` when ``momentum``
  is None or ``debias``, else None), ``scale``, ``bias`` (``nnx.Param``, keys drawn from
  ``rngs.params()`` in flax's order).
  """
  stats = init_stats((num_features,))
  mdl.mean = nnx.BatchStat(stats.mean)
  mdl.var = nnx.BatchStat(stats.var)
  mdl.count = nnx.BatchStat(stats.count) if momentum is None or debias else nnx.data(None)
  init_affine(mdl, num_features, use_scale=use_scale, use_bias=use_bias,
              scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
              scale_metadata=scale_metadata, bias_metadata=bias_metadata)


def init_bn_layer(mdl: nnx.Module, fn: str, args: Mapping[str, Any], *,
                  extra: Sequence[str] = (), check_momentum: bool = True) -> None:
  """A BN-family constructor: state, checks, then the settings stored as attributes.

  Args:
    mdl: the layer being constructed.
    fn: the layer's name for error messages.
    args: the constructor's arguments by name (its ``locals()``): ``num_features``, every
      name in :data:`BN_CONFIG`, the initializers, ``rngs`` and the metadata.
    extra: the names of the layer's own further settings, stored after the shared ones.
    check_momentum: validate ``momentum`` (layers that never update the statistics do not).
  """
  init_bn_state(mdl, args["num_features"], momentum=args["momentum"], debias=args["debias"],
                use_scale=args["use_scale"], use_bias=args["use_bias"],
                scale_init=args["scale_init"], bias_init=args["bias_init"],
                param_dtype=args["param_dtype"], rngs=args["rngs"],
                scale_metadata=args["scale_metadata"], bias_metadata=args["bias_metadata"])
  checks.epsilon_value(fn, args["epsilon"])
  if check_momentum:
    checks.momentum_value(fn, args["momentum"])
  store(mdl, args, ("num_features",) + BN_CONFIG + tuple(extra))


def bn_inputs(mdl: nnx.Module, x: jax.typing.ArrayLike, fn: str):
  """Reads a BN-family layer's state for a call: ``(x, stats, scale, bias, out_dtype)``."""
  x = jnp.asarray(x)
  feat = checks.feature_axes(fn, x.ndim, mdl.axis)
  fshape = tuple(x.shape[a] for a in feat)
  if fshape != tuple(mdl.mean.shape):
    raise ValueError(
        f"{fn}: `x` has features of shape {fshape} on axis {mdl.axis!r} but the layer was "
        f"built with num_features={mdl.num_features}; pass the number of features of `x` or "
        f"the right `axis`.")
  scale = None if mdl.scale is None else mdl.scale[...]
  bias = None if mdl.bias is None else mdl.bias[...]
  mean, var = mdl.mean[...], mdl.var[...]
  # The count is only read with momentum=None or debias; otherwise a placeholder.
  count = getattr(mdl, "count", None)
  count = init_stats(1).count if count is None else count[...]
  out = output_dtype(mdl.promote_dtype, (x, mean, var, scale, bias), mdl.dtype)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(out)
  return x, BatchStats(mean, var, count), scale, bias, out


def write_stats(mdl: nnx.Module, new: BatchStats, shared_error: Optional[str] = None) -> None:
  """Stores updated statistics in place (without gradient, as flax).

  With ``shared_error``, a layer whose statistics cannot be written from the current trace
  (it belongs to an outer trace) raises ``TraceContextError(shared_error)`` first.
  """
  if shared_error is not None and not (mdl.mean._can_update and mdl.var._can_update):
    raise errors.TraceContextError(shared_error)
  if mdl.mean._can_update or mdl.var._can_update:
    new = jax.tree.map(jax.lax.stop_gradient, new)
  mdl.mean[...] = new.mean
  mdl.var[...] = new.var
  if getattr(mdl, "count", None) is not None:
    mdl.count[...] = new.count


def bn_call(mdl: nnx.Module, core: Callable[..., Any], fn: str, x: jax.typing.ArrayLike,
            use_running_average: bool, mask: Optional[jax.Array], *,
            shared_error: Optional[str] = None, **extra: Any) -> jax.Array:
  """A BN-family layer's call: its state, ``core``, and the in-place update in training.

  ``core`` is a functional op with :func:`jaxbn.batch_norm`'s signature (plus ``extra``
  keyword arguments); ``use_running_average`` is the mode already resolved for this call.
  """
  x, stats, scale, bias, out = bn_inputs(mdl, x, fn)
  training = not use_running_average
  y, new = core(
      x, stats, scale, bias,
      training=training,
      axis=mdl.axis,
      momentum=mdl.momentum,
      epsilon=mdl.epsilon,
      axis_name=mdl.axis_name,
      axis_index_groups=mdl.axis_index_groups,
      mask=mask,
      dtype=out,
      use_fast_variance=mdl.use_fast_variance,
      unbiased_running_var=mdl.unbiased_running_var,
      debias=mdl.debias,
      **extra,
  )
  if training:
    write_stats(mdl, new, shared_error)
  return y
