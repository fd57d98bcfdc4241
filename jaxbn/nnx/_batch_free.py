"""Batch-independent normalizations for NNX: FRN/TLU, EvoNorm-B0/S0 and weight-standardized convs.

NNX twins of ``jaxbn.linen``'s layers (same math, same parameter names and initial values):
constructors take ``num_features`` and ``rngs`` as ``flax.nnx``'s norms do; ``scale``, ``bias``
and the layer's own parameters are ``nnx.Param``; EvoNorm-B0's running variance ``var`` is an
``nnx.BatchStat``.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.typing import Dtype, Initializer

import jaxbn
from jaxbn._layers.docs import B0_SETTINGS, FRN_SETTINGS, fill_doc
from jaxbn.nnx._common import Layer, init_affine, mode, param, plain_dtype, value


@fill_doc(frn_settings=FRN_SETTINGS)
class FilterResponseNorm(Layer):
  r"""Filter Response Normalization with TLU for NNX (:class:`jaxbn.linen.FilterResponseNorm`).

  Args:
    num_features: number of channels.
    {frn_settings}
    feature_axes: the channel axis (default -1), flax's name for the functional form's
      ``axis`` (:func:`jaxbn.filter_response_norm` accepts both spellings).
    rngs: ``nnx.Rngs`` for the initializers.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.FilterResponseNorm(3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4, 4, 3))).shape
    (2, 4, 4, 3)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               use_tlu: bool = True, learn_epsilon: bool = False,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               tau_init: Initializer = initializers.zeros_init(),
               eps_init: Initializer = initializers.constant(1e-4),
               feature_axes: int = -1, rngs: nnx.Rngs):
    init_affine(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                rngs)
    self.tau = param(use_tlu, tau_init, rngs, (num_features,), param_dtype)
    self.eps = param(learn_epsilon, eps_init, rngs, (), param_dtype)
    self.num_features, self.epsilon, self.dtype = num_features, epsilon, dtype
    self.param_dtype, self.feature_axes = param_dtype, feature_axes

  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Normalizes ``x``; ``mask`` marks the valid positions."""
    x = jnp.asarray(x)
    scale, bias, tau = value(self.scale), value(self.bias), value(self.tau)
    return jaxbn.filter_response_norm(
        x, scale, bias, tau, axis=self.feature_axes, epsilon=self.epsilon,
        learned_epsilon=value(self.eps), mask=mask,
        dtype=plain_dtype(self.dtype, x, scale, bias, tau))


@fill_doc(b0_settings=B0_SETTINGS)
class EvoNormB0(Layer):
  r"""EvoNorm-B0 for NNX (:class:`jaxbn.linen.EvoNormB0`): ``model.train()``/``eval()`` modes.

  State: the running variance ``var`` (``nnx.BatchStat``; no running mean, B0 does not
  center), plus an int32 ``count`` when ``momentum`` is None (the cumulative average) — the
  linen layer's ``batch_stats`` and the part of the functional ``BatchStats`` B0 uses.

  Args:
    num_features: number of channels.
    use_running_average: True: running variance; False (default): batch variance + update.
    {b0_settings}
    rngs: ``nnx.Rngs``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.EvoNormB0(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = layer(jax.random.normal(jax.random.key(0), (4, 3, 3, 2)))   # updates `var`
    >>> layer.eval()
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'scale', 'v', 'var']
  """

  def __init__(self, num_features: int, *, use_running_average: bool = False, axis: int = -1,
               momentum: float = 0.99, epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               v_init: Initializer = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, unbiased_running_var: bool = False,
               skip_nonfinite: bool = True, rngs: nnx.Rngs):
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.count = (nnx.BatchStat(jaxbn.init_stats(1).count) if momentum is None
                  else nnx.data(None))
    init_affine(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                rngs)
    self.v = nnx.Param(v_init(rngs.params(), (num_features,), param_dtype))
    self.num_features, self.use_running_average = num_features, use_running_average
    self.axis, self.momentum, self.epsilon, self.dtype = axis, momentum, epsilon, dtype
    self.param_dtype, self.axis_name = param_dtype, axis_name
    self.axis_index_groups, self.unbiased_running_var = axis_index_groups, unbiased_running_var
    self.skip_nonfinite = skip_nonfinite

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x``; in training updates ``var`` in place."""
    use_ra = mode(self, use_running_average)
    x = jnp.asarray(x)
    scale, bias, v = value(self.scale), value(self.bias), self.v[...]
    var = self.var[...]
    count = jaxbn.init_stats(1).count if self.count is None else self.count[...]
    stats = jaxbn.BatchStats(jnp.zeros_like(var), var, count)
    y, new = jaxbn.evonorm_b0(
        x, stats, scale, bias, v, training=not use_ra, axis=self.axis, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        dtype=plain_dtype(self.dtype, x, scale, bias, v),
        unbiased_running_var=self.unbiased_running_var,
        skip_nonfinite=self.skip_nonfinite)
    if not use_ra:
      self.var[...] = jax.lax.stop_gradient(new.var)
      if self.count is not None:
        self.count[...] = new.count
    return y


class EvoNormS0(Layer):
  r"""EvoNorm-S0 for NNX (:class:`jaxbn.linen.EvoNormS0`), batch-independent.

  Args:
    num_features: number of channels (last axis).
    num_groups: channel groups (default 32); None with ``group_size``.
    group_size: channels per group.
    epsilon: added to the variance (default 1e-5).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as ``nnx.GroupNorm``.
    v_init: initializer of ``v`` (default ones).
    rngs: ``nnx.Rngs``.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> jaxbn.nnx.EvoNormS0(4, num_groups=2, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 3, 4))).shape
    (2, 3, 3, 4)
  """

  def __init__(self, num_features: int, *, num_groups: Optional[int] = 32,
               group_size: Optional[int] = None, epsilon: float = 1e-5,
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               v_init: Initializer = initializers.ones_init(), rngs: nnx.Rngs):
    init_affine(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                rngs)
    self.v = nnx.Param(v_init(rngs.params(), (num_features,), param_dtype))
    self.num_features, self.num_groups, self.group_size = num_features, num_groups, group_size
    self.epsilon, self.dtype, self.param_dtype = epsilon, dtype, param_dtype

  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Normalizes ``x`` (channels last); ``mask`` marks the valid entries."""
    x = jnp.asarray(x)
    scale, bias, v = value(self.scale), value(self.bias), self.v[...]
    return jaxbn.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups,
                            group_size=self.group_size, epsilon=self.epsilon, mask=mask,
                            dtype=plain_dtype(self.dtype, x, scale, bias, v))


# nnx.Conv reads its kernel inside __call__ and hands it to `conv_general_dilated`; WSConv
# passes a module-level function there that standardizes the kernel with the settings of the
# layer being called (set around the call, per thread).
_ACTIVE = threading.local()


def _ws_conv_general_dilated(lhs, rhs, *args, **kwargs):
  cfg = getattr(_ACTIVE, "cfg", None)
  if cfg is None:
    raise RuntimeError("jaxbn.nnx.WSConv: the standardizing convolution was called outside "
                       "WSConv.__call__; call the layer itself.")
  gain, fan_in_scaling, epsilon = cfg
  rhs = jaxbn.standardize_weight(rhs, gain, axis=-1, epsilon=epsilon,
                                 fan_in_scaling=fan_in_scaling)
  return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class WSConv(nnx.Conv, Layer):
  r"""Weight-standardized convolution for NNX: ``nnx.Conv`` on the standardized kernel.

  The constructor, attributes and state of ``flax.nnx.Conv`` (``kernel``, ``bias``), plus
  ``epsilon`` (default 1e-6); the kernel is standardized per output channel on every call
  (:func:`jaxbn.standardize_weight`, after nnx's dtype promotion). ``conv_general_dilated``
  is taken by the layer (it is the standardizing convolution).

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> conv = jaxbn.nnx.WSConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 5, 5, 3))).shape
    (1, 5, 5, 8)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, *,
               epsilon: float = 1e-6, **kwargs):
    if "conv_general_dilated" in kwargs:
      raise TypeError(f"{type(self).__name__}: `conv_general_dilated` is set by the layer "
                      f"(it standardizes the kernel); remove the argument.")
    super().__init__(in_features, out_features, kernel_size,
                     conv_general_dilated=_ws_conv_general_dilated, **kwargs)
    self.epsilon = epsilon

  def _config(self):
    """``standardize_weight``'s ``gain`` and ``fan_in_scaling``: none here."""
    return None, False

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    """``nnx.Conv.__call__`` with the kernel standardized."""
    prev = getattr(_ACTIVE, "cfg", None)
    _ACTIVE.cfg = (*self._config(), self.epsilon)
    try:
      return super().__call__(inputs, *args, **kwargs)
    finally:
      _ACTIVE.cfg = prev


class ScaledWSConv(WSConv):
  r"""Scaled weight-standardized convolution (NF-Nets) for NNX.

  :class:`WSConv` with the ``1/sqrt(fan_in)`` factor and a learned per-output ``gain``
  (``nnx.Param``, init ``gain_init``, default ones; ``use_gain=False`` for none).

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> conv = jaxbn.nnx.ScaledWSConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv.gain.shape
    (8,)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, *,
               epsilon: float = 1e-6, gain_init: Initializer = initializers.ones_init(),
               use_gain: bool = True, **kwargs):
    super().__init__(in_features, out_features, kernel_size, epsilon=epsilon, **kwargs)
    self.gain = param(use_gain, gain_init, kwargs["rngs"], (out_features,),
                      kwargs.get("param_dtype", jnp.float32))

  def _config(self):
    return value(self.gain), True
