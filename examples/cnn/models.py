"""The CNN, with its normalization layer injected by ``functools.partial``.

:func:`norm_layer` maps a ``--norm`` name to a partially applied Flax module (jaxbn's layers,
or flax's own BatchNorm for comparison); :class:`CNN` builds one per conv layer. Swapping the
normalization changes no other line of the model, as with flax's ``examples/imagenet``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]

# --norm name -> (attribute of jaxbn.linen, what it is).
_JAXBN_LAYERS = {
    "batch": ("BatchNorm", "batch normalization"),
    "renorm": ("BatchRenorm", "batch renormalization"),
    "ghost": ("GhostBatchNorm", "ghost batch normalization"),
    "group": ("GroupNorm", "group normalization"),
    "layer": ("LayerNorm", "layer normalization"),
}


def _jaxbn_linen():
  import jaxbn.linen  # pylint: disable=import-outside-toplevel
  return jaxbn.linen


def available_norms() -> tuple[str, ...]:
  """The ``--norm`` choices this installation of jaxbn supports."""
  try:
    linen = _jaxbn_linen()
  except ImportError:
    linen = None
  names = [n for n, (attr, _) in _JAXBN_LAYERS.items() if hasattr(linen, attr)]
  return tuple(names) + ("none", "flax")


def norm_layer(name: str, *, momentum: float = 0.9, axis_name: Optional[str] = None,
               ghost_batch_size: int = 16, groups: int = 8) -> Optional[ModuleDef]:
  """Returns the normalization module for ``--norm name``, hyperparameters bound.

  Args:
    name: ``batch``, ``renorm``, ``ghost``, ``group``, ``layer``, ``none`` or ``flax``.
    momentum: running-average momentum of the batch-statistics layers (flax convention).
    axis_name: mapped axis to synchronize batch statistics over (``shard_map``/``pmap``).
    ghost_batch_size: virtual batch size of ``ghost``.
    groups: number of groups of ``group``.

  Returns:
    A ``functools.partial`` of a Flax module class, or None for ``none``.

  Raises:
    ValueError: an unknown name, or a layer this jaxbn version does not provide.
  """
  if name == "none":
    return None
  if name == "flax":
    return functools.partial(nn.BatchNorm, momentum=momentum, epsilon=1e-5, axis_name=axis_name)
  if name not in _JAXBN_LAYERS:
    raise ValueError(f"--norm {name!r} is not a normalization; choose one of "
                     f"{', '.join(available_norms())}.")
  attr, what = _JAXBN_LAYERS[name]
  layer = getattr(_jaxbn_linen(), attr, None)
  if layer is None:
    raise ValueError(
        f"--norm {name} needs jaxbn.linen.{attr} ({what}), which this version of jaxbn does "
        f"not provide; choose one of {', '.join(available_norms())}.")
  if name == "batch":
    return functools.partial(layer, momentum=momentum, epsilon=1e-5, axis_name=axis_name,
                             use_fast_variance=False)
  if name == "renorm":
    return functools.partial(layer, momentum=momentum, epsilon=1e-5, axis_name=axis_name)
  if name == "ghost":  # per-device virtual batches; only the running averages are synced
    return functools.partial(layer, momentum=momentum, epsilon=1e-5, axis_name=axis_name,
                             virtual_batch_size=ghost_batch_size)
  if name == "group":
    return functools.partial(layer, num_groups=groups, epsilon=1e-5)
  # Layer norm of a conv net: over (H, W, C) of each example, one scale/bias per channel.
  return functools.partial(layer, epsilon=1e-5, reduction_axes=(1, 2, 3), feature_axes=-1)


def uses_batch_stats(norm: Optional[ModuleDef]) -> bool:
  """Whether a norm module keeps running statistics (and so takes ``use_running_average``)."""
  if norm is None:
    return False
  cls = norm.func if isinstance(norm, functools.partial) else norm
  return "use_running_average" in getattr(cls, "__dataclass_fields__", {})


class CNN(nn.Module):
  """A small VGG-style CNN: per stage, conv 3x3 -> norm -> ReLU (twice); pooling between stages.

  Attributes:
    num_classes: number of output logits.
    widths: channels of each stage; every stage after the first starts with a 2x2 average pool.
    norm: normalization module (a partial from :func:`norm_layer`) or None.
    dtype: computation dtype of the convolutions.
  """

  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  norm: Optional[ModuleDef] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask: Optional[jax.Array] = None,
               norm_args: Optional[dict[str, Any]] = None) -> jax.Array:
    """Logits for images ``x`` (B, H, W, C).

    Args:
      x: float images, NHWC.
      train: batch statistics (True) or running statistics (False) in the norm layers.
      mask: optional bool (B,): which examples are real (False: padding). Padding never enters
        the batch statistics.
      norm_args: extra call arguments of the batch-statistics norm layers in training, e.g.
        batch renorm's scheduled ``r_max``/``d_max``.
    """
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=self.norm is None,
                             dtype=self.dtype)
    bn_mask = None if mask is None else mask[:, None, None, None]
    layer = 0
    for stage, width in enumerate(self.widths):
      if stage > 0:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      for _ in range(2):
        x = conv(width, name=f"conv{layer}")(x)
        x = self._normalize(layer, x, train, bn_mask, norm_args or {})
        x = nn.relu(x)
        layer += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)

  def _normalize(self, layer: int, x: jax.Array, train: bool, mask: Optional[jax.Array],
                 norm_args: dict[str, Any]) -> jax.Array:
    if self.norm is None:
      return x
    norm = self.norm(name=f"norm{layer}")
    if not uses_batch_stats(self.norm):
      return norm(x)  # per-example statistics: padding cannot leak into them
    # In eval mode the layers ignore the mask (recompute_batch_stats reads it).
    return norm(x, use_running_average=not train, mask=mask, **(norm_args if train else {}))
