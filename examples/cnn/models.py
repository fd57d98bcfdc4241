"""The CNN, with its normalization layer injected by ``functools.partial``, in linen and NNX.

:func:`norm_layer` maps a ``--norm`` name to a partially applied Flax linen module (jaxbn's
layers, or flax's own BatchNorm for comparison); :class:`CNN` builds one per conv layer.
:func:`nnx_norm_layer` and :class:`NnxCNN` are the same network written with ``flax.nnx`` and
``jaxbn.nnx`` (``--api nnx``): the same layers, the same initial distributions, the same
arguments. Swapping the normalization changes no other line of the model, as with flax's
``examples/imagenet``.

Mixed precision (``dtype=jnp.bfloat16``): convolutions, the head and the normalization outputs
compute in bfloat16; parameters stay float32 (``param_dtype``) and jaxbn's layers keep their
running statistics in float32 and accumulate their moments in float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
from flax import nnx
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
               ghost_batch_size: int = 16, groups: int = 8, dtype: Any = None
               ) -> Optional[ModuleDef]:
  """Returns the normalization module for ``--norm name``, hyperparameters bound.

  Args:
    name: ``batch``, ``renorm``, ``ghost``, ``group``, ``layer``, ``none`` or ``flax``.
    momentum: running-average momentum of the batch-statistics layers (flax convention).
    axis_name: mapped axis to synchronize batch statistics over (``shard_map``/``pmap``).
    ghost_batch_size: virtual batch size of ``ghost``.
    groups: number of groups of ``group``.
    dtype: output dtype of the layer (None: as flax, promoted from input and parameters).

  Returns:
    A ``functools.partial`` of a Flax module class, or None for ``none``.

  Raises:
    ValueError: an unknown name, or a layer this jaxbn version does not provide.
  """
  if name == "none":
    return None
  if name == "flax":
    return functools.partial(nn.BatchNorm, momentum=momentum, epsilon=1e-5, axis_name=axis_name,
                             dtype=dtype)
  layer = functools.partial(_jaxbn_layer(name, _jaxbn_linen(), "jaxbn.linen"), dtype=dtype)
  return _bind(name, layer, momentum=momentum, axis_name=axis_name,
               ghost_batch_size=ghost_batch_size, groups=groups)


def _jaxbn_layer(name: str, module: Any, where: str) -> Any:
  if name not in _JAXBN_LAYERS:
    raise ValueError(f"--norm {name!r} is not a normalization; choose one of "
                     f"{', '.join(available_norms())}.")
  attr, what = _JAXBN_LAYERS[name]
  layer = getattr(module, attr, None)
  if layer is None:
    raise ValueError(
        f"--norm {name} needs {where}.{attr} ({what}), which this version of jaxbn does "
        f"not provide; choose one of {', '.join(available_norms())}.")
  return layer


def _bind(name: str, layer: Any, *, momentum: float, axis_name: Optional[str],
          ghost_batch_size: int, groups: int) -> Any:
  """The hyperparameters of ``--norm name``; the same for the linen and the NNX class."""
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


def uses_batch_stats(norm: Optional[Any]) -> bool:
  """Whether a norm module (linen partial or NNX factory) keeps running statistics."""
  if norm is None:
    return False
  cls = norm.func if isinstance(norm, functools.partial) else norm
  if "use_running_average" in getattr(cls, "__dataclass_fields__", {}):  # linen
    return True
  import inspect  # pylint: disable=import-outside-toplevel
  try:  # NNX: the constructor takes use_running_average
    return "use_running_average" in inspect.signature(cls.__init__).parameters
  except (TypeError, ValueError):
    return False


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


# ----------------------------------------------------------------------------- NNX


def nnx_norm_layer(name: str, *, momentum: float = 0.9, axis_name: Optional[str] = None,
                   ghost_batch_size: int = 16, groups: int = 8, dtype: Any = None
                   ) -> Optional[Callable[..., Any]]:
  """The ``flax.nnx`` version of :func:`norm_layer`: ``factory(num_features, rngs=...)``.

  The same names and hyperparameters as :func:`norm_layer`, with ``jaxbn.nnx``'s classes
  (``flax``: ``flax.nnx.BatchNorm``).
  """
  if name == "none":
    return None
  if name == "flax":
    return functools.partial(nnx.BatchNorm, momentum=momentum, epsilon=1e-5,
                             axis_name=axis_name, dtype=dtype)
  import jaxbn.nnx  # pylint: disable=import-outside-toplevel
  layer = functools.partial(_jaxbn_layer(name, jaxbn.nnx, "jaxbn.nnx"), dtype=dtype)
  return _bind(name, layer, momentum=momentum, axis_name=axis_name,
               ghost_batch_size=ghost_batch_size, groups=groups)


class NnxCNN(nnx.Module):
  """:class:`CNN` written with ``flax.nnx``: same layers, initializers and arguments.

  ``model.train()`` / ``model.eval()`` switch the norm layers between batch statistics and
  running statistics (NNX's convention, instead of linen's ``train`` argument).

  Args:
    num_classes: number of output logits.
    in_channels: channels of the input images.
    widths: channels of each stage; every stage after the first starts with a 2x2 pool.
    norm: a factory from :func:`nnx_norm_layer`, or None.
    dtype: computation dtype of the convolutions and the head (parameters stay float32).
    rngs: ``nnx.Rngs`` for the initializers.
  """

  def __init__(self, num_classes: int, in_channels: int, *, widths: Sequence[int] = (32, 64, 128),
               norm: Optional[Callable[..., Any]] = None, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.widths = tuple(widths)
    self.stats = uses_batch_stats(norm)
    convs, norms, c_in = [], [], in_channels
    for width in self.widths:
      for _ in range(2):
        convs.append(nnx.Conv(c_in, width, kernel_size=(3, 3), use_bias=norm is None,
                              dtype=dtype, rngs=rngs))
        norms.append(None if norm is None else norm(width, rngs=rngs))
        c_in = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.head = nnx.Linear(c_in, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
               norm_args: Optional[dict[str, Any]] = None) -> jax.Array:
    """Logits for images ``x`` (B, H, W, C); ``mask`` (B,) marks the real examples."""
    bn_mask = None if mask is None else mask[:, None, None, None]
    for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      if layer and layer % 2 == 0:
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
      x = conv(x)
      if norm is not None:
        if self.stats:  # eval mode: the layers ignore the mask and norm_args
          training = not norm.use_running_average
          x = norm(x, mask=bn_mask, **(norm_args if norm_args and training else {}))
        else:
          x = norm(x)
      x = nnx.relu(x)
    return self.head(jnp.mean(x, axis=(1, 2)))
