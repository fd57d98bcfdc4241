"""Data-parallel train-step wrappers: ``jax.shard_map`` (+ ``jax.jit``) and ``jax.pmap``.

Both take the same per-device ``step(state, batch) -> outputs`` function, written for one
device's shard of the batch, calling :func:`jaxbn.batch_norm` with ``axis_name`` so that the
statistics are those of the global batch. They only fix the mapping; the step stays plain JAX.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbn._core.collectives import names, varying_axes
from jaxbn.parallel._mesh import AxisNames, batch_sharding


def _spec_axes(spec: P) -> frozenset:
  """The mesh axes a ``PartitionSpec`` splits over (an output varies over exactly these)."""
  return frozenset(a for entry in spec for a in names(entry))


def _check_replicated_outputs(out: Any, out_specs: Any) -> None:
  """jaxbn's error, before shard_map's, for outputs that vary where ``out_specs`` replicates.

  Names each such output and the likely fixes: BN without ``axis_name`` (per-device running
  statistics), a per-device loss or metric not yet ``psum``/``pmean``-ed.
  """
  try:
    specs = jax.tree.broadcast(out_specs, out, is_leaf=lambda s: isinstance(s, P) or s is None)
  except (ValueError, TypeError):
    return  # not a prefix of the outputs: shard_map reports that itself
  bad = []
  for (path, leaf), spec in zip(jax.tree.leaves_with_path(out),
                                jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    if not isinstance(spec, P):
      continue
    extra = varying_axes(leaf) - _spec_axes(spec)
    if extra:
      bad.append((jax.tree_util.keystr(path), tuple(sorted(extra))))
  if not bad:
    return
  axes = sorted({a for _, extra in bad for a in extra})
  name = axes[0] if len(axes) == 1 else tuple(axes)
  where = "; ".join(f"outputs{path} varies over {extra}" for path, extra in bad)
  raise ValueError(
      f"shard_map_step: `out_specs` says these outputs of `step` are the same on every device, "
      f"but they differ across devices: {where}. The usual causes: a BN call "
      f"without `axis_name` (its running statistics are then per device): pass "
      f"axis_name={name!r} for the statistics of the global batch, or "
      f"jaxbn.parallel.average_stats(stats, axis_name={name!r}) to pool per-device ones; a "
      f"per-device loss or metric: return lax.psum/lax.pmean of it over {name!r}; or give "
      f"those outputs a sharded entry in `out_specs`.")


def shard_map_step(
    step: Callable[[Any, Any], Any],
    mesh: Mesh,
    *,
    axis_names: Optional[AxisNames] = None,
    state_specs: Any = P(),
    out_specs: Any = P(),
    donate_state: bool = False,
) -> Callable[[Any, Any], Any]:
  """``jax.jit(jax.shard_map(step, ...))`` for a replicated state and a batch-split batch.

  Equivalent to::

    shardings = (NamedSharding(mesh, state_specs), batch_sharding(mesh, axis_names))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(state_specs, P(axis_names)),
                           out_specs=out_specs)
    jax.jit(lambda state, batch: mapped(*jax.sharding.reshard((state, batch), shardings)),
            in_shardings=shardings, donate_argnums=(0,) if donate_state else ())

  so a NumPy batch is split over the devices on the way in (already placed arrays pass
  through unchanged), and ``step`` sees its device's rows. Inside ``step``:

  * call BN with ``axis_name=axis_names`` (all mesh axes by default: ``mesh.axis_names``);
  * ``jax.grad`` of a per-device loss with respect to a replicated (``P()``) parameter
    returns the gradient **summed over devices** (shard_map's typing does it; do not
    ``psum`` it again). Write the per-device loss as ``sum of this device's losses / global
    count`` (``lax.psum`` the count) and the summed gradient is that of the global mean loss;
  * return replicated values (``lax.psum``/``pmean`` metrics): ``out_specs=P()`` makes
    shard_map check it, with an error if a value still differs across devices. That error
    is jaxbn's: it names each such output and the likely cause (a BN call without
    ``axis_name`` returns per-device running statistics; a loss not yet ``pmean``-ed).

  Args:
    step: ``step(state, batch) -> outputs`` for one device's shard of the batch.
    mesh: the mesh (:func:`data_mesh`).
    axis_names: the mesh axes that split the batch (default: all, in order).
    state_specs: ``PartitionSpec`` (or a pytree prefix of them) of the state; ``P()`` =
      replicated.
    out_specs: ``PartitionSpec`` (or pytree prefix) of the outputs; default replicated.
    donate_state: donate the input state's buffers (``donate_argnums=(0,)``).

  Returns:
    The jitted ``fn(state, batch) -> outputs`` over the global batch.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
    >>> from jax import lax
    >>> from jaxbn.parallel import data_mesh, shard_batch, shard_map_step
    >>> def make_step(axis_name):
    ...   def step(state, batch):
    ...     params, stats = state
    ...     x, t = batch
    ...     n = x.shape[0] if axis_name is None else lax.psum(x.shape[0], axis_name)
    ...     def loss_fn(params):
    ...       h, new_stats = jaxbn.batch_norm(x @ params['w'], stats, params['scale'],
    ...                                       training=True, axis_name=axis_name)
    ...       return jnp.sum((h.sum(-1) - t) ** 2) / n, new_stats
    ...     (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ...     params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    ...     if axis_name is not None:
    ...       loss = lax.psum(loss, axis_name)
    ...     return (params, stats), loss
    ...   return step
    >>> params = {'w': jnp.ones((4, 3)) / 4, 'scale': jnp.ones(3)}
    >>> state = (params, jaxbn.init_stats(3))
    >>> rng = np.random.default_rng(0)
    >>> batch = (rng.normal(size=(16, 4)).astype(np.float32),
    ...          rng.normal(size=16).astype(np.float32))
    >>> mesh = data_mesh()
    >>> train_step = shard_map_step(make_step('data'), mesh)
    >>> (params8, stats8), loss8 = train_step(state, shard_batch(batch, mesh))
    >>> (params1, stats1), loss1 = jax.jit(make_step(None))(state, batch)  # one device
    >>> bool(jnp.allclose(loss8, loss1, rtol=1e-5)), bool(jnp.allclose(
    ...     params8['w'], params1['w'], atol=1e-5)), bool(jnp.allclose(stats8.var, stats1.var))
    (True, True, True)
  """
  def checked_step(state, batch):
    out = step(state, batch)
    _check_replicated_outputs(out, out_specs)
    return out

  state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                                 is_leaf=lambda s: isinstance(s, P))
  shardings = (state_shardings, batch_sharding(mesh, axis_names))
  mapped = jax.shard_map(checked_step, mesh=mesh, in_specs=(state_specs, shardings[1].spec),
                         out_specs=out_specs)

  def run(state, batch):
    # A no-op for arguments already placed by `in_shardings`; it gives their traced types
    # the mesh shardings that shard_map's `in_specs` require on an explicit-axes mesh.
    return mapped(*jax.sharding.reshard((state, batch), shardings))

  return jax.jit(run, in_shardings=shardings, donate_argnums=(0,) if donate_state else ())


def pmap_step(
    step: Callable[[Any, Any], Any],
    *,
    axis_name: Any = "batch",
    donate_state: bool = False,
    devices: Optional[list] = None,
) -> Callable[[Any, Any], Any]:
  """``jax.pmap(step, in_axes=(None, 0), out_axes=None)``: replicated state, split batch.

  Equivalent to::

    jax.pmap(step, axis_name=axis_name, in_axes=(None, 0), out_axes=None,
             donate_argnums=(0,) if donate_state else (), devices=devices)

  The batch has a leading device axis: reshape a global batch with
  ``x.reshape(jax.local_device_count(), -1, *x.shape[1:])``. The state is passed and
  returned without a device axis. Inside ``step``:

  * call BN with ``axis_name=axis_name``;
  * ``jax.grad`` under ``pmap`` returns **this device's** gradient: ``lax.psum`` it (with a
    per-device loss ``sum of this device's losses / global count``), or ``lax.pmean`` it
    (with a per-device mean loss and equal shards) — unlike :func:`shard_map_step`;
  * make every output identical on all devices (``psum``/``pmean``): with ``out_axes=None``
    pmap does **not** check this and returns device 0's copy.

  Args:
    step: ``step(state, batch) -> outputs`` for one device's shard.
    axis_name: the name of the mapped axis (default ``'batch'``).
    donate_state: donate the input state's buffers.
    devices: optional devices to map over (default: all local devices).

  Returns:
    The pmapped ``fn(state, batch) -> outputs``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
    >>> from jax import lax
    >>> from jaxbn.parallel import pmap_step
    >>> def step(params, x):
    ...   n = lax.psum(x.shape[0], 'batch')
    ...   def loss_fn(params):
    ...     y, _ = jaxbn.batch_norm(x * params, jaxbn.init_stats(2), training=True,
    ...                             axis_name='batch')
    ...     return jnp.sum(y[:, 0] ** 3) / n
    ...   grads = lax.psum(jax.grad(loss_fn)(params), 'batch')   # per-device under pmap
    ...   return params - 0.1 * grads
    >>> x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    >>> new8 = pmap_step(step)(jnp.ones(2), x.reshape(8, 2, 2))
    >>> def single(params, x):
    ...   y, _ = jaxbn.batch_norm(x * params, jaxbn.init_stats(2), training=True)
    ...   return jnp.sum(y[:, 0] ** 3) / x.shape[0]
    >>> new1 = jnp.ones(2) - 0.1 * jax.grad(single)(jnp.ones(2), x)
    >>> bool(jnp.allclose(new8, new1, atol=1e-5))
    True
  """
  return jax.pmap(step, axis_name=axis_name, in_axes=(None, 0), out_axes=None,
                  donate_argnums=(0,) if donate_state else (), devices=devices)
