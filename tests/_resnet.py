"""A small ResNet-style model, written once, with the batch norm injected (flax's pattern).

``ResNet(batch_norm=flax.linen.BatchNorm)`` and ``ResNet(batch_norm=jaxbn.linen.BatchNorm)``
differ in nothing else, which is what the drop-in tests and ``benchmarks/bench_model.py``
compare. The NNX twin ``NNXResNet`` takes ``flax.nnx.BatchNorm`` or ``jaxbn.nnx.BatchNorm``.
Conv + BN + ReLU blocks with a residual (and a 1x1 projection + BN where the shape changes),
global average pooling and a dense head, NHWC, as in flax's ``examples/imagenet/models.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx


class ResNetBlock(nn.Module):
  """Two 3x3 conv + BN, ReLU in between, a residual (projected when the shape changes)."""

  filters: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet (v1.5 blocks) whose batch norm class is a field."""

  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  num_classes: int = 10
  batch_norm: Callable[..., nn.Module] = nn.BatchNorm
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  norm_kwargs: Any = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(self.batch_norm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name,
                             **dict(self.norm_kwargs or {}))
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def linen_loss(model: ResNet, params, batch_stats, x, labels):
  """Cross-entropy in training mode; returns (loss, new batch_stats)."""
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates["batch_stats"]


def linen_train_step(model: ResNet, tx: optax.GradientTransformation):
  """A pure train step ``(params, batch_stats, opt_state, x, labels) -> (..., loss, grads)``."""

  def step(params, batch_stats, opt_state, x, labels):
    (loss, batch_stats), grads = jax.value_and_grad(
        functools.partial(linen_loss, model), has_aux=True)(params, batch_stats, x, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  return step


class NNXBlock(nnx.Module):
  """NNX twin of :class:`ResNetBlock`."""

  def __init__(self, cin, cout, strides, norm, rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=strides, use_bias=False, rngs=rngs)
    self.bn1 = norm(cout, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = norm(cout, rngs=rngs)
    if cin != cout or strides != (1, 1):
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=strides, use_bias=False, rngs=rngs)
      self.bn_proj = norm(cout, rngs=rngs)
    else:
      self.proj = nnx.data(None)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.proj is None else self.bn_proj(self.proj(x))
    return nnx.relu(residual + y)


class NNXResNet(nnx.Module):
  """NNX twin of :class:`ResNet` (float32)."""

  def __init__(self, batch_norm, *, cin=3, stage_sizes=(1, 1), num_filters=8, num_classes=10,
               axis_name=None, rngs: nnx.Rngs, **norm_kwargs):
    norm = functools.partial(batch_norm, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
                             **norm_kwargs)
    self.conv_init = nnx.Conv(cin, num_filters, (3, 3), use_bias=False, rngs=rngs)
    self.bn_init = norm(num_filters, rngs=rngs)
    blocks, c = [], num_filters
    for i, n in enumerate(stage_sizes):
      for j in range(n):
        cout = num_filters * 2**i
        blocks.append(NNXBlock(c, cout, (2, 2) if i > 0 and j == 0 else (1, 1), norm, rngs))
        c = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_init(self.conv_init(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def fill(shapes, seed: int = 0):
  """Concrete variables for a tree of shapes (``jax.eval_shape`` of an init), from NumPy.

  Avoids compiling the random initializers (seconds each on CPU). BN ``scale``/``bias`` get
  values away from 1/0 so that tests exercise them; running ``mean``/``var`` start at 0/1.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "mean" in name:
      v = np.zeros(s.shape)
    elif "var" in name:
      v = np.ones(s.shape)
    elif "scale" in name:
      v = 1.0 + 0.2 * rng.standard_normal(s.shape)
    elif "bias" in name:
      v = 0.1 * rng.standard_normal(s.shape)
    else:  # conv / dense kernels, fan-in scaled
      v = rng.standard_normal(s.shape) / np.sqrt(max(int(np.prod(s.shape[:-1])), 1))
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
