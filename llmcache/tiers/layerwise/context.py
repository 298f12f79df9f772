"""The per-block tier's record of one forward: each row's tag, key and fingerprint.

Every row gets a tag (token count, namespace, first position and padding side packed in one
int64: an entry only answers rows with the same tag), a 64-bit hash of its tokens
(`rows.token_keys`), and, from the input embedding's hook, a SimHash fingerprint of the mean of
its input token embeddings. A pixel model's context is made at its first block, once the patch
embedding tells how many positions an image has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...rows import first_index, make_tag, tag_fits, token_keys
from ..base import Route


@dataclass
class LayerwiseRoute(Route):
    """A forward the per-block tier routes: its context (None until a pixel model's first block)."""

    context: object | None = None  # ForwardContext
    pixel_codes: torch.Tensor | None = None  # int64 [B, W]: a pixel model's patch-embedding fingerprints


@dataclass
class ForwardContext:
    """What one forward pass of the base model knows about its rows."""

    mask: torch.Tensor  # [B, T] 1 = token
    tags: torch.Tensor  # int64 [B]; negative = never cached
    keys: torch.Tensor  # int64 [B]
    cacheable: torch.Tensor  # bool [B]
    store: torch.Tensor  # bool [B]: cacheable, and the first row of the batch with its key
    rows: torch.Tensor  # int64 [B]: 0..B-1
    source: torch.Tensor  # int64 [B]: a cacheable row repeating an earlier row's key: that row; else itself
    own: torch.Tensor  # bool [B]: source == rows
    n_repeats: int  # rows with source != themselves
    align_end: bool  # left padding
    codes: torch.Tensor | None = None  # int64 [B, W] input-embedding fingerprints
    kv_cache: object | None = None  # the model's DynamicCache, when decoding with one
    n_cacheable: int = 0
    _zero_codes: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def zero_codes(self, words: int) -> torch.Tensor:
        """int64 [B, words] of zeros: the codes stored when nothing fingerprints."""
        if self._zero_codes is None or self._zero_codes.shape[1] != words:
            self._zero_codes = torch.zeros(self.batch, words, dtype=torch.int64, device=self.mask.device)
        return self._zero_codes


def token_context(owner, header: bytes, ids, mask, positions, types, kv_cache) -> ForwardContext:
    """The per-forward context of the per-block tier (ids, mask, positions, types: [B, T] on the
    device; `header`: the forward's `rows.key_header`, namespace and model state)."""
    batch, seq = ids.shape
    ntokens = (mask != 0).sum(1)
    left_padded = bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any())
    cfg = owner.config
    cacheable = (ntokens > 0) & (ntokens <= cfg.layerwise.max_tokens)
    first = torch.where(mask != 0, torch.arange(seq, device=mask.device), seq).amin(1).clamp_max(seq - 1)
    first_position = positions.gather(1, first.unsqueeze(1)).squeeze(1)
    cacheable &= tag_fits(first_position, ntokens)
    tags = make_tag(owner.namespace_id(header), first_position.clamp_min(0), ntokens, left_padded)
    tags = torch.where(cacheable, tags, -1 - torch.arange(batch, device=mask.device))
    keys = token_keys(ids, mask, positions, types) ^ (owner.weights_epoch * 0x5851F42D4C957F2D)
    return _context(mask, tags, keys, cacheable, left_padded, kv_cache)


def pixel_context(owner, header: bytes, hashes: torch.Tensor, hidden: torch.Tensor, codes) -> ForwardContext:
    """The context of a pixel model's forward, made at its first cached block: `hashes` int64 [B, 2]
    (`rows.pixel_hashes` of the images), `hidden` [B, T, D] the block's input, `codes` the SimHash
    of each image's mean patch embedding (`LayerwiseTier.embed`; None when not fingerprinted).
    Every image of one model has the same T, so the tag is the header (namespace and state) and T."""
    batch, seq = hidden.shape[:2]
    mask = torch.ones(batch, seq, dtype=torch.int64, device=hidden.device)
    ntokens = torch.full((batch,), seq, dtype=torch.int64, device=hidden.device)
    start = torch.zeros_like(ntokens)
    cacheable = tag_fits(start, ntokens) & (ntokens <= owner.config.layerwise.max_tokens)
    tags = torch.where(cacheable, make_tag(owner.namespace_id(header), start, ntokens, False),
                       -1 - torch.arange(batch, device=hidden.device))
    hashes = hashes.to(hidden.device)
    keys = hashes[:, 0] ^ (hashes[:, 1] * 0x632BE59BD9B4E019) ^ (owner.weights_epoch * 0x5851F42D4C957F2D)
    ctx = _context(mask, tags, keys, cacheable, False, None)
    ctx.codes = codes
    return ctx


def _context(mask, tags, keys, cacheable, left_padded: bool, kv_cache) -> ForwardContext:
    batch = mask.shape[0]
    # A cacheable row repeating an earlier row of the same batch is computed once: every layer
    # serves it its first occurrence's states.
    rows = torch.arange(batch, device=mask.device)
    source = torch.where(cacheable, first_index(keys), rows)
    own = source == rows
    store = cacheable & own
    n_cacheable = int(cacheable.sum())
    return ForwardContext(
        mask=mask, tags=tags, keys=keys, cacheable=cacheable, store=store, rows=rows, source=source, own=own,
        n_repeats=n_cacheable - int(store.sum()), align_end=left_padded, kv_cache=kv_cache, n_cacheable=n_cacheable,
    )
