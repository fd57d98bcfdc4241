# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Synchronized batch norm on 8 (simulated) devices
#
# 1. Per-device versus synchronized statistics, checked against NumPy on the global batch.
# 2. The uneven-batch case (a padded last batch): averaging per-device means is wrong, weighting
#    by the true counts is right.
# 3. The collectives in the compiled program.

# %% [markdown]
# *This notebook is generated from [`notebooks/03_sync_batch_norm.py`](./03_sync_batch_norm.py) (jupytext percent format)
# by `python notebooks/build.py 03`, which also executes it: edit the `.py` file, not the
# `.ipynb`.*

# %%
# Generated from notebooks/03_sync_batch_norm.py
# by `python notebooks/build.py`: edit that file.
# Setup. Inside the jaxbn repository: put the repository on the path (for
# `examples/`), nothing else. Elsewhere (e.g. Colab): jaxbn is not on PyPI, so
# clone the repository and install it from the clone, with the examples' extras.
import os, subprocess, sys
_repo = os.path.abspath("..")
if not os.path.isfile(os.path.join(_repo, "jaxbn", "__init__.py")):
  _repo = os.path.abspath("jaxbn")
  _url = "https://github.com/jaxbn/jaxbn"
  if not os.path.isdir(_repo):
    subprocess.run(["git", "clone", "--depth", "1", _url, _repo], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                  _repo + "[examples]"], check=True)
sys.path.insert(0, _repo)

# %% [markdown]
# On a machine without accelerators, JAX can simulate devices on the CPU. The number must be set
# before JAX starts:

# %%
import os
QUICK = os.environ.get("JAXBN_NB_QUICK") == "1"  # CI sets it: smaller experiments, same code
# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
import matplotlib.pyplot as plt
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
import jax
jax.config.update("jax_num_cpu_devices", 8)     # or env JAX_NUM_CPU_DEVICES=8, before JAX starts
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
import flax.linen as nn
import jaxbn, jaxbn.linen
from jaxbn.parallel import data_mesh, shard_batch
from jaxbn.testing import collective_counts

mesh = data_mesh("data")       # one mesh axis over the 8 devices
print(jax.devices())
print(mesh)

# %% [markdown]
# ## 1. Per-device versus synchronized statistics
#
# A global batch of 8 × 16 examples with 3 features, split over the devices, where the data on
# device $d$ has mean $d$ (think of an unshuffled dataset). Without `axis_name`, each device
# normalizes with the mean of its own 16 examples; with `axis_name="data"` all devices use the
# mean and variance of the whole global batch — exactly what one device would compute on the
# concatenated batch.

# %%
rng = np.random.default_rng(0)
per_device, features = 16, 3
x = (rng.normal(size=(8, per_device, features)) + np.arange(8)[:, None, None]).astype(np.float32)
x = x.reshape(8 * per_device, features)           # global batch, device d holds rows 16d..16d+15

def bn(axis_name):
  def f(x):
    y, stats = jaxbn.batch_norm(x, jaxbn.init_stats(features), training=True, momentum=0.0,
                                axis_name=axis_name)
    return y, stats.mean[None]                     # momentum 0: running stats = batch stats
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P("data"))))

xs = shard_batch(x, mesh)
y_local, mean_local = bn(None)(xs)
y_sync, mean_sync = bn("data")(xs)

ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)   # NumPy BN over the global batch
print("per-device means (feature 0):    ", np.round(np.asarray(mean_local)[:, 0], 3))
print("synchronized means (feature 0):  ", np.round(np.asarray(mean_sync)[:, 0], 3))
print("global mean (NumPy, feature 0):  ", round(float(x[:, 0].mean()), 3))
print("max |synced BN - NumPy global BN|:", float(np.abs(np.asarray(y_sync) - ref).max()))
print("max |per-device BN - NumPy global BN|:", float(np.abs(np.asarray(y_local) - ref).max()))
assert np.allclose(y_sync, ref, atol=1e-4)

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar(np.arange(8), np.asarray(mean_local)[:, 0], color="C1", label="per-device mean (no sync)")
ax.axhline(float(np.asarray(mean_sync)[0, 0]), color="C0", lw=2,
           label="synchronized mean (every device)")
ax.set(xlabel="device", ylabel="mean of feature 0", title="statistics each device normalizes with")
ax.legend()
fig.tight_layout()


# %% [markdown]
# ## 2. Uneven batches: the padded last batch
#
# An epoch of 1437 examples in batches of 64 ends with a batch of 29. Padding it to 64 keeps one
# compiled step and every example; a mask tells BN which rows are real. Split over 8 devices of 8
# rows, the real rows are 8, 8, 8, 5, 0, 0, 0, 0: devices hold different numbers of real
# examples, and some none at all.
#
# The mean of the global batch is then **not** the average of the per-device means: each device's
# mean must be weighted by its count. Averaging per-device masked means with `pmean` is what
# `flax.linen.BatchNorm(axis_name=..., mask=...)` does (flax issue #2417); a device with no real row
# even has an undefined mean.

# %%
def naive_mean(x, m):        # average of per-device masked means
  local = jnp.sum(jnp.where(m[:, None], x, 0), 0) / jnp.sum(m)
  return lax.pmean(local, "data")[None]

def jaxbn_mean(x, m):        # jaxbn: count-weighted over all devices
  return jaxbn.moments(x, axis=-1, mask=m[:, None], axis_name="data").mean[None]

class FlaxBN(nn.Module):
  @nn.compact
  def __call__(self, x, m):
    return nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="data")(
        x, mask=m[:, None])

def flax_mean(x, m):
  variables = FlaxBN().init(jax.random.key(0), x, m)
  _, upd = FlaxBN().apply(variables, x, m, mutable=["batch_stats"])
  return upd["batch_stats"]["BatchNorm_0"]["mean"][None]

def on_devices(f, rows, mask):
  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))
  return np.asarray(g(*shard_batch((rows, mask), mesh)))[0]

rows = (rng.normal(size=(64, features)) + np.repeat(np.arange(8), 8)[:, None]).astype(np.float32)
for counts in ([8, 8, 8, 8, 8, 8, 4, 1], [8, 8, 8, 5, 0, 0, 0, 0]):
  mask = np.concatenate([np.arange(8) < k for k in counts])       # (64,) real rows
  results = {f"NumPy: mean of the {mask.sum()} real rows": rows[mask].mean(0),
             "jaxbn (count-weighted)": on_devices(jaxbn_mean, rows, mask),
             "pmean of per-device masked means": on_devices(naive_mean, rows, mask),
             "flax.linen.BatchNorm(axis_name, mask)": on_devices(flax_mean, rows, mask)}
  print("real rows per device:", counts)
  for name, m in results.items():
    print(f"  {name:40s} {np.array2string(np.asarray(m), precision=3)}")
  assert np.allclose(results["jaxbn (count-weighted)"], rows[mask].mean(0), atol=1e-5)

# %% [markdown]
# Only the count-weighted statistics equal the mean of the real rows: averaging per-device means
# over-weights the devices with few real rows, and gives NaN as soon as one device has none.
# `jaxbn` gathers per-device `(count, mean, M2)` in one collective and merges them exactly, so the
# padded batch trains exactly like an unpadded one (the example script in `examples/cnn` relies
# on it).
#
# ## 3. Collectives in the compiled program
#
# A small model (dense layer, BN, ReLU, dense layer, squared loss) under `jax.shard_map`,
# compiled for the 8 devices, with `jaxbn.linen.BatchNorm` and with `flax.linen.BatchNorm` (both
# with `axis_name="data"`). `jaxbn.testing.collective_counts` reads the compiled HLO. Three
# programs: the forward pass; forward and backward to the input (the BN layer's own collectives);
# the whole gradient step, where `shard_map` also sums the parameter gradients over devices.

# %%
import optax

class Model(nn.Module):
  bn: type
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, use_bias=False)(x)
    x = self.bn(use_running_average=False, momentum=0.9, axis_name="data")(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]

x = shard_batch(rng.normal(size=(64, 8)).astype(np.float32), mesh)
t = shard_batch(rng.normal(size=64).astype(np.float32), mesh)

def programs(bn):
  """Compiled forward; forward + backward to the input; whole step (+ parameter gradients)."""
  model = Model(bn)
  variables = model.init(jax.random.key(0), np.zeros((8, 8), np.float32))
  n = 64
  def forward(v, x):
    return model.apply(v, x, mutable=["batch_stats"])[1]
  def input_grad(v, x, t):
    loss = lambda x: jnp.sum((model.apply(v, x, mutable=["batch_stats"])[0] - t) ** 2) / n
    return jax.grad(loss)(x)
  def step(v, x, t):
    def loss_fn(params):
      y, upd = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum((y - t) ** 2) / n, upd
    return jax.grad(loss_fn, has_aux=True)(v["params"])   # summed over devices by shard_map
  sm = lambda f, ins, out: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=ins, out_specs=out))
  return [sm(forward, (P(), P("data")), P()).lower(variables, x).compile(),
          sm(input_grad, (P(), P("data"), P("data")), P("data")).lower(variables, x, t).compile(),
          sm(step, (P(), P("data"), P("data")), P()).lower(variables, x, t).compile()]

print("all-reduce ops (arrays reduced) in the compiled programs\n")
print("| BatchNorm | forward | forward + backward (to the input) | whole step |")
print("|---|---|---|---|")
for name, bn in [("jaxbn.linen.BatchNorm", jaxbn.linen.BatchNorm),
                 ("flax.linen.BatchNorm", nn.BatchNorm)]:
  cells = []
  for compiled in programs(bn):
    ops = collective_counts(compiled).get("all-reduce", 0)
    arrays = collective_counts(compiled, operands=True).get("all-reduce", 0)
    cells.append(f"{ops} ({arrays})")
  print(f"| {name} | " + " | ".join(cells) + " |")

# %% [markdown]
# A synchronized BN layer needs one all-reduce forward (the per-device statistics travel
# together) and one backward (the two per-feature sums of the closed-form gradient, stacked). The
# parameter gradients add their own; XLA's all-reduce combiner may merge independent all-reduces
# into one op with several operands, which is why the numbers in parentheses count the arrays.
# Under plain `jax.jit` on a batch-sharded array no `axis_name` is needed: XLA inserts the
# reductions itself.

# %% [markdown]
# ## 4. Non-i.i.d. devices: where local statistics fail
#
# Section 1 used an unshuffled batch, where each device's examples differ from the others'. In
# training that happens when each device's data differs systematically — e.g. each device reads
# its own shard of a class-sorted dataset. The experiment
# `python -m examples.cnn.experiments non_iid` trains the example CNN on 8 simulated devices
# where each device's share of every batch comes from its own class-sorted part of the
# training set (2 or 3 of the 10 digit classes per device), with local BN (per-device
# statistics), synchronized BN, batch renorm (local) and group norm, plus local BN on shuffled
# (i.i.d.) shards as the reference; every setting the same number of steps, 3 seeds. Each model
# is evaluated with its running statistics and, for BatchNorm, with statistics recomputed over
# the (shuffled) training set (`jaxbn.linen.recompute_batch_stats`). The notebook reads the
# committed results:

# %%
import json
from examples.cnn import experiment_report

path = os.path.join(_repo, "examples", "cnn", "results", "non_iid.json")
non_iid = experiment_report.load(path) if os.path.exists(path) else None
if non_iid is None:
  print(f"{path} is missing: run `python -m examples.cnn.experiments non_iid` first.")
else:
  print(experiment_report.markdown(non_iid))
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  experiment_report.plot(non_iid, None, ax=ax)
  fig.tight_layout()

# %% [markdown]
# What the committed run shows: on class-sorted shards, local BN ends several points below local
# BN on shuffled shards, and recomputing its statistics after training does not win them back:
# the network was trained on each device's class-specific statistics. Synchronized BN removes
# the gap; batch renorm with local statistics recovers part of it; group norm is unaffected.

# %% [markdown]
# ## 5. Many hosts
#
# Everything above also runs on several processes (hosts) that together form one mesh: the
# `axis_name` collectives then cross the network. `examples/cnn/multihost.py` starts N worker
# processes with M simulated CPU devices each on this machine; they join with
# `jax.distributed.initialize(coordinator_address="127.0.0.1:PORT", num_processes=N,
# process_id=i)`, every process loads only its own rows of each batch
# (`jaxbn.parallel.shard_local_batch`), and synchronized BN spans all N × M devices. On a real
# cluster, run one worker per host with the coordinator's address and the host's process id:
#
# ```bash
# python -m examples.cnn.multihost --worker --coordinator HOST0:PORT \
#     --num_processes N --process_id i -- --config digits --batch_size 256
# ```
#
# Below, 2 processes × 2 devices train a few steps and print the same losses as 1 process × 4
# devices (what `tests/test_examples_multihost.py` checks). Skipped in quick mode (CI runs the
# test instead).

# %%
from examples.cnn import multihost

if not QUICK:
  flags = ["--config", "smoke", "--steps", "3", "--batch_size", "16", "--seed", "1"]
  one, _ = multihost.parse_losses(multihost.launch(1, 4, flags)[0].stdout)
  two, _ = multihost.parse_losses(multihost.launch(2, 2, flags)[0].stdout)
  for step, (a, b) in enumerate(zip(one, two), 1):
    print(f"step {step}: loss {a:.6f} (1 process x 4 devices)  {b:.6f} (2 processes x 2 devices)")
  assert np.allclose(one, two, rtol=1e-5)
