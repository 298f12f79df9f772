"""The per-block tier (`CacheConfig.threshold`): the paper's design, banks per cached block."""

from .config import Layerwise
from .layer import CachedLayer, LayerStats
from .ring_buffer import RingBuffer
from .tier import LayerwiseTier

__all__ = ["CachedLayer", "LayerStats", "Layerwise", "LayerwiseTier", "RingBuffer"]
