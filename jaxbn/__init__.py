"""jaxbn: Batch Normalization and its relatives for JAX, as pure functions of explicit state.

The functional core lives here (it imports JAX only, never flax). The submodules load on
first use (``import jaxbn`` then ``jaxbn.linen.BatchNorm`` works): Flax layers in
``jaxbn.linen`` and ``jaxbn.nnx``, multi-device helpers in ``jaxbn.parallel``, PyTorch
conversion in ``jaxbn.interop``.
"""

import importlib as _importlib
import warnings as _warnings

from jaxbn._core.adapt import adapt_batch_norm, mix_stats, source_weight, split_batch_norm
from jaxbn._core.batch_channel_norm import batch_channel_norm
from jaxbn._core.batch_norm import batch_norm
from jaxbn._core.ema import momentum_from_torch, update_stats
from jaxbn._core.evonorm import evonorm_b0, evonorm_s0
from jaxbn._core.fold import eval_affine, fold_batch_norm
from jaxbn._core.frn import filter_response_norm
from jaxbn._core.frozen import frozen_batch_norm
from jaxbn._core.ghost import ghost_batch_norm
from jaxbn._core.group_norm import group_norm, instance_norm
from jaxbn._core.layer_norm import layer_norm, rms_norm
from jaxbn._core.moments import moments
from jaxbn._core.normalize import normalize
from jaxbn._core.precise import init_population_moments, merge_moments, population_stats
from jaxbn._core.renorm import batch_renorm, renorm_schedule
from jaxbn._core.types import BatchStats, Moments, PopulationMoments, init_stats
from jaxbn._core.weight_standardization import standardize_weight
from jaxbn._layers.recompute import recompute_stats
from jaxbn._version import __version__

__all__ = [
    # state and statistics
    "BatchStats",
    "Moments",
    "init_stats",
    "moments",
    "normalize",
    "update_stats",
    "momentum_from_torch",
    # batch normalization and its variants
    "batch_norm",
    "batch_renorm",
    "renorm_schedule",
    "ghost_batch_norm",
    "batch_channel_norm",
    "frozen_batch_norm",
    "evonorm_b0",
    # batch-independent normalizations
    "evonorm_s0",
    "filter_response_norm",
    "standardize_weight",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    # several domains: split batch norm, test-time adaptation
    "split_batch_norm",
    "adapt_batch_norm",
    "mix_stats",
    "source_weight",
    # after training: precise statistics, folding
    "PopulationMoments",
    "init_population_moments",
    "merge_moments",
    "population_stats",
    "recompute_stats",
    "eval_affine",
    "fold_batch_norm",
]

_SUBMODULES = ("interop", "linen", "nnx", "parallel", "testing")
# Names that moved in 0.2: still reachable here for one release, with a DeprecationWarning.
_MOVED = {name: "interop" for name in (
    "BatchNormVariables", "from_torch_batch_norm", "kernel_from_torch", "kernel_to_torch",
    "to_torch_batch_norm", "torch_batch_norm_config")}


def __getattr__(name):  # PEP 562: lazy submodules (flax loads only with linen/nnx)
  if name in _SUBMODULES:
    return _importlib.import_module(f"jaxbn.{name}")
  if name in _MOVED:
    _warnings.warn(
        f"jaxbn.{name} moved to jaxbn.{_MOVED[name]}.{name}; the old name will be removed in "
        f"jaxbn 0.3.", DeprecationWarning, stacklevel=2)
    return getattr(_importlib.import_module(f"jaxbn.{_MOVED[name]}"), name)
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
