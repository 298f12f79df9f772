"""The shared tier behind the exact tier's device bank: rows that miss the index are looked up in
Redis (one round trip per forward) and copied into the bank, so routing serves them as local
hits; a decoder's pages that miss it are looked up as chains (each row's pages after its longest
local run: two round trips per forward at most) and copied in before routing, so a prefix that
another replica computed is a local prefix hit. Committed entries (pages with the key of the page
they extend) are handed to the shared client's background writer.

The Redis client itself (batched reads, the writer, the breaker, `SharedStats`) is
`llmcache.shared`; this is the exact tier's side of it, and a `Tier` for `stats`, `reset` and
`disable`.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import rows
from ..base import Tier
from .plan import Plan


class Remote(Tier):
    """The shared tier of one exact tier (`CacheConfig.shared`)."""

    def __init__(self, settings):
        try:
            from ...shared import SharedTier
        except ImportError as err:
            raise ImportError("CacheConfig.shared needs the redis client: pip install redis") from err
        self.client = SharedTier(settings)

    def warm(self, store, keyed, fingerprint: bytes) -> None:
        """Look the rows of `keyed` (`route.RowKeys`) that miss the index up in Redis (one round
        trip) and copy what it serves into the store (pinned). `fingerprint`: the model's
        (`ExactTier.fingerprint`), which every value must carry."""
        wanted, seen = [], set()
        for r, key in enumerate(keyed.keys):
            if key is not None and store.index.find(key) < 0 and key not in seen:
                seen.add(key)
                wanted.append((key, int(keyed.count[r]), keyed.label(r)))
        if not wanted:
            return
        prefix = self.client.settings.key_prefix(rows.current_namespace())
        found = self.client.fetch(prefix, fingerprint, [(key, n) for key, n, _ in wanted], store.arena.features,
                                  store.arena.dtype)
        store.insert([(key, held, label, b"") for (key, _, label), held in zip(wanted, found) if held is not None])

    def warm_pages(self, store, fingerprint: bytes, flat: list, pages: int, count, headers: list, host, start,
                   page: int) -> None:
        """Look a decoder batch's pages that miss the index up in Redis as chains (each row's pages
        after its longest run held locally; `flat`: every row's `pages` page keys, row after row;
        `count`: each row's keyed tokens from `start`) and insert the runs it serves into the
        store (pinned), parents before children."""
        batch = len(count)
        if not batch or not pages:
            return
        npages = -(-np.asarray(count) // page)
        present = (store.index.find_many(flat).reshape(batch, pages) >= 0) & (np.arange(pages)[None] < npages[:, None])
        local = np.cumprod(present, axis=1).sum(1)
        if not (local < npages).any():
            return
        wanted, chains = {}, []
        for r in np.flatnonzero(local < npages).tolist():  # (rows that miss pages: per page, its key and parent)
            chain = []
            for j in range(int(local[r]), int(npages[r])):
                key = flat[r * pages + j]
                n = min(page, int(count[r]) - j * page)
                wanted[key] = (flat[r * pages + j - 1] if j else b"", n, (headers[r], host, r, int(start[r]) + j * page, n))
                chain.append(key)
            chains.append(chain)
        prefix = self.client.settings.key_prefix(rows.current_namespace())
        pages_of = {k: v[:2] for k, v in wanted.items()}
        found = self.client.fetch_pages(prefix, fingerprint, pages_of, chains, store.arena.features, store.arena.dtype)
        store.insert([(key, found[key], wanted[key][2], wanted[key][0]) for key in wanted if key in found])
        if self.client.settings.wait > 0:
            self._claim_or_wait(store, fingerprint, prefix, wanted, pages_of, chains, found)

    def _claim_or_wait(self, store, fingerprint: bytes, prefix: bytes, wanted: dict, pages_of: dict, chains: list,
                       found: dict) -> None:
        """`Shared.wait`: each chain that still lacks two or more pages claims its first missing
        one; where another replica holds that claim, wait for its pages, then read them."""
        rest = {}  # first missing page -> the chain from it
        for chain in chains:
            held = next((i for i, key in enumerate(chain) if key not in found), len(chain))
            if len(chain) - held >= 2:
                rest.setdefault(chain[held], chain[held:])
        lost = self.client.claim(prefix, fingerprint, list(rest))
        if not lost:
            return
        self.client.await_release(prefix, fingerprint, lost)
        more = self.client.fetch_pages(prefix, fingerprint, pages_of, [rest[key] for key in lost], store.arena.features,
                                       store.arena.dtype)
        store.insert([(key, more[key], wanted[key][2], wanted[key][0]) for key in wanted if key in more])

    def share(self, store, entries: list, ntokens: list, dst: torch.Tensor, fingerprint: bytes) -> None:
        """Hand the committed `entries` (-1: not committed) to the writer; their states are at
        arena rows `dst`, just written (under the owner's lock, so no eviction has reused them)."""
        # One copy of the batch's stored tokens (the arena's rows may be reused after this call);
        # the queue holds views of it.
        full = store.arena.read(dst)
        items, at = [], 0
        for entry, n in zip(entries, ntokens):
            if entry >= 0:
                items.append((store.index.key(entry), full[at : at + n], store.index.parent_key(entry)))
            at += n
        if items:
            prefix = self.client.settings.key_prefix(rows.current_namespace())
            self.client.put(prefix, fingerprint, items, store.arena.dtype)

    def finish(self, call, output, top: bool) -> None:
        """A forward the block splice routed computed its tokens: what a shared hit saves."""
        if not top and isinstance(call.route, Plan):
            self.client.computed(call.elapsed, call.route.tokens[1])

    def computed(self, seconds: float, tokens: int) -> None:
        """A forward computed `tokens` tokens in `seconds` (a decoder's suffix run)."""
        self.client.computed(seconds, tokens)

    def flush(self, timeout: float) -> bool:
        return self.client.flush(timeout)

    # ---- the Tier verbs -------------------------------------------------------------------
    def clear(self) -> None:
        """(Its entries stay in Redis: other replicas serve them, and this one warms from them again.)"""

    def report(self, counters) -> dict:
        return {"shared": self.client.snapshot()}

    def reset_stats(self) -> None:
        self.client.reset_stats()

    def close(self) -> None:
        self.client.close()
