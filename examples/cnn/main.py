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
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

if __package__ in (None, ""):  # `python examples/cnn/main.py`: make `examples` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cnn import configs  # noqa: E402  (no JAX import yet)

_HELP = {f.name: f for f in dataclasses.fields(configs.Config)}


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
  """One ``--flag`` per :class:`configs.Config` field; None means "the preset's value"."""
  p = argparse.ArgumentParser(
      prog="python -m examples.cnn.main",
      description="Train a small CNN with jaxbn normalization (digits by default).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", default="digits", choices=sorted(configs.CONFIGS),
                 help="preset the other flags override")
  p.add_argument("--dataset", choices=("digits", "cifar10", "synthetic"))
  p.add_argument("--data_dir", help="CIFAR-10 `cifar-10-batches-py` folder")
  p.add_argument("--norm", choices=configs.NORMS,
                 help="batch (jaxbn BatchNorm), renorm, ghost, group, layer, none, or flax "
                      "(flax.linen.BatchNorm, for comparison)")
  p.add_argument("--devices", type=int,
                 help="number of devices; on CPU, simulated devices (set before JAX starts)")
  p.add_argument("--parallel", choices=configs.PARALLEL,
                 help="jit: sharded arrays; shard_map/pmap: per-device code, synced BN")
  p.add_argument("--batch_size", type=int, help="global batch size (all devices)")
  p.add_argument("--epochs", type=int)
  p.add_argument("--learning_rate", type=float)
  p.add_argument("--weight_decay", type=float)
  p.add_argument("--bn_momentum", type=float, help="running-average momentum (flax convention)")
  p.add_argument("--widths", type=_positive_ints, help="conv stage widths, e.g. 32,64,128")
  p.add_argument("--ghost_batch_size", type=int, help="virtual batch of --norm ghost")
  p.add_argument("--groups", type=int, help="groups of --norm group")
  p.add_argument("--num_train", type=int, help="use only this many training examples")
  p.add_argument("--num_test", type=int, help="use only this many test examples")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                 help="random one-pixel shifts of training images")
  p.add_argument("--recompute_stats", action=argparse.BooleanOptionalAction,
                 help="also evaluate with population statistics recomputed after training")
  p.add_argument("--eval_every", type=int, help="evaluate every N epochs")
  p.add_argument("--seed", type=int)
  p.add_argument("--workdir", help="output folder (default runs/cnn/<dataset>-<norm>-...)")
  p.add_argument("--checkpoint_every", type=int,
                 help="save every N epochs (0: at the end only, -1: never)")
  p.add_argument("--resume", action="store_true", default=None,
                 help="continue from the latest checkpoint in --workdir")
  return p


def parse_config(argv: Optional[Sequence[str]] = None) -> configs.Config:
  """The preset of ``--config`` with every given flag applied."""
  args = vars(build_parser().parse_args(argv))
  config = configs.get_config(args.pop("config"))
  return config.replace(**{k: v for k, v in args.items() if v is not None})


def set_cpu_devices(n: int) -> None:
  """Asks JAX for ``n`` CPU devices; must run before JAX's first computation."""
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
  except (train.UsageError, FileNotFoundError) as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  report.print_summary(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
