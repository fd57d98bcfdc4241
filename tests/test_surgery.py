"""Model surgery: an unmodified flax ResNet (``flax.linen.BatchNorm`` inside) and an NNX CNN run
with jaxbn's layers and variants; outputs, updated statistics and gradients equal the
hand-edited model's, checkpoints load both ways, on 1 and 8 devices (``shard_map``).

The ResNet of ``tests/_resnet.py`` is used as a third-party model: its code is not edited,
the replacement happens from outside. "Hand-edited" is the same class with the normalization
injected by hand (``ResNet(batch_norm=jaxbn.linen.BatchNorm, ...)``); both run the same
jaxbn computation, so they agree bit for bit. Against flax's own BatchNorm the numbers agree
to float32 rounding (2e-5 absolute on O(1) outputs: eps 1.2e-7 × a few hundred through three
normalized layers).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx
from tests._resnet import NNXResNet, ResNet, fill

X = np.random.default_rng(0).normal(size=(16, 6, 6, 3)).astype(np.float32) * 2 + 0.5
LABELS = np.arange(16) % 10


def _resnet(**kw):
  """The third-party model, small: one stage of one block (3 BatchNorms incl. projection)."""
  return ResNet(stage_sizes=(1,), num_filters=4, **kw)


def _variables(model):
  return fill(jax.eval_shape(lambda: model.init(jax.random.key(0), X[:2], train=False)))


def _train(model, variables):
  """Loss, gradients and updated statistics of one training step."""

  def loss(params):
    logits, upd = model.apply({**variables, "params": params}, X, train=True,
                              mutable=["batch_stats"])
    return jnp.mean((logits - jax.nn.one_hot(LABELS, 10)) ** 2), upd

  (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return value, grads, upd


def _equal(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def _close(a, b, atol=2e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0,
                                                       atol=atol), a, b)


def test_unmodified_flax_resnet_runs_jaxbn_batch_norm_equal_to_hand_edited():
  third_party = _resnet()  # flax.linen.BatchNorm inside
  variables = _variables(third_party)
  swapped = jaxbn.linen.replace_batch_norm(third_party)
  hand = _resnet(batch_norm=jaxbn.linen.BatchNorm)
  # same variables: the swapped model initializes the same tree, and takes the checkpoint
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(
      lambda: m.init(jax.random.key(0), X[:2], train=False)))
  assert shapes(swapped) == shapes(third_party)
  restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
  out_s, out_h, out_f = (_train(m, restored) for m in (swapped, hand, third_party))
  _equal(out_s, out_h)
  _close(out_s, out_f)  # flax's own BatchNorm, to float32 rounding
  # eval mode, and back to the original module
  ev = lambda m: m.apply({**variables, **out_s[2]}, X, train=False)
  _equal(ev(swapped), ev(hand))
  assert jaxbn.linen.restore_batch_norm(swapped) is third_party


def _hand(cls, **fields):
  """The hand edit: ``cls`` under the name ``BatchNorm``, so that flax's automatic names (and
  with them the checkpoint paths) stay those of the original model (a class named
  ``FrozenBatchNorm`` would create ``FrozenBatchNorm_0`` instead of ``BatchNorm_0``)."""
  return type("BatchNorm", (cls,), {"__annotations__": {k: type(v) for k, v in fields.items()},
                                    **fields})


class _GroupNormAsBN(jaxbn.linen.GroupNorm):
  """GroupNorm taking (and ignoring) the BN-only arguments the ResNet passes."""
  num_groups: int = 4
  use_running_average: object = None
  momentum: object = None


@pytest.mark.parametrize("variant", ["frozen", "renorm", "ghost", "group"])
def test_variants_on_the_unmodified_model(variant):
  third_party = _resnet()
  variables = _variables(third_party)
  layer, kw, hand = {
      "frozen": (jaxbn.linen.FrozenBatchNorm, {}, _hand(jaxbn.linen.FrozenBatchNorm)),
      "renorm": (jaxbn.linen.BatchRenorm, dict(r_max=1.5, d_max=0.5),
                 _hand(jaxbn.linen.BatchRenorm, r_max=1.5, d_max=0.5,
                       use_fast_variance=True)),
      "ghost": (jaxbn.linen.GhostBatchNorm, dict(virtual_batch_size=4),
                _hand(jaxbn.linen.GhostBatchNorm, virtual_batch_size=4,
                      use_fast_variance=True)),
      "group": (jaxbn.linen.GroupNorm, dict(num_groups=4), _hand(_GroupNormAsBN)),
  }[variant]
  swapped = jaxbn.linen.replace_batch_norm(third_party, layer, **kw)
  # (the replacement keeps the flax layers' settings, incl. use_fast_variance=True, which
  # BatchRenorm and GhostBatchNorm default to False: the hand edit sets it too)
  if variant == "group":  # GroupNorm has no batch_stats: only the params are used
    variables = {"params": variables["params"]}
    logits = lambda m: jax.jit(lambda v: m.apply(v, X, train=True))(variables)
    _equal(logits(swapped), logits(_resnet(batch_norm=hand)))
    return
  run = lambda m: jax.jit(lambda v: m.apply(v, X, train=True, mutable=["batch_stats"]))(
      variables)
  out = run(swapped)
  _equal(out, run(_resnet(batch_norm=hand)))
  if variant == "frozen":  # frozen: training mode uses and keeps the running statistics
    _equal(out[1]["batch_stats"], variables["batch_stats"])


class _SetupNet(nn.Module):
  """A model that creates its BatchNorm in ``setup`` (not inline)."""

  def setup(self):
    self.dense = nn.Dense(4)
    self.bn = nn.BatchNorm(momentum=0.9)

  def __call__(self, x, train: bool):
    return self.bn(self.dense(x), use_running_average=not train)


def test_layers_created_in_setup_are_replaced_too():
  x = X[:, 0, 0]
  variables = _SetupNet().init(jax.random.key(0), x, train=False)
  variables = {**variables, "batch_stats": {"bn": {"mean": jnp.full(4, 0.5),
                                                   "var": jnp.full(4, 2.0)}}}
  frozen = jaxbn.linen.replace_batch_norm(_SetupNet(), jaxbn.linen.FrozenBatchNorm)
  y, upd = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
  _equal(y, _SetupNet().apply(variables, x, train=False))  # frozen: eval behaviour in training
  _equal(upd["batch_stats"], variables["batch_stats"])


def test_replace_errors_name_the_field():
  with pytest.raises(TypeError, match=r"replace_batch_norm: BatchNorm has no field\(s\) "
                                      r"\['virtual_batch_size'\]"):
    jaxbn.linen.replace_batch_norm(nn.BatchNorm(use_running_average=True),
                                   virtual_batch_size=4).init(jax.random.key(0), X[:2, 0, 0])
  with pytest.raises(TypeError, match=r"`module` must be a flax.linen.Module"):
    jaxbn.linen.replace_batch_norm(lambda x: x)


def _mesh():
  return jax.make_mesh((8,), ("batch",))


def test_synchronized_on_8_devices_equals_hand_edited_and_global_batch():
  """BN synchronized over 8 devices, on a model without an axis_name field of its own."""
  third_party = _resnet()
  variables = _variables(third_party)
  swapped = jaxbn.linen.replace_batch_norm(third_party, axis_name="batch")
  hand = _resnet(batch_norm=jaxbn.linen.BatchNorm, axis_name="batch")
  mesh = _mesh()

  def sharded(model):
    def step(params, stats, x):
      def loss(p):
        y, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(y ** 2), upd
      (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
      return jax.lax.psum(l, "batch"), g, upd
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("batch")),
                              out_specs=(P(), P(), P())))
    return f(variables["params"], variables["batch_stats"],
             jax.device_put(X, NamedSharding(mesh, P("batch"))))

  out_s, out_h = sharded(swapped), sharded(hand)
  _equal(out_s, out_h)
  # = the unsynchronized model on the global batch (gradients of the replicated parameters
  # come out summed over devices under shard_map, as the global loss's)
  model1 = jaxbn.linen.replace_batch_norm(third_party)
  def loss1(p):
    y, upd = model1.apply({"params": p, "batch_stats": variables["batch_stats"]}, X,
                          train=True, mutable=["batch_stats"])
    return jnp.sum(y ** 2), upd
  (l1, upd1), g1 = jax.jit(jax.value_and_grad(loss1, has_aux=True))(variables["params"])
  _close((l1, upd1), (out_s[0], out_s[2]), atol=2e-4)
  _close(g1, out_s[1], atol=2e-4)


# ----------------------------------------------------------------- NNX
def _nnx_model(bn):
  model = NNXResNet(bn, stage_sizes=(1,), num_filters=4, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  return nnx.merge(graph, fill(state))


def _nnx_step(model):
  graph, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    def loss(state):
      m = nnx.merge(graph, state)
      y = m(x)
      return jnp.mean((y - jax.nn.one_hot(LABELS, 10)) ** 2), nnx.state(m)
    (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return value, grads, new_state

  return step(state, X)


def test_nnx_replace_every_batch_norm_state_moved_and_back():
  original = _nnx_model(nnx.BatchNorm)
  swapped = jaxbn.nnx.replace_batch_norm(original)
  kinds = {type(n).__name__ for _, n in nnx.iter_graph(swapped) if "Norm" in type(n).__name__}
  assert kinds == {"BatchNorm"} and not any(
      isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(swapped))
  _equal(nnx.state(swapped), nnx.state(original))  # same paths, same values
  # equals the hand-edited model (jaxbn.nnx.BatchNorm written in the code), same state
  hand = _nnx_model(jaxbn.nnx.BatchNorm)
  nnx.update(hand, nnx.state(original))
  out_s, out_h = _nnx_step(swapped), _nnx_step(hand)
  _equal(out_s, out_h)
  # and back: flax's layers, same state; the original was not modified
  back = jaxbn.nnx.replace_batch_norm(swapped, nnx.BatchNorm)
  assert all(type(n) is not jaxbn.nnx.BatchNorm for _, n in nnx.iter_graph(back))
  _equal(nnx.state(back), nnx.state(original))
  assert sum(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(original)) == 3
  # checkpoint round trip through flax serialization of the state
  state = nnx.to_pure_dict(nnx.state(swapped))
  restored = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(state))
  nnx.replace_by_pure_dict(target := nnx.state(back), restored)
  nnx.update(back, target)
  _equal(nnx.to_pure_dict(nnx.state(back)), state)


def test_nnx_group_norm_keeps_affine_and_sync_on_8_devices():
  original = _nnx_model(nnx.BatchNorm)
  gn = jaxbn.nnx.replace_batch_norm(original, jaxbn.nnx.GroupNorm, num_groups=4)
  assert jax.tree.leaves(nnx.state(gn, nnx.BatchStat)) == []
  params = lambda m: nnx.state(m, nnx.Param)
  _equal(params(gn), params(original))
  # synchronized BN over 8 devices under shard_map == the global batch on one device
  synced = jaxbn.nnx.replace_batch_norm(original, axis_name="batch")
  graph, state = nnx.split(synced)
  mesh = _mesh()

  def fwd(state, x):
    m = nnx.merge(graph, state)
    return m(x), nnx.state(m, nnx.BatchStat)

  f = jax.jit(jax.shard_map(fwd, mesh=mesh, in_specs=(P(), P("batch")),
                            out_specs=(P("batch"), P())))
  y, stats = f(state, jax.device_put(X, NamedSharding(mesh, P("batch"))))
  single = jaxbn.nnx.replace_batch_norm(original)
  y1 = single(X)
  _close(y, y1, atol=2e-4)
  _close(stats, nnx.state(single, nnx.BatchStat), atol=2e-5)
