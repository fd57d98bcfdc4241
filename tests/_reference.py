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


# ------------------------------------------------------------------ tolerances from numerics
# The rule (tests/README.md): a float comparison allows
#     |actual - expected| <= k * cond * u(dtype) * (|expected| + scale)
# where u is the unit roundoff of the dtype the result is *computed or stored* in, cond is the
# condition factor of the quantity (how much the inputs' rounding is amplified: 1 for a
# normalized output, 1 + |mean|/std for statistics of offset data, log2(n) for n-term sums),
# k is a small constant (default 4: rounding of inputs, statistics, output and one spare), and
# ``scale`` (default: the RMS of ``expected``) gives entries near zero the absolute slack of a
# typical entry. The expected value is a float64 NumPy computation on the *same quantized
# inputs* the library saw, so the bound measures the library's arithmetic only.

_MANTISSA_BITS = {"float64": 53, "float32": 24, "bfloat16": 8, "float16": 11,
                  "complex64": 24, "complex128": 53}


def unit_roundoff(dtype) -> float:
  """u = 2^-p for a p-bit significand: float32 5.96e-8, bfloat16 3.91e-3, float16 4.88e-4."""
  name = np.dtype(dtype).name
  return 2.0 ** -_MANTISSA_BITS[name]


def tol(dtype, cond: float = 1.0, k: float = 4.0) -> float:
  """The relative bound ``k * cond * u(dtype)`` (see the rule above)."""
  return k * cond * unit_roundoff(dtype)


def error_ratio(actual, expected, dtype, *, cond: float = 1.0, k: float = 4.0, scale=None,
                where=None) -> float:
  """max |actual - expected| / bound over the entries; <= 1 means within tolerance."""
  a = np.asarray(actual).astype(np.complex128 if np.iscomplexobj(actual) else np.float64)
  e = np.asarray(expected).astype(np.complex128 if np.iscomplexobj(expected) else np.float64)
  a, e = np.broadcast_arrays(a, e)
  if where is not None:
    w = np.broadcast_to(np.asarray(where, bool), e.shape)
    a, e = a[w], e[w]
  if e.size == 0:
    return 0.0
  if scale is None:
    scale = float(np.sqrt(np.mean(np.abs(e) ** 2))) or 1.0
  bound = tol(dtype, cond, k) * (np.abs(e) + scale)
  with np.errstate(invalid="ignore"):
    r = np.abs(a - e) / bound
  r = np.where(np.isnan(a) & np.isnan(e), 0.0, r)  # NaN where expected NaN is equal
  r = np.where(np.isnan(r), np.inf, r)
  return float(np.max(r))


def close(actual, expected, dtype, **kw) -> bool:
  """True when ``actual`` is within the numerics-derived bound of ``expected``."""
  return error_ratio(actual, expected, dtype, **kw) <= 1.0


def assert_close(actual, expected, dtype, *, cond: float = 1.0, k: float = 4.0, scale=None,
                 where=None, what: str = "value"):
  """Asserts :func:`close`; the message shows the error in units of the bound."""
  r = error_ratio(actual, expected, dtype, cond=cond, k=k, scale=scale, where=where)
  assert r <= 1.0, (f"{what}: max error is {r:.3g}x the bound k*cond*u = {k}*{cond:.3g}*"
                    f"{unit_roundoff(dtype):.3g} ({np.dtype(dtype).name})")


def cond_offset(x, axis=-1, mask=None, eps=1e-5) -> float:
  """1 + max |mean| / sqrt(var + eps) over features: how much BN amplifies the rounding of x.

  ``x − mean`` rounds at u·|mean|; BN divides it by sqrt(var + eps). Features without a valid
  entry are ignored (their output is not compared).
  """
  n, mean, var = moments(x, axis, mask)
  has = n > 0
  if not np.any(has):
    return 1.0
  return float(1 + np.max(np.abs(mean[has]) / np.sqrt(var[has] + eps)))


def bn_output_cond(x64, dtype, axis=-1, mask=None) -> float:
  """Condition factor of a BN output in ``dtype`` relative to u(dtype).

  The statistics are computed in float32; the shifted one-pass (or two-pass) variance has
  relative error ~ u32 * cond_offset², and the output is rounded once to ``dtype``. So the
  error is about u(dtype) + u32 * cond_offset², i.e. cond = 1 + cond_offset² * u32 / u(dtype):
  ~1 for bfloat16/float16 output, cond_offset² for float32.
  """
  c = cond_offset(x64, axis, mask)
  return 1.0 + c * c * unit_roundoff(np.float32) / unit_roundoff(dtype)


def quantize(x, dtype):
  """``x`` rounded to ``dtype`` (as an implementation returning ``dtype`` would), as float64."""
  import jax.numpy as jnp  # noqa: PLC0415
  return np.asarray(jnp.asarray(np.asarray(x, np.float64), dtype).astype(jnp.float32),
                    np.float64)


def stats_cond(x64, axis=-1, order: int = 1, mask=None) -> float:
  """Condition factor of float32 batch statistics: log2(n) (summation) × cond_offset^order.

  ``order=1`` for the mean, ``order=2`` for the variance (the one-pass or shifted formula loses
  cond_offset² of relative accuracy; a two-pass formula does better, so this is an upper bound).
  """
  n, _, _ = moments(x64, axis, mask)
  return float(max(1.0, np.log2(max(float(np.max(n)), 1.0))) *
               cond_offset(x64, axis, mask) ** order)


def group_norm(x, num_groups, eps=1e-6, scale=None, bias=None):
  """float64 group norm of NHWC-like x (batch first, channels last), per example and group."""
  x = np.asarray(x, np.float64)
  c = x.shape[-1]
  g = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = g.mean(axis=axes, keepdims=True)
  var = ((g - mean) ** 2).mean(axis=axes, keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def norm_cond(x64, red, dtype, mask=None, eps=1e-6) -> float:
  """:func:`bn_output_cond` for statistics over the axes ``red`` (layer/group/instance norm).

  cond_offset = 1 + max |mean| / sqrt(var + eps) over the normalized slices (masked entries
  excluded); cond = 1 + cond_offset² · u32 / u(dtype).
  """
  x = np.asarray(x64, np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool),
                                                                   x.shape)
  red = tuple(a % x.ndim for a in red)
  n = m.sum(red, keepdims=True)
  xs = np.where(m, x, 0.0)
  mean = xs.sum(red, keepdims=True) / np.maximum(n, 1)
  var = (np.where(m, x - mean, 0.0) ** 2).sum(red, keepdims=True) / np.maximum(n, 1)
  has = n > 0
  c = 1 + float(np.max(np.abs(mean[has]) / np.sqrt(var[has] + eps))) if np.any(has) else 1.0
  return 1.0 + c * c * unit_roundoff(np.float32) / unit_roundoff(dtype)
