"""The CNN example (examples/cnn): data readers, flags and their errors, and smoke runs.

Smoke runs train one or two steps of a tiny network per --norm and per --parallel mode, and
check what matters against an independent reference: the sharded/synchronized modes against
one device on the same global batch, the padded-and-masked last batch against the unpadded
batch, a resumed run against an uninterrupted one, the CIFAR-10 reader against the documented
byte layout of the format.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from examples.cnn import configs, data, main, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = configs.get_config("smoke")


def _leaves(tree):
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, atol, rtol=1e-4):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- data


def _write_cifar_folder(path, rng, per_batch=3, num_test=4):
  """A synthetic folder in CIFAR-10's "python version" format; returns the NHWC images."""
  os.makedirs(path)
  images, labels = [], []
  for i in range(1, 6):
    img = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
    lab = rng.integers(0, 10, size=per_batch).tolist()
    # The documented layout: each row is 1024 red, then 1024 green, then 1024 blue values,
    # each plane row-major. Built element by element from the definition.
    rows = np.zeros((per_batch, 3072), np.uint8)
    for n in range(per_batch):
      for c in range(3):
        rows[n, c * 1024:(c + 1) * 1024] = img[n, :, :, c].ravel()
    with open(os.path.join(path, f"data_batch_{i}"), "wb") as f:
      pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": lab,
                   b"data": rows, b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    images.append(img)
    labels += lab
  test_img = rng.integers(0, 256, size=(num_test, 32, 32, 3), dtype=np.uint8)
  test_lab = rng.integers(0, 10, size=num_test).tolist()
  with open(os.path.join(path, "test_batch"), "wb") as f:
    pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_lab,
                 b"data": test_img.transpose(0, 3, 1, 2).reshape(num_test, -1),
                 b"filenames": [b"y.png"] * num_test}, f, protocol=2)
  with open(os.path.join(path, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES],
                 b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
  return np.concatenate(images), np.array(labels), test_img, np.array(test_lab)


def test_cifar10_reader_on_synthetic_folder(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "cifar-10-batches-py"
  x_train, y_train, x_test, y_test = _write_cifar_folder(str(folder), rng)
  raw, raw_labels = data.read_cifar10_batch(str(folder / "data_batch_2"))
  np.testing.assert_array_equal(raw, x_train[3:6])
  np.testing.assert_array_equal(raw_labels, y_train[3:6])
  assert raw.dtype == np.uint8 and raw_labels.dtype == np.int32

  # The parent folder works too; images standardized with the train set's channel statistics.
  for path in (folder, tmp_path):
    ds = data.load("cifar10", str(path))
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    f64 = x_train.astype(np.float64) / 255
    mean, std = f64.mean((0, 1, 2)), f64.std((0, 1, 2))
    np.testing.assert_allclose(ds.x_train, (f64 - mean) / std, atol=1e-4)
    np.testing.assert_allclose(ds.x_test, (x_test / 255 - mean) / std, atol=1e-4)
  ds = data.load("cifar10", str(folder), num_train=7, num_test=2)
  assert len(ds.x_train) == 7 and len(ds.y_test) == 2


def test_cifar10_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"cifar10: --data_dir .*nope does not exist; "
                     r"download https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz"):
    data.load("cifar10", str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match=r"has no `test_batch` file.*\"python version\""):
    data.load("cifar10", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no dataset path given"):
    data.load("cifar10", None)
  bad = tmp_path / "bad"
  bad.mkdir()
  with open(bad / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match=r"b'data' has shape \(2, 10\), expected \(N, 3072\)"):
    data.read_cifar10_batch(str(bad / "test_batch"))


def test_digits_and_padded_batches():
  ds = data.load("digits")
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
  np.testing.assert_allclose(ds.x_train.mean(), 0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(), 1, atol=1e-4)
  # Stratified: every class in the test set in proportion (about 36 each).
  assert np.bincount(ds.y_test).min() >= 35

  rng = np.random.default_rng(0)
  got = list(data.batches(ds.x_train, ds.y_train, 64, rng))
  assert len(got) == data.num_batches(1437, 64) == 23
  assert all(b.image.shape == (64, 8, 8, 1) for b in got)
  assert got[-1].mask.sum() == 1437 - 22 * 64 and not got[-1].mask[-1]
  # Every example exactly once: the real rows are a permutation of the training set.
  real = np.concatenate([b.image[b.mask] for b in got])
  order = np.lexsort(real.reshape(len(real), -1).T)
  ref = np.lexsort(ds.x_train.reshape(1437, -1).T)
  np.testing.assert_array_equal(real[order], ds.x_train[ref])

  shifted = data.random_shift(ds.x_train[:50], np.random.default_rng(1))
  assert shifted.shape == (50, 8, 8, 1)
  assert 0 < np.mean(shifted != ds.x_train[:50]) < 1


def test_class_sorted_batches_give_each_device_its_own_classes():
  """--shard_by_class: device d's rows come only from the d-th class-sorted part, and one pass
  covers every training example exactly once."""
  ds = data.load("digits", num_train=200)
  devices, batch = 8, 32
  per_device = batch // devices
  parts = np.array_split(np.sort(ds.y_train), devices)  # the classes each device may hold
  seen = []
  batches = list(data.class_sorted_batches(ds.x_train, ds.y_train, batch, devices,
                                           np.random.default_rng(0)))
  assert len(batches) == data.num_class_sorted_batches(200, batch, devices) == 7
  for b in batches:
    assert b.image.shape == (batch, 8, 8, 1) and b.mask.shape == (batch,)
    for d in range(devices):
      rows = slice(d * per_device, (d + 1) * per_device)
      labels = b.label[rows][b.mask[rows]]
      assert set(labels.tolist()) <= set(parts[d].tolist())
    seen += [tuple(img.ravel()) for img in b.image[b.mask]]
  assert len(seen) == 200 and len(set(seen)) == len({tuple(x.ravel()) for x in ds.x_train})
  assert max(len(set(p.tolist())) for p in parts) <= 3  # a few classes per device


def test_noise_is_added_once_with_the_given_std():
  clean = data.load("digits", num_train=400)
  noisy = data.load("digits", num_train=400, noise=0.6)
  again = data.load("digits", num_train=400, noise=0.6)
  np.testing.assert_array_equal(noisy.x_train, again.x_train)  # fixed by the seed
  diff = (noisy.x_train - clean.x_train).ravel()
  # 25,600 draws: the sample std of N(0, 0.6^2) is within 0.6 * 4/sqrt(2n) ~ 1% of 0.6.
  np.testing.assert_allclose(diff.std(), 0.6, rtol=0.02)
  assert abs(diff.mean()) < 4 * 0.6 / np.sqrt(diff.size)
  np.testing.assert_array_equal(noisy.y_train, clean.y_train)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, message", [
    (["--norm", "batchnorm"], r"argument --norm: invalid choice: 'batchnorm'"),
    (["--parallel", "dp"], r"argument --parallel: invalid choice: 'dp'"),
    (["--devices", "two"], r"argument --devices: invalid int value: 'two'"),
    (["--widths", "32,x"], r"argument --widths: expected comma-separated integers"),
    (["--config", "imagenet"], r"argument --config: invalid choice: 'imagenet'"),
])
def test_bad_flags_exit_with_usage(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main.parse_config(argv)
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_every_flag_has_help_text():
  parser = main.build_parser()
  for action in parser._actions:  # pylint: disable=protected-access
    if action.dest in ("help",):
      continue
    text = (action.help or "").split("(default:")[0].strip()
    assert len(text) > 10, f"--{action.dest} has no help text"
  fields = {f.name for f in __import__("dataclasses").fields(configs.Config)}
  flags = {a.dest for a in parser._actions} - {"help", "config"}  # pylint: disable=protected-access
  assert flags == fields  # one flag per Config field, no more, no fewer


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=60, devices=8), r"--batch_size 60 is not a multiple of --devices 8; "
     r"the global batch is split evenly, so use e\.g\. --batch_size 56"),
    (dict(devices=0), r"--devices must be a positive integer, got 0"),
    (dict(epochs=-1), r"--epochs must be a positive integer, got -1"),
    (dict(norm="ghost", batch_size=16, ghost_batch_size=5, parallel="pmap", devices=2),
     r"--norm ghost: the per-device batch \(8\) must be a multiple of --ghost_batch_size 5"),
    (dict(norm="ghost", devices=8), r"--norm ghost: the per-device batch \(2\) must be a "
     r"multiple of --ghost_batch_size 4 \(virtual batches do not span devices\)"),
    (dict(norm="group", groups=3), r"--norm group: every width in --widths 4,8 must be "
     r"divisible by --groups 3"),
    (dict(dataset="cifar10"), r"--dataset cifar10 needs --data_dir path/to/cifar-10-batches-py"),
    (dict(bn_momentum=1.0), r"--bn_momentum must be in \[0, 1\), got 1\.0"),
    (dict(learning_rate=0.0), r"--learning_rate must be > 0"),
    (dict(norm="flax", parallel="shard_map", devices=8),
     r"--norm flax with --parallel shard_map: .*flax issue #2417.*use --norm batch"),
    (dict(api="haiku"), r"--api 'haiku': choose one of linen, nnx"),
    (dict(dtype="float16"), r"--dtype 'float16': choose one of float32, bfloat16"),
    (dict(steps=0), r"--steps must be a positive integer \(or unset\), got 0"),
    (dict(warmup_fraction=1.0), r"--warmup_fraction must be in \[0, 1\), got 1\.0"),
    (dict(sync_bn=False, devices=2), r"--no-sync_bn needs per-device code: use --parallel "
     r"shard_map or pmap"),
    (dict(resume=True, overwrite=True), r"--resume and --overwrite contradict each other"),
])
def test_check_config_errors(changes, message):
  with pytest.raises(configs.UsageError, match=message):
    train.check_config(SMOKE.replace(**changes))


def test_more_devices_than_exist():
  assert len(jax.devices()) == 8  # the test conftest's simulated CPU devices
  with pytest.raises(configs.UsageError, match=r"--devices 9: only 8 cpu device\(s\) exist; "
                     r"run through main\.py, which sets the number of simulated CPU devices"):
    train.select_devices(9)


def test_missing_norm_layer_is_named(monkeypatch):
  import jaxbn.linen

  class Partial:
    BatchNorm = jaxbn.linen.BatchNorm
  monkeypatch.setattr(models, "_jaxbn_linen", lambda: Partial)
  assert models.available_norms() == ("batch", "none", "flax")
  with pytest.raises(configs.UsageError, match=r"--norm renorm needs jaxbn\.linen\.BatchRenorm "
                     r"\(batch renormalization\), which this version of jaxbn does not provide; "
                     r"choose one of batch, none, flax"):
    train.check_config(SMOKE.replace(norm="renorm"))


def test_main_reports_errors_without_traceback(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    main.main(["--dataset", "cifar10", "--data_dir", str(tmp_path / "missing")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert re.search(r"^python -m examples\.cnn\.main: error: cifar10: --data_dir .*missing "
                   r"does not exist; download ", err), err
  assert "Traceback" not in err
  with pytest.raises(SystemExit) as e:
    main.main(["--config", "smoke", "--devices", "16", "--batch_size", "16"])
  assert e.value.code == 2
  assert re.search(r"error: --devices 16: only 8 cpu device\(s\) exist",
                   capsys.readouterr().err)


# ----------------------------------------------------------------------------- steps


@pytest.fixture(scope="module")
def tiny():
  """A tiny model's initial state, a 12-example batch padded to 16, and one device's result."""
  ds = data.load("synthetic", num_train=12, num_test=4)
  cfg = SMOKE.replace(learning_rate=0.5, warmup_fraction=0.0)
  batch = next(data.batches(ds.x_train, ds.y_train, 16))
  assert batch.mask.sum() == 12
  model = train.create_model(cfg, ds.num_classes)
  state = train.create_train_state(train.init_key(0), cfg, model, ds.image_shape, total=4)
  reference = _run_steps(cfg, ds, state, batch, "jit", 1)
  return cfg, ds, state, batch, reference


def _run_steps(cfg, ds, state, batch, mode, n_devices, steps=2):
  if mode != "jit":  # the same variables; the layers synchronize over the "data" axis
    state = state.replace(apply_fn=train.create_model(cfg, ds.num_classes, "data").apply)
  runner = train.make_runner(mode, jax.devices()[:n_devices])
  state = runner.put_state(jax.tree.map(np.array, state))  # a copy: the step donates it
  for _ in range(steps):
    state, metrics = runner.train(state, runner.put_batch(batch))
  return state, {k: float(v) for k, v in metrics.items()}


def test_padded_batch_equals_unpadded(tiny):
  """Padding + mask: the same steps as on the 12 real examples alone (exact statistics)."""
  cfg, ds, state, batch, (ref, ref_m) = tiny
  real = data.Batch(batch.image[:12], batch.label[:12], batch.mask[:12])
  got, got_m = _run_steps(cfg, ds, state, real, "jit", 1)
  assert ref_m["count"] == got_m["count"] == 12
  np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
  _assert_trees_close(got.params, ref.params, atol=2e-6)
  _assert_trees_close(got.batch_stats, ref.batch_stats, atol=2e-6)
  # The steps really trained: parameters and running statistics moved.
  assert not np.allclose(np.asarray(ref.batch_stats["norm0"]["var"]), 1.0)
  assert not np.allclose(np.asarray(ref.params["head"]["kernel"]),
                         np.asarray(state.params["head"]["kernel"]))


@pytest.mark.parametrize("mode", ["jit", "shard_map", "pmap"])
def test_parallel_modes_equal_one_device(tiny, mode):
  """8 devices, two of them holding only padding: same parameters and BN statistics."""
  cfg, ds, state, batch, (ref, ref_m) = tiny
  got, got_m = _run_steps(cfg, ds, state, batch, mode, 8)
  assert got_m["count"] == 12
  np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
  _assert_trees_close(got.params, ref.params, atol=1e-5)
  _assert_trees_close(got.batch_stats, ref.batch_stats, atol=1e-5)


# ----------------------------------------------------------------------------- whole runs


def _check_outputs(summary, cfg):
  assert os.path.isabs(summary["metrics_path"]) and os.path.isfile(summary["plot_path"])
  with open(summary["plot_path"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(summary["metrics_path"]) as f:
    saved = json.load(f)
  assert saved["config"]["norm"] == cfg.norm and len(saved["history"]) == cfg.epochs
  row = saved["history"][-1]
  assert np.isfinite(row["train_loss"]) and np.isfinite(row["test_loss"])
  assert summary["steps"] == cfg.epochs * 2 and summary["test_examples"] == 12
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert saved["summary"]["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("norm, parallel, devices", [
    ("batch", "pmap", 2),
    ("renorm", "shard_map", 2),
    ("ghost", "jit", 2),
    ("group", "jit", 1),
    ("layer", "jit", 1),
    ("none", "jit", 1),
    ("flax", "jit", 1),
])
def test_smoke_runs(norm, parallel, devices, tmp_path):
  cfg = SMOKE.replace(norm=norm, parallel=parallel, devices=devices,
                      recompute_stats=norm in ("batch", "flax"))
  state, summary = train.train_and_evaluate(cfg, str(tmp_path))
  _check_outputs(summary, cfg)
  assert ("test_accuracy_recomputed" in summary) == (norm in ("batch", "flax"))
  assert bool(state.batch_stats) == (norm in ("batch", "renorm", "ghost", "flax"))


@pytest.mark.parametrize("norm, parallel, devices, extra", [
    ("batch", "shard_map", 2, {}),
    ("renorm", "pmap", 2, {}),
    ("batch", "shard_map", 2, dict(sync_bn=False, shard_by_class=True)),
    ("group", "jit", 1, dict(dtype="bfloat16")),
])
def test_nnx_smoke_runs(norm, parallel, devices, extra, tmp_path):
  """--api nnx in every parallel mode: an nnx.Optimizer state that trains and checkpoints."""
  cfg = SMOKE.replace(api="nnx", norm=norm, parallel=parallel, devices=devices,
                      recompute_stats=norm == "batch", **extra)
  state, summary = train.train_and_evaluate(cfg, str(tmp_path))
  _check_outputs(summary, cfg)
  assert isinstance(state, train.NnxTrainState)
  assert ("test_accuracy_recomputed" in summary) == (norm == "batch")
  model, optimizer = state.merge()
  assert int(optimizer.step[...]) == 2
  if norm != "group":  # the running statistics moved away from their initial 0 / 1
    assert not np.allclose(np.asarray(model.norms[0].var[...]), 1.0)


def test_bfloat16_keeps_parameters_and_statistics_in_float32():
  """--dtype bfloat16: bf16 activations and logits, float32 parameters and BN statistics."""
  ds = data.load("synthetic", num_train=16, num_test=4)
  for api in ("linen", "nnx"):
    cfg = SMOKE.replace(dtype="bfloat16", api=api)
    model, state = train.init_state(cfg, ds, total=2)
    if api == "nnx":
      params = nnx.state(model, nnx.Param)
      stats = nnx.state(model, nnx.BatchStat)
      model.eval()
      logits = model(ds.x_test)
    else:
      params, stats = state.params, state.batch_stats
      logits = model.apply({"params": params, "batch_stats": stats}, ds.x_test, train=False)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert {a.dtype for a in jax.tree.leaves(stats)} == {np.dtype("float32")}
    assert logits.dtype == jax.numpy.bfloat16


def test_local_bn_averages_running_stats_and_differs_from_synced(tiny):
  """--no-sync_bn: each device normalizes with its own statistics (so the step differs from
  synced BN on the same batch), and the stored running statistics are the devices' average
  (jaxbn.parallel.average_stats), identical on every device."""
  cfg, ds, state, batch, (ref, ref_m) = tiny
  local_state = state.replace(apply_fn=train.create_model(cfg, ds.num_classes, None).apply)
  runner = train.make_runner("shard_map", jax.devices()[:2], sync_bn=False)
  got, got_m = runner.train(runner.put_state(jax.tree.map(np.array, local_state)),
                            runner.put_batch(batch))
  synced, synced_m = _run_steps(cfg, ds, state, batch, "shard_map", 2, steps=1)
  assert got_m["count"] == synced_m["count"] == 12
  assert abs(float(got_m["loss"]) - synced_m["loss"]) > 1e-4
  # Reference: the per-device batch statistics of the first BN layer's input, pooled.
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  _, inter = state.apply_fn(variables, batch.image, train=True, mask=batch.mask,
                            mutable=["batch_stats", "intermediates"],
                            capture_intermediates=lambda m, _: m.name == "conv0")
  h = np.asarray(inter["intermediates"]["conv0"]["__call__"][0], np.float64)
  m = np.asarray(batch.mask)
  per = [h[i * 8:(i + 1) * 8][m[i * 8:(i + 1) * 8]].reshape(-1, h.shape[-1]) for i in range(2)]
  means = np.stack([p.mean(0) for p in per])
  m = cfg.bn_momentum  # each device: m * (0, 1) + (1 - m) * its batch's (mean, var); then
  # pooled: the average of the running means and of the running variances plus the spread of
  # the running means, which is (1 - m)^2 times the spread of the batch means.
  want_var = m + (1 - m) * np.mean([p.var(0) for p in per], 0) + (1 - m) ** 2 * means.var(0)
  # float32 statistics of O(1) values: 1e-5 relative covers the rounding with margin; a plain
  # average of the variances (no spread term) is off by (1 - m)^2 var(means) ~ 1e-3 here.
  np.testing.assert_allclose(np.asarray(got.batch_stats["norm0"]["mean"]),
                             (1 - m) * means.mean(0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.batch_stats["norm0"]["var"]), want_var,
                             rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path):
  """Two epochs in one go == one epoch, then --resume for the second; orbax absolute paths."""
  cfg = SMOKE.replace(epochs=2, checkpoint_every=1, learning_rate=0.5, recompute_stats=False)
  full, summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  _check_outputs(summary, cfg)
  ckpts = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["1", "2"]
  shutil.rmtree(ckpts / "2")  # as if the run had stopped after epoch 1
  resumed, summary2 = train.train_and_evaluate(cfg.replace(resume=True), str(tmp_path / "run"))
  _assert_trees_close(resumed.params, full.params, atol=1e-6)
  _assert_trees_close(resumed.batch_stats, full.batch_stats, atol=1e-6)
  assert summary2["steps"] == 4
  with open(summary2["metrics_path"]) as f:
    assert [r["epoch"] for r in json.load(f)["history"]] == [1, 2]
  with pytest.raises(configs.UsageError, match=r"--resume: the checkpoint in .*checkpoints was "
                     r"trained with --norm batch \(now group\); pass the same flags"):
    train.train_and_evaluate(cfg.replace(resume=True, norm="group"), str(tmp_path / "run"))
  # A new run (no --resume) in the same workdir is refused, unless --overwrite.
  with pytest.raises(configs.UsageError, match=r"--workdir .*run holds an earlier run "
                     r"\(checkpoints, metrics\.json\); pass --resume to continue it, "
                     r"--overwrite to replace it, or another --workdir"):
    train.train_and_evaluate(cfg.replace(epochs=1), str(tmp_path / "run"))
  assert sorted(os.listdir(ckpts)) == ["1", "2"]
  train.train_and_evaluate(cfg.replace(epochs=1, checkpoint_every=0, overwrite=True),
                           str(tmp_path / "run"))
  assert sorted(os.listdir(ckpts)) == ["1"]


def test_command_line_script(tmp_path):
  """`python examples/cnn/main.py` as a user runs it: devices set before JAX starts."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.join(ROOT, "examples", "cnn", "main.py"), "--config", "smoke",
         "--devices", "4", "--parallel", "shard_map", "--checkpoint_every", "0",
         "--workdir", str(tmp_path / "w")]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert re.search(r"^done: synthetic --norm batch --parallel shard_map --devices 4: test "
                   r"accuracy \d+\.\d\d% \(running stats; \d+\.\d\d% with recomputed stats\) "
                   r"on 12 examples; 1 epochs \(2 steps\) in .* s, .* examples/s; wall time "
                   r".* s\. Wrote .*metrics\.json and .*curves\.png$", out.stdout, re.M), out.stdout
  assert re.search(r"^epoch   1/1  train loss", out.stdout, re.M)
  assert "\r" not in out.stdout + out.stderr  # no progress bar without a TTY
  assert os.listdir(tmp_path / "w" / "checkpoints") == ["1"]
