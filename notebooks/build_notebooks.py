"""Writes the notebooks of this folder from the cell sources below, and executes them.

    python notebooks/build_notebooks.py            # write and execute all (full settings)
    python notebooks/build_notebooks.py 02         # only the notebooks whose name contains 02
    python notebooks/build_notebooks.py --no-execute
    python notebooks/build_notebooks.py --markdown-only   # text edits: keep the outputs

The notebooks are committed with their outputs (plots included). Each reads the environment
variable ``JAXBN_NB_QUICK=1`` to shrink its experiments, which is how CI executes them
(tests/test_notebooks.py) in well under a minute each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = r'''import os
QUICK = os.environ.get("JAXBN_NB_QUICK") == "1"  # CI sets it: smaller experiments, same code
%matplotlib inline
%config InlineBackend.figure_formats = ["png"]
import matplotlib.pyplot as plt
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})'''

DIGITS = r'''from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

digits = load_digits()  # 1797 real 8x8 grayscale digits, bundled with scikit-learn
images = ((digits.images / 16.0 - 0.3) / 0.4)[..., None].astype(np.float32)  # NHWC, ~standardized
x_train, x_test, y_train, y_test = train_test_split(
    images, digits.target.astype(np.int32), test_size=0.2, random_state=0, stratify=digits.target)
print("train", x_train.shape, "test", x_test.shape)'''


def md(text: str):
  return new_markdown_cell(text.strip("\n"))


def code(text: str):
  return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------------------- 01

NB01 = [
    md(r'''
# Batch normalization from scratch

What batch normalization (Ioffe & Szegedy, 2015) does, shown on real data with `jaxbn`:

1. what it does to the distribution of a layer's activations, channel by channel — and the same
   computation in five lines of NumPy;
2. training mode (statistics of the batch) versus inference mode (running statistics);
3. how the running statistics converge: exponential moving average (momentum) versus a
   cumulative average;
4. the effect on a small CNN's training curve, with and without BN.

For a convolutional layer with NHWC activations $x$, BN computes one mean and one variance per
channel $c$, over the batch and the spatial positions:

$$\mu_c = \frac{1}{NHW}\sum_{n,h,w} x_{nhwc},\qquad
\sigma^2_c = \frac{1}{NHW}\sum_{n,h,w} (x_{nhwc}-\mu_c)^2,\qquad
y_{nhwc} = \gamma_c\,\frac{x_{nhwc}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}} + \beta_c .$$
'''),
    code(SETUP + r'''
import functools
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import optax
import jaxbn, jaxbn.linen'''),
    code(DIGITS),
    md(r'''
## 1. What BN does to the activations

A convolution with random filters of very different scales (and a bias per channel) gives
pre-activations whose channels have different centers and spreads. BN in training mode maps
every channel to mean 0 and variance 1 over the batch (here with $\gamma=1, \beta=0$).
'''),
    code(r'''
def conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

channels = 8
scales = np.geomspace(0.2, 5.0, channels).astype(np.float32)
kernel = jax.random.normal(jax.random.key(0), (3, 3, 1, channels)) * scales / 3
offsets = np.linspace(-3, 3, channels).astype(np.float32)
h = conv(x_train[:256], kernel) + offsets          # (256, 8, 8, 8): a batch of activations

y, stats = jaxbn.batch_norm(h, jaxbn.init_stats(channels), training=True, momentum=0.9)

# The same thing from scratch, in float64 NumPy: statistics over N, H and W, per channel.
def batch_norm_numpy(x, eps=1e-5):
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))          # biased, as BN uses for normalization
  return (x - mean) / np.sqrt(var + eps), mean, var

y_ref, mean_ref, var_ref = batch_norm_numpy(np.asarray(h, np.float64))
print("max |jaxbn - numpy|:", float(np.abs(np.asarray(y) - y_ref).max()))
assert np.allclose(y, y_ref, atol=1e-4)
print("per-channel mean after BN:", np.round(np.asarray(y).mean((0, 1, 2)), 6))
print("per-channel std  after BN:", np.round(np.asarray(y).std((0, 1, 2)), 4))'''),
    code(r'''
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
for ax, data, title in [(axes[0], h, "before BN (pre-activations)"), (axes[1], y, "after BN")]:
  per_channel = [np.asarray(data[..., c]).ravel()[::4] for c in range(channels)]  # 4096 values each
  ax.violinplot(per_channel, showmedians=True)
  ax.set(title=title, xlabel="channel", ylabel="value", xticks=range(1, channels + 1))
fig.tight_layout()'''),
    md(r'''
## 2. Training mode versus inference mode

In training mode an example's output depends on the *other* examples of its batch (through the
batch statistics). In inference mode the running statistics are used instead, so the output of
an example is a fixed function of that example alone. Below: the first example placed in two
different batches.
'''),
    code(r'''
batch_a = h[:32]
batch_b = jnp.concatenate([h[:1], h[128:159]])    # same first example, other companions
ya, _ = jaxbn.batch_norm(batch_a, stats, training=True)
yb, _ = jaxbn.batch_norm(batch_b, stats, training=True)
ea, _ = jaxbn.batch_norm(batch_a, stats, training=False)
eb, same = jaxbn.batch_norm(batch_b, stats, training=False)
print("training mode : max |y(example 0 in batch A) - y(example 0 in batch B)| =",
      float(jnp.abs(ya[0] - yb[0]).max()))
print("inference mode: max |y(example 0 in batch A) - y(example 0 in batch B)| =",
      float(jnp.abs(ea[0] - eb[0]).max()))
print("inference mode returns the statistics unchanged:", same is stats)'''),
    md(r'''
## 3. How the running statistics converge

The running statistics estimate the population statistics of each channel. With momentum $m$
(flax/Keras convention: the weight of the *old* value; PyTorch's `momentum=p` is $m = 1-p$):

$$\hat\mu \leftarrow m\,\hat\mu + (1-m)\,\mu_B .$$

They start at $\hat\mu = 0$, $\hat\sigma^2 = 1$, so with $m$ close to 1 they need many batches to
forget the start (about $1/(1-m)$); `debias=True` removes that start-up bias (as Adam does), and
`momentum=None` is the cumulative average of all batches (PyTorch's `momentum=None`). We stream
random batches of 32 digits through the conv layer above and compare with the statistics of all
1797 images.
'''),
    code(r'''
steps = 60 if QUICK else 300
all_h = conv(jnp.asarray(images), kernel) + offsets
pop_mean = np.asarray(all_h.mean((0, 1, 2)))
rng = np.random.default_rng(0)
idx = rng.integers(0, len(images), size=(steps, 32))
batches = conv(jnp.asarray(images[idx.ravel()]), kernel) + offsets
batches = batches.reshape(steps, 32, 8, 8, channels)

@functools.partial(jax.jit, static_argnames=("momentum", "debias"))
def stream(batches, momentum, debias=False):
  def body(stats, batch):
    _, stats = jaxbn.batch_norm(batch, stats, training=True, momentum=momentum, debias=debias)
    return stats, stats.mean
  return jax.lax.scan(body, jaxbn.init_stats(channels), batches)[1]

runs = {"momentum 0.9": stream(batches, 0.9), "momentum 0.99": stream(batches, 0.99),
        "momentum 0.99, debias": stream(batches, 0.99, True),
        "cumulative (momentum=None)": stream(batches, None)}
fig, ax = plt.subplots(figsize=(7, 3.8))
for label, means in runs.items():
  err = np.abs(np.asarray(means) - pop_mean).mean(-1)   # mean over channels
  ax.plot(np.arange(1, steps + 1), err, label=label)
ax.set(xscale="log", yscale="log", xlabel="batches seen", ylabel="|running mean − population mean|",
       title="convergence of the running mean (average over channels)")
ax.legend()
for label, means in runs.items():
  err = np.abs(np.asarray(means[-1]) - pop_mean).mean()
  print(f"{label:28s} error after {steps} batches: {err:.4f}")'''),
    md(r'''
Momentum 0.9 converges fast but keeps the noise of its last ~10 batches; 0.99 is smoother but is
still pulled towards its initial value for hundreds of steps unless debiased; the cumulative
average keeps improving as $1/\sqrt{n}$ but never forgets, which suits recomputing statistics of
a *fixed* network after training (see `jaxbn.linen.recompute_batch_stats`) rather than tracking
a network whose weights change.

## 4. A small CNN with and without BN

The same network (two conv layers, global average pooling, a linear classifier) trained with
SGD + momentum on the digits, with `jaxbn.linen.BatchNorm` after each convolution or without
any normalization, at a moderate and at a high learning rate.
'''),
    code(r'''
class SmallCNN(nn.Module):
  use_bn: bool

  @nn.compact
  def __call__(self, x, train: bool):
    for width in (16, 32):
      x = nn.Conv(width, (3, 3), use_bias=not self.use_bn)(x)
      if self.use_bn:
        x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                  use_fast_variance=False)(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.mean((1, 2)))


@functools.lru_cache(maxsize=None)
def compiled_steps(use_bn):
  """The jitted train step and accuracy of one model (the learning rate is an input)."""
  model = SmallCNN(use_bn)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates_p, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates_p), updates.get("batch_stats", {}),
            opt_state, loss)

  @jax.jit
  def accuracy(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return jnp.mean(logits.argmax(-1) == y)

  return model, tx, step, accuracy


def train_cnn(use_bn, learning_rate, epochs, batch_size=64, seed=0):
  model, tx, step, accuracy = compiled_steps(use_bn)
  variables = model.init(jax.random.key(seed, impl="rbg"), x_train[:1], train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  opt_state = tx.init(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate)
  rng = np.random.default_rng(seed)
  losses, test_acc = [], []
  steps = len(x_train) // batch_size   # shuffled each epoch; the example script pads instead
  for _ in range(epochs):
    order = rng.permutation(len(x_train))[:steps * batch_size].reshape(steps, batch_size)
    for b in order:
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                  x_train[b], y_train[b])
      losses.append(float(loss))
    test_acc.append(float(accuracy(params, batch_stats, x_test, y_test)))
  return np.array(losses), np.array(test_acc)


epochs = 2 if QUICK else 12
results = {}
for lr in (0.05, 0.5):
  for use_bn in (True, False):
    results[(use_bn, lr)] = train_cnn(use_bn, lr, epochs)
    print(f"BN={use_bn!s:5} lr={lr}: final train loss {results[(use_bn, lr)][0][-20:].mean():.3f}, "
          f"test accuracy {results[(use_bn, lr)][1][-1]:.2%}")'''),
    code(r'''
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
smooth = lambda v, k=10: np.convolve(v, np.ones(k) / k, mode="valid")
for (use_bn, lr), (losses, acc) in results.items():
  style = dict(color="C0" if use_bn else "C3", ls="-" if lr == 0.05 else "--")
  label = f"{'BN' if use_bn else 'no norm'}, lr {lr}"
  ax_loss.plot(smooth(np.nan_to_num(losses, nan=10.0)), label=label, **style)
  ax_acc.plot(np.arange(1, len(acc) + 1), 100 * acc, marker="o", label=label, **style)
ax_loss.set(yscale="log", xlabel="step", ylabel="training loss (smoothed)", title="training loss")
ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (running stats)")
ax_loss.legend(); ax_acc.legend()
fig.tight_layout()'''),
    md(r'''
With BN the training loss falls much faster at the same learning rate, and the ten times
larger learning rate speeds it up further, while the network without normalization starts
slowly and its loss jumps early on at the large rate. In the same number of epochs the BN
network reaches the higher test accuracy. (With the large rate, BN's test accuracy also wobbles
from epoch to epoch: the running statistics lag behind weights that change fast.)

The next notebook (`02_normalization_compared`) looks at what happens when the batch gets
small, and `03_sync_batch_norm` at batch statistics over several devices.
'''),
]

# --------------------------------------------------------------------------------------- 02

NB02 = [
    md(r'''
# Normalization layers compared: BN, layer, instance and group norm

1. Which axes each normalization reduces over (a figure, and a check of `jaxbn`'s functions
   against NumPy).
2. An experiment on the digits at **per-device batch sizes 2, 4, 8 and 32** (8 devices): batch
   norm with per-device statistics, synchronized batch norm, batch renormalization and group
   norm — the small-batch weakness of BN and its remedies.
'''),
    code(SETUP + r'''
import time
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import optax
import jaxbn, jaxbn.linen
from jaxbn.parallel import average_stats'''),
    md(r'''
## 1. Which axes are normalized together

For activations of shape (N, H, W, C), each method computes one mean and variance per shaded
set below (after Wu & He, 2018): **batch norm** over N, H, W for each channel; **layer norm**
over H, W, C for each example; **instance norm** over H, W for each example and channel;
**group norm** over H, W and a group of channels for each example.
'''),
    code(r'''
N, C, HW = 6, 8, 5
def cube(ax, filled, title):
  ax.voxels(np.ones((C, HW, N), bool), facecolors=np.where(filled, "#3b7dd8", "#dddddd"),
            edgecolor="#888888", linewidth=0.3)
  ax.set_title(title)
  ax.set_xlabel("C", labelpad=-10); ax.set_ylabel("H, W", labelpad=-10)
  ax.set_zlabel("N", labelpad=-10)
  ax.set_xticklabels([]); ax.set_yticklabels([]); ax.set_zticklabels([])
  ax.view_init(elev=20, azim=-60)

c, h, n = np.meshgrid(np.arange(C), np.arange(HW), np.arange(N), indexing="ij")
sets = {"Batch norm": c == 2, "Layer norm": n == N - 1, "Instance norm": (n == N - 1) & (c == 2),
        "Group norm (4 groups)": (n == N - 1) & (c // 2 == 1)}
fig = plt.figure(figsize=(13, 3.4))
for i, (title, filled) in enumerate(sets.items()):
  cube(fig.add_subplot(1, 4, i + 1, projection="3d"), filled, title)
fig.tight_layout()'''),
    md(r'''
The same statement in code: each `jaxbn` function equals a NumPy normalization over those axes.
'''),
    code(r'''
x = jax.random.normal(jax.random.key(0), (N, 4, 4, C)) * 3 + 1
xf = np.asarray(x, np.float64)
def standardize(v, axes, eps):
  return (v - v.mean(axes, keepdims=True)) / np.sqrt(v.var(axes, keepdims=True) + eps)

grouped = standardize(xf.reshape(N, 4, 4, 4, C // 4), (1, 2, 4), 1e-6).reshape(xf.shape)
checks = {
    "batch_norm      over (N, H, W)":
        (jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True)[0],
         standardize(xf, (0, 1, 2), 1e-5)),
    "layer_norm      over (H, W, C)":
        (jaxbn.layer_norm(x, reduction_axes=(1, 2, 3)), standardize(xf, (1, 2, 3), 1e-6)),
    "instance_norm   over (H, W)":
        (jaxbn.instance_norm(x), standardize(xf, (1, 2), 1e-6)),
    "group_norm (4)  over (H, W, C/4)":
        (jaxbn.group_norm(x, num_groups=4), grouped),
}
for name, (got, want) in checks.items():
  err = float(np.abs(np.asarray(got) - want).max())
  print(f"{name}: max |jaxbn - numpy| = {err:.1e}")
  assert err < 1e-4'''),
    md(r'''
## 2. Small batches per device

Batch norm's statistics come from the examples of one batch. When the batch per device is
small, they are noisy, and — worse — in inference mode the network sees the running averages,
which differ from the per-batch statistics it was trained with. Four ways to train the same
network on 8 devices:

* **BN (per device)**: each device normalizes with the statistics of its own examples (what
  `flax.linen.BatchNorm` does without `axis_name`); the running statistics are averaged over
  devices at the end of each step (`jaxbn.parallel.average_stats`).
* **Synchronized BN**: `jaxbn.linen.BatchNorm(axis_name=...)`: statistics of the global batch
  (8 × the per-device batch).
* **Batch renorm** (Ioffe, 2017), per device: `jaxbn.linen.BatchRenorm`, which corrects the batch
  statistics towards the running ones (`r`, `d`, with `jaxbn.renorm_schedule`'s warm-up).
* **Group norm**: per-example statistics, no dependence on the batch at all.

The network: two conv layers and a hidden dense layer, each followed by the normalization. The
8 devices are simulated with `jax.vmap(..., axis_name="device")`: the normalization layers see
exactly the same per-device batches and collectives as under `jax.shard_map` or `jax.pmap` on 8
real devices (notebook 03 uses real devices), and one small program compiles fast. Every run
trains for the same number of epochs; the learning rate grows with the square root of the batch.
'''),
    code(DIGITS),
    code(r'''
DEVICES = 8
METHODS = {"BN (per device)": "bn", "synchronized BN": "sync", "batch renorm": "renorm",
           "group norm": "gn"}


class Net(nn.Module):
  method: str

  def norm(self, x, train, renorm_args):
    if self.method in ("bn", "sync"):
      return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                   use_fast_variance=False,
                                   axis_name="device" if self.method == "sync" else None)(x)
    if self.method == "renorm":
      return jaxbn.linen.BatchRenorm(use_running_average=not train, momentum=0.9)(
          x, **(renorm_args if train else {}))
    return jaxbn.linen.GroupNorm(num_groups=4)(x)

  @nn.compact
  def __call__(self, x, train: bool, renorm_args=None):
    for i, width in enumerate((16, 32)):
      x = nn.relu(self.norm(nn.Conv(width, (3, 3), use_bias=False)(x), train, renorm_args))
      if i == 0:
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(self.norm(nn.Dense(64, use_bias=False)(x.mean((1, 2))), train, renorm_args))
    return nn.Dense(10)(x)


def train_eval(method, per_device, epochs, seed=0):
  model = Net(method)
  variables = model.init(jax.random.key(seed, impl="rbg"), x_train[:2], train=False)
  params, stats = variables["params"], variables.get("batch_stats", {})
  global_batch = per_device * DEVICES
  steps_per_epoch = len(x_train) // global_batch
  total = epochs * steps_per_epoch
  tx = optax.sgd(optax.cosine_decay_schedule(0.05 * (per_device / 2) ** 0.5, total), momentum=0.9)
  opt_state = tx.init(params)

  def renorm_args(step):  # plain BN for 10% of the steps, then r_max -> 3, d_max -> 5
    r_max, d_max = jaxbn.renorm_schedule(step, warmup_steps=total // 10,
                                         r_max_steps=total // 2, d_max_steps=2 * total // 5)
    return {"r_max": r_max, "d_max": d_max}

  @jax.jit
  def step(params, stats, opt_state, x, y, i):      # x: (DEVICES, per_device, 8, 8, 1)
    def loss_fn(params):
      def on_device(x, y):
        logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      renorm_args=renorm_args(i), mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", {})
      losses, new_stats = jax.vmap(on_device, axis_name="device")(x, y)
      return losses.mean(), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), average_stats(new_stats), opt_state, loss

  @jax.jit
  def accuracy(params, stats, x, y):
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return jnp.mean(logits.argmax(-1) == y)

  rng = np.random.default_rng(seed)
  i = 0
  for _ in range(epochs):
    order = rng.permutation(len(x_train))[:steps_per_epoch * global_batch]
    for b in order.reshape(steps_per_epoch, DEVICES, per_device):
      params, stats, opt_state, loss = step(params, stats, opt_state, x_train[b], y_train[b], i)
      i += 1
  return float(accuracy(params, stats, x_test, y_test))'''),
    code(r'''
sizes = (2,) if QUICK else (2, 4, 8, 32)
epochs = 2 if QUICK else 20
seeds = (0,) if QUICK else (0, 1)
table = {}
start = time.time()
for name, method in METHODS.items():
  for b in sizes:
    table[name, b] = np.mean([train_eval(method, b, epochs, seed) for seed in seeds])
print(f"{len(table) * len(seeds)} runs of {epochs} epochs in {time.time() - start:.0f} s "
      f"(test accuracy, mean of {len(seeds)} seed(s))\n")
header = "| method | " + " | ".join(f"{b} / device ({8 * b} global)" for b in sizes) + " |"
print(header)
print("|---|" + "---|" * len(sizes))
for name in METHODS:
  print(f"| {name} | " + " | ".join(f"{100 * table[name, b]:.1f}%" for b in sizes) + " |")'''),
    code(r'''
fig, ax = plt.subplots(figsize=(7, 4))
for k, name in enumerate(METHODS):
  ax.plot(sizes, [100 * table[name, b] for b in sizes], marker="o", label=name)
ax.set(xscale="log", xticks=sizes, xticklabels=[str(b) for b in sizes],
       xlabel="examples per device (8 devices)", ylabel="test accuracy (%)",
       title="digits: accuracy vs. per-device batch size")
ax.legend()
fig.tight_layout()'''),
    md(r'''
What to read from it (the committed run: 2 seeds, so differences of a point are noise):

* **BN with per-device statistics breaks down at 2 examples per device**: the hidden dense layer
  normalizes 2 values per feature (each becomes ±1), so the network behaves very differently in
  training and at inference, where it uses the running averages.
* **Synchronized BN** removes the problem: the statistics are those of the global batch (16 to
  256 examples), whatever the per-device batch. It costs one all-reduce per layer forward and
  one backward (notebook 03).
* **Batch renormalization** keeps per-device statistics but corrects them towards the running
  averages: it recovers part of the gap at 2 per device (how much varies with the seed and the
  schedule of `r_max`/`d_max`); at the largest batches, with few steps, its corrections slowed
  training here.
* **Group norm** does not depend on the batch at all and is good at small batches; with the few
  steps of the largest batches (5 per epoch) it trains more slowly than BN.
'''),
]

# --------------------------------------------------------------------------------------- 03

NB03 = [
    md(r'''
# Synchronized batch norm on 8 (simulated) devices

1. Per-device versus synchronized statistics, checked against NumPy on the global batch.
2. The uneven-batch case (a padded last batch): averaging per-device means is wrong, weighting
   by the true counts is right.
3. The collectives in the compiled program.

On a machine without accelerators, JAX can simulate devices on the CPU. The number must be set
before JAX starts:
'''),
    code(SETUP + r'''
import jax
jax.config.update("jax_num_cpu_devices", 8)     # or env JAX_NUM_CPU_DEVICES=8, before JAX starts
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
import flax.linen as nn
import jaxbn, jaxbn.linen
from jaxbn.parallel import collective_counts, data_mesh, shard_batch

mesh = data_mesh("data")       # one mesh axis over the 8 devices
print(jax.devices())
print(mesh)'''),
    md(r'''
## 1. Per-device versus synchronized statistics

A global batch of 8 × 16 examples with 3 features, split over the devices, where the data on
device $d$ has mean $d$ (think of an unshuffled dataset). Without `axis_name`, each device
normalizes with the mean of its own 16 examples; with `axis_name="data"` all devices use the
mean and variance of the whole global batch — exactly what one device would compute on the
concatenated batch.
'''),
    code(r'''
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
assert np.allclose(y_sync, ref, atol=1e-4)'''),
    code(r'''
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar(np.arange(8), np.asarray(mean_local)[:, 0], color="C1", label="per-device mean (no sync)")
ax.axhline(float(np.asarray(mean_sync)[0, 0]), color="C0", lw=2,
           label="synchronized mean (every device)")
ax.set(xlabel="device", ylabel="mean of feature 0", title="statistics each device normalizes with")
ax.legend()
fig.tight_layout()'''),
    md(r'''
## 2. Uneven batches: the padded last batch

An epoch of 1437 examples in batches of 64 ends with a batch of 29. Padding it to 64 keeps one
compiled step and every example; a mask tells BN which rows are real. Split over 8 devices of 8
rows, the real rows are 8, 8, 8, 5, 0, 0, 0, 0: devices hold different numbers of real
examples, and some none at all.

The mean of the global batch is then **not** the average of the per-device means: each device's
mean must be weighted by its count. Averaging per-device masked means with `pmean` is what
`flax.linen.BatchNorm(axis_name=..., mask=...)` does (flax issue #2417); a device with no real row
even has an undefined mean.
'''),
    code(r'''
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
  assert np.allclose(results["jaxbn (count-weighted)"], rows[mask].mean(0), atol=1e-5)'''),
    md(r'''
Only the count-weighted statistics equal the mean of the real rows: averaging per-device means
over-weights the devices with few real rows, and gives NaN as soon as one device has none.
`jaxbn` gathers per-device `(count, mean, M2)` in one collective and merges them exactly, so the
padded batch trains exactly like an unpadded one (the example script in `examples/cnn` relies
on it).

## 3. Collectives in the compiled program

A small model (dense layer, BN, ReLU, dense layer, squared loss) under `jax.shard_map`,
compiled for the 8 devices, with `jaxbn.linen.BatchNorm` and with `flax.linen.BatchNorm` (both
with `axis_name="data"`). `jaxbn.parallel.collective_counts` reads the compiled HLO. Three
programs: the forward pass; forward and backward to the input (the BN layer's own collectives);
the whole gradient step, where `shard_map` also sums the parameter gradients over devices.
'''),
    code(r'''
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
  print(f"| {name} | " + " | ".join(cells) + " |")'''),
    md(r'''
A synchronized BN layer needs one all-reduce forward (the per-device statistics travel
together) and one backward (the two per-feature sums of the closed-form gradient, stacked). The
parameter gradients add their own; XLA's all-reduce combiner may merge independent all-reduces
into one op with several operands, which is why the numbers in parentheses count the arrays.
Under plain `jax.jit` on a batch-sharded array no `axis_name` is needed: XLA inserts the
reductions itself.
'''),
]

NOTEBOOKS = {
    "01_batch_norm_from_scratch.ipynb": NB01,
    "02_normalization_compared.ipynb": NB02,
    "03_sync_batch_norm.ipynb": NB03,
}


def build(name: str) -> nbformat.NotebookNode:
  nb = new_notebook(cells=NOTEBOOKS[name])
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": HERE}}).execute()
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("only", nargs="*", help="build only notebooks whose name contains these")
  parser.add_argument("--no-execute", action="store_true", help="write without outputs")
  parser.add_argument("--markdown-only", action="store_true",
                      help="only update the text cells of the existing notebooks (the code "
                           "cells must be unchanged)")
  args = parser.parse_args(argv)
  for name in NOTEBOOKS:
    if args.only and not any(s in name for s in args.only):
      continue
    nb = build(name)
    if args.markdown_only:
      old = nbformat.read(os.path.join(HERE, name), as_version=4)
      if [(c.cell_type, c.source) for c in old.cells if c.cell_type == "code"] != \
         [(c.cell_type, c.source) for c in nb.cells if c.cell_type == "code"] or \
         len(old.cells) != len(nb.cells):
        raise SystemExit(f"{name}: code cells changed; execute it instead of --markdown-only")
      for old_cell, new_cell in zip(old.cells, nb.cells):
        if new_cell.cell_type == "markdown":
          old_cell.source = new_cell.source
      nbformat.write(old, os.path.join(HERE, name))
      continue
    if not args.no_execute:
      t = time.time()
      execute(nb)
      print(f"{name}: executed in {time.time() - t:.0f} s", file=sys.stderr)
    nbformat.validate(nb)
    nbformat.write(nb, os.path.join(HERE, name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
