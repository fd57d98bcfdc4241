"""Configuration presets for the CNN example.

A :class:`Config` is a plain frozen dataclass (no extra dependency); ``main.py`` turns every field
into a ``--flag`` and :func:`get_config` gives the preset a run starts from. ``digits`` is the
default: the README's quick-start run, sized to train in under three minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

class UsageError(ValueError):
  """A bad flag or flag combination; ``main.py`` prints it without a traceback."""


NORMS = ("batch", "renorm", "ghost", "group", "layer", "none", "flax")
PARALLEL = ("jit", "shard_map", "pmap")
APIS = ("linen", "nnx")
DTYPES = ("float32", "bfloat16")

# Default parent of the run folders: <repository>/runs/cnn, absolute, whatever the current
# directory is.
RUNS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "runs", "cnn")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run.

  Attributes:
    dataset: ``digits`` (bundled with scikit-learn), ``cifar10`` (local folder) or ``synthetic``.
    data_dir: CIFAR-10 ``cifar-10-batches-py`` folder (only for ``cifar10``).
    num_train: keep only this many training examples (None: all).
    num_test: keep only this many test examples (None: all).
    noise: standard deviation of Gaussian noise added to every image, train and test, in units
      of the standardized pixels (0: none); a harder task for the experiments.
    api: ``linen`` (``jaxbn.linen`` layers, a ``flax.training`` TrainState) or ``nnx``
      (``jaxbn.nnx`` layers, ``nnx.Optimizer``).
    dtype: ``float32``, or ``bfloat16`` for mixed precision: bf16 activations, float32
      parameters, optimizer state and BN statistics.
    norm: normalization layer: ``batch`` (jaxbn BatchNorm), ``renorm`` (batch renormalization),
      ``ghost`` (ghost batch norm), ``group``, ``layer``, ``none``, or ``flax`` (flax's own
      BatchNorm, for comparison).
    widths: channels of the three conv stages (each stage halves the resolution after the first).
    bn_momentum: running-average momentum (flax convention: weight of the old value).
    ghost_batch_size: virtual batch size for ``--norm ghost``.
    groups: number of groups for ``--norm group``.
    devices: number of devices (simulated CPU devices when there is no accelerator).
    parallel: ``jit`` (batch-sharded arrays, XLA reduces globally), ``shard_map`` or ``pmap``
      (per-device code with statistics synchronized over the ``data`` axis).
    sync_bn: with ``shard_map``/``pmap``: synchronize the batch statistics over the devices
      (True), or normalize each device's shard with its own statistics ("local BN", as
      without SyncBatchNorm in PyTorch DDP) and average the running statistics over devices
      after every step (:func:`jaxbn.parallel.average_stats`).
    shard_by_class: non-i.i.d. devices: sort the training set by class, split it into one
      contiguous part per device, and fill each device's share of every batch from its own
      part only (with 8 devices each sees 2 or 3 of the 10 digit classes).
    batch_size: global batch size (all devices together); must be a multiple of ``devices``.
    epochs: passes over the training set (ignored when ``steps`` is set).
    steps: a fixed step budget: train exactly this many steps (None: ``epochs`` passes).
    learning_rate: peak learning rate: SGD with Nesterov momentum 0.9, linear warm-up then
      cosine decay to 0 (``optax.warmup_cosine_decay_schedule``).
    weight_decay: weight decay added to the gradients of conv and dense kernels.
    warmup_fraction: fraction of the steps spent warming the learning rate up from 0.
    augment: random one-pixel shifts of the training images.
    seed: seed for initialization, shuffling and augmentation.
    eval_every: evaluate on the test set every this many epochs (and after the last).
    recompute_stats: after training, also evaluate with population statistics recomputed over
      the training set (when this jaxbn version provides the API).
    workdir: where checkpoints, ``metrics.json`` and ``curves.png`` go (made absolute;
      None: ``RUNS_DIR/<dataset>-<norm>-<parallel>-<N>dev``).
    checkpoint_every: save a checkpoint every this many epochs and at the end (0: only at the
      end; -1: never).
    resume: continue from the latest checkpoint in ``workdir``.
    overwrite: delete the checkpoints of an earlier run in ``workdir`` and start again
      (without it, and without ``resume``, a workdir with checkpoints is an error).
  """

  dataset: str = "digits"
  data_dir: Optional[str] = None
  num_train: Optional[int] = None
  num_test: Optional[int] = None
  noise: float = 0.0
  api: str = "linen"
  dtype: str = "float32"
  norm: str = "batch"
  widths: tuple[int, ...] = (32, 64, 128)
  bn_momentum: float = 0.9
  ghost_batch_size: int = 16
  groups: int = 8
  devices: int = 1
  parallel: str = "jit"
  sync_bn: bool = True
  shard_by_class: bool = False
  batch_size: int = 64
  epochs: int = 30
  steps: Optional[int] = None
  learning_rate: float = 0.01
  weight_decay: float = 5e-4
  warmup_fraction: float = 0.15
  augment: bool = True
  seed: int = 0
  eval_every: int = 1
  recompute_stats: bool = True
  workdir: Optional[str] = None
  checkpoint_every: int = 1
  resume: bool = False
  overwrite: bool = False

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)


def digits() -> Config:
  """The quick-start run: sklearn digits, 30 epochs, batch 64."""
  return Config()


def cifar10() -> Config:
  """CIFAR-10 from a local folder: wider network, longer run (hours on CPU, minutes on GPU)."""
  return Config(dataset="cifar10", widths=(64, 128, 256), batch_size=256, epochs=30,
                learning_rate=0.01, bn_momentum=0.9, groups=16)


def synthetic() -> Config:
  """Synthetic class templates: a few seconds, no data needed."""
  return Config(dataset="synthetic", widths=(16, 32, 64), epochs=5, batch_size=64)


def digits_ci() -> Config:
  """Digits in a fraction of the time (narrower network, 10 epochs): what the accuracy tests run.

  Reaches the same >= 97% test accuracy as ``digits`` (see tests/test_examples_accuracy.py).
  """
  return Config(widths=(16, 32, 64), epochs=10, learning_rate=0.02, checkpoint_every=-1,
                recompute_stats=False)


def hard() -> Config:
  """Harder digits for the experiments (experiments.py): 600 training examples, noisy images.

  On ``digits`` every normalization lands within 0.6% of 99.7%; with fewer examples and pixel
  noise (std 0.6 of the standardized pixels) the choice of normalization shows.
  """
  return Config(num_train=600, noise=0.6, widths=(16, 32, 64), checkpoint_every=-1,
                eval_every=1000, recompute_stats=False)


def smoke() -> Config:
  """One or two steps on a tiny synthetic set: what CI runs for every --norm/--parallel."""
  return Config(dataset="synthetic", num_train=20, num_test=12, widths=(4, 8),
                batch_size=16, epochs=1, ghost_batch_size=4, groups=2, augment=False,
                recompute_stats=True, checkpoint_every=-1)


CONFIGS = {"digits": digits, "digits_ci": digits_ci, "hard": hard, "cifar10": cifar10,
           "synthetic": synthetic, "smoke": smoke}


def get_config(name: str = "digits") -> Config:
  """Returns the preset ``name`` (one of :data:`CONFIGS`)."""
  try:
    return CONFIGS[name]()
  except KeyError:
    raise ValueError(f"get_config: unknown config {name!r}; choose one of "
                     f"{', '.join(CONFIGS)}.") from None
