"""``jax.export`` of a model with jaxbn's BatchNorm: the eval step and the train step (running
statistics updated) are exported, serialized to bytes, deserialized and called; outputs equal
the live functions' bit for bit (same StableHLO, same CPU compiler). Serialization needs the
``flatbuffers`` package. A symbolic batch size gives one artifact for every batch size."""

import jax
import numpy as np
import optax
import pytest
from jax import export

import jaxbn
import jaxbn.linen
from tests._resnet import ResNet, fill

MODEL = ResNet(batch_norm=jaxbn.linen.BatchNorm, stage_sizes=(1,), num_filters=4)
X = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32) + 0.5
LABELS = np.arange(8) % 10
TX = optax.sgd(0.1)


def eval_step(variables, x):
  return MODEL.apply(variables, x, train=False)


def train_step(params, batch_stats, x, labels):
  def loss(p):
    logits, upd = MODEL.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
  (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, _ = TX.update(grads, TX.init(params), params)
  return optax.apply_updates(params, updates), upd["batch_stats"], value


def _roundtrip(fn, *args, shapes=None):
  exported = export.export(jax.jit(fn))(*(shapes or args))
  blob = exported.serialize()
  assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
  return export.deserialize(blob)


def _equal(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def _close(a, b):
  """A few float32 ulps of the largest magnitude: a symbolic batch compiles its reductions
  along another path (the entry count is an array, the exactness guard a conditional), so
  the last bit may differ from the concrete-shape program."""
  def check(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    np.testing.assert_allclose(u, v, rtol=0,
                               atol=8 * np.finfo(np.float32).eps * max(1.0, np.abs(v).max()))
  jax.tree.map(check, a, b)


def test_export_roundtrip_eval_and_train_step():
  variables = fill(jax.eval_shape(lambda: MODEL.init(jax.random.key(0), X[:2], train=False)))
  params, stats = variables["params"], variables["batch_stats"]
  # train step: parameters and running statistics updated, as the live function
  restored = _roundtrip(train_step, params, stats, X, LABELS)
  new_params, new_stats, loss = restored.call(params, stats, X, LABELS)
  _equal((new_params, new_stats, loss), jax.jit(train_step)(params, stats, X, LABELS))
  assert not np.array_equal(new_stats["bn_init"]["mean"], stats["bn_init"]["mean"])
  # eval step with the updated statistics
  trained = {"params": new_params, "batch_stats": new_stats}
  restored = _roundtrip(eval_step, trained, X)
  _equal(restored.call(trained, X), jax.jit(eval_step)(trained, X))


def test_export_with_symbolic_batch_size():
  variables = fill(jax.eval_shape(lambda: MODEL.init(jax.random.key(0), X[:2], train=False)))
  params, stats = variables["params"], variables["batch_stats"]
  b, = export.symbolic_shape("b")
  spec = lambda a, shape: jax.ShapeDtypeStruct(shape, a.dtype)
  shapes = (params, stats, spec(X, (b,) + X.shape[1:]), spec(LABELS, (b,)))
  restored = _roundtrip(train_step, shapes=shapes)
  for n in (8, 4):
    _close(restored.call(params, stats, X[:n], LABELS[:n]),
           jax.jit(train_step)(params, stats, X[:n], LABELS[:n]))


def test_export_symbolic_batch_with_a_mask_equals_the_concrete_call():
  """A masked batch norm exports with a symbolic batch (the mask's shape is checked
  symbolically); each batch size gives the concrete-shape results (float64 NumPy too)."""
  b, = export.symbolic_shape("b")
  def f(x, m):
    y, stats = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True, mask=m, momentum=0.0)
    return y, stats.var  # (BatchStats is not registered for serialization)
  restored = _roundtrip(f, shapes=(jax.ShapeDtypeStruct((b, 3), np.float32),
                                   jax.ShapeDtypeStruct((b, 1), np.bool_)))
  rng = np.random.default_rng(1)
  for n in (5, 8):
    x = rng.normal(size=(n, 3)).astype(np.float32) * 2 + 1
    m = np.arange(n)[:, None] % 3 != 1
    y, var = restored.call(x, m)
    _close((y, var), jax.jit(f)(x, m))
    np.testing.assert_allclose(np.asarray(var), x[m[:, 0]].astype(np.float64).var(0),
                               rtol=1e-6)
