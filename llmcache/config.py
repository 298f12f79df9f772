"""`CacheConfig`: every knob of the layer cache, documented and validated in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

EVICTIONS = ("lru", "staleness", "divergence")
MODES = ("state", "residual")
FINGERPRINTS = ("embeddings", "hidden")


@dataclass
class CacheConfig:
    """How `llmcache.accelerate` caches a model's layers.

    Attributes:
        threshold: cosine tau in (0, 1] of the semantic tier: a row reuses a cached entry when the
            SimHash estimate of the cosine between their fingerprints is >= tau (Hamming radius
            nbits * arccos(tau) / pi). One value, or one per cached layer. None (the default)
            turns the semantic tier off: only exact repeats are served, which is lossless.
            Semantic hits change outputs; measure them (`llmcache demo`) before turning them on.
        num_bits: SimHash code length, a positive multiple of 64 up to 1024.
        layers: which blocks cache: None for all, a list of indices, or a range.
        capacity: at most this many entries per cached layer.
        max_bytes: budget in bytes over all banks (default 1 GiB); each layer gets an equal
            share, and holds min(capacity, share / entry size) entries, allocated once at its
            first insert and never grown. None: capacity alone decides.
        max_tokens: longest row (in real tokens) that is cached; longer rows always compute.
            Banks store max_tokens positions per entry.
        eviction: which entry a full bank overwrites: "lru" (least recently used), "staleness"
            (lowest decayed match rate, half-life `staleness_half_life` ticks) or "divergence"
            (highest measured reuse deviation first, then LRU).
        mode: "state" serves the cached h_l (the paper); "residual" adds the cached update
            h_l - h_{l-1} to the row's own input. Exact hits are bit-identical in "state" mode
            only ("residual" reproduces them up to rounding), which is why "state" is the
            default; with a threshold, "residual" lost fewer STS-B Spearman points at every tau
            of the sweep (bench/results/experiments/experiments-sweep.md) and no more perplexity.
        exact: the exact tier: rows whose token ids (and length and namespace) equal a cached
            row's reuse it, bit-identical to recomputing in the same padded shape.
        fingerprint: "embeddings" (mean of the input token embeddings, as in the paper, computed
            once per forward) or "hidden" (mean of each block's own input hidden state).
        verify_rate: fraction of semantic hits that are computed anyway to measure how far the
            reused state is from the true one (divergence monitoring). 0 turns it off.
        max_divergence: an entry whose measured 1 - cosine exceeds this is evicted; a layer whose
            running mean exceeds it stops serving semantic hits.
        staleness_half_life: ticks (forward passes) over which a match rate halves.
        seed: seed of the SimHash hyperplanes.
        backend: kernel backend for the ops (None: automatic; see llmcache.ops).
    """

    threshold: float | Sequence[float] | None = None
    num_bits: int = 256
    layers: Sequence[int] | range | None = None
    capacity: int = 1024
    max_bytes: int | None = 1 << 30
    max_tokens: int = 64
    eviction: str = "lru"
    mode: str = "state"
    exact: bool = True
    fingerprint: str = "embeddings"
    verify_rate: float = 0.05
    max_divergence: float = 0.02
    staleness_half_life: float = 256.0
    seed: int = 0
    backend: str | None = None

    def replace(self, **overrides) -> CacheConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self) }
        if unknown:
            raise TypeError(f"unknown CacheConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, num_layers: int) -> list[int]:
        """Check every field; return the cached layer indices. Raises ValueError naming the field."""
        layers = list(range(num_layers)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        _require(not bad and layers, "layers", self.layers, f"indices in 0..{num_layers - 1}, non-empty")
        if self.threshold is not None:
            values = [self.threshold] if isinstance(self.threshold, (int, float)) else list(self.threshold)
            _require(
                all(isinstance(t, (int, float)) and 0.0 < t <= 1.0 for t in values),
                "threshold",
                self.threshold,
                "None or cosine values in (0, 1]",
            )
            _require(
                len(values) in (1, len(layers)),
                "threshold",
                self.threshold,
                f"one value or one per cached layer ({len(layers)})",
            )
        _require(
            isinstance(self.num_bits, int) and 0 < self.num_bits <= 1024 and self.num_bits % 64 == 0,
            "num_bits",
            self.num_bits,
            "a positive multiple of 64 up to 1024",
        )
        _require(isinstance(self.capacity, int) and self.capacity > 0, "capacity", self.capacity, "an int > 0")
        _require(
            self.max_bytes is None or (isinstance(self.max_bytes, int) and self.max_bytes > 0),
            "max_bytes",
            self.max_bytes,
            "None or an int > 0",
        )
        _require(isinstance(self.max_tokens, int) and self.max_tokens > 0, "max_tokens", self.max_tokens, "an int > 0")
        _require(self.eviction in EVICTIONS, "eviction", self.eviction, f"one of {EVICTIONS}")
        _require(self.mode in MODES, "mode", self.mode, f"one of {MODES}")
        _require(self.fingerprint in FINGERPRINTS, "fingerprint", self.fingerprint, f"one of {FINGERPRINTS}")
        _require(0.0 <= self.verify_rate <= 1.0, "verify_rate", self.verify_rate, "a fraction in [0, 1]")
        _require(self.max_divergence > 0.0, "max_divergence", self.max_divergence, "a float > 0")
        _require(self.staleness_half_life > 0.0, "staleness_half_life", self.staleness_half_life, "a float > 0")
        return layers

    def layer_threshold(self, position: int) -> float | None:
        """The threshold of the position-th cached layer (None: semantic tier off)."""
        if self.threshold is None:
            return None
        if isinstance(self.threshold, (int, float)):
            return float(self.threshold)
        values = list(self.threshold)
        return float(values[position] if len(values) > 1 else values[0])


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"CacheConfig.{name} = {value!r} is invalid: expected {allowed}")
