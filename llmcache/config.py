"""`CacheConfig`: every knob of the layer cache, documented and validated in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

EVICTIONS = ("lru", "staleness")
MODES = ("state", "residual")
FINGERPRINTS = ("embeddings", "hidden")
PADDINGS = ("auto", "exact", "masked")


@dataclass
class CacheConfig:
    """How `llmcache.accelerate` caches a model's layers.

    Attributes:
        semantic: a `llmcache.Semantic` (the error you accept, e.g. Semantic(tolerance=0.95,
            max_error=0.01)): the verified semantic tier, behind the exact tier, serves a row a
            neighbour's output only where its own checks bound the error (llmcache/verified.py).
            None (the default): off.
        shared: a Redis URL ("redis://host:6379/0") or a `llmcache.Shared(url, ttl=..., ...)`: a
            shared tier behind the exact tier's device bank, so that replicas of one model (and
            a restarted process) serve what any of them computed (llmcache/shared/). Exact
            entries only; encoders and pixel models (a decoder's prefix pages stay local).
            None (the default): off.
        threshold: experts only, keeps no error bound: cosine tau in (0, 1] of the per-block
            semantic tier (the paper's design): a row reuses a cached entry when the
            SimHash estimate of the cosine between their fingerprints is >= tau (Hamming radius
            nbits * arccos(tau) / pi). One value, or one per cached layer. None (the default)
            turns the semantic tier off: only exact repeats are served, which is lossless.
            Semantic hits change outputs; measure them (`llmcache demo`) before turning them on.
        num_bits: SimHash code length, a positive multiple of 64 up to 1024.
        layers: which blocks cache: None for all, a list of indices, or a range.
        capacity: at most this many entries (None, the default: the byte budget alone decides;
            the semantic tier's per-layer banks then hold up to 1024 entries each).
        max_bytes: budget in bytes over all banks (default 1 GiB). The exact tier's arena grows
            in chunks as entries arrive and never past it; an entry of n tokens takes
            ceil(n / page_tokens) pages. `accelerate` refuses a budget that cannot hold one page.
            The semantic tier splits it equally between its layers' banks. None: no byte limit.
        padding: what a served row holds at its padding positions (mask == 0), in its output and
            in the K/V it hands a decoder's KV cache. "exact": the uncached model's values, so
            every position of every output equals it. A decoder's trailing padding is computed
            after the row's stored K/V (as new tokens after a cached prefix are); other padding
            (a decoder's leading padding, an encoder's) is kept with the row: the row is keyed
            and stored with it, and served where it comes again with as much padding. "masked":
            zeros there; a row is served whatever its padding, for callers that never read
            padding (pooling with the mask, a classifier reading a real token). "auto" (the
            default): "exact" for a decoder, but for the leading padding of a call given a KV
            cache (generate's prefill: every later step masks it, generate reads the last
            position only, and keyed with its padding a prompt would share no prefix pages with
            prompts padded otherwise; the past_key_values generate returns hold zeros there);
            "masked" for an encoder and a SentenceTransformer, whose callers pool with the mask
            or read a real token (an encoder row's padding depends on its batch's width: a
            repeat in a batch of another width would miss; see README).
        page_tokens: tokens per page of the exact tier's arena (small pages waste little on
            short rows: a 7-token row in 8-token pages uses 8 positions).
        max_tokens: longest row (in real tokens) that the semantic tier caches; its banks store
            max_tokens positions per entry. The exact tier has no length limit but the budget.
        eviction: which entry a full bank overwrites: "lru" (least recently used), "staleness"
            (lowest decayed match rate, half-life `staleness_half_life` ticks).
        mode: "state" serves the cached h_l (the paper); "residual" adds the cached update
            h_l - h_{l-1} to the row's own input. Exact hits are bit-identical in "state" mode
            only ("residual" reproduces them up to rounding), which is why "state" is the
            default; with a threshold, "residual" lost fewer STS-B Spearman points at every tau
            of the sweep (bench/results/experiments/experiments-sweep.md) and no more perplexity.
        exact: the exact tier: rows whose token ids (and length and namespace) equal a cached
            row's reuse it, bit-identical to recomputing in the same padded shape.
        fingerprint: "embeddings" (mean of the input token embeddings, as in the paper, computed
            once per forward) or "hidden" (mean of each block's own input hidden state).
        staleness_half_life: ticks (forward passes) over which a match rate halves.
        seed: seed of the SimHash hyperplanes.
        backend: kernel backend for the ops (None: automatic; see llmcache.ops).
    """

    semantic: object | None = None  # llmcache.Semantic
    shared: object | None = None  # llmcache.Shared (a URL str becomes one)
    threshold: float | Sequence[float] | None = None
    num_bits: int = 256
    layers: Sequence[int] | range | None = None
    capacity: int | None = None
    max_bytes: int | None = 1 << 30
    padding: str = "auto"
    page_tokens: int = 8
    max_tokens: int = 64
    eviction: str = "lru"
    mode: str = "state"
    exact: bool = True
    fingerprint: str = "embeddings"
    staleness_half_life: float = 256.0
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shared, str):
            from .shared import Shared

            self.shared = Shared(self.shared)
        self.validate(None)

    def replace(self, **overrides) -> CacheConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self) }
        if unknown:
            raise TypeError(f"unknown CacheConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, num_layers: int | None) -> list[int]:
        """Check every field (types included); return the cached layer indices (none when
        num_layers is None: the check at construction). Raises ValueError naming the field."""
        layers = []
        if self.layers is not None:
            _require(isinstance(self.layers, (Sequence, range)) and not isinstance(self.layers, str), "layers",
                     self.layers, "None, a list of block indices or a range")
            layers = list(self.layers)
            bad = [i for i in layers if not _is_int(i) or i < 0 or (num_layers is not None and i >= num_layers)]
            upper = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
            _require(not bad and layers, "layers", self.layers, f"block indices in {upper}, non-empty")
        if num_layers is not None and self.layers is None:
            layers = list(range(num_layers))
        if self.threshold is not None:
            values = [self.threshold] if _is_number(self.threshold) else (
                list(self.threshold) if isinstance(self.threshold, Sequence) else [self.threshold])
            _require(
                all(_is_number(t) and 0.0 < t <= 1.0 for t in values),
                "threshold",
                self.threshold,
                "None or cosine values in (0, 1]",
            )
            _require(
                num_layers is None or len(values) in (1, len(layers)),
                "threshold",
                self.threshold,
                f"one value or one per cached layer ({len(layers)})",
            )
        _require(
            _is_int(self.num_bits) and 0 < self.num_bits <= 1024 and self.num_bits % 64 == 0,
            "num_bits",
            self.num_bits,
            "a positive multiple of 64 up to 1024",
        )
        _require(self.capacity is None or (_is_int(self.capacity) and self.capacity > 0), "capacity",
                 self.capacity, "None or an int > 0")
        _require(_is_int(self.page_tokens) and self.page_tokens > 0, "page_tokens", self.page_tokens, "an int > 0")
        _require(
            self.max_bytes is None or (_is_int(self.max_bytes) and self.max_bytes > 0),
            "max_bytes",
            self.max_bytes,
            "None or an int > 0",
        )
        _require(_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", self.max_tokens, "an int > 0")
        _require(self.eviction in EVICTIONS, "eviction", self.eviction, f"one of {EVICTIONS}")
        _require(self.padding in PADDINGS, "padding", self.padding, f"one of {PADDINGS}")
        _require(self.mode in MODES, "mode", self.mode, f"one of {MODES}")
        _require(self.fingerprint in FINGERPRINTS, "fingerprint", self.fingerprint, f"one of {FINGERPRINTS}")
        _require(isinstance(self.exact, bool), "exact", self.exact, "True or False")
        self._validate_tiers()
        return layers

    def _validate_tiers(self) -> None:
        """The tiers behind the exact one, and the kernels' backend."""
        from .promise import Semantic

        _require(self.semantic is None or isinstance(self.semantic, Semantic), "semantic", self.semantic,
                 "None or a llmcache.Semantic(tolerance=..., max_error=...)")
        _require(self.semantic is None or (self.threshold is None and self.exact), "semantic", self.semantic,
                 "None when threshold is set or exact is False (the verified tier works behind the exact tier; "
                 "threshold is the unbounded per-block tier)")
        from .shared import Shared

        _require(self.shared is None or isinstance(self.shared, Shared), "shared", self.shared,
                 'None, a Redis URL ("redis://host:port/db") or a llmcache.Shared(url, ...)')
        _require(self.shared is None or (self.threshold is None and self.exact), "shared", self.shared,
                 "None when threshold is set or exact is False (the shared tier holds exact entries only)")
        _require(_is_number(self.staleness_half_life) and self.staleness_half_life > 0.0, "staleness_half_life",
                 self.staleness_half_life, "a number > 0")
        _require(_is_int(self.seed), "seed", self.seed, "an int")
        from .ops._library import BACKENDS

        _require(self.backend is None or self.backend in BACKENDS, "backend", self.backend,
                 f"None (automatic) or one of {BACKENDS}")

    def layer_threshold(self, position: int) -> float | None:
        """The threshold of the position-th cached layer (None: semantic tier off)."""
        if self.threshold is None:
            return None
        if isinstance(self.threshold, (int, float)):
            return float(self.threshold)
        values = list(self.threshold)
        return float(values[position] if len(values) > 1 else values[0])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"CacheConfig.{name} = {value!r} is invalid: expected {allowed}")
