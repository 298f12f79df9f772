"""llmcache: layer-wise activation reuse for transformer inference (arXiv 2512.16843).

    model = llmcache.accelerate(model)          # patch a transformers model in place
    print(llmcache.stats(model))                # hits per layer, bytes, time in lookups
    llmcache.disable(model)                     # restore it exactly

Importing never needs a GPU or the compiled extension: ops fall back to Triton or PyTorch,
and `build_info()` says what is in use.
"""

from . import ops
from ._build_info import __version__, build_info
from .adapters import register_adapter
from .api import accelerate, bypass, cached, disable, flush, is_accelerated, reset
from .calibrate import Calibration, calibrate
from .config import CacheConfig
from .persist import load, save
from .promise import Semantic
from .report import CacheStats, Held, HeldEntry, held, stats
from .rows import namespace
from .shared import Shared, SharedStats
from .state import register_state
from .tiers.layerwise import LayerStats, Layerwise, RingBuffer
from .tiers.verified import SemanticStats

__all__ = [
    "CacheConfig",
    "CacheStats",
    "Calibration",
    "Held",
    "HeldEntry",
    "LayerStats",
    "Layerwise",
    "RingBuffer",
    "Semantic",
    "SemanticStats",
    "Shared",
    "SharedStats",
    "__version__",
    "accelerate",
    "build_info",
    "bypass",
    "cached",
    "calibrate",
    "disable",
    "flush",
    "held",
    "is_accelerated",
    "load",
    "namespace",
    "ops",
    "register_adapter",
    "register_state",
    "reset",
    "save",
    "stats",
]
