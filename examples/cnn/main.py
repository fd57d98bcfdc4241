"""Trains the example CNN: ``python -m examples.cnn.main [--flags]``.

The defaults train on scikit-learn's bundled digits with jaxbn's BatchNorm (under three minutes
on two CPU cores). ``--devices N`` sets the number of simulated CPU devices before JAX starts,
so ``--devices 8 --parallel shard_map`` runs synchronized BN on a laptop. ``--help`` lists
every flag; see README.md next to this file.
"""

from __future__ import annotations

import time

_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

if __package__ in (None, ""):  # `python examples/cnn/main.py`: make `examples` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cnn import configs  # noqa: E402  (no JAX import yet)


def _positive_ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,128, "
                                     f"got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def build_parser() -> argparse.ArgumentParser:
  """One ``--flag`` per :class:`configs.Config` field; unset flags keep the preset's value."""
  p = argparse.ArgumentParser(
      prog="python -m examples.cnn.main",
      description="Train a small CNN with jaxbn normalization layers (sklearn digits by "
                  "default). Defaults shown are the digits preset's.")
  preset = configs.get_config("digits")

  def add(name: str, help: str = "", **kw):  # pylint: disable=redefined-builtin
    default = getattr(preset, name)
    if isinstance(default, tuple):
      default = ",".join(map(str, default))
    p.add_argument(f"--{name}", help=f"{help} (default: {default})".lstrip(), **kw)

  p.add_argument("--config", default="digits", choices=sorted(configs.CONFIGS),
                 help="preset that the other flags override (default: digits)")
  add("dataset", "digits (bundled with scikit-learn), cifar10 (needs --data_dir) or "
      "synthetic (random class templates)", choices=("digits", "cifar10", "synthetic"))
  add("data_dir", "CIFAR-10 `cifar-10-batches-py` folder")
  add("api", "Flax API of the model: linen (jaxbn.linen layers) or nnx (jaxbn.nnx layers, "
      "nnx.Optimizer)", choices=configs.APIS)
  add("dtype", "activation dtype: float32, or bfloat16 (mixed precision: float32 parameters, "
      "optimizer state and BN statistics)", choices=configs.DTYPES)
  add("norm", "batch (jaxbn BatchNorm), renorm, ghost, group, layer, none, or flax "
      "(flax.linen.BatchNorm, for comparison)", choices=configs.NORMS)
  add("devices", "number of devices; without an accelerator, simulated CPU devices",
      type=int)
  add("parallel", "jit: batch-sharded arrays; shard_map or pmap: per-device code with "
      "synchronized BN", choices=configs.PARALLEL)
  add("sync_bn", "with shard_map/pmap: synchronize BN statistics over the devices "
      "(--no-sync_bn: each device normalizes with its own shard's statistics)",
      action=argparse.BooleanOptionalAction)
  add("shard_by_class", "non-i.i.d. devices: each device's share of every batch comes from "
      "its own class-sorted part of the training set", action=argparse.BooleanOptionalAction)
  add("batch_size", "global batch size (all devices together)", type=int)
  add("epochs", "passes over the training set (ignored with --steps)", type=int)
  add("steps", "fixed step budget: train exactly this many steps (overrides --epochs)",
      type=int)
  add("learning_rate", "peak learning rate (SGD with Nesterov momentum 0.9; linear warm-up, "
      "then cosine decay to 0)", type=float)
  add("warmup_fraction", "fraction of the steps spent warming the learning rate up from 0",
      type=float)
  add("weight_decay", "L2 weight decay added to the gradients of conv and dense kernels",
      type=float)
  add("bn_momentum", "running-average momentum, flax convention (PyTorch's 0.1 = 0.9 here)",
      type=float)
  add("widths", "channels of the conv stages", type=_positive_ints)
  add("ghost_batch_size", "virtual batch of --norm ghost", type=int)
  add("groups", "groups of --norm group", type=int)
  add("num_train", "use only this many training examples", type=int)
  add("num_test", "use only this many test examples", type=int)
  add("noise", "std of Gaussian noise added to every standardized image (a harder task)",
      type=float)
  add("augment", "random one-pixel shifts of the training images",
      action=argparse.BooleanOptionalAction)
  add("recompute_stats", "also evaluate with BN statistics recomputed after training",
      action=argparse.BooleanOptionalAction)
  add("eval_every", "evaluate every N epochs", type=int)
  add("seed", "seed of the initialization, the data split, shuffling and augmentation",
      type=int)
  add("workdir", f"output folder; None: {configs.RUNS_DIR}/<dataset>-<norm>-<parallel>-<N>dev")
  add("checkpoint_every", "save every N epochs and at the end (0: at the end, -1: never)",
      type=int)
  add("resume", "continue from the latest checkpoint in --workdir", action="store_true",
      default=None)
  add("overwrite", "delete an earlier run's checkpoints in --workdir and start again",
      action="store_true", default=None)
  return p


def parse_config(argv: Optional[Sequence[str]] = None) -> configs.Config:
  """The preset of ``--config`` with every given flag applied."""
  args = vars(build_parser().parse_args(argv))
  config = configs.get_config(args.pop("config"))
  return config.replace(**{k: v for k, v in args.items() if v is not None})


# Simulated CPU devices are threads; on a busy machine one may wait longer than XLA's default
# 40 s at a collective, and XLA then aborts the process. Allow 15 minutes.
_PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")


def set_cpu_devices(n: int) -> None:
  """Asks JAX for ``n`` CPU devices; must run before JAX's first computation.

  Also raises XLA's timeout for CPU collectives (unless ``XLA_FLAGS`` already sets it), so a
  loaded machine slows the simulated devices down instead of aborting the run.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "collective_call_terminate_timeout" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + _PATIENT_COLLECTIVES).strip()
  import jax  # pylint: disable=import-outside-toplevel
  if n > 1:
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX already started (e.g. in a notebook): train checks the count.
      pass


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  config = parse_config(argv)
  set_cpu_devices(config.devices)
  from examples.cnn import report, train  # pylint: disable=import-outside-toplevel
  try:
    _, summary = train.train_and_evaluate(config, start_time=_START)
  except (configs.UsageError, FileNotFoundError) as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  report.print_summary(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
