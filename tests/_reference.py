"""Independent float64 NumPy references used across the tests."""

from __future__ import annotations

import numpy as np


def feature_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def moments(x, axis=-1, mask=None):
  """float64 (count, mean, biased var) over all non-feature axes, masked."""
  x = np.asarray(x)
  cplx = np.iscomplexobj(x)
  x = x.astype(np.complex128 if cplx else np.float64)
  feat = feature_axes(x.ndim, axis)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  n = m.sum(axis=red, keepdims=True).astype(np.float64)
  xs = np.where(m, x, 0)
  mean = xs.sum(axis=red, keepdims=True) / np.maximum(n, 1)
  var = np.where(m, np.abs(x - mean) ** 2, 0).sum(axis=red, keepdims=True) / np.maximum(n, 1)
  return n, mean, var


def batch_norm(x, scale=None, bias=None, axis=-1, eps=1e-5, mask=None):
  """float64 training-mode BN output and (count, mean, var), keepdims shapes."""
  n, mean, var = moments(x, axis, mask)
  feat = feature_axes(np.ndim(x), axis)
  kshape = tuple(d if i in feat else 1 for i, d in enumerate(np.shape(x)))
  x64 = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  if mask is not None:
    keep = np.broadcast_to(mask, x64.shape) | np.isfinite(x64)
    x64 = np.where(keep, x64, 0)
  y = (x64 - mean) / np.sqrt(var + eps)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(kshape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(kshape)
  return y, (n, mean, var)


def ema(old, new, momentum):
  return momentum * np.asarray(old, np.float64) + (1 - momentum) * np.asarray(new, np.float64)


def grads(x, scale, bias, dy, axis=-1, eps=1e-5, mask=None):
  """float64 closed-form gradients of sum(dy * BN(x)) w.r.t. x, scale, bias."""
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  n, mean, var = moments(x, axis, mask)
  feat = feature_axes(x.ndim, axis)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  kshape = mean.shape
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  x = np.where(m | np.isfinite(x), x, 0)
  inv = 1 / np.sqrt(var + eps)
  xhat = (x - mean) * inv
  g = np.asarray(scale, np.float64).reshape(kshape)
  dbias = dy.sum(axis=red)
  dscale = (dy * xhat).sum(axis=red)
  # Every output depends on the statistics; only valid entries enter them.
  s0 = (dy * g).sum(axis=red, keepdims=True)
  s1 = (dy * g * xhat).sum(axis=red, keepdims=True)
  nn = np.maximum(n, 1)
  dx = g * inv * dy - np.where(m, inv * (s0 + xhat * s1) / nn, 0)
  return dx, dscale.reshape(-1), dbias.reshape(-1)
