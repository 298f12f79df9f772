"""`CacheConfig`: every knob of the layer cache, documented and validated in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

EVICTIONS = ("lru", "staleness")
PADDINGS = ("auto", "exact", "masked")


@dataclass
class CacheConfig:
    """How `llmcache.accelerate` caches a model's layers.

    Attributes:
        semantic: a `llmcache.Semantic` (the error you accept, e.g. Semantic(tolerance=0.95,
            max_error=0.01)): the verified semantic tier, behind the exact tier, serves a row a
            neighbour's output only where its own checks bound the error (llmcache/tiers/verified.py).
            None (the default): off.
        shared: a Redis URL ("redis://host:6379/0") or a `llmcache.Shared(url, ttl=..., ...)`: a
            shared tier behind the exact tier's device bank, so that replicas of one model (and
            a restarted process) serve what any of them computed (llmcache/shared/). Exact
            entries only: encoders' and pixel models' rows, decoders' prefix pages (generated
            tokens' included), looked up as chains.
            None (the default): off.
        layerwise: a `llmcache.Layerwise(threshold=...)`: experts only, keeps no error bound: the
            paper's per-block tier instead of the exact one (its own fields: threshold,
            max_tokens, mode, fingerprint, its banks' eviction). None (the default): the exact
            tier, which is lossless.
        num_bits: SimHash code length, a positive multiple of 64 up to 1024.
        layers: which blocks cache: None for all, a list of indices, or a range.
        capacity: at most this many entries (None, the default: the byte budget alone decides;
            the per-block tier's banks then hold up to 1024 entries each).
        max_bytes: budget in bytes over all banks (default 1 GiB). The exact tier's arena grows
            in chunks as entries arrive and never past it (on the CPU it reserves address space
            for up to 1 GiB of it at once: memory is used as pages are written); an entry of n tokens takes
            ceil(n / page_tokens) pages. `accelerate` refuses a budget that cannot hold one page.
            The per-block tier splits it equally between its layers' banks. None: no byte limit.
        padding: what a served row holds at its padding positions (mask == 0), in its output and
            in the K/V it hands a decoder's KV cache. "exact": the uncached model's values, so
            every position of every output equals it. A decoder's trailing padding is computed
            after the row's stored K/V (as new tokens after a cached prefix are); other padding
            (a decoder's leading padding, an encoder's) is kept with the row: the row is keyed
            and stored with it, and served where it comes again with as much padding. "masked":
            zeros there; a row is served whatever its padding, for callers that never read
            padding (pooling with the mask, a classifier reading a real token); an encoder's
            computed rows hold zeros at their padding too, so a call's output does not depend
            on which of its rows were served. "auto" (the
            default): "exact" for a decoder, but for the leading padding of a call given a KV
            cache (generate's prefill: every later step masks it, generate reads the last
            position only, and keyed with its padding a prompt would share no prefix pages with
            prompts padded otherwise; the past_key_values generate returns hold zeros there);
            "masked" for an encoder and a SentenceTransformer, whose callers pool with the mask
            or read a real token (an encoder row's padding depends on its batch's width: a
            repeat in a batch of another width would miss; see README).
        page_tokens: tokens per page of the exact tier's arena (small pages waste little on
            short rows: a 7-token row in 8-token pages uses 8 positions).
        eviction: which entry the exact tier gives up when full (a CLOCK hand): "lru" (an entry
            hit since the hand last passed is spared once) or "staleness" (GCLOCK: each hit
            spares it one more pass, up to 8, so entries hit often outlive ones hit once).
        seed: seed of the SimHash hyperplanes.
        backend: kernel backend for the ops (None: automatic; see llmcache.ops).
    """

    semantic: object | None = None  # llmcache.Semantic
    shared: object | None = None  # llmcache.Shared (a URL str becomes one)
    layerwise: object | None = None  # llmcache.Layerwise
    num_bits: int = 256
    layers: Sequence[int] | range | None = None
    capacity: int | None = None
    max_bytes: int | None = 1 << 30
    padding: str = "auto"
    page_tokens: int = 8
    eviction: str = "lru"
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shared, str):
            from .shared import Shared

            self.shared = Shared(self.shared)
        self.validate(None)

    def replace(self, **overrides) -> CacheConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            moved = sorted(unknown & set(LAYERWISE_FIELDS))
            hint = (f" ({', '.join(moved)}: moved to the per-block tier's own section, "
                    f"layerwise=llmcache.Layerwise({', '.join(f'{m}=...' for m in moved)}))") if moved else ""
            raise TypeError(f"unknown CacheConfig field(s): {sorted(unknown)}{hint}")
        return dataclasses.replace(self, **overrides)

    def validate(self, num_layers: int | None) -> list[int]:
        """Check every field (types included); return the cached layer indices (none when
        num_layers is None: the check at construction). Raises ValueError naming the field."""
        layers = []
        if self.layers is not None:
            require(isinstance(self.layers, (Sequence, range)) and not isinstance(self.layers, str), "layers",
                    self.layers, "None, a list of block indices or a range")
            layers = list(self.layers)
            bad = [i for i in layers if not is_int(i) or i < 0 or (num_layers is not None and i >= num_layers)]
            upper = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
            require(not bad and layers, "layers", self.layers, f"block indices in {upper}, non-empty")
        if num_layers is not None and self.layers is None:
            layers = list(range(num_layers))
        require(is_int(self.num_bits) and 0 < self.num_bits <= 1024 and self.num_bits % 64 == 0, "num_bits",
                self.num_bits, "a positive multiple of 64 up to 1024")
        require(self.capacity is None or (is_int(self.capacity) and self.capacity > 0), "capacity",
                self.capacity, "None or an int > 0")
        require(is_int(self.page_tokens) and self.page_tokens > 0, "page_tokens", self.page_tokens, "an int > 0")
        require(self.max_bytes is None or (is_int(self.max_bytes) and self.max_bytes > 0), "max_bytes",
                self.max_bytes, "None or an int > 0")
        require(self.eviction in EVICTIONS, "eviction", self.eviction, f"one of {EVICTIONS}")
        require(self.padding in PADDINGS, "padding", self.padding, f"one of {PADDINGS}")
        require(is_int(self.seed), "seed", self.seed, "an int")
        from .ops._library import BACKENDS

        require(self.backend is None or self.backend in BACKENDS, "backend", self.backend,
                f"None (automatic) or one of {BACKENDS}")
        self._validate_tiers(layers if num_layers is not None else None)
        return layers

    def _validate_tiers(self, layers: list[int] | None) -> None:
        """The per-block tier's section, or the tiers behind the exact one."""
        from .promise import Semantic
        from .shared import Shared
        from .tiers.layerwise.config import Layerwise

        require(self.layerwise is None or isinstance(self.layerwise, Layerwise), "layerwise", self.layerwise,
                "None or a llmcache.Layerwise(threshold=...)")
        if self.layerwise is not None:
            self.layerwise.validate(layers)
        require(self.semantic is None or isinstance(self.semantic, Semantic), "semantic", self.semantic,
                "None or a llmcache.Semantic(tolerance=..., max_error=...)")
        require(self.semantic is None or self.layerwise is None, "semantic", self.semantic,
                "None when layerwise is set (the verified tier works behind the exact tier; layerwise is the "
                "unbounded per-block tier)")
        require(self.shared is None or isinstance(self.shared, Shared), "shared", self.shared,
                'None, a Redis URL ("redis://host:port/db") or a llmcache.Shared(url, ...)')
        require(self.shared is None or self.layerwise is None, "shared", self.shared,
                "None when layerwise is set (the shared tier holds exact entries only)")


# The per-block tier's fields, which were CacheConfig's before it had a section of its own.
LAYERWISE_FIELDS = ("threshold", "max_tokens", "mode", "exact", "fingerprint", "staleness_half_life")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(ok: bool, name: str, value, allowed: str, section: str = "CacheConfig") -> None:
    """The one way a config field is checked: ValueError naming the field unless `ok`."""
    if not ok:
        raise ValueError(f"{section}.{name} = {value!r} is invalid: expected {allowed}")
