"""`Layerwise`: the configuration of the paper's per-block tier, a section of `CacheConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EVICTIONS = ("lru", "staleness")
MODES = ("state", "residual")
FINGERPRINTS = ("embeddings", "hidden")


@dataclass(frozen=True)
class Layerwise:
    """The per-block tier of the paper: experts only, it keeps no error bound.

    `accelerate(model, layerwise=llmcache.Layerwise(threshold=0.95))` gives every cached block
    a bank of earlier rows' states looked up by SimHash fingerprint: a row reuses a cached entry
    when the SimHash estimate of the cosine between their fingerprints is >= threshold (Hamming
    radius nbits * arccos(threshold) / pi). Semantic hits change outputs; measure them
    (`llmcache demo`) before turning them on. The bounded semantic tier is `llmcache.Semantic`.

    Attributes:
        threshold: cosine tau in (0, 1]: one value, or one per cached layer.
        max_tokens: longest row (in real tokens) it caches; its banks store max_tokens positions
            per entry.
        mode: "state" serves the cached h_l (the paper); "residual" adds the cached update
            h_l - h_{l-1} to the row's own input. Exact hits are bit-identical in "state" mode
            only ("residual" reproduces them up to rounding); with a threshold, "residual" lost
            fewer STS-B Spearman points at every tau of the sweep
            (bench/results/experiments/experiments-sweep.md) and no more perplexity.
        exact: look rows up by the hash of their tokens first (a repeat is served its own states).
        fingerprint: "embeddings" (mean of the input token embeddings, as in the paper, computed
            once per forward) or "hidden" (mean of each block's own input hidden state).
        eviction: which entry a full bank overwrites: "lru" (least recently used) or
            "staleness" (lowest match rate, decayed with half-life `staleness_half_life`).
        staleness_half_life: ticks (forward passes) over which a match rate halves.
    """

    threshold: float | Sequence[float]
    max_tokens: int = 64
    mode: str = "state"
    exact: bool = True
    fingerprint: str = "embeddings"
    eviction: str = "lru"
    staleness_half_life: float = 256.0

    def __post_init__(self) -> None:
        self.validate(None)

    def validate(self, layers: list[int] | None) -> None:
        """Check every field; with the cached `layers`, that thresholds fit them. Raises
        ValueError naming the field."""
        from ...config import is_int, is_number, require

        values = [self.threshold] if is_number(self.threshold) else (
            list(self.threshold) if isinstance(self.threshold, Sequence) else [self.threshold])
        ok = bool(values) and all(is_number(t) and 0.0 < t <= 1.0 for t in values)
        require(ok, "threshold", self.threshold, "cosine values in (0, 1]", "Layerwise")
        require(layers is None or len(values) in (1, len(layers)), "threshold", self.threshold,
                f"one value or one per cached layer ({len(layers or ())})", "Layerwise")
        require(is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", self.max_tokens, "an int > 0",
                "Layerwise")
        require(self.mode in MODES, "mode", self.mode, f"one of {MODES}", "Layerwise")
        require(isinstance(self.exact, bool), "exact", self.exact, "True or False", "Layerwise")
        require(self.fingerprint in FINGERPRINTS, "fingerprint", self.fingerprint, f"one of {FINGERPRINTS}",
                "Layerwise")
        require(self.eviction in EVICTIONS, "eviction", self.eviction, f"one of {EVICTIONS}", "Layerwise")
        require(is_number(self.staleness_half_life) and self.staleness_half_life > 0.0, "staleness_half_life",
                self.staleness_half_life, "a number > 0", "Layerwise")

    def layer_threshold(self, position: int) -> float:
        """The threshold of the position-th cached layer."""
        if isinstance(self.threshold, (int, float)):
            return float(self.threshold)
        values = list(self.threshold)
        return float(values[position] if len(values) > 1 else values[0])
