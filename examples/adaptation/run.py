"""Batch-norm adaptation on digits with a shifted test set: accuracy before and after.

A small CNN written with ``flax.linen.BatchNorm`` (as a third-party model would be) is trained
on scikit-learn's 8x8 digits, then evaluated on test sets shifted in contrast, brightness and
noise, with:

* ``source``: the trained model as is (running statistics of the training data);
* ``bn_adapt_N``: :func:`jaxbn.linen.test_time_adaptation` with prior ``N`` — each test batch
  normalized with the source statistics mixed with its own, weight ``N / (N + n)`` (Schneider
  et al. 2020); ``N = 0`` uses the test batch's statistics only;
* ``tent``: TENT (Wang et al. 2021) on top of ``bn_adapt_0``: one online pass over the test
  batches, each batch predicted, then one Adam step on the prediction entropy that trains
  only the BN affine parameters (:func:`jaxbn.linen.batch_norm_affine_mask`).

and, on the clean test set, an exponential moving average (EMA) of the weights evaluated with
the last running statistics vs. statistics recomputed for the averaged weights
(:func:`jaxbn.linen.swa_batch_stats`); and split BN: clean and low-contrast digits trained
together, one shared BN vs. per-domain statistics (:class:`jaxbn.linen.SplitBatchNorm`).

Run ``python -m examples.adaptation.run`` (about 2-4 minutes on 2 CPU cores); it writes
``results.json`` and renders ``RESULTS.md`` from it (``--render-only`` re-renders).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
import jaxbn.linen

HERE = os.path.dirname(os.path.abspath(__file__))
SHIFTS = ("clean", "contrast", "brightness", "noise", "all")
PRIORS = (0, 16)


class CNN(nn.Module):
  """Conv-BN-ReLU x2, global average pooling, dense head; flax's own BatchNorm.

  ``split=True``: :class:`jaxbn.linen.SplitBatchNorm` with 2 domains instead (shared
  scale/bias, one set of statistics per domain), the domain of each example given to the call.
  """

  split: bool = False

  @nn.compact
  def __call__(self, x, train: bool, domain: Any = 0):
    def norm(h):
      if self.split:
        return jaxbn.linen.SplitBatchNorm(num_domains=2, use_running_average=not train,
                                          momentum=0.9)(h, domain=domain)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    x = nn.relu(norm(nn.Conv(16, (3, 3), use_bias=False)(x)))
    x = nn.relu(norm(nn.Conv(32, (3, 3), strides=(2, 2), use_bias=False)(x)))
    return nn.Dense(10)(x.mean((1, 2)))


def load(seed: int = 0):
  """Digits in [0, 1], NHWC, a fixed 2/3 : 1/3 split."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = 2 * len(x) // 3
  return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def shift(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """The test-set shifts: lower contrast, brighter, Gaussian noise, all three."""
  if kind in ("contrast", "all"):
    x = 0.3 * x + 0.35
  if kind in ("brightness", "all"):
    x = x + 0.5
  if kind in ("noise", "all"):
    x = x + rng.normal(scale=0.3, size=x.shape)
  return x.astype(np.float32)


def batches(n: int, size: int, rng=None):
  idx = np.arange(n) if rng is None else rng.permutation(n)
  return [idx[i:i + size] for i in range(0, n, size)]


def train(seed: int, xtr, ytr, *, epochs: int, batch_size: int, ema_decay: float,
          model: Optional[CNN] = None, domains: Optional[np.ndarray] = None):
  """Adam on cross-entropy; returns the model, its variables and an EMA of the params.

  ``domains``: one domain id per training example, passed to the model (split BN).
  """
  model = CNN() if model is None else model
  domains = np.zeros(len(xtr), np.int32) if domains is None else domains
  variables = model.init(jax.random.key(seed), xtr[:2], train=False)
  tx = optax.adam(3e-3)
  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  ema = params

  @jax.jit
  def step(params, stats, opt, ema, x, y, d):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, domain=d,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return params, upd["batch_stats"], opt, ema

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for idx in batches(len(xtr), batch_size, rng):
      if len(idx) < batch_size:
        continue
      params, stats, opt, ema = step(params, stats, opt, ema, xtr[idx], ytr[idx],
                                     domains[idx])
  return model, {"params": params, "batch_stats": stats}, ema


def accuracy(f, variables, x, y, batch_size):
  """Accuracy of the jitted ``f(variables, x)`` over ``x`` in batches of ``batch_size``."""
  hits = sum(int((np.asarray(f(variables, x[i])).argmax(-1) == y[i]).sum())
             for i in batches(len(x), batch_size))
  return hits / len(x)


def make_tent(model, variables, example, lr):
  """TENT: online entropy minimization of the BN affine parameters on the adapted model.

  Returns ``run(x, y, batch_size) -> accuracy``: one pass over the test batches, each
  predicted with the current parameters, then one Adam step on its mean prediction entropy
  that changes only the BN ``scale``/``bias``; starts from the trained parameters every run.
  """
  adapted = jaxbn.linen.test_time_adaptation(model, prior=0.0)
  mask = jaxbn.linen.batch_norm_affine_mask(adapted.apply, variables, example, train=False)
  tx = optax.multi_transform({True: optax.adam(lr), False: optax.set_to_zero()}, mask)

  @jax.jit
  def step(params, opt, xb):
    def entropy(p):
      logits = adapted.apply({**variables, "params": p}, xb, train=False)
      logp = jax.nn.log_softmax(logits)
      return -(jnp.exp(logp) * logp).sum(-1).mean(), logits
    (_, logits), g = jax.value_and_grad(entropy, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, logits

  def run(x, y, batch_size):
    params = variables["params"]
    opt = tx.init(params)
    hits = 0
    for idx in batches(len(x), batch_size):
      params, opt, logits = step(params, opt, x[idx])
      hits += int((np.asarray(logits).argmax(-1) == y[idx]).sum())
    return hits / len(x)

  return run


def run_seed(seed: int, data, args) -> dict[str, Any]:
  (xtr, ytr), (xte, yte) = data
  model, variables, ema = train(seed, xtr, ytr, epochs=args.epochs,
                                batch_size=args.batch_size, ema_decay=args.ema_decay)
  rng = np.random.default_rng(1000 + seed)
  order = rng.permutation(len(xte))  # test batches mix the classes
  xte, yte = xte[order], yte[order]
  plain = lambda v, x: model.apply(v, x, train=False)
  evals = {"source": jax.jit(plain)}
  for prior in PRIORS:
    adapted = jaxbn.linen.test_time_adaptation(model, prior=float(prior))
    evals[f"bn_adapt_{prior}"] = jax.jit(lambda v, x, m=adapted: m.apply(v, x, train=False))
  run_tent = make_tent(model, variables, xte[:args.batch_size], args.tent_lr)
  out: dict[str, Any] = {}
  for kind in SHIFTS:
    xs = shift(xte, kind, rng)
    row = {k: accuracy(f, variables, xs, yte, args.batch_size) for k, f in evals.items()}
    row["tent"] = run_tent(xs, yte, args.batch_size)
    out[kind] = row
  # weight averaging: EMA weights with the last running statistics vs. recomputed ones
  train_batches = [xtr[i] for i in batches(len(xtr), args.batch_size)]
  stale = {**variables, "params": ema}
  fresh = jaxbn.linen.swa_batch_stats(plain, variables, ema, train_batches, progress=False)
  out["ema"] = {"last_weights": out["clean"]["source"],
                "ema_stale_stats": accuracy(evals["source"], stale, xte, yte, args.batch_size),
                "ema_recomputed_stats": accuracy(evals["source"], fresh, xte, yte,
                                                 args.batch_size)}
  out["split"] = split_bn(seed, data, args)
  return out


def split_bn(seed: int, data, args) -> dict[str, float]:
  """Two known domains, clean and low-contrast digits, trained together in mixed batches:
  one shared BN vs. per-domain statistics (SplitBatchNorm); test accuracy per domain."""
  (xtr, ytr), (xte, yte) = data
  rng = np.random.default_rng(2000 + seed)
  dom_tr = (rng.uniform(size=len(xtr)) < 0.5).astype(np.int32)
  x_mixed = np.where(dom_tr[:, None, None, None] == 1, shift(xtr, "contrast", rng), xtr)
  test = {"clean": (xte, 0), "contrast": (shift(xte, "contrast", rng), 1)}
  out = {}
  for name, model in (("shared", CNN()), ("split", CNN(split=True))):
    model, variables, _ = train(seed, x_mixed, ytr, epochs=args.epochs,
                                batch_size=args.batch_size, ema_decay=args.ema_decay,
                                model=model, domains=dom_tr)
    f = jax.jit(lambda v, x, d, m=model: m.apply(v, x, train=False, domain=d))
    for kind, (x, d) in test.items():
      out[f"{name}_{kind}"] = accuracy(lambda v, xb: f(v, xb, d), variables, x, yte,
                                       args.batch_size)
  return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  summary: dict[str, Any] = {}
  for group in per_seed[0]:
    summary[group] = {}
    for method in per_seed[0][group]:
      vals = np.array([s[group][method] for s in per_seed])
      summary[group][method] = {"mean": float(vals.mean()), "std": float(vals.std()),
                                "values": vals.tolist()}
  return summary


def render(results: dict[str, Any]) -> str:
  """Markdown tables from ``results.json`` (every number comes from there)."""
  s, cfg = results["summary"], results["config"]
  fmt = lambda d: f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"
  methods = ["source"] + [f"bn_adapt_{p}" for p in PRIORS] + ["tent"]
  names = {"source": "source BN", "tent": "TENT (BN affine, 1 pass)"}
  names.update({f"bn_adapt_{p}": f"BN adapt, N={p}" for p in PRIORS})
  lines = [
      "# Batch-norm adaptation on digits with a shifted test set",
      "",
      "Generated by `python -m examples.adaptation.run` from `results.json`; do not edit.",
      "",
      f"Test accuracy (%), mean ± std over seeds {cfg['seeds']}; {cfg['num_train']} training "
      f"and {cfg['num_test']} test images (8x8 digits), {cfg['epochs']} epochs, test batches "
      f"of {cfg['batch_size']}. {results['hardware']}, {results['seconds']:.0f} s in all.",
      "",
      "| test set | " + " | ".join(names[m] for m in methods) + " |",
      "|---" * (len(methods) + 1) + "|",
  ]
  for kind in SHIFTS:
    lines.append(f"| {kind} | " + " | ".join(fmt(s[kind][m]) for m in methods) + " |")
  e = s["ema"]
  lines += [
      "",
      f"Weight averaging (EMA, decay {cfg['ema_decay']}), clean test set:",
      "",
      "| weights | BN statistics | accuracy (%) |",
      "|---|---|---|",
      f"| last | trained with them | {fmt(e['last_weights'])} |",
      f"| EMA | last running statistics (stale) | {fmt(e['ema_stale_stats'])} |",
      f"| EMA | recomputed (`swa_batch_stats`) | {fmt(e['ema_recomputed_stats'])} |",
      "",
      "Two known domains trained together in mixed batches (clean and low-contrast digits, "
      "each example's domain given), test accuracy per domain:",
      "",
      "| BN | clean test | low-contrast test |",
      "|---|---|---|",
  ]
  sp = s["split"]
  for name, label in (("shared", "one shared BN (flax)"),
                      ("split", "per-domain statistics (`SplitBatchNorm`)")):
    lines.append(f"| {label} | {fmt(sp[name + '_clean'])} | {fmt(sp[name + '_contrast'])} |")
  lines.append("")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--tent-lr", type=float, default=1e-3)
  p.add_argument("--ema-decay", type=float, default=0.95)
  p.add_argument("--out", default=HERE)
  p.add_argument("--render-only", action="store_true")
  args = p.parse_args(argv)
  path = os.path.join(args.out, "results.json")
  if not args.render_only:
    start = time.time()
    data = load()
    per_seed = [run_seed(s, data, args) for s in args.seeds]
    results = {
        "config": {"seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size,
                   "tent_lr": args.tent_lr, "ema_decay": args.ema_decay,
                   "num_train": len(data[0][0]), "num_test": len(data[1][0]),
                   "priors": list(PRIORS), "shifts": list(SHIFTS)},
        "hardware": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
        "seconds": time.time() - start,
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  with open(path) as f:
    results = json.load(f)
  text = render(results)
  with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
