"""Decoders: what a KV cache grows by after its prefill (generate's decode steps) is stored as pages too.

A chat's next turn repeats the last prompt and the model's answer to it; vLLM and SGLang keep a
finished sequence's blocks, generated tokens included, and so does this, from the K/V the model
already computed (nothing runs again). A prefill this tier routes with an empty DynamicCache of
full-attention layers (generate's) starts a `Track` of that cache: per row, the key of its last
full page (its chain goes on from there) and its tokens after that page. Each decode step on that
cache is routed as a `Step`: the model runs as it would, and the step's input tokens and the last
cached block's output at them are recorded (device tensors; the host work is a state check); the
K/V stay in the cache. Once every row has completed a page since the last write (or one row two),
and when `generate` returns, the full pages completed are written in one batch (`Tracks.write`):
keys chained on from each row's last page (`rows.chain_keys(after=...)`), states from the
recorded outputs and the cache's K/V, reserved and committed as a prefill's pages are (the shared
tier writes them too). A write copies the steps' tokens to the host: one synchronisation, at a
point where `generate` waits for every step's tokens anyway.

Rows are kept right-aligned: a row's pending tokens are the last `lens[r]` columns of the cache.
What is stored is never another state's or another sequence's: a step under another model state
(an adapter switched, autocast changed), weights that changed (every entry is dropped), a cache
that is not as the last recorded forward left it (reordered by beam search, cropped, reset: its
first layer's K/V tensors were replaced or modified) or a row whose last page was evicted ends the
track or the row, and what it would have stored is not stored. In a decode loop of one's own (no
`generate`) the pages completed after the last write are not stored.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ... import rows
from ..base import Route
from . import plan as plans


def _version(tensor: torch.Tensor) -> int | None:
    """Its version counter (None: an inference tensor, which keeps none; only its identity tells)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


@dataclass
class Step(Route):
    """The route of a decode step of a tracked cache: the model runs as it would; the cache records."""

    track: object = None


@dataclass
class _Pages:
    """What `ExactTier.commit` takes: the reserved entries and their token counts."""

    entries: list
    store_n: list


class Track:
    """One followed KV cache (see the module docstring); arrays indexed by batch row."""

    def __init__(self, cache, switches: bytes, headers: list, after: np.ndarray, linked: np.ndarray,
                 host: np.ndarray, lens: np.ndarray, tail_keys: list, active: np.ndarray, columns: int):
        self.ref, self.strong = weakref.ref(cache), None
        self.switches, self.headers = switches, headers
        self.after, self.linked = after, linked  # uint8 [B, 32] the chain's last key; whether it is a page's
        self.host, self.lens = host, lens  # int64 [3, B, W] pending ids/positions/types, right-aligned; [B]
        self.tail_keys, self.active, self.columns = tail_keys, active, columns
        self.tail_width = host.shape[2]
        self.states: torch.Tensor | None = None  # [B, W, D] the pending tokens' last-block outputs
        self.steps: list = []  # per step since the last write: (ids, positions, types [B, k], outputs [B, k, D])
        self.seen: tuple | None = None  # the cache's first tracked layer's K and V as the last forward left them
        self.since = 0  # columns the steps recorded since the last write add


class Tracks:
    """The tracked caches of one exact tier (decoders)."""

    def __init__(self, tier):
        self.tier = tier
        self.tracks: dict[int, Track] = {}  # id(cache) -> its track
        self.local = threading.local()  # .scopes: a list per `generate` call under way, of the tracks it started

    # ---- following --------------------------------------------------------------------
    def start(self, call, rows_, seq: int) -> Track | None:
        """Follow `call`'s KV cache from this prefill on (routed rows `rows_`: `prefix._Rows`).
        Under the owner's lock."""
        from .suffix import _plain_and_empty

        cache = call.kv_cache
        if cache is None or not _plain_and_empty(cache) or call.arguments.get("use_cache") is False:
            return None
        page = self.tier.store.config.page_tokens
        n, start = np.asarray(rows_.n_real, dtype=np.int64), np.asarray(rows_.start, dtype=np.int64)
        active = np.asarray(rows_.keyed) & (rows_.pads == 0) & (np.asarray(rows_.trailing) == 0) & (start + n == seq)
        if not active.any():
            return None
        full = n // page
        lens = np.where(active, n - full * page, 0)
        width = int(lens.max())
        cols = seq - width + np.arange(width)
        host = rows_.host[:, :, cols][[0, 2, 3]] if width else np.zeros((3, rows_.batch, 0), dtype=np.int64)
        after = np.zeros((rows_.batch, 32), dtype=np.uint8)
        tail_keys = []
        for r in range(rows_.batch):  # (per row of a prefill, once: its chain's last key and tail page)
            last = rows_.page_key(r, full[r] - 1) if active[r] and full[r] else rows.chain_seed(b"P", rows_.headers[r])
            after[r] = np.frombuffer(last, dtype=np.uint8)
            tail_keys.append(rows_.page_key(r, full[r]) if active[r] and lens[r] else None)
        track = Track(cache, call.switches, rows_.headers, after, active & (full > 0), host, lens, tail_keys, active,
                      seq)
        self._prune()
        self.tracks[id(cache)] = track
        scopes = getattr(self.local, "scopes", None)
        if scopes:
            scopes[-1].append(track)
            track.strong = cache  # (generate drops its cache before it returns: kept until the last write)
        return track

    def ran(self, track: Track) -> None:
        """The forward that started `track` (or recorded a step) ran: what the cache holds now."""
        cache = track.ref()
        layer = cache.layers[self.tier.layer_idx(0)] if cache is not None and cache.layers else None
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            track.seen = None
            return
        track.seen = (weakref.ref(keys), _version(keys), weakref.ref(values), _version(values))

    def _unchanged(self, track: Track, cache) -> bool:
        """The cache holds what the last recorded forward left (not reordered, cropped or reset:
        those replace or modify its tensors)."""
        seen = track.seen
        if seen is None or cache.get_seq_length() != track.columns:
            return False
        layer = cache.layers[self.tier.layer_idx(0)]
        return layer.keys is seen[0]() and _version(layer.keys) == seen[1] and layer.values is seen[2]() \
            and _version(layer.values) == seen[3]

    def follows(self, cache) -> Track | None:
        track = self.tracks.get(id(cache)) if cache is not None else None
        return track if track is not None and track.ref() is cache else None

    def step(self, call, reason: str | None) -> Step | None:
        """The route of a decode step on a followed cache, or None (the track ends). Under the lock."""
        track = self.follows(call.kv_cache)
        ids = call.arguments.get("input_ids")
        if track is None:
            return None
        if reason is not None or call.switches != track.switches or not self._unchanged(track, call.kv_cache) \
                or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(track.lens):
            self.end(track)
            return None
        return Step(track=track)

    def stepped(self, call) -> None:
        """A routed decode step ran: record its tokens and outputs; write the pages due."""
        track, args = call.route.track, call.arguments
        captured = call.capture or []
        ids = args["input_ids"]
        k = ids.shape[1]
        out = captured[-1] if captured else None
        if out is None or out.shape[:2] != ids.shape:
            with self.tier.owner.lock:
                self.end(track)
            return
        positions = args.get("position_ids")
        if positions is None:
            positions = args.get("cache_position")
            positions = torch.arange(track.columns, track.columns + k, device=ids.device) if positions is None \
                else positions
        types = args.get("token_type_ids")
        track.steps.append((ids, positions, types, out))  # (broadcast to [B, k] when written)
        track.columns += k
        track.since += k
        self.ran(track)
        full = np.where(track.active, track.lens + track.since, 0) // self.tier.store.config.page_tokens
        if full.max() >= 2 or full[track.active].min() >= 1:
            with self.tier.owner.lock:
                self.write(track)

    @contextlib.contextmanager
    def generating(self):
        """The scope of one `generate` call: the tracks it starts are written out when it returns."""
        scopes = self.local.__dict__.setdefault("scopes", [])
        scopes.append([])
        try:
            yield
        finally:
            for track in scopes.pop():
                with self.tier.owner.lock:
                    if self.tracks.get(id(track.strong)) is track:
                        self.write(track, final=True)
                    self.end(track)

    def end(self, track: Track) -> None:
        if self.tracks.get(id(track.ref())) is track:
            del self.tracks[id(track.ref())]
        track.strong, track.steps, track.states = None, [], None

    def clear(self) -> None:
        for track in list(self.tracks.values()):
            self.end(track)
        self.tracks.clear()

    def _prune(self) -> None:
        for key in [key for key, track in self.tracks.items() if track.ref() is None]:
            del self.tracks[key]

    # ---- writing ----------------------------------------------------------------------
    def write(self, track: Track, final: bool = False) -> None:
        """Store the full pages the track's rows completed since its last write (under the lock);
        `final` (generate returned): also each row's last partial page, which the next turn's
        prompt continues (`prefix._partial_pages` finds it)."""
        cache = track.ref()
        if cache is None or not self._unchanged(track, cache):
            self.end(track)
            return
        page = self.tier.store.config.page_tokens
        pending = np.where(track.active, track.lens + track.since, 0)
        tails = final and (track.since > 0 or track.states is not None) and bool(pending.any())
        if not (pending >= page).any() and not tails:
            return  # (no page complete: nothing to copy to the host yet)
        new = self._take_steps(track)
        if new is not None:
            if track.states is None:
                track.states = self._tail_states(track, new)
            track.states = torch.cat([track.states, new], 1)
        full = np.where(track.active, track.lens // page, 0)
        if full.any():
            reserved = _reserve(self.tier, track, full)
            if reserved is not None:
                _store(self.tier, track, cache, full, *reserved)
        lens = np.where(track.active, track.lens - full * page, 0)
        width = int(lens.max())
        track.host, track.lens = track.host[:, :, track.host.shape[2] - width :], lens
        track.states = track.states[:, track.states.shape[1] - width :]
        if tails:
            _store_tails(self.tier, track, cache)
        if not track.active.any():
            self.end(track)

    def _take_steps(self, track: Track) -> torch.Tensor | None:
        """The recorded steps' tokens onto the pending ones (one host copy); their outputs [B, k, D]."""
        steps, track.steps, track.since = track.steps, [], 0
        if not steps:
            return None
        ids = torch.cat([s[0] for s in steps], 1)
        fields = [ids] + [torch.cat([ids.new_zeros(()).expand_as(s[0]) if s[i] is None else s[i].expand_as(s[0])
                                     for s in steps], 1) for i in (1, 2)]
        tokens = torch.stack([f.long() for f in fields]).cpu().numpy()
        track.host = np.concatenate([track.host, tokens], axis=2)
        track.lens = np.where(track.active, track.lens + tokens.shape[2], 0)
        return torch.cat([s[3] for s in steps], 1)

    def _tail_states(self, track: Track, like: torch.Tensor) -> torch.Tensor:
        """[B, W, D]: the prefill's tail tokens' outputs (W: its pending width), read from their
        page in the bank. A row whose tail page is gone ends."""
        store, index = self.tier.store, self.tier.store.index
        batch, width = len(track.lens), track.tail_width
        states = like.new_zeros((batch, width, like.shape[-1]))
        tails = [(r, index.find(key)) for r, key in enumerate(track.tail_keys) if key is not None and track.active[r]]
        gone = [r for r, entry in tails if entry < 0]
        track.active[gone] = False
        tails = [(r, entry) for r, entry in tails if entry >= 0]
        if tails:
            src = index.token_rows([entry for _, entry in tails])
            counts = np.asarray([len(index.token_rows(entry)) for _, entry in tails], dtype=np.int64)
            at = np.asarray([r for r, _ in tails], dtype=np.int64)
            dst = plans.runs(at * width + width - counts, counts)
            read = store.arena.read(plans.upload({"src": src}, store.arena.device)["src"])[:, : like.shape[-1]]
            states.view(-1, like.shape[-1]).index_copy_(0, plans.upload({"dst": dst}, like.device)["dst"],
                                                       read.to(like.dtype))
        return states


def _reserve(tier, track: Track, full: np.ndarray):
    """Keys of the new full pages (flattened row after row: `row`, `j` its page in the row),
    which of them the index holds (`found`), and entries reserved for the others (`got`, one
    per distinct new key, `place` saying whose)."""
    index, page = tier.store.index, tier.store.config.page_tokens
    batch, width = track.lens.shape[0], track.host.shape[2]
    start = width - track.lens
    host = np.stack([track.host[0], np.ones_like(track.host[0]), track.host[1], track.host[2]])
    parent_of_row = np.full(batch, -1, dtype=np.int64)
    linked = np.flatnonzero(track.linked & (full > 0))
    if len(linked):
        parent_of_row[linked] = index.find_many(rows.split_keys(track.after[linked]))
        gone = linked[parent_of_row[linked] < 0]  # (the page it extends was evicted: its pages could not be found)
        track.active[gone], full[gone] = False, 0
    if not full.any():
        return None
    keys = rows.chain_keys(b"P", track.headers, host, start, full * page, page, after=track.after)
    row = np.repeat(np.arange(batch), full)
    j = np.arange(len(row)) - np.repeat(np.cumsum(full) - full, full)
    flat_keys = np.ascontiguousarray(keys[row, j])
    flat = rows.split_keys(flat_keys)
    found = index.find_many(flat)
    # Each new key reserved once (two rows that generated the same tokens share its page).
    missing = np.flatnonzero(found < 0)
    place = np.full(len(flat), -1, dtype=np.int64)
    new = missing[:0]
    if len(missing):
        _, first, inverse = np.unique(flat_keys[missing].view("V32").ravel(), return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        place[missing] = rank[inverse.ravel()]
        new = missing[np.sort(first)]
    parent = np.where(j == 0, parent_of_row[row], 0)
    later = np.flatnonzero(j > 0)
    prev = later - 1
    parent[later] = np.where(found[prev] >= 0, found[prev], -2 - place[prev])
    labels = [(track.headers[row[i]], host, int(row[i]), int(start[row[i]] + j[i] * page), page) for i in new.tolist()]
    got = index.reserve_many([flat[i] for i in new.tolist()], [page] * len(new), parent[new], labels) if len(new) else []
    return keys, row, j, found, place, new, np.asarray(got, dtype=np.int64)

def _store(tier, track: Track, cache, full, keys, row, j, found, place, new, got) -> None:
    """Write the reserved pages' states and publish them; each row's chain moves on to its last page."""
    page = tier.store.config.page_tokens
    batch, width = len(full), track.host.shape[2]
    entry = np.where(found >= 0, found, np.append(got, -1)[place])
    broken = np.zeros(batch, dtype=bool)
    np.logical_or.at(broken, row, entry < 0)  # (a page that got no room: the row's chain stops here)
    track.active &= ~broken
    moved = np.flatnonzero((full > 0) & ~broken)
    track.after[moved], track.linked[moved] = keys[moved, full[moved] - 1], True
    written = new[got >= 0]
    if len(written):
        start = width - track.lens
        _commit(tier, track, cache, got[got >= 0].tolist(), row[written] * width + start[row[written]] + j[written] * page,
                np.full(len(written), page))


def _store_tails(tier, track: Track, cache) -> None:
    """Each active row's pending tokens (fewer than a page) as a partial page after its last page."""
    index, page = tier.store.index, tier.store.config.page_tokens
    lens, width = np.where(track.active, track.lens, 0), track.host.shape[2]
    rows_ = np.flatnonzero(lens > 0)
    if not len(rows_):
        return
    start = width - lens
    host = np.stack([track.host[0], np.ones_like(track.host[0]), track.host[1], track.host[2]])
    keys = rows.split_keys(rows.chain_keys(b"P", track.headers, host, start, lens, page, after=track.after)[rows_, 0])
    parents = np.where(track.linked[rows_], index.find_many(rows.split_keys(track.after[rows_])), -1)
    new: dict[bytes, int] = {}  # key -> its row (two rows with one tail: stored once)
    for key, r, parent, held in zip(keys, rows_.tolist(), parents.tolist(), index.find_many(keys).tolist()):
        if held < 0 and (parent >= 0 or not track.linked[r]):
            new.setdefault(key, r)
    if not new:
        return
    owners = np.asarray(list(new.values()), dtype=np.int64)
    labels = [(track.headers[r], host, r, int(start[r]), int(lens[r])) for r in owners.tolist()]
    got = np.asarray(index.reserve_many(list(new), lens[owners], parents[np.searchsorted(rows_, owners)], labels))
    if (got >= 0).any():
        _commit(tier, track, cache, got[got >= 0].tolist(), (owners * width + start[owners])[got >= 0],
                lens[owners][got >= 0])


def _commit(tier, track: Track, cache, entries: list, first: np.ndarray, counts: np.ndarray) -> None:
    """Write reserved `entries` from the pending tokens (flat [B * W] positions `first`, `counts`
    of them each) and publish them."""
    width = track.host.shape[2]
    src = plans.runs(first, counts)
    dev = plans.upload({"src": src, "dst": tier.store.index.token_rows(entries)}, track.states.device)
    layers = [cache.layers[tier.layer_idx(p)] for p in range(tier.geometry.blocks)]
    # A token's row: the output, then per block K then V [B, heads, W, head dim] (`ops.write_rows`).
    pieces = [track.states.unsqueeze(1)] + [t[:, :, -width:] for layer in layers for t in (layer.keys, layer.values)]
    tier.commit(_Pages(entries, counts.tolist()), dev["dst"], pieces, dev["src"])
    tier.owner.counters.decode_pages += len(entries)
