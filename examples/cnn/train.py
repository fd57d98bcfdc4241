"""Training library for the CNN example: state, steps, parallel modes and the training loop.

Laid out like flax's ``examples/imagenet``: :func:`create_train_state`, :func:`train_step`,
:func:`eval_step` and :func:`train_and_evaluate` are plain functions that ``main.py`` (or a
notebook, or a test) calls.

Three ways to run on several devices (``--parallel``), all giving batch normalization over the
whole global batch:

* ``jit``: the global batch is a ``jax.Array`` sharded over a ``data`` mesh axis and the state is
  replicated; the step is the single-device code, and XLA makes the statistics' reductions
  global (no ``axis_name``).
* ``shard_map``: the step runs per device under ``jax.shard_map``; the norm layers get
  ``axis_name='data'`` and synchronize their statistics. Gradients of the replicated parameters
  come out summed over devices (shard_map's typing inserts the sum).
* ``pmap``: the same per-device step under ``jax.pmap``; here the gradients are per device, so
  the step sums them with ``lax.psum``.

With ``sync_bn=False`` the per-device modes normalize each device's shard with its own
statistics ("local BN") and average the running statistics over the devices after every step.

Two Flax APIs (``--api``): ``linen`` (``jaxbn.linen`` layers in a ``flax.training`` TrainState)
and ``nnx`` (``jaxbn.nnx`` layers, ``nnx.Optimizer(model, tx, wrt=nnx.Param)``). The NNX model
and optimizer are split into a graph definition and a state pytree (:class:`NnxTrainState`)
and merged again inside the step, so one jitted/shard_mapped/pmapped step function serves all
three parallel modes for both APIs (NNX modules are not pytrees: ``jax.shard_map`` and
``jax.pmap`` need the split; ``nnx.jit`` would do it for single-program ``jit`` only).

The loss of a step is the sum over the real (unmasked) examples divided by the global number of
real examples, so padding the last batch changes neither the loss nor the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
import jaxbn.parallel

from examples.cnn import data as data_lib
from examples.cnn import models
from examples.cnn.configs import APIS, DTYPES, NORMS, PARALLEL, RUNS_DIR, Config, UsageError

AXIS = "data"
Metrics = dict[str, jax.Array]
NormArgs = Callable[[jax.Array], dict[str, jax.Array]]


class TrainState(train_state.TrainState):
  """flax's TrainState plus the norm layers' running statistics (``batch_stats``)."""

  batch_stats: Any = None


class NnxTrainState(flax.struct.PyTreeNode):
  """An NNX model and its ``nnx.Optimizer``, split into a static graph and a state pytree.

  Attributes:
    graphdef: ``nnx.split((model, optimizer))``'s graph definition (static, not a leaf).
    state: the matching ``nnx.State``: parameters, running statistics, optimizer state and
      the optimizer's step counter.
  """

  graphdef: Any = flax.struct.field(pytree_node=False)
  state: Any = None

  def merge(self) -> tuple[Any, nnx.Optimizer]:
    """``(model, optimizer)``: fresh NNX objects holding this state."""
    return nnx.merge(self.graphdef, self.state)

  @property
  def step(self) -> jax.Array:
    return self.merge()[1].step[...]


# ----------------------------------------------------------------------------- setup


def check_config(config: Config) -> None:
  """Validates flags before anything is computed.

  Raises:
    UsageError: with the flag name, the value received and what is allowed.
  """
  if config.dataset not in data_lib.DATASETS:
    raise UsageError(f"--dataset {config.dataset!r}: choose one of "
                     f"{', '.join(data_lib.DATASETS)}.")
  if config.norm not in NORMS:
    raise UsageError(f"--norm {config.norm!r}: choose one of {', '.join(NORMS)}.")
  if config.parallel not in PARALLEL:
    raise UsageError(f"--parallel {config.parallel!r}: choose one of {', '.join(PARALLEL)}.")
  if config.api not in APIS:
    raise UsageError(f"--api {config.api!r}: choose one of {', '.join(APIS)}.")
  if config.dtype not in DTYPES:
    raise UsageError(f"--dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}.")
  for flag in ("devices", "batch_size", "epochs", "eval_every", "ghost_batch_size", "groups"):
    value = getattr(config, flag)
    if not isinstance(value, int) or value < 1:
      raise UsageError(f"--{flag} must be a positive integer, got {value!r}.")
  if config.steps is not None and (not isinstance(config.steps, int) or config.steps < 1):
    raise UsageError(f"--steps must be a positive integer (or unset), got {config.steps!r}.")
  if not 0 <= config.warmup_fraction < 1:
    raise UsageError(f"--warmup_fraction must be in [0, 1), got {config.warmup_fraction}.")
  if not config.noise >= 0:
    raise UsageError(f"--noise must be >= 0, got {config.noise}.")
  if not config.sync_bn and config.parallel == "jit" and config.devices > 1:
    raise UsageError(
        "--no-sync_bn needs per-device code: use --parallel shard_map or pmap (under --parallel "
        "jit the batch is one global array and XLA always computes global statistics).")
  if config.resume and config.overwrite:
    raise UsageError("--resume and --overwrite contradict each other: --resume continues the "
                     "run in --workdir, --overwrite deletes it; pass one.")
  if config.batch_size % config.devices:
    raise UsageError(
        f"--batch_size {config.batch_size} is not a multiple of --devices {config.devices}; "
        f"the global batch is split evenly, so use e.g. --batch_size "
        f"{config.devices * max(1, config.batch_size // config.devices)}.")
  per_device = config.batch_size // config.devices
  if config.norm == "ghost" and per_device % config.ghost_batch_size:
    raise UsageError(
        f"--norm ghost: the per-device batch ({per_device}) must be a multiple of "
        f"--ghost_batch_size {config.ghost_batch_size} (virtual batches do not span devices).")
  if config.norm == "group" and any(w % config.groups for w in config.widths):
    raise UsageError(f"--norm group: every width in --widths {','.join(map(str, config.widths))}"
                     f" must be divisible by --groups {config.groups}.")
  if not config.widths or any(w < 1 for w in config.widths):
    raise UsageError(f"--widths must be positive integers, got {config.widths!r}.")
  if not (config.learning_rate > 0 and config.weight_decay >= 0):
    raise UsageError(f"--learning_rate must be > 0 and --weight_decay >= 0, got "
                     f"{config.learning_rate} and {config.weight_decay}.")
  if not 0 <= config.bn_momentum < 1:
    raise UsageError(f"--bn_momentum must be in [0, 1), got {config.bn_momentum}.")
  if config.dataset == "cifar10" and not config.data_dir:
    raise UsageError(f"--dataset cifar10 needs --data_dir path/to/{data_lib.CIFAR10_FOLDER} "
                     f"(download {data_lib.CIFAR10_URL} and extract it).")
  if config.norm == "flax" and config.parallel != "jit" and config.devices > 1:
    raise UsageError(
        f"--norm flax with --parallel {config.parallel}: flax.linen.BatchNorm averages "
        f"per-device masked means without weighting them by their counts (flax issue #2417) and "
        f"returns NaN on a device whose shard is all padding (the padded last batch); use "
        f"--norm batch (jaxbn, exact) or --parallel jit.")
  if config.norm != "none":
    try:
      models.norm_layer(config.norm)
    except ValueError as e:
      raise UsageError(str(e)) from None


def select_devices(n: int) -> list[jax.Device]:
  """The first ``n`` devices, or a clear error if there are fewer."""
  devices = jax.devices()
  if n > len(devices):
    kind = devices[0].platform
    hint = ("run through main.py, which sets the number of simulated CPU devices before JAX "
            "starts, or call jax.config.update('jax_num_cpu_devices', N) first"
            if kind == "cpu" else
            "set JAX_PLATFORMS=cpu to simulate them on CPU devices instead")
    raise UsageError(f"--devices {n}: only {len(devices)} {kind} device(s) exist; {hint}.")
  return devices[:n]


def compute_dtype(config: Config) -> Any:
  """The activations' dtype: ``jnp.float32`` or ``jnp.bfloat16`` (``--dtype``)."""
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def norm_axis_name(config: Config) -> Optional[str]:
  """The axis the norm layers synchronize over: ``data`` for synced per-device modes."""
  return AXIS if config.parallel != "jit" and config.sync_bn else None


def _norm_kwargs(config: Config, axis_name: Optional[str]) -> dict[str, Any]:
  dtype = compute_dtype(config)
  return dict(momentum=config.bn_momentum, axis_name=axis_name,
              ghost_batch_size=config.ghost_batch_size, groups=config.groups,
              dtype=None if dtype == jnp.float32 else dtype)


def create_model(config: Config, num_classes: int, axis_name: Optional[str] = None
                 ) -> models.CNN:
  """The linen CNN with the configured norm layer (synchronized over ``axis_name`` if given)."""
  norm = models.norm_layer(config.norm, **_norm_kwargs(config, axis_name))
  return models.CNN(num_classes=num_classes, widths=tuple(config.widths), norm=norm,
                    dtype=compute_dtype(config))


def create_nnx_model(config: Config, num_classes: int, in_channels: int,
                     axis_name: Optional[str] = None, *, seed: int = 0) -> Any:
  """The NNX CNN (:class:`models.NnxCNN`) with the configured ``jaxbn.nnx`` norm layer."""
  norm = models.nnx_norm_layer(config.norm, **_norm_kwargs(config, axis_name))
  return models.NnxCNN(num_classes, in_channels, widths=tuple(config.widths), norm=norm,
                       dtype=compute_dtype(config), rngs=nnx.Rngs(params=init_key(seed)))


def renorm_args(config: Config, total_steps: int) -> Optional[NormArgs]:
  """Batch renorm's clipping schedule (:func:`jaxbn.renorm_schedule`) scaled to the run.

  As in Ioffe (2017): plain batch norm first, then ``r_max`` 1 -> 3 and ``d_max`` 0 -> 5;
  here the ramps start at 10% of the steps and end at 40% (``d_max``) and 50% (``r_max``).
  """
  if config.norm != "renorm":
    return None
  t0 = max(1, total_steps // 10)
  def args(step):
    r_max, d_max = jaxbn.renorm_schedule(step, warmup_steps=t0,
                                         r_max_steps=max(t0 + 1, total_steps // 2),
                                         d_max_steps=max(t0 + 1, 2 * total_steps // 5))
    return {"r_max": r_max, "d_max": d_max}
  return args


def total_steps(config: Config, steps_per_epoch: int) -> int:
  """The run's step budget: ``--steps``, or ``--epochs`` passes over the training set."""
  return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def create_optimizer(config: Config, total: int) -> optax.GradientTransformation:
  """SGD with Nesterov momentum 0.9, warm-up + cosine decay over ``total`` steps.

  The learning rate rises linearly from 0 to ``--learning_rate`` over ``--warmup_fraction`` of
  the steps, then decays to 0 along a cosine; ``--weight_decay`` times the kernel is added to
  the gradient of every conv and dense kernel (not to biases or norm scales).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=max(1, int(config.warmup_fraction * total)), decay_steps=max(total, 2))
  def is_kernel(path) -> bool:  # linen: (..., 'kernel'); NNX: (..., 'kernel', '.value')
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "kernel" in keys[-2:]
  decay_mask = lambda params: jax.tree.map_with_path(lambda path, _: is_kernel(path), params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=0.9, nesterov=True))


def init_key(seed: int) -> jax.Array:
  """The parameter-initialization key.

  The "rbg" generator: the initializers of a whole network compile several times faster on
  CPU than with the default threefry (seconds at startup); any key works.
  """
  return jax.random.key(seed, impl="rbg")


def create_train_state(rng: jax.Array, config: Config, model: models.CNN,
                       image_shape: tuple[int, ...], total: int) -> TrainState:
  """Initializes parameters, running statistics and optimizer state (linen)."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config, total),
                           batch_stats=variables.get("batch_stats", {}))


def create_nnx_train_state(config: Config, num_classes: int, image_shape: tuple[int, ...],
                           total: int, axis_name: Optional[str] = None) -> NnxTrainState:
  """Builds the NNX model and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and splits them."""
  model = create_nnx_model(config, num_classes, image_shape[-1], axis_name, seed=config.seed)
  optimizer = nnx.Optimizer(model, create_optimizer(config, total), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return NnxTrainState(graphdef=graphdef, state=state)


def init_state(config: Config, ds: data_lib.Dataset, total: int) -> tuple[Any, Any]:
  """``(model, state)`` of ``--api``: the linen CNN and its TrainState, or the NNX graph's state.

  For NNX the returned model is the module at initialization (read-only use: its class and
  norm factory); the training state lives in the :class:`NnxTrainState`.
  """
  axis_name = norm_axis_name(config)
  if config.api == "nnx":
    state = create_nnx_train_state(config, ds.num_classes, ds.image_shape, total, axis_name)
    return state.merge()[0], state
  model = create_model(config, ds.num_classes, axis_name=axis_name)
  return model, create_train_state(init_key(config.seed), config, model, ds.image_shape, total)


# ----------------------------------------------------------------------------- steps


def _global_sum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _metric_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                 axis_name: Optional[str]) -> Metrics:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels) & mask
  sums = {"loss": jnp.sum(jnp.where(mask, losses, 0.0)),
          "correct": jnp.sum(correct.astype(jnp.float32)),
          "count": jnp.sum(mask.astype(jnp.float32))}
  return {k: _global_sum(v, axis_name) for k, v in sums.items()}


def train_step(state: TrainState, batch: data_lib.Batch, *, axis_name: Optional[str] = None,
               sum_grads: bool = False, norm_args: Optional[NormArgs] = None,
               average_stats: bool = False) -> tuple[TrainState, Metrics]:
  """One SGD step on a (possibly padded) batch (linen).

  Args:
    state: the train state (replicated).
    batch: this device's part of the global batch (or all of it without ``axis_name``).
    axis_name: the mapped axis of ``shard_map``/``pmap`` (None under plain ``jit``).
    sum_grads: sum the gradients over ``axis_name`` (``pmap``; ``shard_map`` does it itself).
    norm_args: ``step -> dict`` of extra norm-layer arguments (batch renorm's schedule).
    average_stats: local (unsynchronized) BN: average the per-device running statistics over
      ``axis_name`` after the update (:func:`jaxbn.parallel.average_stats`).

  Returns:
    The new state and the global sums ``loss``, ``correct`` and ``count`` (real examples).
  """
  count = _global_sum(jnp.sum(batch.mask.astype(jnp.float32)), axis_name)
  batch_stats = _per_device(state.batch_stats, batch, axis_name) if average_stats else (
      state.batch_stats)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": batch_stats}
    logits, updates = state.apply_fn(
        variables, batch.image, train=True, mask=batch.mask,
        norm_args=None if norm_args is None else norm_args(state.step), mutable=["batch_stats"])
    return _loss(logits, batch, count), (logits, updates)

  grads, (logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  if sum_grads:
    grads = lax.psum(grads, axis_name)
  stats = updates.get("batch_stats", state.batch_stats)
  if average_stats and stats:
    stats = jaxbn.parallel.average_stats(stats, axis_name=axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=stats)
  return state, _metric_sums(logits, batch.label, batch.mask, axis_name)


def _per_device(stats: Any, batch: data_lib.Batch, axis_name: Optional[str]) -> Any:
  """Local BN under ``shard_map``: the running statistics typed per device (``pcast`` to
  varying), which says in the program that each device keeps its own until they are averaged
  (without it jaxbn warns that ``axis_name`` may have been forgotten). Unchanged elsewhere."""
  manual = getattr(jax.typeof(batch.image), "manual_axis_type", None)
  if axis_name is None or axis_name not in getattr(manual, "varying", ()):
    return stats
  return jax.tree.map(lambda v: lax.pcast(v, axis_name, to="varying"), stats)


def _loss(logits: jax.Array, batch: data_lib.Batch, count: jax.Array) -> jax.Array:
  """Sum of the real examples' cross-entropies (in float32) / the global count."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch.label)
  return jnp.sum(jnp.where(batch.mask, losses, 0.0)) / jnp.maximum(count, 1.0)


def nnx_train_step(state: NnxTrainState, batch: data_lib.Batch, *,
                   axis_name: Optional[str] = None, sum_grads: bool = False,
                   norm_args: Optional[NormArgs] = None, average_stats: bool = False
                   ) -> tuple[NnxTrainState, Metrics]:
  """:func:`train_step` for ``--api nnx``: merge, ``nnx.value_and_grad``, optimizer update, split.

  Arguments and results as :func:`train_step`. ``nnx.value_and_grad`` differentiates with
  respect to the ``nnx.Param`` variables; the norm layers' ``nnx.BatchStat`` updates made in
  the forward pass are kept in the model.
  """
  model, optimizer = state.merge()
  model.train()
  if average_stats:
    nnx.update(model, _per_device(nnx.state(model, nnx.BatchStat), batch, axis_name))
  count = _global_sum(jnp.sum(batch.mask.astype(jnp.float32)), axis_name)
  extra = None if norm_args is None else norm_args(optimizer.step[...])

  def loss_fn(model):
    logits = model(batch.image, mask=batch.mask, norm_args=extra)
    return _loss(logits, batch, count), logits

  (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  if sum_grads:
    grads = lax.psum(grads, axis_name)
  optimizer.update(model, grads)
  if average_stats:
    stats = nnx.state(model, nnx.BatchStat)
    averaged = jaxbn.parallel.average_stats(nnx.to_pure_dict(stats), axis_name=axis_name)
    nnx.replace_by_pure_dict(stats, averaged)
    nnx.update(model, stats)
  new = state.replace(state=nnx.state((model, optimizer)))
  return new, _metric_sums(logits, batch.label, batch.mask, axis_name)


def eval_step(state: TrainState, batch: data_lib.Batch, *, axis_name: Optional[str] = None
              ) -> Metrics:
  """Test-set sums with the running statistics (the norm layers in inference mode)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = state.apply_fn(variables, batch.image, train=False)
  return _metric_sums(logits, batch.label, batch.mask, axis_name)


def nnx_eval_step(state: NnxTrainState, batch: data_lib.Batch, *,
                  axis_name: Optional[str] = None) -> Metrics:
  """:func:`eval_step` for ``--api nnx`` (``model.eval()``: running statistics)."""
  model, _ = state.merge()
  model.eval()
  return _metric_sums(model(batch.image), batch.label, batch.mask, axis_name)


# ----------------------------------------------------------------------------- parallel modes


@dataclasses.dataclass
class Runner:
  """A parallel mode: the compiled steps and how to place state and batches for them.

  Attributes:
    mode: ``jit``, ``shard_map`` or ``pmap``.
    devices: the devices used.
    train: ``(state, batch) -> (state, metric sums)``, compiled for the mode.
    eval: ``(state, batch) -> metric sums``.
    put_state: places a state for ``train``/``eval`` (replicated over the devices; the
      steps return it in the same form, one logical copy, ready to checkpoint).
    put_batch: places a host batch of global size for ``train``/``eval``.
  """

  mode: str
  devices: list[jax.Device]
  train: Callable[..., Any]
  eval: Callable[..., Any]
  put_state: Callable[[TrainState], TrainState]
  put_batch: Callable[[data_lib.Batch], Any]


def make_runner(mode: str, devices: list[jax.Device], norm_args: Optional[NormArgs] = None,
                *, api: str = "linen", sync_bn: bool = True) -> Runner:
  """Compiles the train and eval steps of ``--api`` for ``--parallel mode``.

  ``jit``: the single-device steps under ``jax.jit``, the batch sharded over the mesh.
  ``shard_map`` and ``pmap``: the per-device steps with ``axis_name='data'``, wrapped by
  :func:`jaxbn.parallel.shard_map_step` / :func:`jaxbn.parallel.pmap_step`. With
  ``sync_bn=False`` the per-device steps average the running statistics after each update
  (the layers themselves are built without ``axis_name``).
  """
  train_fn, eval_fn = (nnx_train_step, nnx_eval_step) if api == "nnx" else (train_step,
                                                                             eval_step)
  step = functools.partial(train_fn, norm_args=norm_args,
                           average_stats=not sync_bn and mode != "jit")
  if mode == "pmap":
    n = len(devices)
    train = jaxbn.parallel.pmap_step(
        functools.partial(step, axis_name=AXIS, sum_grads=True), axis_name=AXIS,
        devices=devices, donate_state=True)
    evaluate = jaxbn.parallel.pmap_step(functools.partial(eval_fn, axis_name=AXIS),
                                        axis_name=AXIS, devices=devices)
    put_batch = lambda b: jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), b)
    return Runner(mode, devices, train, evaluate, lambda s: s, put_batch)

  mesh = jaxbn.parallel.data_mesh(AXIS, devices=devices)
  replicated = NamedSharding(mesh, P())
  if mode == "jit":
    train = jax.jit(step, donate_argnums=0)
    evaluate = jax.jit(eval_fn)
  else:
    train = jaxbn.parallel.shard_map_step(functools.partial(step, axis_name=AXIS), mesh,
                                          donate_state=True)
    evaluate = jaxbn.parallel.shard_map_step(functools.partial(eval_fn, axis_name=AXIS),
                                             mesh)
  return Runner(mode, devices, train, evaluate, lambda s: jax.device_put(s, replicated),
                lambda b: jaxbn.parallel.shard_batch(b, mesh))


# ----------------------------------------------------------------------------- loop


def _sums_to_metrics(sums: list[Metrics]) -> dict[str, float]:
  total = jax.tree.map(lambda *xs: float(np.sum([np.asarray(x) for x in xs])), *sums)
  n = max(total["count"], 1.0)
  return {"loss": total["loss"] / n, "accuracy": total["correct"] / n,
          "count": int(total["count"])}


def evaluate(runner: Runner, state: Any, x: np.ndarray, y: np.ndarray, batch_size: int
             ) -> dict[str, float]:
  """Loss and accuracy over all of ``x`` (padded last batch, nothing dropped)."""
  sums = [runner.eval(state, runner.put_batch(b))
          for b in data_lib.batches(x, y, batch_size)]
  return _sums_to_metrics(sums)


def recompute_stats(runner: Runner, model: Any, state: Any, ds: data_lib.Dataset,
                    config: Config) -> Optional[Any]:
  """The state with population statistics recomputed over the training set ("precise BN").

  :func:`jaxbn.linen.recompute_batch_stats` (or :func:`jaxbn.nnx.recompute_batch_stats`)
  runs the trained network over the (unaugmented) training set in batches of the training
  size and replaces every BatchNorm layer's running averages by the exact mean and variance
  of its inputs (Wu & Johnson 2021). Synchronized layers run under the devices' mesh; local
  (``sync_bn=False``) layers see whole batches, so both get the statistics of the whole
  training set.

  Returns:
    The new state (placed for ``runner``), or None for norms without BatchNorm layers
    (renorm, ghost, group, layer, none), where the recomputation does not apply.
  """
  if config.norm not in ("batch", "flax"):
    return None
  synced = norm_axis_name(config) is not None
  mesh = jaxbn.parallel.data_mesh(AXIS, devices=runner.devices) if synced else None
  train_batches = data_lib.batches(ds.x_train, ds.y_train, config.batch_size,
                                   np.random.default_rng(config.seed))
  if config.api == "nnx":
    net, optimizer = state.merge()
    new = jaxbn.nnx.recompute_batch_stats(net, train_batches, mesh=mesh, progress=False,
                                          forward=lambda m, b: m(b.image, mask=b.mask))
    nnx.update(net, nnx.state(new, nnx.BatchStat))
    return runner.put_state(state.replace(state=nnx.state((net, optimizer))))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  new = jaxbn.linen.recompute_batch_stats(
      lambda v, b: model.apply(v, b.image, train=False, mask=b.mask), variables,
      train_batches, mesh=mesh, progress=False)
  return runner.put_state(state.replace(batch_stats=new["batch_stats"]))


def recompute_and_evaluate(runner: Runner, model: Any, state: Any, ds: data_lib.Dataset,
                           config: Config) -> Optional[dict[str, float]]:
  """Test metrics with population statistics recomputed over the training set.

  See :func:`recompute_stats`.

  Returns:
    The test metrics, or None for norms without BatchNorm layers (renorm, ghost, group,
    layer, none), where the recomputation does not apply.
  """
  recomputed = recompute_stats(runner, model, state, ds, config)
  if recomputed is None:
    return None
  return evaluate(runner, recomputed, ds.x_test, ds.y_test, config.batch_size)


def _hardware() -> dict[str, Any]:
  dev = jax.devices()[0]
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"platform": dev.platform, "device_kind": getattr(dev, "device_kind", ""),
          "cpu": cpu, "cpu_count": os.cpu_count(), "load_avg_1m": load and round(load[0], 2),
          "jax": jax.__version__, "flax": flax.__version__}


def default_workdir(config: Config) -> str:
  """``RUNS_DIR/<dataset>-<norm>-<parallel>-<N>dev[-nnx][-bfloat16]``, absolute."""
  name = f"{config.dataset}-{config.norm}-{config.parallel}-{config.devices}dev"
  name += "-nnx" if config.api == "nnx" else ""
  name += "-bfloat16" if config.dtype == "bfloat16" else ""
  return os.path.join(RUNS_DIR, name)


def epoch_batches(config: Config, ds: data_lib.Dataset, epoch: int
                  ) -> Iterator[data_lib.Batch]:
  """The training batches of ``epoch``: shuffled (and shifted) as the config says.

  The random stream depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
  """
  rng = np.random.default_rng([config.seed, epoch])
  x = data_lib.random_shift(ds.x_train, rng) if config.augment else ds.x_train
  if config.shard_by_class:
    return data_lib.class_sorted_batches(x, ds.y_train, config.batch_size, config.devices, rng)
  return data_lib.batches(x, ds.y_train, config.batch_size, rng)


def steps_per_epoch(config: Config, ds: data_lib.Dataset) -> int:
  """Steps in one pass over the training set (the last batch padded)."""
  if config.shard_by_class:
    return data_lib.num_class_sorted_batches(len(ds.x_train), config.batch_size,
                                             config.devices)
  return data_lib.num_batches(len(ds.x_train), config.batch_size)


def load_data(config: Config) -> data_lib.Dataset:
  """The dataset of ``config`` (with ``--num_train``/``--num_test``/``--noise`` applied)."""
  return data_lib.load(config.dataset, config.data_dir, num_train=config.num_train,
                       num_test=config.num_test, noise=config.noise, seed=config.seed)


def train_and_evaluate(config: Config, workdir: Optional[str] = None, *,
                       start_time: Optional[float] = None) -> tuple[Any, dict[str, Any]]:
  """Trains and evaluates; writes checkpoints, ``metrics.json`` and ``curves.png``.

  Args:
    config: the run's configuration (checked by :func:`check_config`).
    workdir: output folder (default ``config.workdir`` or :func:`default_workdir`), made
      absolute and printed.
    start_time: ``time.time()`` at process start, to report the wall time including JAX's
      startup (default: now).

  Returns:
    ``(state, summary)``: the final train state (one copy; a :class:`TrainState` or an
    :class:`NnxTrainState`) and the summary: test accuracy with the running statistics (and
    with recomputed statistics for BatchNorm), times, throughput and file paths.

  Raises:
    UsageError: bad flags, more devices than exist, or a workdir holding an earlier run
      without ``resume``/``overwrite``.
    FileNotFoundError: a missing dataset folder.
  """
  from examples.cnn import report  # pylint: disable=import-outside-toplevel

  t0 = time.time() if start_time is None else start_time
  check_config(config)
  devices = select_devices(config.devices)
  workdir = os.path.abspath(os.path.expanduser(workdir or config.workdir or
                                               default_workdir(config)))
  report.check_workdir(workdir, resume=config.resume, overwrite=config.overwrite)
  print(f"workdir: {workdir}", flush=True)
  os.makedirs(workdir, exist_ok=True)

  ds = load_data(config)
  per_epoch = steps_per_epoch(config, ds)
  total = total_steps(config, per_epoch)
  num_epochs = -(-total // per_epoch)
  ckpt = report.Checkpoints(workdir, config) if config.checkpoint_every >= 0 else None
  if config.resume:
    if ckpt is None:
      raise UsageError("--resume needs checkpoints; do not pass --checkpoint_every -1.")
    ckpt.check_compatible()
  elif ckpt is not None and ckpt.clear():  # --overwrite (check_workdir refused otherwise)
    print(f"--overwrite: deleted the earlier checkpoints in {ckpt.directory}", file=sys.stderr)
  model, state = init_state(config, ds, total)
  history: list[dict[str, Any]] = []
  if config.resume:
    restored = ckpt.restore(state)
    if restored is None:
      print(f"--resume: no checkpoint in {ckpt.directory}; starting from scratch.",
            file=sys.stderr)
    else:
      state, _, history = restored

  runner = make_runner(config.parallel, devices, renorm_args(config, total), api=config.api,
                       sync_bn=config.sync_bn)
  state = runner.put_state(state)
  first_epoch = len(history) + 1
  step = (first_epoch - 1) * per_epoch
  progress = report.Progress(total=total, initial=step)
  steady_seconds, steady_examples = 0.0, 0  # epochs after the first (no compilation)
  for epoch in range(first_epoch, num_epochs + 1):
    t_epoch = time.time()
    sums = []
    for batch in epoch_batches(config, ds, epoch):
      if step == total:  # --steps ends inside this epoch
        break
      state, metrics = runner.train(state, runner.put_batch(batch))
      sums.append(metrics)
      step += 1
      progress.step(metrics, config.batch_size)
    train = _sums_to_metrics(sums)  # waits for the epoch's steps
    seconds = time.time() - t_epoch
    if epoch > first_epoch:
      steady_seconds, steady_examples = steady_seconds + seconds, steady_examples + train["count"]
    row = {"epoch": epoch, "steps": step, "train_loss": train["loss"],
           "train_accuracy": train["accuracy"], "seconds": seconds,
           "examples_per_s": train["count"] / seconds}
    if epoch % config.eval_every == 0 or epoch == num_epochs:
      test = evaluate(runner, state, ds.x_test, ds.y_test, config.batch_size)
      row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    progress.log(report.epoch_line(row, num_epochs))
    history.append(row)
    if ckpt is not None and ((config.checkpoint_every > 0 and
                              epoch % config.checkpoint_every == 0) or epoch == num_epochs):
      ckpt.save(epoch, state, history)
  progress.close()
  if ckpt is not None:
    ckpt.close()

  final_state = state
  if history and "test_accuracy" in history[-1] and len(history) >= first_epoch:
    test = {"loss": history[-1]["test_loss"], "accuracy": history[-1]["test_accuracy"]}
  else:  # a --resume of a finished run
    test = evaluate(runner, state, ds.x_test, ds.y_test, config.batch_size)
  train_seconds = sum(r["seconds"] for r in history[first_epoch - 1:])
  summary: dict[str, Any] = {
      "dataset": config.dataset, "norm": config.norm, "parallel": config.parallel,
      "devices": config.devices, "api": config.api, "dtype": config.dtype,
      "epochs": num_epochs, "steps": int(np.asarray(final_state.step)),
      "running_stats": model.stats if config.api == "nnx" else models.uses_batch_stats(
          model.norm),
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "test_examples": len(ds.x_test), "train_examples": len(ds.x_train),
      "train_seconds": train_seconds,
      "examples_per_s": (steady_examples / steady_seconds if steady_seconds else
                         len(ds.x_train) * (num_epochs - first_epoch + 1) /
                         max(train_seconds, 1e-9)),
  }
  if config.recompute_stats:
    recomputed = recompute_and_evaluate(runner, model, final_state, ds, config)
    if recomputed is not None:
      summary["test_accuracy_recomputed"] = recomputed["accuracy"]
      summary["test_loss_recomputed"] = recomputed["loss"]
  summary["workdir"] = workdir
  summary["metrics_path"] = os.path.join(workdir, "metrics.json")
  summary["plot_path"] = os.path.join(workdir, "curves.png")
  report.plot_curves(summary["plot_path"], history, title=report.run_title(config))
  summary["wall_seconds"] = time.time() - t0
  report.write_metrics(summary["metrics_path"], config, history, summary, _hardware())
  return final_state, summary
