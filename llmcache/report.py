"""What an accelerated model's cache reports: `stats` (counters) and `held` (entries).

Both read the router's counters and ask every tier for its part (`Tier.report`, `Tier.held`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .api import owner_of
from .shared import SharedStats
from .tiers.verified import SemanticStats


@dataclass
class CacheStats:
    """A snapshot of an accelerated model's cache.

    forwards, rows: base-model calls and their batch rows seen by the cache, cached or not.
    hits: rows served from a bank (exact tier: a served row skips every cached block; semantic
    tier: summed over layers, one per row and layer served), exact_hits + semantic_hits.
    lookups: rows looked up (semantic tier: summed over layers). hit_rate: hits over all rows
    (semantic tier: over rows x cached layers). not_cached: rows that ran uncached, by reason
    (training, grad, inference_tensors, output_attentions, inputs_embeds, too_long, padding: a
    whole decoder row whose trailing padding its batch could not compute from its K/V, ...).
    repeats: rows repeating an earlier row of their own batch (exact tier): not served from the
    bank, not computed either (the first occurrence's result is copied); hits + repeats rows
    skipped the cached blocks.
    prefix_rows: decoder rows that computed only their tokens after a cached prefix.
    decode_pages: pages of tokens that decode steps computed (generate's answers), stored for the
    prompts that repeat them (a chat's next turn).
    last_semantic_rows: the rows of the last routed forward served a neighbour's output.
    tokens_served / tokens_computed: real tokens whose states came from the bank / were computed
    in cached forwards, in total; last_tokens: (served, computed) of the last cached forward.
    entries: entries held (a decoder's: pages of token prefixes, shared by every row extending
    them); bytes: bytes of the states they hold; bytes_reserved: bytes the banks
    have allocated. invalidations: times the weights or the module tree changed (or LoRA adapters
    were merged or unmerged) and every entry was dropped.
    fingerprint_s / lookup_s: host wall time (on CUDA it counts launches, not kernels).
    layers: one LayerStats per cached layer.
    semantic: the verified semantic tier's state and evidence (`llmcache.Semantic`), None when off;
    its hits are in `hits` and `semantic_hits`.
    shared: the shared tier's counters (`llmcache.SharedStats`), None when off; its hits are
    also in `hits` (a row served from Redis is copied into the device bank and served from it).
    """

    tier: str  # "exact" or "semantic"
    forwards: int
    rows: int
    lookups: int
    hits: int
    exact_hits: int
    semantic_hits: int
    insertions: int
    evictions: int
    invalidations: int
    entries: int
    bytes: int
    bytes_reserved: int
    fingerprint_s: float
    lookup_s: float
    not_cached: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    repeats: int = 0
    prefix_rows: int = 0
    decode_pages: int = 0
    tokens_served: int = 0
    tokens_computed: int = 0
    last_tokens: tuple = (0, 0)
    semantic: SemanticStats | None = None
    last_semantic_rows: tuple = ()
    shared: SharedStats | None = None

    @property
    def hit_rate(self) -> float:
        per_row = 1 if self.tier == "exact" else len(self.layers)
        return self.hits / (self.rows * per_row) if self.rows and self.layers else 0.0

    def __repr__(self) -> str:
        return (f"CacheStats(forwards={self.forwards}, rows={self.rows}, hits={self.hits}, "
                f"hit_rate={self.hit_rate:.3f}, entries={self.entries}, bytes={self.bytes}, "
                f"bytes_reserved={self.bytes_reserved}, not_cached={self.not_cached})")

    def __str__(self) -> str:
        head = f"{'layer':>5} {'lookups':>8} {'hits':>7} {'hit%':>6} {'exact':>7} {'sem':>6} {'ins':>7} {'evict':>6}"
        lines = [head]
        for s in self.layers:
            lines.append(
                f"{s.layer:>5} {s.lookups:>8} {s.hits:>7} {100 * s.hit_rate:>5.1f}% {s.exact_hits:>7} "
                f"{s.semantic_hits:>6} {s.insertions:>7} {s.evictions:>6}"
            )
        lines.append(
            f"forwards {self.forwards}, rows {self.rows}, hits {self.hits} ({100 * self.hit_rate:.1f} %), "
            f"in-batch repeats {self.repeats}, prefix rows {self.prefix_rows}, tokens served {self.tokens_served} / "
            f"computed {self.tokens_computed}, "
            f"entries {self.entries}, held {self.bytes / 2**20:.2f} MiB of {self.bytes_reserved / 2**20:.2f} MiB "
            f"reserved, inserted {self.insertions}, evicted {self.evictions}, invalidations {self.invalidations}"
        )
        if self.not_cached:
            lines.append("not cached (rows): " + ", ".join(f"{k} {v}" for k, v in sorted(self.not_cached.items())))
        lines.append(f"lookup {1e3 * self.lookup_s:.1f} ms, fingerprint {1e3 * self.fingerprint_s:.1f} ms")
        if self.semantic is not None:
            s = self.semantic
            fmt = lambda b: "never measured" if b is None else f"{100 * b:.2f} %"
            lines.append(f"semantic tier ({s.promise}): {s.state}; served {s.served}, would-be hits {s.would_be}, "
                         f"checked {s.verified} ({s.failed} outside tolerance), explored {s.explored} "
                         f"({s.explored_failed} failed), error bound {fmt(s.error_bound)}, explored-sample bound "
                         f"{fmt(s.realised_bound)}, neighbours narrowed {s.narrowed}")
        if self.shared is not None:
            s = self.shared
            ms = lambda v: "-" if v is None else f"{1e3 * v:.2f} ms"
            lines.append(f"shared tier {s.url}: {s.state}; looked up {s.lookups} rows in {s.round_trips} round trips "
                         f"(p50 {ms(s.latency_p50_s)}, p99 {ms(s.latency_p99_s)}), hits {s.hits}, refused "
                         f"{s.refused or 0}, skipped {s.skipped or 0}, written {s.writes} ({s.bytes_written} B), "
                         f"dropped {s.write_drops or 0}, errors {s.errors or 0}")
        return "\n".join(lines)


def stats(model: nn.Module) -> CacheStats:
    """A snapshot of the cache's counters (see CacheStats)."""
    owner = owner_of(model)
    with owner.lock:
        c = owner.counters
        parts = {"fingerprint_s": c.fingerprint_s, "lookup_s": c.lookup_s}
        for tier in owner.tiers:
            for name, value in tier.report(c).items():
                parts[name] = parts[name] + value if name in ("fingerprint_s", "lookup_s") else value
        return CacheStats(forwards=c.forwards, rows=c.rows, invalidations=c.invalidations, not_cached=dict(c.not_cached),
                          repeats=c.repeats, prefix_rows=c.prefix_rows, tokens_served=c.tokens_served,
                          tokens_computed=c.tokens_computed, last_tokens=tuple(c.last_tokens),
                          last_semantic_rows=tuple(c.last_semantic_rows), **parts)


@dataclass(frozen=True)
class HeldEntry:
    """One exact-tier entry: the row it answers (a decoder's: one page of a row, after the
    prefix its `parent` names) and what it takes."""

    ids: tuple[int, ...]  # the real token ids of the row (a decoder: of the page)
    positions: tuple[int, ...]
    token_types: tuple[int, ...]
    namespace: str
    pages: int
    bytes: int
    hits: int  # rows it served
    serial: int = -1  # its number, never reused
    parent: int = -1  # a decoder page: the serial of the page it extends (-1: the row's first page)
    state: str = ""  # the model state it was computed under (llmcache.state: dtype, autocast, adapters, ...)


@dataclass(frozen=True)
class Held:
    """What an accelerated model's cache holds: exact-tier entries, and semantic entries per layer."""

    entries: list  # HeldEntry, exact tier
    layers: dict  # block index -> entries held by that layer's bank (semantic tier)


def held(model: nn.Module) -> Held:
    """What the cache holds now (an inspection surface for tests and for users)."""
    owner = owner_of(model)
    with owner.lock:
        entries = [entry for tier in owner.tiers for entry in tier.held()]
        layers = {i: n for tier in owner.tiers for i, n in tier.held_layers().items()}
    return Held(entries, layers)


__all__ = ["CacheStats", "Held", "HeldEntry", "held", "stats"]
