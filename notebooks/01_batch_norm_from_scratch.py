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
# # Batch normalization from scratch
#
# What batch normalization (Ioffe & Szegedy, 2015) does, shown on real data with `jaxbn`:
#
# 1. what it does to the distribution of a layer's activations, channel by channel — and the same
#    computation in five lines of NumPy;
# 2. training mode (statistics of the batch) versus inference mode (running statistics);
# 3. how the running statistics converge: exponential moving average (momentum) versus a
#    cumulative average;
# 4. the effect on a small CNN's training curve, with and without BN.
#
# For a convolutional layer with NHWC activations $x$, BN computes one mean and one variance per
# channel $c$, over the batch and the spatial positions:
#
# $$\begin{aligned}
# \mu_c &= \frac{1}{NHW}\sum_{n,h,w} x_{nhwc}, \\
# \sigma^2_c &= \frac{1}{NHW}\sum_{n,h,w} (x_{nhwc}-\mu_c)^2, \\
# y_{nhwc} &= \gamma_c\,\frac{x_{nhwc}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}} + \beta_c .
# \end{aligned}$$

# %% [markdown]
# *This notebook is generated from [`notebooks/01_batch_norm_from_scratch.py`](./01_batch_norm_from_scratch.py) (jupytext percent format)
# by `python notebooks/build.py 01`, which also executes it: edit the `.py` file, not the
# `.ipynb`.*

# %%
# Generated from notebooks/01_batch_norm_from_scratch.py
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

# %%
import os
QUICK = os.environ.get("JAXBN_NB_QUICK") == "1"  # CI sets it: smaller experiments, same code
# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
import matplotlib.pyplot as plt
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
import functools
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import optax
import jaxbn, jaxbn.linen

# %%
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

digits = load_digits()  # 1797 real 8x8 grayscale digits, bundled with scikit-learn
images = ((digits.images / 16.0 - 0.3) / 0.4)[..., None].astype(np.float32)  # NHWC, ~standardized
x_train, x_test, y_train, y_test = train_test_split(
    images, digits.target.astype(np.int32), test_size=0.2, random_state=0, stratify=digits.target)
print("train", x_train.shape, "test", x_test.shape)


# %% [markdown]
# ## 1. What BN does to the activations
#
# A convolution with random filters of very different scales (and a bias per channel) gives
# pre-activations whose channels have different centers and spreads. BN in training mode maps
# every channel to mean 0 and variance 1 over the batch (here with $\gamma=1, \beta=0$).

# %%
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
print("per-channel std  after BN:", np.round(np.asarray(y).std((0, 1, 2)), 4))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
for ax, data, title in [(axes[0], h, "before BN (pre-activations)"), (axes[1], y, "after BN")]:
  per_channel = [np.asarray(data[..., c]).ravel()[::4] for c in range(channels)]  # 4096 values each
  ax.violinplot(per_channel, showmedians=True)
  ax.set(title=title, xlabel="channel", ylabel="value", xticks=range(1, channels + 1))
fig.tight_layout()

# %% [markdown]
# ## 2. Training mode versus inference mode
#
# In training mode an example's output depends on the *other* examples of its batch (through the
# batch statistics). In inference mode the running statistics are used instead, so the output of
# an example is a fixed function of that example alone. Below: the first example placed in two
# different batches.

# %%
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
print("inference mode returns the statistics unchanged:", same is stats)

# %% [markdown]
# ### The same layer in Flax: linen and NNX
#
# In a Flax model you use the layers instead of the function. `jaxbn.linen.BatchNorm` is a
# drop-in for `flax.linen.BatchNorm` (the running statistics live in the `batch_stats`
# collection; `use_running_average` picks the mode); `jaxbn.nnx.BatchNorm` is a drop-in for
# `flax.nnx.BatchNorm` (the statistics are `nnx.BatchStat` attributes of the module;
# `model.train()` / `model.eval()` pick the mode). Both match the NumPy reference above (their
# default `use_fast_variance=True`, flax's one-pass variance, rounds more than the function's
# default; `use_fast_variance=False` selects the stable one):

# %%
from flax import nnx
import jaxbn.nnx

linen_bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
variables = linen_bn.init(jax.random.key(0), h)
y_linen, updates = linen_bn.apply(variables, h, mutable=["batch_stats"])

nnx_bn = jaxbn.nnx.BatchNorm(channels, momentum=0.9, rngs=nnx.Rngs(0))
nnx_bn.train()
y_nnx = nnx_bn(h)                                  # updates nnx_bn.mean / nnx_bn.var in place

for name, out, mean in [("linen", y_linen, updates["batch_stats"]["mean"]),
                        ("nnx", y_nnx, nnx_bn.mean[...])]:
  print(f"{name:>5}: max |y - numpy| = {float(np.abs(np.asarray(out) - y_ref).max()):.1e}, "
        f"running mean = 0.9 * 0 + 0.1 * batch mean: "
        f"{np.allclose(mean, 0.1 * mean_ref, atol=1e-5)}")
  assert np.allclose(out, y_ref, atol=1e-4) and np.allclose(mean, 0.1 * mean_ref, atol=1e-5)

nnx_bn.eval()                                      # inference: running statistics, unchanged
before = nnx_bn.mean[...]
_ = nnx_bn(h)
assert np.array_equal(nnx_bn.mean[...], before)
print("nnx eval mode leaves the statistics unchanged")

# %% [markdown]
# ## 3. How the running statistics converge
#
# The running statistics estimate the population statistics of each channel. With momentum $m$
# (flax/Keras convention: the weight of the *old* value; PyTorch's `momentum=p` is $m = 1-p$):
#
# $$\hat\mu \leftarrow m\,\hat\mu + (1-m)\,\mu_B .$$
#
# They start at $\hat\mu = 0$, $\hat\sigma^2 = 1$, so with $m$ close to 1 they need many batches to
# forget the start (about $1/(1-m)$); `debias=True` removes that start-up bias (as Adam does), and
# `momentum=None` is the cumulative average of all batches (PyTorch's `momentum=None`). We stream
# random batches of 32 digits through the conv layer above and compare with the statistics of all
# 1797 images.

# %%
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
  print(f"{label:28s} error after {steps} batches: {err:.4f}")


# %% [markdown]
# Momentum 0.9 converges fast but keeps the noise of its last ~10 batches; 0.99 is smoother but is
# still pulled towards its initial value for hundreds of steps unless debiased; the cumulative
# average keeps improving as $1/\sqrt{n}$ but never forgets, which suits recomputing statistics of
# a *fixed* network after training (see `jaxbn.linen.recompute_batch_stats`) rather than tracking
# a network whose weights change.
#
# ## 4. A small CNN with and without BN
#
# The same network (two conv layers, global average pooling, a linear classifier) trained with
# SGD + momentum on the digits, with `jaxbn.linen.BatchNorm` after each convolution or without
# any normalization, at a moderate and at a high learning rate.

# %%
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
          f"test accuracy {results[(use_bn, lr)][1][-1]:.2%}")

# %%
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
fig.tight_layout()

# %% [markdown]
# With BN the training loss falls much faster at the same learning rate, and the ten times
# larger learning rate speeds it up further, while the network without normalization starts
# slowly and its loss jumps early on at the large rate. In the same number of epochs the BN
# network reaches the higher test accuracy. (With the large rate, BN's test accuracy also wobbles
# from epoch to epoch: the running statistics lag behind weights that change fast.)
#
# The next notebook (`02_normalization_compared`) looks at what happens when the batch gets
# small, and `03_sync_batch_norm` at batch statistics over several devices.
