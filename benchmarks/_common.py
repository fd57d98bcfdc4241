"""Shared timing helpers for the benchmarks: warm, interleaved runs, medians, paired ratios."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List

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


def paired_ratio(a: List[float], b: List[float]) -> float:
  """Median over rounds of a[i] / b[i] (both timed in the same round)."""
  return statistics.median([x / y for x, y in zip(a, b)])
