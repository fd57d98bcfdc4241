"""Recomputing BN statistics: the driver that records every BN layer's input over batches.

:func:`recompute_stats` runs a functional model (which takes its ``batch_norm`` as an
argument) over batches with every BN call replaced by a :class:`Recorder`, and merges each
layer's exact moments with :func:`jaxbn.merge_moments`. ``jaxbn.linen.recompute_batch_stats``
and ``jaxbn.nnx.recompute_batch_stats`` run the same :func:`run` on Flax models by
intercepting their BatchNorm layers.
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn._core import checks
from jaxbn._core import collectives
from jaxbn._core.moments import Plan, batch_moments
from jaxbn._core.normalize import affine, to_keepdims
from jaxbn._core.precise import init_population_moments, merge_moments, population_stats
from jaxbn._core.types import BatchStats, Moments
from jaxbn._layers.common import flax_axes
from jaxbn._layers.docs import RUN_ARGS, fill_doc

MODES = ("train", "sequential")


# --------------------------------------------------------------------------------------------
# The engine shared by the functional, linen and nnx drivers.
# --------------------------------------------------------------------------------------------


@dataclass
class LayerInfo:
  """What the engine learned about one BN layer while tracing the model once."""

  index: int                 # order of its first call in the forward pass
  feature_shape: tuple
  unbiased: bool             # the layer stores PyTorch's unbiased variance


_ACTIVE = threading.local()


def current_recorder() -> Optional["Recorder"]:
  """The recorder of the recomputation being traced on this thread (None outside one)."""
  stack = getattr(_ACTIVE, "stack", None)
  return stack[-1] if stack else None


def check_stats_shape(fn: str, layer: str, feature_shape: tuple, shape: tuple,
                      scan: str) -> None:
  """Refuses a BN layer whose stored statistics are not of its features' shape (stacked)."""
  if shape != feature_shape:
    raise ValueError(
        f"{fn}: the BatchNorm layer {layer} normalizes features of shape {feature_shape} but "
        f"stores statistics of shape {shape}: layers inside {scan}.scan/{scan}.vmap (stacked "
        f"statistics) are not supported.")


class Recorder:
  """Stands in for every BN layer of a model during one traced forward pass.

  Each call computes the layer's batch moments (synchronized over the layer's own
  ``axis_name``, as in training), records the moments of the layer input over all the data
  of this step (over ``sync_axes``, the axes the batch is sharded over), and normalizes:

  * ``mode="train"``: with the batch statistics, exactly as the layer did in training;
  * ``mode="sequential"``: layers before ``stage`` (in call order) with their recomputed
    population statistics ``pop``, as at inference; the others with batch statistics.
  """

  def __init__(self, fn: str, mode: str, layers: Optional[dict], pop, stage, sync_axes):
    self.fn = fn
    self.mode = mode
    self.discovering = layers is None
    self.layers: dict = {} if layers is None else layers
    self.pop = pop
    self.stage = stage
    self.sync_axes = tuple(sync_axes)
    self.recorded: list[tuple[int, Moments]] = []

  def flax_call(self, key: Hashable, layer: Any, x: jax.Array, scale: Any, bias: Any,
                mask: Any, out_dtype: Any) -> jax.Array:
    """``self(key, x, ...)`` with the options of a flax-style BN ``layer``."""
    return self(key, x, axis=flax_axes(layer.axis, x.ndim), epsilon=layer.epsilon, scale=scale,
                bias=bias, mask=mask, axis_name=layer.axis_name,
                axis_index_groups=layer.axis_index_groups, out_dtype=out_dtype,
                unbiased=getattr(layer, "unbiased_running_var", False))

  @contextlib.contextmanager
  def active(self):
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
      stack = _ACTIVE.stack = []
    stack.append(self)
    try:
      yield self
    finally:
      stack.pop()

  def __call__(self, key: Hashable, x: ArrayLike, *, axis=-1, epsilon=1e-5, scale=None,
               bias=None, mask=None, axis_name=None, axis_index_groups=None,
               out_dtype=None, unbiased: bool = False) -> jax.Array:
    """Normalizes ``x`` for layer ``key`` and records its moments (see the class doc)."""
    fn = self.fn
    x = jnp.asarray(x)
    checks.float_input(fn, x)
    feat = checks.feature_axes(fn, x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feat)
    checks.mask_broadcasts(fn, mask, x.shape)
    for name in collectives.names(axis_name):
      try:
        lax.axis_size(name)
      except NameError:
        raise ValueError(
            f"{fn}: the BatchNorm layer {key!r} synchronizes its statistics over "
            f"axis_name={axis_name!r}, which is not bound here. Pass mesh=<a "
            f"jax.sharding.Mesh with an axis {name!r}> (and batch_spec=) so that the "
            f"recomputation runs under jax.shard_map, as the training step did.") from None
    red = checks.reduction_axes(x.ndim, feat)
    mask_a = None if mask is None else jnp.asarray(mask)
    info = self.layers.get(key)
    if info is None:
      if not self.discovering:
        raise ValueError(
            f"{fn}: the BatchNorm layer {key!r} was not called when the model was first "
            f"traced; the forward pass must call the same BN layers for every batch.")
      info = self.layers[key] = LayerInfo(len(self.layers), fshape, bool(unbiased))

    groups = collectives.groups_tuple(axis_index_groups)
    n, mean, var = batch_moments(x, mask_a, Plan(red, axis_name, groups))
    if set(collectives.names(axis_name)) == set(self.sync_axes) and groups is None:
      pn, pmean, pvar = n, mean, var
    else:
      pn, pmean, pvar = batch_moments(x, mask_a, Plan(red, self.sync_axes or None))
    self.recorded.append((info.index, Moments(pmean, pvar, pn)))
    mean, var = (to_keepdims(v, x.shape, feat) for v in (mean, var))

    if self.mode == "sequential":  # (the first trace, finding the layers, is "train")
      use_pop = info.index < self.stage
      pop_mean, pop_var = self.pop[info.index]
      mean = jnp.where(use_pop, to_keepdims(pop_mean, x.shape, feat, mean.dtype), mean)
      var = jnp.where(use_pop, to_keepdims(pop_var, x.shape, feat, var.dtype), var)
    inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return affine(x, mean, inv, to_keepdims(scale, x.shape, feat),
                  to_keepdims(bias, x.shape, feat), x.dtype if out_dtype is None else out_dtype)


_NO_BATCH = object()


def _progress(total: Optional[int], progress: Optional[bool], desc: str):
  """A tqdm bar (off with ``progress=False``, quiet when not a TTY with ``progress=None``), or
  ``nullcontext(None)`` without tqdm."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is optional
    return contextlib.nullcontext(None)
  return tqdm(total=total, desc=desc, unit="batch", leave=False,
              disable=True if progress is False else None if progress is None else False)


def run(fn: str, trace: Callable[[Any, Any, Recorder], Any], state: Any, batches: Iterable, *,
        mode: str = "train", num_batches: Optional[int] = None,
        progress: Optional[bool] = None, mesh: Any = None, batch_spec: Any = None,
        check_layers: Optional[Callable[[dict], None]] = None) -> tuple[dict, list]:
  """Runs the recomputation; returns ``(layers, accumulators)``.

  ``trace(state, batch, recorder)`` runs the model forward once with every BN layer replaced
  by a call to ``recorder`` (under ``recorder.active()``). ``layers`` maps each layer key to
  its :class:`LayerInfo`; ``accumulators[info.index]`` is its :class:`PopulationMoments`.
  ``check_layers(layers)``, if given, runs after the first trace, before any data is
  processed (to fail fast).
  """
  if mode not in MODES:
    raise ValueError(f"{fn}: `mode` must be one of {MODES}, got {mode!r}.")
  if num_batches is not None and (not isinstance(num_batches, (int, np.integer))
                                  or num_batches < 1):
    raise ValueError(f"{fn}: `num_batches` must be a positive int or None (all batches), "
                     f"got {num_batches!r}.")
  if mode == "sequential" and isinstance(batches, collections.abc.Iterator):
    raise TypeError(
        f"{fn}: mode='sequential' makes one pass over the data per BN layer, so `batches` "
        f"must be re-iterable (a list, a dataset object, or an object whose __iter__ starts "
        f"over), not a one-shot iterator or generator.")

  sync_axes: tuple = ()
  spec = replicated = None
  place = lambda tree, spec: tree
  wrap = lambda f, n_in: f
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    spec = P(tuple(mesh.axis_names)) if batch_spec is None else batch_spec
    if not isinstance(spec, P):
      raise TypeError(f"{fn}: `batch_spec` must be a jax.sharding.PartitionSpec (applied to "
                      f"every array of a batch), got {type(spec).__name__}.")
    sync_axes = tuple(dict.fromkeys(a for e in spec for a in collectives.names(e)))  # in order

    def place(tree, s, mesh=mesh):
      return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, s)), tree)

    def wrap(f, n_in, mesh=mesh, spec=spec):
      return jax.shard_map(f, mesh=mesh, in_specs=(P(),) * (n_in - 1) + (spec,),
                           out_specs=P())
    replicated = P()
  state = place(state, replicated)

  it = itertools.islice(batches, num_batches)  # all of them with None
  first = next(it, _NO_BATCH)
  if first is _NO_BATCH:
    raise ValueError(f"{fn}: `batches` yielded no batch; pass an iterable of at least one "
                     f"batch of training data (e.g. a few hundred batches of the training set).")
  first = place(first, spec)

  # Trace once to find the BN layers, in the order the forward pass calls them.
  finder = Recorder(fn, "train", None, None, None, sync_axes)

  def discover(state, batch):
    with finder.active():
      trace(state, batch, finder)

  jax.eval_shape(wrap(discover, 2), state, first)
  layers = finder.layers
  if not layers:
    raise ValueError(
        f"{fn}: the forward pass called no BatchNorm layer, so there are no statistics to "
        f"recompute; check that the model uses flax or jaxbn BatchNorm (or, for a functional "
        f"model, the `batch_norm` it is given).")
  if check_layers is not None:
    check_layers(layers)
  infos = sorted(layers.values(), key=lambda i: i.index)

  def step(state, pop, stage, accs, batch):
    rec = Recorder(fn, mode, layers, pop, stage, sync_axes)
    with rec.active():
      trace(state, batch, rec)
    accs = list(accs)
    for index, m in rec.recorded:
      accs[index] = merge_moments(accs[index], m)
    return accs

  step = jax.jit(wrap(step, 5))
  fresh = lambda: [init_population_moments(i.feature_shape) for i in infos]
  pop = [(jnp.zeros(i.feature_shape), jnp.ones(i.feature_shape)) for i in infos]
  passes = 1 if mode == "train" else len(infos)
  try:
    total = passes * (len(batches) if num_batches is None else min(len(batches), num_batches))
  except TypeError:
    total = None if num_batches is None else passes * num_batches
  result = fresh()
  with _progress(total, progress, fn) as bar:
    for p in range(passes):
      accs, pop_p = place(fresh(), replicated), place(pop, replicated)
      rest = it if p == 0 else itertools.islice(batches, num_batches)
      source = itertools.chain([first] if p == 0 else [], (place(b, spec) for b in rest))
      seen = 0
      for batch in source:
        accs = step(state, pop_p, jnp.int32(p), accs, batch)
        seen += 1
        if bar is not None:
          bar.update(1)
      if seen == 0:
        raise ValueError(f"{fn}: `batches` yielded no batch on pass {p + 1} of {passes}; "
                         f"mode='sequential' needs an iterable that starts over each time.")
      if mode == "train":
        result = accs
      else:
        result[p] = accs[p]  # its population statistics, for the layers after it
        pop[p] = population_stats(accs[p], unbiased_running_var=infos[p].unbiased)[:2]
  return layers, result


# --------------------------------------------------------------------------------------------
# Functional driver.
# --------------------------------------------------------------------------------------------


@fill_doc(run_args=RUN_ARGS)
def recompute_stats(
    apply_fn: Callable[[Any, Any, Callable], Any],
    variables: Any,
    batches: Iterable,
    *,
    mode: str = "train",
    num_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    mesh: Any = None,
    batch_spec: Any = None,
) -> Any:
  r"""Recomputes every BN layer's running statistics as exact population statistics.

  With the weights frozen, the model is run over the batches and, for every BN layer, the
  mean and (biased) variance of its input over all the data are computed exactly — weighted
  by the true counts across batches of different sizes and masks (Chan's merge, float32
  accumulation of per-batch float32 moments), and over all devices when a ``mesh`` is given.
  This is "precise BN" (Wu & Johnson 2021): unlike the running averages, the statistics
  describe the final network.

  What "the input of a layer" means depends on how the layers before it normalize:

  * ``mode="train"`` (default; Wu & Johnson, fvcore, PyTorch's ``swa_utils.update_bn``): one
    pass; every layer normalizes with the batch's own statistics, exactly as in training, so
    each layer's population statistics are those of the inputs it saw in training (use the
    training batch size).
  * ``mode="sequential"`` (CNTK's post-BN statistics): layer by layer, in the order the
    forward pass calls them; the layers before each one normalize with their recomputed
    population statistics, so each layer's statistics are those of its inputs *at
    inference*. One pass over the data per BN layer; ``batches`` must be re-iterable.

  The model is functional: ``apply_fn(variables, batch, batch_norm)`` runs the forward pass in
  inference mode (dropout off) and calls the given ``batch_norm`` — which has the signature of
  :func:`jaxbn.batch_norm` — wherever it would call ``jaxbn.batch_norm``. Each call's
  ``stats`` argument must be one of the :class:`~jaxbn.BatchStats` inside ``variables``
  (that is how the layer is identified); ``training`` and ``momentum`` are ignored, while
  ``axis``, ``epsilon``, ``mask``, ``axis_name`` and ``unbiased_running_var`` are honoured.

  Args:
    apply_fn: ``apply_fn(variables, batch, batch_norm)``, the model's forward pass.
    variables: a pytree holding the parameters and the :class:`~jaxbn.BatchStats` of every
      BN layer. Not modified.
    batches: an iterable of batches (any pytrees ``apply_fn`` accepts), e.g. the training
      set without augmentation; re-iterable for ``mode="sequential"``.
    {run_args}

  Returns:
    ``variables`` with each :class:`~jaxbn.BatchStats` that a layer used replaced by one
    holding the population mean and variance (same dtypes; ``count`` unchanged; features
    with no valid entry keep their values). Other leaves are returned as they were.

  Raises:
    ValueError: an empty ``batches``, no BN layer called, a bad ``mode``/``num_batches``, an
      ``axis_name`` not bound (pass ``mesh``), or a ``stats`` that is not in ``variables``.
    TypeError: ``mode="sequential"`` with a one-shot iterator.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> def model(variables, x, batch_norm):
    ...   params, stats = variables
    ...   h, _ = batch_norm(x @ params["w"], stats["bn"], training=False)
    ...   return h
    >>> variables = ({"w": jnp.eye(2)}, {"bn": jaxbn.init_stats(2)})
    >>> data = [jnp.array([[0.0, 1.0], [2.0, 3.0]]), jnp.array([[4.0, 5.0]])]
    >>> params, stats = jaxbn.recompute_stats(model, variables, data, progress=False)
    >>> stats["bn"].mean.tolist(), stats["bn"].var.tolist()
    ([2.0, 3.0], [2.666..., 2.666...])

  References:
    Wu & Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021 (section 3).
  """
  fn = "recompute_stats"
  is_stats = lambda v: isinstance(v, BatchStats)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_stats)
  leaves = [v for _, v in with_paths]
  # Layers are named by the path of their stats in `variables`, e.g. "[1]['bn2']".
  position = {jax.tree_util.keystr(path): i for i, (path, v) in enumerate(with_paths)
              if is_stats(v)}
  if not position:
    raise ValueError(f"{fn}: `variables` holds no jaxbn.BatchStats; pass the pytree that "
                     f"holds the parameters and the statistics of the BN layers.")

  def trace(variables, batch, rec):
    lv = jax.tree.flatten(variables, is_leaf=is_stats)[0]
    ids = {id(lv[i].mean): key for key, i in position.items()}

    def batch_norm(x, stats, scale=None, bias=None, *, training=None, axis=-1, momentum=None,
                   epsilon=1e-5, axis_name=None, axis_index_groups=None, mask=None, dtype=None,
                   use_fast_variance=False, unbiased_running_var=False, debias=False):
      del training, momentum, use_fast_variance, debias
      key = ids.get(id(getattr(stats, "mean", None)))
      if key is None:
        raise ValueError(
            f"{fn}: `batch_norm` was called with statistics that are not one of the "
            f"BatchStats of `variables` (a modified or computed stats object); pass each "
            f"layer its BatchStats from `variables` unchanged.")
      xa = jnp.asarray(x)
      fshape = tuple(xa.shape[a] for a in checks.feature_axes(fn, xa.ndim, axis))
      if tuple(jnp.shape(stats.mean)) != fshape:
        raise ValueError(
            f"{fn}: `x` has features of shape {fshape} on axis {axis!r} but its `stats.mean` "
            f"has shape {tuple(jnp.shape(stats.mean))}; pass the right `axis` or stats.")
      y = rec(key, x, axis=axis, epsilon=epsilon, scale=scale, bias=bias, mask=mask,
              axis_name=axis_name, axis_index_groups=axis_index_groups,
              out_dtype=dtype, unbiased=unbiased_running_var)
      return y, stats

    return apply_fn(variables, batch, batch_norm)

  layers, accs = run(fn, trace, variables, batches, mode=mode, num_batches=num_batches,
                     progress=progress, mesh=mesh, batch_spec=batch_spec)
  new = list(leaves)
  for key, info in layers.items():
    new[position[key]] = result(accs, info, leaves[position[key]])
  return jax.tree.unflatten(treedef, new)


def result(accs: list, info: LayerInfo, old: Any) -> BatchStats:
  """Layer ``info``'s recomputed statistics: :func:`population_stats` of its accumulator
  (fetched from the devices) over ``old`` (a :class:`BatchStats`, or ``(mean, var)``)."""
  if not isinstance(old, BatchStats):
    old = BatchStats(*old, jnp.zeros((), jnp.int32))
  acc = jax.tree.map(jnp.asarray, jax.device_get(accs[info.index]))
  return population_stats(acc, old, unbiased_running_var=info.unbiased)


__all__ = ["MODES", "LayerInfo", "Recorder", "current_recorder", "recompute_stats", "result", "run"]
