"""Batch-independent normalizations for Linen: FRN/TLU, EvoNorm-B0/S0 and weight-standardized convs.

Thin layers over the functional ``jaxbn.filter_response_norm``, ``jaxbn.evonorm_b0``,
``jaxbn.evonorm_s0`` and ``jaxbn.standardize_weight``, with flax's conventions: fields
``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``, ``*_init``; variables
``params/scale`` and ``params/bias`` (one per channel), plus the layer's own parameters.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

import jaxbn
from jaxbn._layers.docs import B0_SETTINGS, FRN_SETTINGS, fill_doc
from jaxbn.linen._common import (AffineFields, GroupFields, ModeFields, affine_params,
                                 result_dtype)


def _features(x: jax.Array, axes: Axes) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(x.shape[a] for a in axes)


@fill_doc(frn_settings=FRN_SETTINGS)
class FilterResponseNorm(nn.Module):
  r"""Filter Response Normalization with TLU (Singh & Krishnan, 2019) for Linen.

  ``y = γ x / sqrt(ν² + ε) + β``, ``z = max(y, τ)``, with ``ν²`` the mean of ``x²`` over the
  spatial axes per example and channel (:func:`jaxbn.filter_response_norm`). No batch
  statistics: the same in training and evaluation. Variables ``params/scale``,
  ``params/bias``, ``params/tau`` (``use_tlu``) and the scalar ``params/eps``
  (``learn_epsilon``: ``ε = epsilon + |eps|``).

  Attributes:
    {frn_settings}
    feature_axes: the channel axis or axes (default -1), flax's name for the functional
      form's ``axis`` (:func:`jaxbn.filter_response_norm` accepts both spellings).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.FilterResponseNorm()
    >>> x = jnp.ones((2, 4, 4, 3))
    >>> jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x))
    {'params': {'bias': (3,), 'scale': (3,), 'tau': (3,)}}
  """

  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  use_tlu: bool = True
  learn_epsilon: bool = False
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros
  eps_init: Initializer = initializers.constant(1e-4)
  feature_axes: Axes = -1

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Normalizes ``x`` (channels on ``feature_axes``); ``mask`` marks the valid positions."""
    x = jnp.asarray(x)
    shape = _features(x, self.feature_axes)
    scale, bias, _ = affine_params(self, x, shape, self.use_scale, self.use_bias)
    tau = self.param("tau", self.tau_init, shape, self.param_dtype) if self.use_tlu else None
    eps = self.param("eps", self.eps_init, (), self.param_dtype) if self.learn_epsilon else None
    return jaxbn.filter_response_norm(
        x, scale, bias, tau, axis=self.feature_axes, epsilon=self.epsilon,
        learned_epsilon=eps, mask=mask, dtype=result_dtype(x, scale, bias, tau, dtype=self.dtype))


@fill_doc(b0_settings=B0_SETTINGS)
class EvoNormB0(AffineFields, ModeFields):
  r"""EvoNorm-B0 (Liu et al., 2020) for Linen: batch variance with running statistics.

  ``y = x / max(sqrt(s²_b + ε), v·x + sqrt(s²_i + ε)) · γ + β`` (:func:`jaxbn.evonorm_b0`).
  As ``flax.linen.BatchNorm``: the mode comes from ``use_running_average`` (constructor or
  call), training uses the batch variance (synchronized over ``axis_name``) and updates the
  running one, evaluation uses the running one; during ``init`` nothing is updated and no
  collective is issued. Variables ``params/scale``, ``params/bias``, ``params/v`` and
  ``batch_stats/var`` (no running mean: B0 does not center, as in the paper), plus an int32
  ``batch_stats/count`` when ``momentum`` is None (the cumulative average needs it) — the
  state of the functional form's ``BatchStats`` that B0 reads and updates.

  Attributes:
    use_running_average: True: running variance (eval); False: batch variance (training).
    {b0_settings}

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.EvoNormB0(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    >>> variables = layer.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = layer.apply(variables, x, use_running_average=False,
    ...                          mutable=['batch_stats'])
    >>> updates['batch_stats']['var'].shape
    (2,)
  """

  v_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  unbiased_running_var: bool = False
  skip_nonfinite: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Normalizes ``x``; in training (``batch_stats`` mutable) updates the running variance."""
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    x = jnp.asarray(x)
    shape = _features(x, self.axis)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    ra_count = (self.variable("batch_stats", "count", lambda: jaxbn.init_stats(1).count)
                if self.momentum is None else None)
    scale, bias, _ = affine_params(self, x, shape, self.use_scale, self.use_bias)
    v = self.param("v", self.v_init, shape, self.param_dtype)
    init = self.is_initializing()
    stats = jaxbn.BatchStats(jnp.zeros(shape, ra_var.value.dtype), ra_var.value,
                             jaxbn.init_stats(1).count if ra_count is None else ra_count.value)
    y, new = jaxbn.evonorm_b0(
        x, stats, scale, bias, v, training=not use_running_average, axis=self.axis,
        momentum=self.momentum, epsilon=self.epsilon,
        axis_name=None if init else self.axis_name,
        axis_index_groups=None if init else self.axis_index_groups, mask=mask,
        dtype=result_dtype(x, scale, bias, v, dtype=self.dtype),
        unbiased_running_var=self.unbiased_running_var,
        skip_nonfinite=self.skip_nonfinite)
    if not use_running_average and not init:
      ra_var.value = new.var
      if ra_count is not None:
        ra_count.value = new.count
    return y


class EvoNormS0(AffineFields, GroupFields):
  r"""EvoNorm-S0 (Liu et al., 2020) for Linen: ``x·σ(v·x)`` over the group std.

  Batch-independent (:func:`jaxbn.evonorm_s0`); channels last, groups as flax's
  ``GroupNorm`` (``num_groups`` or ``group_size``). Variables ``params/scale``,
  ``params/bias``, ``params/v``.

  Attributes:
    num_groups: channel groups (default 32); None with ``group_size``.
    group_size: channels per group.
    epsilon: added to the variance (default 1e-5).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as flax's GroupNorm.
    v_init: initializer of ``v`` (default ones).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> layer = jaxbn.linen.EvoNormS0(num_groups=2)
    >>> x = jnp.ones((2, 3, 3, 4))
    >>> jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x))
    {'params': {'bias': (4,), 'scale': (4,), 'v': (4,)}}
  """

  v_init: Initializer = initializers.ones

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Normalizes ``x`` (channels last); ``mask`` marks the valid entries."""
    x = jnp.asarray(x)
    shape = (x.shape[-1],)
    scale, bias, _ = affine_params(self, x, shape, self.use_scale, self.use_bias)
    v = self.param("v", self.v_init, shape, self.param_dtype)
    return jaxbn.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups,
                            group_size=self.group_size, epsilon=self.epsilon, mask=mask,
                            dtype=result_dtype(x, scale, bias, v, dtype=self.dtype))


class WSConv(nn.Conv):
  r"""Weight-standardized convolution (Qiao et al., 2019) for Linen: ``nn.Conv`` on ``Ŵ``.

  Every field, the call and the variables of ``flax.linen.Conv`` (``params/kernel``,
  ``params/bias``), so a Conv checkpoint loads; the stored ``kernel`` is standardized per
  output channel on each call, ``Ŵ = (W − μ) / sqrt(σ² + epsilon)`` over its fan-in
  (:func:`jaxbn.standardize_weight`, before flax's dtype promotion). Usually followed by
  GroupNorm (``WSConv`` + ``GroupNorm`` is the paper's batch-independent replacement of
  conv + BN). Implemented by standardizing ``kernel`` where ``nn.Conv`` reads it
  (``self.param``), so every other field (padding, strides, groups...) is ``nn.Conv``'s own.

  Attributes:
    epsilon: added to the kernel variance (default 1e-6, timm's ``StdConv2d``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> conv = jaxbn.linen.WSConv(8, (3, 3))
    >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (8,), 'kernel': (3, 3, 3, 8)}}
  """

  epsilon: float = 1e-6

  def _scaling(self, features: int) -> tuple[Optional[jax.Array], bool]:
    """``standardize_weight``'s ``gain`` and ``fan_in_scaling``: none here."""
    return None, False

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    """``nn.Module.param``, returning the standardized kernel for ``kernel``."""
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel":
      return value
    gain, fan_in_scaling = self._scaling(value.shape[-1])
    return jaxbn.standardize_weight(value, gain, axis=-1, epsilon=self.epsilon,
                                    fan_in_scaling=fan_in_scaling)


class ScaledWSConv(WSConv):
  r"""Scaled weight-standardized convolution (NF-Nets, Brock et al., 2021) for Linen.

  ``Ŵ = g · (W − μ) / sqrt(fan_in · (σ² + epsilon))``, with a learned per-output ``gain``
  (``params/gain``, init ``gain_init``); otherwise :class:`WSConv` (``nn.Conv``'s fields
  and variables). timm's ``ScaledStdConv2d`` convention (``ε`` inside the square root).

  Attributes:
    gain_init: initializer of ``gain`` (default ones); multiply by the activation's gain
      constant (NF-Nets' ``γ``) if you use one.
    use_gain: learn ``gain`` (default True).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> conv = jaxbn.linen.ScaledWSConv(8, (3, 3), use_bias=False)
    >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'gain': (8,), 'kernel': (3, 3, 3, 8)}}
  """

  gain_init: Initializer = initializers.ones
  use_gain: bool = True

  def _scaling(self, features: int) -> tuple[Optional[jax.Array], bool]:
    gain = (super().param("gain", self.gain_init, (features,), self.param_dtype)
            if self.use_gain else None)
    return gain, True
