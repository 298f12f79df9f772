"""`RingBuffer`: the fixed-capacity, device-resident bank of one cached layer.

All tensors are allocated once, on the model's device, and overwritten in place: a full bank
evicts, it never grows. Per slot it keeps the SimHash code, the exact-tier key, the match tag
(token count, namespace, padding side), the stored states and the eviction metadata.
Lookups run `hamming_topk`; reads run the fused `gather_with_mask`, which also stamps
last_used and counts hits. It is the per-block tier's bank (`llmcache.tiers.layerwise`); the exact tier
keeps its entries in pages (`llmcache.bank`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...ops._library import resolve_backend
from ...ops.gather_with_mask import gather_with_mask_unchecked
from ...ops.hamming_topk import hamming_topk_unchecked
from ...rows import POSITION_BITS, SIDE_BITS, TOKEN_BITS, first_of_key


class RingBuffer:
    """A bank of `capacity` entries of shape `entry_shape` = [max_tokens, *F].

    Args:
        capacity: slots N.
        words: SimHash words W per code.
        entry_shape: shape of one stored entry, sequence axis first ([Tcap, F]).
        dtype, device: of the stored states (the model's).
        eviction: "lru" or "staleness" (see CacheConfig).
        half_life: staleness half-life in ticks.
        backend: kernel backend for the ops, None for automatic.
    """

    def __init__(
        self,
        capacity: int,
        words: int,
        entry_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        eviction: str = "lru",
        half_life: float = 256.0,
        backend: str | None = None,
    ) -> None:
        self.capacity = capacity
        self.eviction = eviction
        self.half_life = half_life
        self.backend = backend
        self.tick = 0
        self.evictions = 0  # valid entries overwritten by inserts
        self.filled = 0  # slots [filled, capacity) have never held an entry since the last reset
        # The bank's arguments are valid by construction, so the public wrappers' checks (a few
        # dozen Python calls per lookup) are skipped on this hot path: the unchecked entries
        # with a forced backend, and with none (argument or LLMCACHE_BACKEND) the registered ops.
        self._direct = resolve_backend(backend, device) == "auto"
        # Ordinary tensors even when created under inference mode: inference tensors could only
        # be updated inside inference mode, and a bank is also used under no_grad or reset outside.
        with torch.inference_mode(False), torch.no_grad():
            self._allocate(capacity, words, entry_shape, dtype, device)

    def _allocate(self, capacity, words, entry_shape, dtype, device) -> None:
        new = {"device": device}
        # Left unfilled (a zero fill of a large bank costs more than many forwards); `insert`
        # writes every position of an entry, padding positions as zeros, so what a slot serves
        # is always finite.
        self.values = torch.empty((capacity,) + tuple(entry_shape), dtype=dtype, **new)
        # Positions [dirty_lo, dirty_hi) of a slot may be non-zero (all of them, at first): a write
        # zeroes only what it does not overwrite inside that range, not the whole rest of the entry.
        # Host-side (numpy): it steers which slices a write fills, so it is read on the host anyway.
        self.dirty = np.tile(np.array([0, entry_shape[0]], dtype=np.int64), (capacity, 1))
        self.codes = torch.zeros(capacity, words, dtype=torch.int64, **new)
        self.keys = torch.zeros(capacity, 1, dtype=torch.int64, **new)
        self.tags = torch.zeros(capacity, dtype=torch.int64, **new)
        self.valid = torch.zeros(capacity, dtype=torch.bool, **new)
        self.last_used = torch.zeros(capacity, dtype=torch.int64, **new)
        self.hit_count = torch.zeros(capacity, dtype=torch.int64, **new)
        self.rate = torch.zeros(capacity, dtype=torch.float32, **new)
        self.rate_tick = torch.zeros(capacity, dtype=torch.int64, **new)

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes this bank holds."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        return (self.codes, self.keys, self.tags, self.valid, self.last_used, self.hit_count, self.rate,
                self.rate_tick, self.values)

    @staticmethod
    def entry_bytes(entry_shape: tuple[int, ...], dtype: torch.dtype, words: int) -> int:
        """Bytes one slot costs, metadata included (for sizing a bank from a byte budget)."""
        per_value = math.prod(entry_shape) * torch.empty((), dtype=dtype).element_size()
        return per_value + 8 * words + 8 * 5 + 4 + 1

    def advance(self) -> None:
        """One forward pass went by (the clock of LRU and staleness)."""
        self.tick += 1

    def reset(self) -> None:
        """Forget every entry (the memory stays allocated)."""
        self.filled = 0
        self.valid.zero_()
        self.hit_count.zero_()
        self.rate.zero_()

    @property
    def namespace_ids(self) -> torch.Tensor:
        """int64 [N]: the namespace id of each slot's entry."""
        return self.tags >> (POSITION_BITS + TOKEN_BITS + SIDE_BITS)

    @property
    def token_counts(self) -> torch.Tensor:
        """int64 [N]: the token count of each slot's entry."""
        return (self.tags >> SIDE_BITS) & ((1 << TOKEN_BITS) - 1)

    def evict(self, slots: torch.Tensor) -> None:
        self.valid[slots] = False

    @property
    def occupied(self) -> int:
        return int(self.valid.sum())

    # ---- lookup ------------------------------------------------------------------------
    def lookup(self, codes: torch.Tensor, tags: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest same-tag entry per row within `radius`: (slot int64 [B] or -1, dist int32 [B])."""
        dist, idx = self._topk(codes, self.codes, tags)
        dist, idx = dist[:, 0], idx[:, 0]
        return torch.where(dist <= radius, idx, -1), dist

    def lookup_exact(self, keys: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """Slot holding the same exact key and tag per row, or -1: int64 [B]."""
        dist, idx = self._topk(keys.unsqueeze(1), self.keys, tags)
        return torch.where(dist[:, 0] == 0, idx[:, 0], -1)

    def _topk(self, queries: torch.Tensor, bank: torch.Tensor, tags: torch.Tensor):
        if self._direct:
            return torch.ops.llmcache.hamming_topk(queries, bank, 1, self.valid, tags, self.tags)
        return hamming_topk_unchecked(queries, bank, 1, self.valid, tags, self.tags, backend=self.backend)

    # ---- read --------------------------------------------------------------------------
    def gather(self, slot: torch.Tensor, computed: torch.Tensor, row: torch.Tensor, align_end: bool) -> torch.Tensor:
        """out[r] = entry slot[r] (a hit) or computed[row[r]] (a miss): [B, T, *F]. The slots read
        count as used now (LRU stamp, hit count, staleness rate)."""
        args = (self.values, slot, computed, row, self.last_used, self.hit_count, self.tick, align_end)
        if self._direct:
            out = torch.ops.llmcache.gather_with_mask(*args)
        else:
            out = gather_with_mask_unchecked(*args, backend=self.backend)
        if self.eviction == "staleness":
            hit_slots = slot[slot >= 0]
            self.rate[hit_slots] = self._decayed_rate(hit_slots)
            self.rate_tick[hit_slots] = self.tick
            self.rate.index_add_(0, hit_slots, torch.ones_like(hit_slots, dtype=torch.float32))
        return out

    def _decayed_rate(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        rate = self.rate if slots is None else self.rate[slots]
        since = self.rate_tick if slots is None else self.rate_tick[slots]
        return rate * torch.exp2(-(self.tick - since).float() / self.half_life)

    # ---- write -------------------------------------------------------------------------
    def _victims(self, count: int) -> torch.Tensor:
        """`count` slots to overwrite: never-used ones first, then free ones, then by the eviction policy."""
        if self.filled + count <= self.capacity:
            start, self.filled = self.filled, self.filled + count
            return torch.arange(start, self.filled, device=self.valid.device)
        if self.eviction == "staleness":
            score = self._decayed_rate()
        else:
            score = self.last_used.double()
        score = torch.where(self.valid, score.double(), -math.inf)
        return score.topk(count, largest=False).indices

    def insert(
        self,
        codes: torch.Tensor,
        keys: torch.Tensor,
        tags: torch.Tensor,
        states: torch.Tensor,
        align_end: bool,
        rows: torch.Tensor | None = None,
        dedupe: bool = True,
        return_rows: bool = False,
    ):
        """Store rows of a batch as new entries; returns the slots used (int64 [<= M]), or with
        `return_rows` (rows stored, their slots).

        Args:
            codes: int64 [B, W]; keys, tags: int64 [B]; states: [B, T, *F] in the bank's dtype.
            align_end: the rows are left-padded, so their tokens end at position T - 1.
            rows: int64 [M], the rows to store (default: all B).
            dedupe: of rows with equal keys store only the first (False: the caller guarantees
                the keys of `rows` are distinct).
            return_rows: also return which rows were stored (int64 [<= M]).
        Rows holding NaN or Inf are not stored (a non-finite row sum finds them in one pass).
        """
        batch = states.shape[0]
        if rows is None:
            rows = torch.arange(batch, device=states.device)
        if dedupe:
            rows = rows.index_select(0, first_of_key(keys.index_select(0, rows)).nonzero().flatten())
        rows = rows[: self.capacity]
        source = states if rows.numel() == batch else states.index_select(0, rows)
        finite = finite_rows(source)
        if finite is not None:
            rows, source = rows[finite], source[finite]
        if rows.numel() == 0:
            return (rows, rows) if return_rows else rows
        full = self.filled + rows.numel() > self.capacity
        slots = self._victims(rows.numel())
        if full:
            self.evictions += int(self.valid[slots].sum())
        self.write_values(slots, source, align_end)
        self.codes.index_copy_(0, slots, codes.index_select(0, rows))
        self.keys.index_copy_(0, slots, keys.index_select(0, rows).unsqueeze(1))
        self.tags.index_copy_(0, slots, tags.index_select(0, rows))
        self.valid.index_fill_(0, slots, True)
        self.last_used.index_fill_(0, slots, self.tick)
        self.hit_count.index_fill_(0, slots, 0)
        self.rate.index_fill_(0, slots, 0.0)
        self.rate_tick.index_fill_(0, slots, self.tick)
        return (rows, slots) if return_rows else slots

    def write_values(self, slots: torch.Tensor, source: torch.Tensor, align_end: bool) -> None:
        """Overwrite the stored states of `slots` (int64 [M]) with `source` ([M, T, *F], the bank's
        dtype): the row's positions, and zeros over the rest of the entry. Metadata untouched."""
        if slots.numel() == 0:
            return
        seq, stored = source.shape[1], self.values.shape[1]
        span = min(seq, stored)
        start, stop = (stored - span, stored) if align_end else (0, span)
        if span != seq:
            source = source[:, seq - span :] if align_end else source[:, :span]
        (self.values if span == stored else self.values[:, start:stop]).index_copy_(0, slots, source)
        host = slots.cpu().numpy()
        lo, hi = int(self.dirty[host, 0].min()), int(self.dirty[host, 1].max())
        if lo < start:
            self.values[:, lo:start].index_fill_(0, slots, 0)
        if hi > stop:
            self.values[:, stop:hi].index_fill_(0, slots, 0)
        self.dirty[host] = (start, stop)


def finite_rows(x: torch.Tensor) -> torch.Tensor | None:
    """None when every value of `x` ([M, ...]) is finite, else bool [M]: which rows are. One
    whole-tensor reduction and host read in the common case; per-row sums only when its total
    is not finite (a NaN/Inf anywhere, or an overflow the per-row check then tells apart)."""
    if math.isfinite(float(x.sum(dtype=torch.float32))):
        return None
    return torch.isfinite(x.sum(dim=tuple(range(1, x.dim())), dtype=torch.float32))
