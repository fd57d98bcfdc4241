"""Experiments that show when batch normalization helps and when it fails.

``python -m examples.cnn.experiments NAME [--quick] [--out DIR] [--seeds N]`` runs one experiment
and writes ``NAME.json`` (every run: setting, seed, accuracies, steps), ``NAME.md`` (a table of
mean ± standard deviation over the seeds) and ``NAME.png`` into ``examples/cnn/results/`` (or
``--out``). Every setting of an experiment trains for the same number of steps (a fixed step
budget, not a fixed number of epochs), from the same seeds, on the ``hard`` preset: 600 noisy
training digits (``configs.hard``), where the normalizations differ by more than the spread
over seeds. ``--quick`` runs a few steps with one seed and a tiny network: a smoke test of the
whole pipeline (what CI runs), not a result.

Experiments (``NAME``):

* ``small_batches``: 8 simulated devices, 2, 4, 8, 16 or 32 examples per device. Local BN
  (each device's statistics), synchronized BN, ghost BN (virtual batches of
  ``min(per-device batch, 4)``), batch renorm (local statistics), group norm and layer norm.
* ``non_iid``: 8 devices, 16 examples per device, each device's share of every batch drawn
  from its own class-sorted part of the training set (2 or 3 classes per device). Local BN,
  synchronized BN, batch renorm (local), group norm; local BN on i.i.d. shards as the
  reference. Test accuracy with the running statistics and with statistics recomputed over
  the training set.
* ``train_vs_eval``: one device, a short run; BN momentum 0.9, 0.99 and 0.999; test accuracy
  with the running statistics and with recomputed ("precise") statistics.

The simulated devices share the machine's cores: the experiments measure accuracy, not speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python examples/cnn/experiments.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cnn import configs  # noqa: E402  (no JAX import yet)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EXPERIMENTS = ("small_batches", "non_iid", "train_vs_eval")
DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Setting:
  """One line of an experiment: a label and the config changes it makes to the base preset."""

  label: str
  changes: dict[str, Any]
  group: str = ""  # e.g. the per-device batch size of small_batches (a column of the table)


def _local(norm: str, **kw) -> dict[str, Any]:
  return dict(norm=norm, parallel="shard_map", sync_bn=False, **kw)


def _synced(norm: str, **kw) -> dict[str, Any]:
  return dict(norm=norm, parallel="shard_map", sync_bn=True, **kw)


def settings(name: str, quick: bool) -> tuple[configs.Config, list[Setting], dict[str, Any]]:
  """``(base config, settings, description)`` of experiment ``name``."""
  base = configs.get_config("hard").replace(devices=DEVICES, learning_rate=0.02)
  if quick:
    base = base.replace(widths=(4, 8), num_train=64, num_test=32, groups=2)
  if name == "small_batches":
    steps = 3 if quick else 150
    per_device = (2,) if quick else (2, 4, 8, 16, 32)
    out = []
    for b in per_device:
      common = dict(batch_size=b * DEVICES)
      out += [
          Setting("local BN", {**_local("batch"), **common}, str(b)),
          Setting("synced BN", {**_synced("batch"), **common}, str(b)),
          Setting("ghost BN", {**_synced("ghost", ghost_batch_size=min(b, 4)), **common},
                  str(b)),
          Setting("batch renorm", {**_local("renorm"), **common}, str(b)),
          Setting("group norm", {**_synced("group"), **common}, str(b)),
          Setting("layer norm", {**_synced("layer"), **common}, str(b)),
      ]
    what = (f"{DEVICES} simulated devices, per-device batch "
            f"{', '.join(map(str, per_device))}; {steps} steps for every setting")
    return base.replace(steps=steps), out, {"what": what, "steps": steps,
                                            "per_device": list(per_device)}
  if name == "non_iid":
    steps = 3 if quick else 300
    common = dict(batch_size=16 * DEVICES, recompute_stats=True)
    out = [
        Setting("local BN, i.i.d. shards", {**_local("batch"), **common}),
        Setting("local BN", {**_local("batch"), **common, "shard_by_class": True}),
        Setting("synced BN", {**_synced("batch"), **common, "shard_by_class": True}),
        Setting("batch renorm (local)", {**_local("renorm"), **common,
                                         "shard_by_class": True}),
        Setting("group norm", {**_synced("group"), **common, "shard_by_class": True}),
    ]
    what = (f"{DEVICES} simulated devices x 16 examples; each device's share of every batch "
            f"from its own class-sorted part (2 or 3 classes); {steps} steps")
    return base.replace(steps=steps), out, {"what": what, "steps": steps}
  if name == "train_vs_eval":
    steps = 3 if quick else 60
    common = dict(devices=1, parallel="jit", batch_size=32, recompute_stats=True,
                  norm="batch", warmup_fraction=0.1)
    momenta = (0.9, 0.999) if quick else (0.9, 0.99, 0.999)
    out = [Setting(f"momentum {m}", {**common, "bn_momentum": m}) for m in momenta]
    what = f"1 device, batch 32, {steps} steps (short training)"
    return base.replace(steps=steps), out, {"what": what, "steps": steps}
  raise ValueError(f"experiments: unknown experiment {name!r}; choose one of "
                   f"{', '.join(EXPERIMENTS)}.")


# ----------------------------------------------------------------------------- running


def run_setting(base: configs.Config, setting: Setting, seeds: Sequence[int], ds: Any
                ) -> list[dict[str, Any]]:
  """Trains ``setting`` once per seed (one compiled step shared by all seeds).

  Returns:
    One record per seed: test accuracy with the running statistics (``running``), with
    recomputed statistics (``recomputed``, BatchNorm only, when the setting asks for it), the
    final training loss and the steps taken.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from examples.cnn import train  # pylint: disable=import-outside-toplevel
  config = base.replace(**setting.changes)
  train.check_config(config)
  devices = train.select_devices(config.devices)
  per_epoch = train.steps_per_epoch(config, ds)
  total = train.total_steps(config, per_epoch)
  runner = train.make_runner(config.parallel, devices, train.renorm_args(config, total),
                             api=config.api, sync_bn=config.sync_bn)
  records = []
  for seed in seeds:
    cfg = config.replace(seed=seed)
    t0 = time.time()
    model, state = train.init_state(cfg, ds, total)
    state = runner.put_state(state)
    step, epoch, last = 0, 0, []
    while step < total:
      epoch += 1
      for batch in train.epoch_batches(cfg, ds, epoch):
        if step == total:
          break
        state, metrics = runner.train(state, runner.put_batch(batch))
        # One step in flight at a time: with many queued steps, XLA:CPU's simulated devices
        # were seen to deadlock in a collective on a loaded 2-core machine.
        jax.block_until_ready(metrics)
        step += 1
        last = (last + [metrics])[-10:]
    record = {"setting": setting.label, "group": setting.group, "seed": seed, "steps": step,
              "epochs": round(step / per_epoch, 2),
              "train_loss_last10": train._sums_to_metrics(last)["loss"],  # pylint: disable=protected-access
              "running": train.evaluate(runner, state, ds.x_test, ds.y_test,
                                        cfg.batch_size)["accuracy"]}
    if cfg.recompute_stats:
      recomputed = train.recompute_and_evaluate(runner, model, state, ds, cfg)
      if recomputed is not None:
        record["recomputed"] = recomputed["accuracy"]
    record["seconds"] = round(time.time() - t0, 2)
    records.append(record)
    print(f"  {setting.label:<28} {setting.group:>3} seed {seed}: running "
          f"{record['running']:.2%}" + (f", recomputed {record['recomputed']:.2%}"
                                          if "recomputed" in record else "") +
          f" ({record['seconds']:.0f} s)", flush=True)
  return records


def _machine() -> dict[str, Any]:
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                            timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__, "commit": commit,
          "platform": jax.devices()[0].platform, "devices": len(jax.devices())}


def run(name: str, *, quick: bool = False, seeds: int = 3, out: Optional[str] = None
        ) -> dict[str, Any]:
  """Runs experiment ``name`` and writes its JSON, markdown table and plot.

  Returns:
    The JSON document (also written to ``<out>/<name>.json``).
  """
  from examples.cnn import data as data_lib  # pylint: disable=import-outside-toplevel
  base, items, info = settings(name, quick)
  seeds = 1 if quick else seeds
  out = os.path.abspath(out or RESULTS_DIR)
  os.makedirs(out, exist_ok=True)
  # One dataset for every setting and seed (the seeds vary initialization and batch order).
  ds = data_lib.load(base.dataset, num_train=base.num_train, num_test=base.num_test,
                     noise=base.noise, seed=0)
  t0 = time.time()
  print(f"{name}: {info['what']}; seeds 0..{seeds - 1}; writing to {out}", flush=True)
  command = f"python -m examples.cnn.experiments {name}" + (" --quick" if quick else "") + (
      f" --seeds {seeds}" if seeds != 3 and not quick else "")
  doc = {"experiment": name, "quick": quick, "command": command, "description": info["what"],
         "info": info, "seeds": list(range(seeds)),
         "base_config": dataclasses.asdict(base),
         "settings": [{"label": s.label, "group": s.group, "changes": s.changes} for s in items],
         "train_examples": len(ds.x_train), "test_examples": len(ds.x_test),
         "machine": _machine(), "runs": []}
  from examples.cnn import experiment_report  # pylint: disable=import-outside-toplevel
  for i, item in enumerate(items):
    doc["runs"] += run_setting(base, item, range(seeds), ds)
    # Written after every setting, so an interrupted run leaves its finished part (marked).
    doc["complete"] = i == len(items) - 1
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc["wall_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump(doc, f, indent=1)
    experiment_report.render(doc, out)
  print(f"{name}: done in {doc['wall_seconds']:.0f} s; wrote {name}.json, {name}.md, "
        f"{name}.png in {out}", flush=True)
  return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m examples.cnn.experiments",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("name", choices=EXPERIMENTS + ("all",), help="the experiment to run")
  p.add_argument("--quick", action="store_true",
                 help="a few steps, one seed, a tiny network: checks the pipeline (CI)")
  p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default: 3)")
  p.add_argument("--out", default=None,
                 help=f"output folder (default: {RESULTS_DIR})")
  args = p.parse_args(argv)
  if args.seeds < 1:
    p.error(f"--seeds must be >= 1, got {args.seeds}")
  from examples.cnn import main as main_lib  # pylint: disable=import-outside-toplevel
  main_lib.set_cpu_devices(DEVICES)
  for name in (EXPERIMENTS if args.name == "all" else (args.name,)):
    run(name, quick=args.quick, seeds=args.seeds, out=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
