"""What the NNX layers share: dtype promotion, flax's errors, parameters, statistics and the
BN call. Only public flax names are used (no ``flax.nnx.nn``/``flax.nnx.module`` helpers)."""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import errors, nnx
from flax.typing import Dtype, Initializer

import jaxbn
# The core's argument checks, so that the layers (which validate at construction) and the
# functions give the same messages.
from jaxbn._core.checks import epsilon_value, feature_axes, momentum_value
from jaxbn._layers import registry
from jaxbn._layers.common import flax_axes, flax_error


# --------------------------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------------------------


def promote_dtype(args: tuple, /, *, dtype: Optional[Dtype] = None, inexact: bool = True
                  ) -> tuple:
  """Casts ``args`` (None entries kept) to ``dtype``, or to their promoted dtype.

  flax.nnx's default ``promote_dtype``, written here so that no private flax helper is
  imported: with ``inexact``, an integer/bool result is promoted to (at least) float32.

  Args:
    args: arrays or None.
    dtype: the dtype to cast to (default: ``jnp.result_type`` of the arrays).
    inexact: the dtype must be floating (or complex).

  Returns:
    A tuple of ``args`` cast to one dtype.

  Raises:
    ValueError: an integer ``dtype`` with ``inexact=True``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxbn.nnx import promote_dtype
    >>> [a.dtype.name for a in promote_dtype((jnp.ones(2, jnp.int8), jnp.ones(2, jnp.bfloat16)))]
    ['bfloat16', 'bfloat16']
  """
  if dtype is None:
    dtype = jnp.result_type(*(jnp.asarray(a) for a in args if a is not None))
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"Dtype must be inexact: {dtype}")
  return tuple(None if a is None else jnp.asarray(a, dtype) for a in args)


def output_dtype(promote: Callable[..., tuple], arrays: tuple, dtype: Optional[Dtype]):
  """The dtype ``promote`` would compute in, found abstractly (no array is cast)."""
  specs = tuple(None if a is None else jax.ShapeDtypeStruct((), jnp.result_type(a))
                for a in arrays)
  out = jax.eval_shape(lambda *a: promote(a, dtype=dtype), *specs)
  return out[0].dtype


# --------------------------------------------------------------------------------------------
# Errors that flax also raises (flax's type and sentence first), and argument checks.
# --------------------------------------------------------------------------------------------


MODE_HOWTO = (
    "{layer}: give `use_running_average` (True: normalize with the stored statistics, "
    "eval; False: with the batch statistics, updating the stored ones, training) to the "
    "constructor or to the call (`layer(x, use_running_average=True/False)`), or set it on "
    "the whole model with `model.train()` / `model.eval()` / `nnx.view(model, "
    "use_running_average=...)`.")


def resolve_mode(layer: str, use_running_average: Optional[bool]) -> bool:
  """``use_running_average`` for this call (:func:`mode`), or flax.nnx's error when unset."""
  if use_running_average is not None:
    return use_running_average
  name = layer.rsplit(".", 1)[-1]
  raise flax_error(f"No `use_running_average` argument was provided to {name}.",
                   MODE_HOWTO.format(layer=layer))


# --------------------------------------------------------------------------------------------
# Parameters, statistics and the BN call.
# --------------------------------------------------------------------------------------------

# Constructor arguments that are not settings: a layer does not store them (as flax).
_NOT_SETTINGS = ("self", "__class__", "rngs", "bias_init", "scale_init", "bias_metadata",
                 "scale_metadata")


def _show_signature(cls: type) -> None:
  sig = inspect.signature(cls.__init__)
  cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])


class Layer(nnx.Module):
  """The base of jaxbn's NNX layers: ``inspect.signature(cls)`` is the constructor's.

  ``flax.nnx.Module``'s metaclass makes every class's signature ``(*args, **kwargs)``; here
  each subclass that defines ``__init__`` states its own (help(), IDEs and tools that read
  signatures see the real parameters).
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "__init__" in vars(cls):
      _show_signature(cls)

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by ``nnx.view``: sets ``use_running_average`` when given (layers with a mode).

    Args:
      use_running_average: True: normalize with the running statistics; False: with the
        batch statistics, updating the running ones.
    """
    if use_running_average is not None and hasattr(self, "use_running_average"):
      self.use_running_average = use_running_average


def layer_fields(cls: type) -> type:
  """``cls`` as an ``nnx.dataclass``: its annotated fields are its constructor's arguments.

  The NNX twin of the linen layers' fields. The constructor takes the fields in order (the
  inherited ones first; a redefined one keeps its place), keyword-only but where
  ``field(kw_only=False)``, and stores each as an attribute; an ``InitVar`` (initializers,
  ``rngs``, metadata: not stored, as in flax) goes to ``__post_init__`` only. Equality stays
  identity and the repr nnx's; ``inspect.signature(cls)`` shows the plain annotations.
  """
  cls = nnx.dataclass(cls, eq=False, kw_only=True)
  hints = cls.__init__.__annotations__
  hints.pop("return", None)
  for name, hint in hints.items():
    if isinstance(hint, str) and hint.startswith("InitVar["):
      hints[name] = hint[len("InitVar["):-1]
  _show_signature(cls)
  return cls


def mode(mdl: nnx.Module, call: Optional[bool]) -> bool:
  """``use_running_average`` for this call: the call's, else the attribute's; always True for
  a layer frozen by ``freeze_batch_norm`` (it keeps its eval mode through ``model.train()``)."""
  if getattr(mdl, "unfrozen", None) is not None:
    return True
  return mdl.use_running_average if call is None else call


def settings(layer: type, old: nnx.Module, names: Optional[Sequence[str]] = None) -> dict:
  """The constructor arguments of ``layer`` that ``old`` stores as settings (only ``names``
  if given); ``num_features`` and ``rngs`` are left out."""
  params = inspect.signature(layer.__init__).parameters
  return {n: getattr(old, n) for n in params
          if n not in _NOT_SETTINGS + ("num_features",) and hasattr(old, n)
          and (names is None or n in names)}


def rebuild(layer: type, old: nnx.Module, overrides: Mapping[str, Any], *,
            names: Optional[Sequence[str]] = None) -> nnx.Module:
  """``layer`` built with ``old``'s settings and ``overrides``, holding ``old``'s Variables.

  Every ``nnx.Variable`` attribute of ``old`` is moved to the new layer where it has a
  Variable of that name, so the state keeps its paths and values (shared with ``old``).
  """
  new = layer(old.num_features, **{**settings(layer, old, names), **overrides},
              rngs=nnx.Rngs(0))
  for name, value in list(vars(old).items()):
    if isinstance(value, nnx.Variable) and isinstance(getattr(new, name, None), nnx.Variable):
      setattr(new, name, value)
  return new


def init_affine(mdl: nnx.Module, num_features: Any, use_scale: bool, use_bias: bool,
                scale_init: Initializer, bias_init: Initializer, param_dtype: Dtype,
                rngs: nnx.Rngs, scale_metadata: Mapping[str, Any] = MappingProxyType({}),
                bias_metadata: Mapping[str, Any] = MappingProxyType({})) -> None:
  """Creates ``scale`` and ``bias`` (``nnx.Param``, or None), keys drawn in flax's order;
  ``num_features`` is their size (or their shape, a tuple)."""
  shape = tuple(num_features) if isinstance(num_features, tuple) else (num_features,)
  mdl.scale = param(use_scale, scale_init, rngs, shape, param_dtype, scale_metadata)
  mdl.bias = param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)


def param(use: bool, init: Initializer, rngs: nnx.Rngs, shape: tuple, dtype: Dtype,
          metadata: Mapping[str, Any] = MappingProxyType({})) -> Any:
  """An ``nnx.Param`` drawn by ``init`` (a key from ``rngs.params()``), or None without ``use``."""
  return nnx.Param(init(rngs.params(), shape, dtype), **metadata) if use else nnx.data(None)


def value(v: Any) -> Optional[jax.Array]:
  """The array of an ``nnx.Variable``; None for None."""
  return None if v is None else v[...]


def plain_dtype(dtype: Any, x: jax.Array, *params: Any) -> Any:
  """``dtype``, else the promoted dtype of ``x`` and the (non-None) parameters."""
  if dtype is not None:
    return dtype
  return jnp.result_type(x, *[p for p in params if p is not None])


def init_bn_state(mdl: nnx.Module, fn: str, bias_init: Initializer, scale_init: Initializer,
                  rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = MappingProxyType({}),
                  scale_metadata: Mapping[str, Any] = MappingProxyType({})) -> None:
  """flax BatchNorm's state for a BN-family layer whose settings are stored, after the checks.

  ``mean``, ``var`` (``nnx.BatchStat``, float32), ``count`` (int32 ``nnx.BatchStat`` when
  ``momentum`` is None or ``debias``, else None), ``scale``, ``bias`` (``nnx.Param``, keys
  drawn from ``rngs.params()`` in flax's order); ``fn`` is the layer's name for errors.
  """
  epsilon_value(fn, mdl.epsilon)
  momentum_value(fn, mdl.momentum)
  stats = jaxbn.init_stats((mdl.num_features,))
  mdl.mean = nnx.BatchStat(stats.mean)
  mdl.var = nnx.BatchStat(stats.var)
  with_count = mdl.momentum is None or getattr(mdl, "debias", False)
  mdl.count = nnx.BatchStat(stats.count) if with_count else nnx.data(None)
  init_affine(mdl, mdl.num_features, mdl.use_scale, mdl.use_bias, scale_init, bias_init,
              mdl.param_dtype, rngs, scale_metadata, bias_metadata)


def init_bn_layer(mdl: nnx.Module, fn: str, args: Mapping[str, Any]) -> None:
  """A BN-family constructor written out (not :func:`layer_fields`): stores every argument in
  ``args`` (its ``locals()``) but ``rngs``, the initializers and metadata, then
  :func:`init_bn_state`."""
  for name in args:
    if name not in _NOT_SETTINGS:
      setattr(mdl, name, args[name])
  init_bn_state(mdl, fn, args["bias_init"], args["scale_init"], args["rngs"],
                args.get("bias_metadata", {}), args.get("scale_metadata", {}))


def bn_inputs(mdl: nnx.Module, x: jax.typing.ArrayLike, fn: str):
  """A BN-family layer's state for a call: ``(x, axis, stats, scale, bias, out_dtype)``."""
  x = jnp.asarray(x)
  axis = flax_axes(mdl.axis, x.ndim)
  fshape = tuple(x.shape[a] for a in feature_axes(fn, x.ndim, axis))
  if fshape != tuple(mdl.mean.shape):
    raise ValueError(
        f"{fn}: `x` has features of shape {fshape} on axis {mdl.axis!r} but the layer was "
        f"built with num_features={mdl.num_features}; pass the number of features of `x` or "
        f"the right `axis`.")
  scale, bias = value(mdl.scale), value(mdl.bias)
  mean, var = mdl.mean[...], mdl.var[...]
  count = jaxbn.init_stats(1).count if mdl.count is None else mdl.count[...]
  out = output_dtype(mdl.promote_dtype, (x, mean, var, scale, bias), mdl.dtype)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(out)
  return x, axis, jaxbn.BatchStats(mean, var, count), scale, bias, out


# The settings a BN-family layer gives its functional op, under the same names.
_CORE_SETTINGS = ("momentum", "epsilon", "axis_name", "axis_index_groups", "use_fast_variance",
                  "unbiased_running_var", "debias", "skip_nonfinite")


SHARED_UNDER_VMAP = (
    "{fn}: cannot write the running statistics `mean`/`var` in training mode: "
    "the layer belongs to an outer trace of a transformation that calls it. Usually the "
    "layer is shared by a map over the batch (e.g. `nnx.vmap(model, in_axes=1)`), so each "
    "mapped slice has its own batch statistics and they cannot be stored in the one layer. "
    "Either synchronize the statistics over the mapped axis, `nnx.vmap(..., "
    "axis_name='batch')` with the layer's `axis_name='batch'` (statistics of the whole "
    "batch, as without vmap); or give every slice its own layer (an ensemble: create it "
    "under `nnx.vmap` and map it with in_axes=0); or call `model.eval()` to use the running "
    "statistics. With plain `jax` transformations, call `nnx.merge` inside the transformed "
    "function, or use the `nnx` version of the transformation (`nnx.grad`, `nnx.vmap`)."
)


def bn_call(mdl: nnx.Module, core: Callable[..., Any], fn: str, x: jax.typing.ArrayLike,
            use_running_average: Optional[bool], mask: Optional[jax.Array], **extra: Any
            ) -> jax.Array:
  """A BN-family layer's call: its state, ``core``, and the in-place update in training.

  ``core`` is a functional op with :func:`jaxbn.batch_norm`'s signature (plus ``extra``
  keyword arguments); ``use_running_average`` is the call's (see :func:`mode`; flax's error
  when no mode is set). Complex input turns the running mean complex after the first update.
  """
  training = not resolve_mode(fn, mode(mdl, use_running_average))
  x, axis, stats, scale, bias, out = bn_inputs(mdl, x, fn)
  if jnp.iscomplexobj(x) and not jnp.iscomplexobj(stats.mean):
    stats = stats._replace(mean=stats.mean.astype(jnp.promote_types(stats.mean.dtype,
                                                                    jnp.complex64)))
  y, new = core(x, stats, scale, bias, training=training, axis=axis, mask=mask, dtype=out,
                **{name: getattr(mdl, name) for name in _CORE_SETTINGS}, **extra)
  if training:
    write_stats(mdl, new, fn)
  return y


def write_stats(mdl: nnx.Module, new: jaxbn.BatchStats, fn: str) -> None:
  """Stores a training call's statistics in place, without gradient (``count`` if it has one);
  a layer shared under a map over the batch gets :data:`SHARED_UNDER_VMAP`'s hint."""
  new = jax.tree.map(jax.lax.stop_gradient, new)
  try:
    for var, value in ((mdl.mean, new.mean), (mdl.var, new.var)):
      if value.dtype == var[...].dtype:
        var[...] = value
      else:  # complex input: the running mean turns complex (as in flax.linen)
        var.set_value(value)
    if getattr(mdl, "count", None) is not None:
      mdl.count[...] = new.count
  except errors.TraceContextError:  # the layer belongs to an outer trace
    raise errors.TraceContextError(SHARED_UNDER_VMAP.format(fn=fn)) from None


# --------------------------------------------------------------------------------------------
# The registry, for NNX modules.
# --------------------------------------------------------------------------------------------


def treatment(fn: str, node: Any, path: Any = ()) -> registry.Treatment:
  """What the tool ``fn`` does with ``node`` at graph ``path`` (see ``jaxbn._layers.registry``).

  Raises:
    TypeError: ``node`` is not registered but has ``mean`` and ``var`` ``nnx.BatchStat``s.
  """
  def holds_stats():
    return (isinstance(node, nnx.Module)
            and isinstance(getattr(node, "mean", None), nnx.BatchStat)
            and isinstance(getattr(node, "var", None), nnx.BatchStat))

  return registry.treatment(fn, node, holds_stats, f"at {tuple(path)}",
                            "`mean` and `var` nnx.BatchStat", "nnx")


def register_batch_norm(cls: type, *, kind: str = "trains") -> type:
  """Registers an NNX class with the tools: :func:`jaxbn.linen.register_batch_norm`'s twin.

  Same ``kind`` (``"trains"``, ``"frozen"``, ``"adaptive"``, ``"running"``), return value and
  errors, for a ``flax.nnx.Module`` subclass (``TypeError`` for anything else).

  Example:
    >>> import jaxbn.nnx
    >>> @jaxbn.nnx.register_batch_norm
    ... class MyBatchNorm(jaxbn.nnx.BatchNorm):   # (a subclass would not need it)
    ...   pass
  """
  return registry.register("jaxbn.nnx.register_batch_norm", cls, kind, nnx.Module)
