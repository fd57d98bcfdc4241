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

The loss of a step is the sum over the real (unmasked) examples divided by the global number of
real examples, so padding the last batch changes neither the loss nor the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.parallel

from examples.cnn import data as data_lib
from examples.cnn import models
from examples.cnn.configs import NORMS, PARALLEL, Config, UsageError

AXIS = "data"
Metrics = dict[str, jax.Array]
NormArgs = Callable[[jax.Array], dict[str, jax.Array]]


class TrainState(train_state.TrainState):
  """flax's TrainState plus the norm layers' running statistics (``batch_stats``)."""

  batch_stats: Any = None


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
  for flag in ("devices", "batch_size", "epochs", "eval_every", "ghost_batch_size", "groups"):
    value = getattr(config, flag)
    if not isinstance(value, int) or value < 1:
      raise UsageError(f"--{flag} must be a positive integer, got {value!r}.")
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


def create_model(config: Config, num_classes: int, axis_name: Optional[str] = None
                 ) -> models.CNN:
  """The CNN with the configured norm layer (synchronized over ``axis_name`` if given)."""
  norm = models.norm_layer(config.norm, momentum=config.bn_momentum, axis_name=axis_name,
                           ghost_batch_size=config.ghost_batch_size, groups=config.groups)
  return models.CNN(num_classes=num_classes, widths=tuple(config.widths), norm=norm)


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


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with Nesterov momentum, a warmup + cosine schedule, weight decay on kernels only."""
  total = config.epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=max(1, int(config.warmup_fraction * total)), decay_steps=max(total, 2))
  decay_mask = lambda params: jax.tree.map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
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
                       image_shape: tuple[int, ...], steps_per_epoch: int) -> TrainState:
  """Initializes parameters, running statistics and optimizer state."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config, steps_per_epoch),
                           batch_stats=variables.get("batch_stats", {}))


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
               sum_grads: bool = False, norm_args: Optional[NormArgs] = None
               ) -> tuple[TrainState, Metrics]:
  """One SGD step on a (possibly padded) batch.

  Args:
    state: the train state (replicated).
    batch: this device's part of the global batch (or all of it without ``axis_name``).
    axis_name: the mapped axis of ``shard_map``/``pmap`` (None under plain ``jit``).
    sum_grads: sum the gradients over ``axis_name`` (``pmap``; ``shard_map`` does it itself).
    norm_args: ``step -> dict`` of extra norm-layer arguments (batch renorm's schedule).

  Returns:
    The new state and the global sums ``loss``, ``correct`` and ``count`` (real examples).
  """
  count = _global_sum(jnp.sum(batch.mask.astype(jnp.float32)), axis_name)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = state.apply_fn(
        variables, batch.image, train=True, mask=batch.mask,
        norm_args=None if norm_args is None else norm_args(state.step), mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.label)
    loss = jnp.sum(jnp.where(batch.mask, losses, 0.0)) / jnp.maximum(count, 1.0)
    return loss, (logits, updates)

  grads, (logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  if sum_grads:
    grads = lax.psum(grads, axis_name)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates.get("batch_stats", state.batch_stats))
  return state, _metric_sums(logits, batch.label, batch.mask, axis_name)


def eval_step(state: TrainState, batch: data_lib.Batch, *, axis_name: Optional[str] = None
              ) -> Metrics:
  """Test-set sums with the running statistics (the norm layers in inference mode)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = state.apply_fn(variables, batch.image, train=False)
  return _metric_sums(logits, batch.label, batch.mask, axis_name)


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


def make_runner(mode: str, devices: list[jax.Device], norm_args: Optional[NormArgs] = None
                ) -> Runner:
  """Compiles :func:`train_step` and :func:`eval_step` for ``--parallel mode``.

  ``jit``: the single-device steps under ``jax.jit``, the batch sharded over the mesh.
  ``shard_map`` and ``pmap``: the per-device steps with ``axis_name='data'``, wrapped by
  :func:`jaxbn.parallel.shard_map_step` / :func:`jaxbn.parallel.pmap_step`.
  """
  step = functools.partial(train_step, norm_args=norm_args)
  if mode == "pmap":
    n = len(devices)
    train = jaxbn.parallel.pmap_step(
        functools.partial(step, axis_name=AXIS, sum_grads=True), axis_name=AXIS,
        devices=devices, donate_state=True)
    evaluate = jaxbn.parallel.pmap_step(functools.partial(eval_step, axis_name=AXIS),
                                        axis_name=AXIS, devices=devices)
    put_batch = lambda b: jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), b)
    return Runner(mode, devices, train, evaluate, lambda s: s, put_batch)

  mesh = jaxbn.parallel.data_mesh(AXIS, devices=devices)
  replicated = NamedSharding(mesh, P())
  if mode == "jit":
    train = jax.jit(step, donate_argnums=0)
    evaluate = jax.jit(eval_step)
  else:
    train = jaxbn.parallel.shard_map_step(functools.partial(step, axis_name=AXIS), mesh,
                                          donate_state=True)
    evaluate = jaxbn.parallel.shard_map_step(functools.partial(eval_step, axis_name=AXIS),
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


def recompute_and_evaluate(runner: Runner, model: models.CNN, state: TrainState,
                           ds: data_lib.Dataset, config: Config) -> Optional[dict[str, float]]:
  """Test metrics with population statistics recomputed over the training set.

  :func:`jaxbn.linen.recompute_batch_stats` runs the trained network over the (unaugmented)
  training set in batches of the training size and replaces every BatchNorm layer's running
  averages by the exact mean and variance of its inputs ("precise BN", Wu & Johnson 2021).

  Returns:
    The test metrics, or None for norms without BatchNorm layers (renorm, ghost, group,
    layer, none), where the recomputation does not apply.
  """
  if config.norm not in ("batch", "flax"):
    return None
  synced = config.parallel != "jit"
  mesh = jaxbn.parallel.data_mesh(AXIS, devices=runner.devices) if synced else None
  train_batches = data_lib.batches(ds.x_train, ds.y_train, config.batch_size,
                                   np.random.default_rng(config.seed))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  new = jaxbn.linen.recompute_batch_stats(
      lambda v, b: model.apply(v, b.image, train=False, mask=b.mask), variables,
      train_batches, mesh=mesh, progress=False)
  recomputed = runner.put_state(state.replace(batch_stats=new["batch_stats"]))
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


def train_and_evaluate(config: Config, workdir: Optional[str] = None, *,
                       start_time: Optional[float] = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains and evaluates; writes checkpoints, ``metrics.json`` and ``curves.png``.

  Args:
    config: the run's configuration (checked by :func:`check_config`).
    workdir: output folder (default ``config.workdir`` or ``runs/cnn/<name>``), made absolute.
    start_time: ``time.time()`` at process start, to report the wall time including JAX's
      startup (default: now).

  Returns:
    ``(state, summary)``: the final train state (one copy) and the summary: test accuracy
    with the running statistics (and with recomputed statistics for BatchNorm), times,
    throughput and file paths.

  Raises:
    UsageError: bad flags or more devices than exist.
    FileNotFoundError: a missing dataset folder.
  """
  from examples.cnn import report  # pylint: disable=import-outside-toplevel

  t0 = time.time() if start_time is None else start_time
  check_config(config)
  devices = select_devices(config.devices)
  workdir = os.path.abspath(workdir or config.workdir or os.path.join(
      "runs", "cnn", f"{config.dataset}-{config.norm}-{config.parallel}-{config.devices}dev"))
  os.makedirs(workdir, exist_ok=True)

  ds = data_lib.load(config.dataset, config.data_dir, num_train=config.num_train,
                     num_test=config.num_test, seed=config.seed)
  steps_per_epoch = data_lib.num_batches(len(ds.x_train), config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  ckpt = report.Checkpoints(workdir, config) if config.checkpoint_every >= 0 else None
  if config.resume:
    if ckpt is None:
      raise UsageError("--resume needs checkpoints; do not pass --checkpoint_every -1.")
    ckpt.check_compatible()
  elif ckpt is not None and ckpt.clear():
    print(f"note: a new run (no --resume): replaced the earlier checkpoints in "
          f"{ckpt.directory}", file=sys.stderr)
  model = create_model(config, ds.num_classes,
                       axis_name=None if config.parallel == "jit" else AXIS)
  state = create_train_state(init_key(config.seed), config, model, ds.image_shape,
                             steps_per_epoch)
  history: list[dict[str, Any]] = []
  if config.resume:
    restored = ckpt.restore(state)
    if restored is None:
      print(f"--resume: no checkpoint in {ckpt.directory}; starting from scratch.",
            file=sys.stderr)
    else:
      state, _, history = restored

  runner = make_runner(config.parallel, devices, renorm_args(config, total_steps))
  state = runner.put_state(state)
  first_epoch = len(history) + 1
  progress = report.Progress(total=total_steps, initial=(first_epoch - 1) * steps_per_epoch)
  steady_seconds, steady_examples = 0.0, 0  # epochs after the first (no compilation)
  for epoch in range(first_epoch, config.epochs + 1):
    epoch_rng = np.random.default_rng([config.seed, epoch])  # the same after --resume
    x = data_lib.random_shift(ds.x_train, epoch_rng) if config.augment else ds.x_train
    t_epoch = time.time()
    sums = []
    for batch in data_lib.batches(x, ds.y_train, config.batch_size, epoch_rng):
      state, metrics = runner.train(state, runner.put_batch(batch))
      sums.append(metrics)
      progress.step(metrics, config.batch_size)
    train = _sums_to_metrics(sums)  # waits for the epoch's steps
    seconds = time.time() - t_epoch
    if epoch > first_epoch:
      steady_seconds, steady_examples = steady_seconds + seconds, steady_examples + train["count"]
    row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
           "seconds": seconds, "examples_per_s": train["count"] / seconds}
    if epoch % config.eval_every == 0 or epoch == config.epochs:
      test = evaluate(runner, state, ds.x_test, ds.y_test, config.batch_size)
      row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    progress.log(report.epoch_line(row, config.epochs))
    history.append(row)
    if ckpt is not None and ((config.checkpoint_every > 0 and
                              epoch % config.checkpoint_every == 0) or epoch == config.epochs):
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
      "devices": config.devices, "epochs": config.epochs,
      "steps": int(np.asarray(final_state.step)),
      "running_stats": models.uses_batch_stats(model.norm),
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "test_examples": len(ds.x_test), "train_examples": len(ds.x_train),
      "train_seconds": train_seconds,
      "examples_per_s": (steady_examples / steady_seconds if steady_seconds else
                         len(ds.x_train) * (config.epochs - first_epoch + 1) /
                         max(train_seconds, 1e-9)),
  }
  if config.recompute_stats:
    recomputed = recompute_and_evaluate(runner, model, final_state, ds, config)
    if recomputed is not None:
      summary["test_accuracy_recomputed"] = recomputed["accuracy"]
      summary["test_loss_recomputed"] = recomputed["loss"]
  summary["metrics_path"] = os.path.join(workdir, "metrics.json")
  summary["plot_path"] = os.path.join(workdir, "curves.png")
  report.plot_curves(summary["plot_path"], history, title=report.run_title(config))
  summary["wall_seconds"] = time.time() - t0
  report.write_metrics(summary["metrics_path"], config, history, summary, _hardware())
  return final_state, summary
