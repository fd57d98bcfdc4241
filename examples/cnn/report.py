"""What a run leaves behind: progress bar, checkpoints, ``metrics.json`` and ``curves.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

import jax

from examples.cnn.configs import Config, UsageError

# Fields that define the shapes of the saved state: --resume refuses a checkpoint that differs.
_STRUCTURAL = ("dataset", "api", "norm", "widths", "groups", "ghost_batch_size")


def check_workdir(workdir: str, *, resume: bool, overwrite: bool) -> None:
  """Refuses to start a new run over an earlier one unless told what to do with it.

  Raises:
    UsageError: ``workdir`` holds checkpoints or ``metrics.json`` of an earlier run and
      neither ``resume`` nor ``overwrite`` is set.
  """
  if resume or overwrite:
    return
  ckpts = os.path.join(workdir, "checkpoints")
  earlier = [p for p in (ckpts, os.path.join(workdir, "metrics.json"))
             if os.path.isfile(p) or (os.path.isdir(p) and os.listdir(p))]
  if earlier:
    raise UsageError(f"--workdir {workdir} holds an earlier run ({', '.join(map(os.path.basename, earlier))}); "
                     f"pass --resume to continue it, --overwrite to replace it, or another "
                     f"--workdir.")


class Progress:
  """A tqdm bar over all steps with loss, accuracy and throughput; silent without a TTY.

  Without a TTY (a log file, CI) only the per-epoch lines from :meth:`log` are printed.
  """

  def __init__(self, total: int, initial: int = 0, every: int = 10):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    self.bar = tqdm(total=total, initial=initial, unit="step", disable=None, dynamic_ncols=True,
                    leave=False)
    self.every = every
    self.n = 0
    self._t: Optional[float] = None
    self._examples = 0

  def step(self, metrics: dict[str, jax.Array], batch_size: int) -> None:
    """Advances the bar; every ``every`` steps shows the step's loss, accuracy and ex/s."""
    self.n += 1
    if self.bar.disable:
      return
    self.bar.update(1)
    self._examples += batch_size
    if self._t is None:  # the first step compiles: measure throughput from the second
      self._t, self._examples = time.time(), 0
    elif self.n % self.every == 0:
      m = {k: float(v) for k, v in metrics.items()}  # waits for this step
      rate = self._examples / max(time.time() - self._t, 1e-9)
      self.bar.set_postfix(loss=f"{m['loss'] / max(m['count'], 1):.3f}",
                           acc=f"{m['correct'] / max(m['count'], 1):.1%}",
                           ex_s=f"{rate:,.0f}", refresh=False)

  def log(self, line: str) -> None:
    if self.bar.disable:
      print(line, flush=True)
    else:
      self.bar.write(line)

  def close(self) -> None:
    self.bar.close()


def epoch_line(row: dict[str, Any], epochs: int) -> str:
  line = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
          f"acc {row['train_accuracy']:.2%}")
  if "test_accuracy" in row:
    line += f"  |  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2%}"
  return line + f"  |  {row['seconds']:.1f} s, {row['examples_per_s']:,.0f} ex/s"


def run_title(config: Config) -> str:
  return (f"{config.dataset}, --api {config.api}, --dtype {config.dtype}, --norm "
          f"{config.norm}, --parallel {config.parallel}, --devices {config.devices}, batch "
          f"{config.batch_size}")


def summary_line(s: dict[str, Any]) -> str:
  """The one line a run ends with."""
  acc = f"test accuracy {s['test_accuracy']:.2%}"
  if s.get("running_stats"):
    acc += " (running stats"
    if "test_accuracy_recomputed" in s:
      acc += f"; {s['test_accuracy_recomputed']:.2%} with recomputed stats"
    acc += ")"
  flags = "".join(f" --{k} {s[k]}" for k in ("api", "dtype") if s.get(k) not in
                  (None, "linen", "float32"))
  return (f"done: {s['dataset']}{flags} --norm {s['norm']} --parallel {s['parallel']} --devices "
          f"{s['devices']}: {acc} on {s['test_examples']} examples; {s['epochs']} epochs "
          f"({s['steps']} steps) in {s['train_seconds']:.1f} s, {s['examples_per_s']:,.0f} "
          f"examples/s; wall time {s['wall_seconds']:.1f} s. Wrote {s['metrics_path']} and "
          f"{s['plot_path']}")


def print_summary(summary: dict[str, Any], file=sys.stdout) -> None:
  print(summary_line(summary), file=file, flush=True)


def write_metrics(path: str, config: Config, history: list[dict[str, Any]],
                  summary: dict[str, Any], hardware: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump({"config": dataclasses.asdict(config), "hardware": hardware,
               "summary": summary, "history": history}, f, indent=1)


def plot_curves(path: str, history: list[dict[str, Any]], title: str = "") -> None:
  """Loss and accuracy per epoch (train and test) in one PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  epochs = [r["epoch"] for r in history]
  tested = [r for r in history if "test_accuracy" in r]
  ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
  ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], marker=".",
               label="test")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
  ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history], marker=".", label="train")
  ax_acc.plot([r["epoch"] for r in tested], [100 * r["test_accuracy"] for r in tested],
              marker=".", label="test")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class Checkpoints:
  """Orbax checkpoints of the train state and the metric history under ``workdir/checkpoints``.

  Orbax needs absolute paths; ``workdir`` is made absolute here.
  """

  def __init__(self, workdir: str, config: Config, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.config = config
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, epoch: int, state: Any, history: list[dict[str, Any]]) -> None:
    ocp = self._ocp
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"config": dataclasses.asdict(self.config),
                                "history": history})), force=True)

  def clear(self) -> int:
    """Deletes the checkpoints of an earlier run in this workdir; returns how many."""
    steps = list(self.manager.all_steps())
    for step in steps:
      self.manager.delete(step)
    return len(steps)

  def check_compatible(self) -> None:
    """Raises if the latest checkpoint was written for another model or dataset.

    Raises:
      UsageError: naming the flags that differ.
    """
    ocp = self._ocp
    epoch = self.manager.latest_step()
    if epoch is None:
      return
    meta = self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved, now = meta["config"], dataclasses.asdict(self.config)
    diff = [f"--{k} {_fmt(saved.get(k))} (now {_fmt(now[k])})" for k in _STRUCTURAL
            if _fmt(saved.get(k)) != _fmt(now[k])]
    if diff:
      raise UsageError(f"--resume: the checkpoint in {self.directory} was trained with "
                       f"{', '.join(diff)}; pass the same flags or another --workdir.")

  def restore(self, template: Any) -> Optional[tuple[Any, int, list[dict[str, Any]]]]:
    """``(state, epoch, history)`` of the latest checkpoint, or None if there is none.

    Raises:
      UsageError: the checkpoint was written with a different model or dataset.
    """
    ocp = self._ocp
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    self.check_compatible()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, int(epoch), list(restored.meta["history"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _fmt(v: Any) -> str:
  return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
