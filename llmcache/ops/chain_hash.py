"""Content-addressed keys of token pages: BLAKE2b chained over each row, for a whole batch at once.

The exact tier keys every row (a whole row, or a decoder's pages) by this hash of what decides
its states, chained from a seed that holds the forward's key header (namespace, model state), so
the same prefix has the same key in every process and a page's key names its whole prefix (the
form vLLM's and LMCache's page keys take). 256-bit BLAKE2b: finding two inputs with one key is a
2^128 search, so no collision can be crafted and none happens by chance. A host op: it runs on
the router's host copy of the batch. Kernels: csrc/cpu/chain_hash.cpp, reference.chain_hash.
"""

from __future__ import annotations

import torch

from . import reference
from ._library import LIB, check, check_tensor, direct, fill_missing_kernels, resolve_backend

DIGEST = reference.CHAIN_DIGEST

LIB.define("chain_hash(Tensor seeds, Tensor tokens, Tensor start, Tensor count, int page, int pages) -> Tensor")


@torch.library.register_fake("llmcache::chain_hash")
def _chain_hash_fake(seeds, tokens, start, count, page, pages):
    return seeds.new_empty((tokens.shape[1], pages, DIGEST))


fill_missing_kernels("chain_hash", None, reference.chain_hash)


def chain_hash(seeds: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, count: torch.Tensor, page: int,
               pages: int, *, backend: str | None = None) -> torch.Tensor:
    """uint8 [B, pages, 32]: the chained key of every page of every row (`reference.chain_hash`
    states the contract).

    Args:
        seeds: uint8 [B, 32], each row's key before its first page.
        tokens: int64 [C, B, T] on the CPU, the channels hashed per token (ids, mask, positions, types).
        start, count: int64 [B], each row's span.
        page: tokens per page (a row's last page may be shorter); pages: pages per row returned.
    """
    check_tensor("tokens", tokens, dtypes=(torch.int64,), ndim=3, device=torch.device("cpu"))
    batch = tokens.shape[1]
    check_tensor("seeds", seeds, dtypes=(torch.uint8,), ndim=2, device=tokens.device)
    check(tuple(seeds.shape) == (batch, DIGEST), f"seeds must be [B={batch}, {DIGEST}], got {tuple(seeds.shape)}")
    for name, t in (("start", start), ("count", count)):
        check_tensor(name, t, dtypes=(torch.int64,), ndim=1, device=tokens.device)
        check(t.shape[0] == batch, f"{name} must have shape [B={batch}], got {tuple(t.shape)}")
    check(bool(((start >= 0) & (count >= 0) & (start + count <= tokens.shape[2])).all()),
          "every row's span start..start+count must lie in [0, T)")
    check(page > 0 and pages >= 0, f"page must be positive and pages non-negative, got {page}, {pages}")
    return chain_hash_unchecked(seeds, tokens, start, count, page, pages, backend=backend)


def chain_hash_unchecked(seeds, tokens, start, count, page: int, pages: int, *, backend: str | None = None):
    """`chain_hash` without the Python argument checks (the routing's own calls: valid by
    construction; the C++ kernel still checks the spans). Eager calls on plain tensors take the
    kernel without the dispatcher (as `write_rows` does); fake and functional tensors the op."""
    name = resolve_backend(backend, torch.device("cpu"))
    if name == "reference":
        return reference.chain_hash(seeds, tokens, start, count, page, pages)
    ext = direct(tokens) if name in ("auto", "cpp") else None
    if ext is not None:
        return ext.chain_hash(seeds, tokens, start, count, int(page), int(pages))
    return torch.ops.llmcache.chain_hash(seeds, tokens, start, count, int(page), int(pages))
