"""Shared timing helpers for the benchmarks: warm, interleaved runs, medians, paired ratios."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax


def machine() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {os.cpu_count()} cores, {cpu}; "
          f"jax {jax.__version__}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


def block(out):
  return jax.block_until_ready(out)


def interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                min_time: float = 0.0) -> Dict[str, List[float]]:
  """Runs every function once per round, ``reps`` rounds, and returns per-round seconds."""
  for _ in range(warmup):
    for f in fns.values():
      block(f())
  times: Dict[str, List[float]] = {k: [] for k in fns}
  start = time.perf_counter()
  r = 0
  while r < reps or (time.perf_counter() - start) < min_time:
    for k, f in fns.items():
      t0 = time.perf_counter()
      block(f())
      times[k].append(time.perf_counter() - t0)
    r += 1
  return times


def median(v: List[float]) -> float:
  return statistics.median(v)


def paired_ratios(a: List[float], b: List[float]) -> List[float]:
  """Per-round ratios a[i] / b[i] (both timed in the same round)."""
  return [x / y for x, y in zip(a, b)]


def paired_ratio(a: List[float], b: List[float]) -> float:
  """Median over rounds of a[i] / b[i] (both timed in the same round)."""
  return statistics.median(paired_ratios(a, b))


def ratio_of_medians(a: List[float], b: List[float]) -> float:
  """median(a) / median(b): what a reader computes from the two "median" columns."""
  return statistics.median(a) / statistics.median(b)


def quartiles(v: List[float]) -> Tuple[float, float]:
  """(25th, 75th) percentile of ``v`` (inclusive method; both equal v[0] for one value)."""
  if len(v) < 2:
    return (v[0], v[0])
  q = statistics.quantiles(v, n=4, method="inclusive")
  return (q[0], q[2])


class Deadline:
  """Skips a unit of work that would not finish ``seconds`` after creation (None: never skips).

  The estimate of a unit's duration is the longest one so far, so a script under an external
  time limit (``timeout``) still writes the results it has instead of being killed mid-way.
  """

  def __init__(self, seconds: Optional[float]):
    self.t0, self.seconds, self.longest = time.perf_counter(), seconds, 0.0
    self.skipped: List[str] = []

  def allows(self, what: str) -> bool:
    """True if ``what`` may start; else records it in ``skipped``."""
    if self.seconds is None:
      return True
    if time.perf_counter() - self.t0 + self.longest > self.seconds:
      self.skipped.append(what)
      return False
    return True

  def took(self, started: float) -> None:
    """Records the duration of a unit that started at ``started`` (``time.perf_counter()``)."""
    self.longest = max(self.longest, time.perf_counter() - started)

  def note(self) -> Optional[str]:
    if not self.skipped:
      return None
    return (f"Stopped at the {self.seconds:.0f} s deadline (--deadline): not run: "
            + "; ".join(self.skipped) + ".")


# Datasheet peak memory bandwidth (bytes/s), matched against ``jax.devices()[0].device_kind``
# (first matching substring wins, so the specific names come first). Sources: NVIDIA's product
# datasheets (H100 SXM5 80 GB HBM3: 3.35 TB/s; H100 PCIe 80 GB HBM2e: 2.0 TB/s; H100 NVL 94 GB:
# 3.9 TB/s; H200 141 GB HBM3e: 4.8 TB/s; GH200 96 GB HBM3: 4.0 TB/s; A100 SXM4 80 GB: 2.039
# TB/s; A100 40 GB: 1.555 TB/s; A100 PCIe 80 GB: 1.935 TB/s; L4: 300 GB/s; A10G: 600 GB/s;
# V100: 900 GB/s; B200: 8 TB/s). These are upper bounds no kernel reaches: a device-to-device
# copy measures ~90% of them (the benchmarks also report the measured copy bandwidth).
# Assumption: JAX's device_kind names the card as nvidia-smi does ("NVIDIA H100 80GB HBM3").
HBM_PEAK = [
    ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("GH200", 4.0e12), ("H200", 4.8e12),
    ("A100-SXM4-40GB", 1.555e12), ("A100-PCIE-40GB", 1.555e12),
    ("A100-PCIE-80GB", 1.935e12), ("A100 80GB PCIe", 1.935e12), ("A100", 2.039e12),
    ("B200", 8.0e12), ("L4", 3.0e11), ("A10G", 6.0e11), ("V100", 9.0e11),
]


def hbm_peak(device_kind: str) -> Optional[float]:
  """Datasheet memory bandwidth in bytes/s for a GPU ``device_kind``, or None if unknown."""
  for key, bw in HBM_PEAK:
    if key.lower() in (device_kind or "").lower():
      return bw
  return None

