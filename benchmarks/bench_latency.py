"""Latency model of synchronized BN in a ResNet-50 step: two forward rounds vs a conditional.

jaxbn's synchronized statistics use two small all-reduces in the forward pass of each BN
layer: round 1 agrees on a common shift (``C`` numbers; it depends only on a small sample of
``x``, so it runs while each device makes its pass over ``x``), round 2 sums the moments
(``2C``). The design it replaced used one round plus a ``lax.cond`` whose predicate came
from the all-reduced sums: on XLA:GPU a conditional is a ConditionalThunk that copies the
predicate to the host and blocks (``BlockHostUntilDone``) — one host synchronization per BN
layer per step. This script puts numbers on the trade, per ResNet-50 train step (53 BN
layers at 224×224), for 8 to 4096 devices. Nothing runs on a GPU: it is a model, with its
assumptions stated.

Model (stated assumptions, not measurements):

* all-reduce of ``B`` bytes over ``P`` devices: ``T(B) = 2·log2(P)·α + 2·B/β`` (a
  latency-optimal tree; the same model as ``bench_collectives.py``), GPU cluster with
  InfiniBand NDR: ``α = 5 µs``, ``β = 50 GB/s`` per GPU;
* the pass over ``x`` that round 1 overlaps reads the bf16 activation of the layer once at
  ``HBM = 2.0 TB/s`` (A100 80GB's datasheet bandwidth): ``t_pass = bytes(x) / HBM``;
* round 1 is exposed only where it outlasts that pass: ``max(0, T(4C) − t_pass)`` per layer
  (XLA:GPU runs all-reduces asynchronously on their own stream, and round 1's only input is
  the sample of ``x``);
* a host synchronization costs ``t_sync`` = 8 µs (best case) to 25 µs per conditional (the
  device-to-host copy of the predicate, the host's wake-up and the launch of the next
  kernels; the figures of the issue that removed the conditional).

Per step, with ``R2 = Σ_layers T(8C)`` the moments' round every design has:
one round + conditional ``= R2 + 53·t_sync``; two rounds ``= R2 + Σ_layers max(0, T(4C) −
t_pass)``; flax's one round (``E[x²] − E[x]²``, inexact far from zero) ``= R2``.
"""

from __future__ import annotations

import argparse
import math

import _results

ALPHA = 5e-6  # s per tree step (GPU cluster, InfiniBand NDR; assumed)
BETA = 50e9  # B/s per GPU (assumed)
HBM = 2.0e12  # B/s (A100 80GB datasheet; assumed for the pass round 1 overlaps)
SYNC = (8e-6, 25e-6)  # s per host synchronization (best, typical-worst)
DEVICES = (8, 64, 256, 1024, 4096)
BATCHES = (8, 32)  # images per device


def resnet50_bn_layers():
  """(height*width, channels) of the 53 BN layers of ResNet-50 v1.5 at 224×224."""
  layers = [(112 * 112, 64)]
  res_in = 56
  for blocks, width, res in ((3, 64, 56), (4, 128, 28), (6, 256, 14), (3, 512, 7)):
    for b in range(blocks):
      first = b == 0
      layers.append(((res_in if first else res) ** 2, width))  # 1x1 reduce (input size)
      layers.append((res * res, width))  # 3x3 (stride here in v1.5)
      layers.append((res * res, 4 * width))  # 1x1 expand
      if first:
        layers.append((res * res, 4 * width))  # projection shortcut
    res_in = res
  return layers


def allreduce(nbytes: float, devices: int) -> float:
  return 2 * math.log2(devices) * ALPHA + 2 * nbytes / BETA


def model(batch: int, devices: int):
  layers = resnet50_bn_layers()
  r2 = sum(allreduce(8 * c, devices) for _, c in layers)  # (S1, S2) in float32
  exposed = sum(max(0.0, allreduce(4 * c, devices) - batch * hw * c * 2 / HBM)
                for hw, c in layers)
  hidden = sum(min(allreduce(4 * c, devices), batch * hw * c * 2 / HBM) for hw, c in layers)
  return r2, exposed, hidden, len(layers)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _results.add_output_args(parser)
  args = parser.parse_args()
  rows = []
  for batch in BATCHES:
    for devices in DEVICES:
      r2, exposed, hidden, n = model(batch, devices)
      rows.append([batch, devices, 1e3 * r2, 1e3 * (r2 + n * SYNC[0]), 1e3 * (r2 + n * SYNC[1]),
                   1e3 * (r2 + exposed), 1e3 * hidden, n * SYNC[0] / max(exposed, 1e-12)])
  cols = ["images/device", "devices", "flax one round, ms", "one round + cond (8 µs sync), ms",
          "one round + cond (25 µs sync), ms", "two rounds (jaxbn), ms",
          "round 1 hidden behind the pass, ms", "best-case sync ÷ exposed round 1"]
  t = _results.table(
      "ResNet-50 train step (53 BN layers, bf16 activations): BN forward all-reduce latency "
      "per step, modelled", cols, rows,
      formats=[None, None, ".2f", ".2f", ".2f", ".2f", ".2f", ".2f"],
      platform=("Model estimate (no GPU ran): T = 2·log2(P)·α + 2B/β, α = 5 µs, β = 50 GB/s; "
                "round 1 overlaps a bf16 pass at 2.0 TB/s; host sync 8–25 µs"),
      note=("Forward only (every design has the same one backward all-reduce per layer). "
            "The last column above 1 means the host synchronizations the conditional cost "
            "exceed the exposed part of the second round even at their best case."))
  path = _results.write_results(
      "bench_latency", [t], command=_results.command_line(),
      title="Two forward rounds vs a conditional at scale: a latency model (`bench_latency.py`)",
      notes=["A model with stated assumptions (the script's docstring); no timing is "
             "measured and no accelerator ran. It bounds the trade jaxbn made when it removed "
             "the exactness guard's conditional (a host synchronization per BN layer on "
             "XLA:GPU) for a second, overlapped all-reduce of C numbers."],
      out_dir=_results.output_dir(args))
  _results.print_table(t)
  return path


if __name__ == "__main__":
  main()
