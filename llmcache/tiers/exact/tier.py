"""The exact tier: one lookup per forward, served rows skip every cached block, only misses compute.

Routing (`route`, once per forward, on the router's host copy of the batch): encoders' and pixel
models' rows are looked up whole (`route.py`), decoders' page by page (`prefix.py`). The route is
a `plan.Plan` for the block splice below, or for decoders with cached prefixes a
`suffix.SuffixPlan` that the router runs through `suffix.suffix_forward`.

The splice (`blocks.BlockSplice.forward`, on every block of the span first..last cached layer): the first
block drops the served rows and the span runs on the M computing rows only, each block getting
its batch-major arguments sliced to those rows; the last block merges the served rows' stored
output, the computed rows and the in-batch repeats back to [B, T, D] and stores the computed
rows' real tokens. For decoders each block also hands the model's KV cache the K/V of all B rows
(computed rows' from a stand-in that captures them, served rows' from the entry), so
`generate()` decodes from exact KV entries.

An entry holds what serving it needs: the last cached block's output at the row's real tokens
and, for decoders, every span block's K and V there, as [n, D + L * 2 * kv_dim] in pages of the
arena (`store.Store`). Served rows are zero at padding positions (mask == 0) of the output, and
with masked padding an encoder's computed rows too (`route._padding`).
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import torch
from torch import nn

from ... import rows
from ...state import model_fingerprint
from ..base import Call, Route, Tier
from . import prefix
from . import route as encoder
from .blocks import BlockSplice
from .extend import Step, Tracks
from .plan import Plan
from .store import Store
from .suffix import SuffixPlan, suffix_forward


class ExactTier(Tier):
    """The exact tier of the blocks `span` of one model.

    Args:
        owner: the router (`ModelCache`): its lock, counters, config and current call.
        base: the base model. blocks: its block list. geometry: `adapters.Geometry` of the span.
        store: the entries. near: the verified semantic tier behind it (None: off). remote: the
        shared tier behind it (`remote.Remote`, None: off).
    """

    def __init__(self, owner, base: nn.Module, blocks, span: list[int], geometry, store: Store, near=None,
                 remote=None):
        self.owner, self.base, self.span, self.geometry, self.store = owner, base, span, geometry, store
        self.near, self.remote = near, remote
        self.splice = BlockSplice(self, [blocks[i].forward for i in span])
        self.kv_layout: dict = {}  # decoders: span position -> (kv heads, head dim, layer_idx)
        # Decoders: the K/V dtype under each model state (`Call.switches`): autocast computes
        # K/V in its own dtype, which the entries (in the arena's dtype) must be handed back in.
        self.kv_dtypes: dict = {}
        self.formats: dict = {}  # span position -> number of outputs of the block (1: a tensor)
        # RoBERTa-style embeddings number positions from the ids themselves, padding included.
        self.positions_from_ids = hasattr(getattr(base, "embeddings", None), "padding_idx")
        self.use_cache_default = bool(getattr(base.config, "use_cache", True))
        self.takes_cache_position = "cache_position" in inspect.signature(base.forward).parameters
        self.taken: list = []  # the pending batches whose flags this forward's payload carries
        self.shared_fingerprint = None  # the shared tier's: made at its first lookup, again after a change
        self.tracks = Tracks(self)  # decoders: the KV caches whose decode steps are stored as pages
        self.cuts_positions = True  # encoders: computing rows may skip their trailing padding (`route.route`)
        self.embeddings = None  # encoders: `embed.Embeddings`, the embeddings' forward (`api._exact_tiers` sets it)

    def layer_idx(self, position: int) -> int:
        """The KV cache layer of span block `position`."""
        return self.layout(position)[2]

    def layout(self, position: int) -> tuple[int, int, int]:
        """(kv heads, head dim, KV cache layer) of span block `position`: as a forward that computed
        it saw them, else as the geometry says (a replica whose forwards so far were all served
        from the bank or a suffix: its entries came from Redis or a file)."""
        layout = self.kv_layout.get(position)
        if layout is None:
            g = self.geometry
            layout = (g.kv_heads, g.kv_width // 2 // g.kv_heads, self.span[position])
        return layout

    def kv_dtype(self, switches: bytes) -> torch.dtype:
        """The dtype of the K/V the blocks compute under the model state `switches`."""
        return self.kv_dtypes.get(switches, self.store.arena.dtype)

    # ---- routing ---------------------------------------------------------------------
    def payload(self, call: Call) -> torch.Tensor | None:
        self.taken, flags = self.store.take_pending()
        return flags

    def route(self, call: Call) -> Route | None:
        store, flags = self.store, call.parts.get(self)
        index = store.index
        before = index.evictions
        try:
            return self._route(call, store, flags)
        finally:
            self.owner.counters.evicted += index.evictions - before

    def _route(self, call: Call, store: Store, flags) -> Route | None:
        with store.index.pinned():
            store.check_pending(self.taken, flags, call.counts)
            self.taken = []
            near = None
            if call.pixels is not None:
                batch = len(call.host)
                keys = encoder.RowKeys([rows.pixel_key(call.header, row, call.seq) for row in call.host],
                                       np.zeros(batch, dtype=np.int64), np.full(batch, call.seq, dtype=np.int64))
            else:
                # RoBERTa-style embeddings number positions from the ids, padding included.
                ids_before = call.arguments.get("position_ids") is None and self.positions_from_ids
                near = self.near.neighbours(call, ids_before and not self.geometry.decoder) if self.near else None
                if self.geometry.decoder:
                    def follow(rows_):
                        call.track = self.tracks.start(call, rows_, call.seq)

                    warm = None
                    if self.remote is not None:
                        def warm(*args):
                            self.remote.warm_pages(store, self._shared_fingerprint(), *args)
                    return prefix.route(store, call.header, call.host, call.seq, call.device, call.counts,
                                        self.geometry, near, call.padding, follow, warm)
                keys = encoder.row_keys(call.header, call.host, ids_before, call.counts, call.padding)
            if self.remote is not None:
                self.remote.warm(store, keys, self._shared_fingerprint())
            cut = self.cuts_positions and call.pixels is None and call.padding == (False, False)
            return encoder.route(store, keys, call.seq, call.device, call.counts, near,
                                 self.near.pooling if self.near is not None else "mean", call.host[1] if cut else None)

    def run(self, call: Call, forward):
        """Run a forward this tier routed with a route of its own making (a suffix), or None."""
        if isinstance(call.route, SuffixPlan):
            start = time.perf_counter()
            output = suffix_forward(self, call.route, call, forward)
            if self.remote is not None:
                self.remote.computed(time.perf_counter() - start, call.route.tokens[1])
            if call.track is not None:
                self.tracks.ran(call.track)
            return output
        return None

    def follows(self, cache) -> bool:
        return self.tracks.follows(cache) is not None

    def step(self, call: Call, reason: str | None) -> Route | None:
        return self.tracks.step(call, reason) if self.geometry.decoder else None

    def finish(self, call: Call, output, top: bool) -> None:
        if not top and isinstance(call.route, Step):
            self.tracks.stepped(call)
        elif not top and call.track is not None:
            self.tracks.ran(call.track)

    def generating(self):
        """The scope of one `generate` call (`extend.Tracks.generating`)."""
        return self.tracks.generating()

    def commit(self, plan, dst: torch.Tensor, pieces: list, src: torch.Tensor | None = None) -> None:
        """Write and publish the entries `plan` reserved: token src[i] (or i) of `pieces` [M, A, T,
        C] at arena row dst[i] (`PagedArena.write_tokens`)."""
        with self.owner.lock:
            committed = self.store.commit(plan.entries, plan.store_n, dst, pieces, src)
            self.owner.counters.inserted += len(committed) - committed.count(-1)
            if self.remote is not None:
                self.remote.share(self.store, committed, plan.store_n, dst, self._shared_fingerprint())
        plan.entries = []

    def release(self, plan) -> None:
        """Give back what `plan` reserved (its forward will not write it)."""
        with self.owner.lock:
            self.store.release(plan.entries)
            plan.entries = []

    def abort(self, call: Call) -> None:
        if isinstance(call.route, (Plan, SuffixPlan)) and call.route.entries:
            self.release(call.route)

    # ---- the Tier verbs -------------------------------------------------------------------
    def clear(self) -> None:
        self.store.clear()
        self.kv_dtypes.clear()
        self.tracks.clear()

    def invalidate(self, dtype: torch.dtype, device: torch.device) -> None:
        self.store.clear(dtype, device)
        self.kv_dtypes.clear()
        self.tracks.clear()
        if self.embeddings is not None:
            self.embeddings.clear()
        self.shared_fingerprint = None  # (hashed again, from the new weights, at the next lookup)

    def report(self, counters) -> dict:
        c = counters
        from ..layerwise import LayerStats

        layers = [LayerStats(layer=i, lookups=c.looked_up, hits=c.served, exact_hits=c.served - c.semantic_served,
                             semantic_hits=c.semantic_served, insertions=c.inserted, evictions=c.evicted)
                  for i in self.span]
        return {"tier": "exact", "layers": layers, "lookups": c.looked_up, "hits": c.served,
                "exact_hits": c.served - c.semantic_served, "semantic_hits": c.semantic_served,
                "insertions": c.inserted, "evictions": c.evicted, "entries": self.store.index.entries,
                "decode_pages": c.decode_pages,
                "bytes": self.store.held_bytes, "bytes_reserved": self.store.arena.reserved_bytes}

    def held(self) -> list:
        from ...report import HeldEntry

        self.resolve_pending()
        entries, index = [], self.store.index
        for e in index.live():
            info = index.describe(e)
            if info.label is None:  # (a pixel model's row: its key is a digest of its pixels)
                key = {"ids": (), "positions": (), "types": (), "namespace": "", "dtype": "", "switches": ""}
            else:
                key = rows.describe_label(info.label)
            entries.append(HeldEntry(tuple(np.asarray(key["ids"]).tolist()), tuple(np.asarray(key["positions"]).tolist()),
                                     tuple(np.asarray(key["types"]).tolist()), key["namespace"], info.pages,
                                     info.pages * self.store.arena.page_bytes, info.hits, info.serial,
                                     info.parent_serial, f"{key['dtype']};{key['switches']}"))
        return entries

    def resolve_pending(self) -> None:
        """Check the pending finiteness flags now (a host read: `save` and `held`)."""
        counts: dict = {}
        self.store.resolve_pending(counts)
        self.owner.count_reasons(counts)

    def fingerprint(self, base) -> bytes:
        arena = self.store.arena
        return model_fingerprint(base, self.span, arena.features, arena.dtype)

    def _shared_fingerprint(self) -> bytes:
        """`fingerprint`, kept between forwards for the shared tier (every forward checks the
        model's state first, which drops it when the function changed)."""
        if self.shared_fingerprint is None:
            self.shared_fingerprint = self.fingerprint(self.base)
        return self.shared_fingerprint

    def state_dict(self, fingerprint: bytes) -> tuple[dict, dict]:
        self.resolve_pending()
        tensors = {f"exact.{k}": v for k, v in self.store.state_dict(fingerprint).items()}
        meta = {"kv_layout": {str(p): list(layout) for p, layout in self.kv_layout.items()},
                "kv_dtypes": {s.hex(): str(d) for s, d in self.kv_dtypes.items()},
                "formats": {str(p): n for p, n in self.formats.items()}}
        return tensors, {"exact": meta}

    def load_state_dict(self, tensors: dict, meta: dict, fingerprint: bytes):
        meta = meta.get("exact", {})
        saved = {k[len("exact."):]: v for k, v in tensors.items() if k.startswith("exact.")}
        index, arena = self.store.load_state_dict(saved, fingerprint)
        kv_layout = {int(p): tuple(int(v) for v in layout) for p, layout in meta.get("kv_layout", {}).items()}
        kv_dtypes = {bytes.fromhex(s): getattr(torch, d.split(".")[-1]) for s, d in meta.get("kv_dtypes", {}).items()}
        formats = {int(p): int(n) for p, n in meta.get("formats", {}).items()}
        return index, arena, kv_layout, kv_dtypes, formats

    def adopt(self, built) -> None:
        index, arena, self.kv_layout, self.kv_dtypes, formats = built
        self.store.adopt(index, arena)
        self.formats.update(formats)
