"""Pure-PyTorch reference of every llmcache op: the specification, the fallback and the test oracle.

Nothing here is fast. Each function states the exact contract that the C++, CUDA and Triton
kernels reproduce bit for bit (integers) or up to the rounding rule of SimHash (see `simhash`).
"""

from __future__ import annotations

import torch

# SWAR popcount constants as signed int64 (torch has no uint64 arithmetic).
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101
# Bit j of a 64-bit word as a signed int64 (bit 63 is the sign bit).
_BIT_VALUES = [1 << j if j < 63 else -(1 << 63) for j in range(64)]
# Rows scanned per step of the reference lookup: bounds its [B, chunk, W] temporary.
_REF_CHUNK = 1 << 14


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Per-element popcount of an int64 tensor (two's complement bits), as int64."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56) & 0xFF


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor `[..., nbits]` (nbits % 64 == 0) into int64 words `[..., nbits // 64]`.

    Bit j lands in word j // 64 at bit position j % 64.
    """
    *lead, nbits = bits.shape
    weights = torch.tensor(_BIT_VALUES, dtype=torch.int64, device=bits.device)
    words = bits.reshape(*lead, nbits // 64, 64).to(torch.int64) * weights
    return words.sum(-1)


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """codes[b, j // 64] bit j%64 = (sum_i x[b, i] * planes[i, j] >= 0), accumulated in fp32.

    Args: x float [B, d]; planes float [d, nbits]. Returns int64 [B, nbits // 64].
    """
    proj = x.float() @ planes.float()
    return pack_bits(proj >= 0)


def masked_mean(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask != 0: [B, T, d] x [B, T] -> fp32 [B, d] (0 for empty rows)."""
    weight = (mask != 0).to(torch.float32).unsqueeze(-1)
    total = (embeds.float() * weight).sum(1)
    return total / weight.sum(1).clamp_min(1.0)


def simhash_pooled(embeds: torch.Tensor, mask: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash of the masked mean of token embeddings: the paper's fingerprint f(X) = SimHash(Avg(E(X))).

    Args: embeds float [B, T, d]; mask bool/int [B, T] (0 = padding); planes float [d, nbits].
    Returns int64 [B, nbits // 64]. A row with no token gets the code of the zero vector (all ones).
    """
    return simhash(masked_mean(embeds, mask), planes)


def eligible_mask(
    num_queries: int,
    bank_rows: int,
    device: torch.device,
    valid: torch.Tensor | None,
    query_tag: torch.Tensor | None,
    bank_tag: torch.Tensor | None,
) -> torch.Tensor:
    """[B, N] bool: slot n may answer query b (valid, and same tag when tags are given)."""
    ok = torch.ones(num_queries, bank_rows, dtype=torch.bool, device=device)
    if valid is not None:
        ok &= valid.bool().unsqueeze(0)
    if query_tag is not None:
        ok &= query_tag.unsqueeze(1) == bank_tag.unsqueeze(0)
    return ok


def hamming_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    valid: torch.Tensor | None = None,
    query_tag: torch.Tensor | None = None,
    bank_tag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k eligible bank rows nearest to each query in Hamming distance.

    Args: queries int64 [B, W]; bank int64 [N, W]; valid bool [N] or None; query_tag int64 [B]
    and bank_tag int64 [N], both or neither: slot n is eligible for query b when valid[n] and
    bank_tag[n] == query_tag[b].
    Returns (dist int32 [B, k], idx int64 [B, k]) ascending by distance, ties to the smaller
    index; missing answers are idx = -1, dist = 64 * W + 1.
    """
    num_queries, words = queries.shape
    bank_rows = bank.shape[0]
    missing = 64 * words + 1
    # Sort key dist * (N + 1) + n orders by distance, then index, in one integer.
    stride = bank_rows + 1
    sentinel = missing * stride
    best = torch.full((num_queries, 0), sentinel, dtype=torch.int64, device=queries.device)
    for start in range(0, bank_rows, _REF_CHUNK):
        stop = min(start + _REF_CHUNK, bank_rows)
        dist = popcount64(queries.unsqueeze(1) ^ bank[start:stop].unsqueeze(0)).sum(-1)
        ok = eligible_mask(
            num_queries,
            stop - start,
            queries.device,
            None if valid is None else valid[start:stop],
            query_tag,
            None if bank_tag is None else bank_tag[start:stop],
        )
        index = torch.arange(start, stop, device=queries.device)
        key = torch.where(ok, dist * stride + index, sentinel)
        merged = torch.cat([best, key], dim=1)
        best = merged.topk(min(k, merged.shape[1]), dim=1, largest=False, sorted=True).values
    if best.shape[1] < k:
        pad = torch.full((num_queries, k - best.shape[1]), sentinel, dtype=torch.int64, device=queries.device)
        best = torch.cat([best, pad], dim=1)
    found = best < sentinel
    dist = torch.where(found, best // stride, missing).to(torch.int32)
    idx = torch.where(found, best % stride, -1)
    return dist, idx


def gather_with_mask(
    values: torch.Tensor,
    slot: torch.Tensor,
    computed: torch.Tensor,
    row: torch.Tensor,
    last_used: torch.Tensor,
    hit_count: torch.Tensor,
    tick: int,
    align_end: bool = False,
) -> torch.Tensor:
    """Merge cached and freshly computed rows: out[r] = values[slot[r]] if slot[r] >= 0 else computed[row[r]].

    Args:
        values: [N, Tv, *F] the bank's stored states.
        slot: int64 [B], the bank slot of a hit, -1 for a miss.
        computed: [M, T, *F] states computed for the misses (same dtype as values).
        row: int64 [B], for a miss the row of `computed` it takes (ignored for hits).
        last_used, hit_count: int64 [N], updated in place for every slot read: last_used = tick,
            hit_count += number of rows that read it.
        align_end: the sequence axis of an entry lines up with the end of the batch's (left
            padding) instead of its start (right padding). Positions of a hit row outside the
            Tv stored ones are zero.
    Returns [B, T, *F].
    """
    batch = slot.shape[0]
    seq = computed.shape[1]
    stored = values.shape[1]
    out = computed.new_zeros((batch, seq) + tuple(computed.shape[2:]))
    hit = slot >= 0
    miss = ~hit
    out[miss] = computed[row[miss]]
    span = min(seq, stored)
    hit_slots = slot[hit]
    if align_end:
        out[hit, seq - span :] = values[hit_slots, stored - span :]
    else:
        out[hit, :span] = values[hit_slots, :span]
    last_used[hit_slots] = tick
    hit_count.index_add_(0, hit_slots, torch.ones_like(hit_slots))
    return out


CHAIN_DIGEST = 32  # bytes of a chain_hash key (BLAKE2b-256)


def chain_hash(seeds: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, count: torch.Tensor, page: int,
               pages: int) -> torch.Tensor:
    """Content-addressed keys of token pages, chained over each row: uint8 [B, pages, 32].

    Row r's span `start[r] .. start[r] + count[r]` of `tokens` int64 [C, B, T] is cut into pages
    of `page` tokens (the last may be shorter); page j's key is the 32-byte BLAKE2b digest
    (RFC 7693, `hashlib.blake2b(digest_size=32)`) of: the key of page j - 1 (page 0: `seeds[r]`,
    uint8 [B, 32]), the page's token count as uint32 little-endian, a width byte, and its tokens
    in order, each as its C channels, little-endian: as int32 (width 4) where every value of the
    page fits one, else as int64 (width 8). So a key names its page and everything before it,
    and the same prefix has the same key in every process. Pages past a row's span are zero.
    """
    import hashlib

    import numpy as np

    data = tokens.cpu().numpy()
    out = np.zeros((tokens.shape[1], pages, CHAIN_DIGEST), dtype=np.uint8)
    for r in range(tokens.shape[1]):
        prev = bytes(seeds[r].cpu().numpy())
        s, n = int(start[r]), int(count[r])
        for j in range(min(pages, -(-n // page))):
            a, b = s + j * page, s + min(n, (j + 1) * page)
            page_tokens = np.ascontiguousarray(data[:, r, a:b].T)
            narrow = bool(((page_tokens >= -(1 << 31)) & (page_tokens < (1 << 31))).all())
            body = page_tokens.astype("<i4" if narrow else "<i8").tobytes()
            message = prev + (b - a).to_bytes(4, "little") + (4 if narrow else 8).to_bytes(1, "little") + body
            prev = hashlib.blake2b(message, digest_size=CHAIN_DIGEST).digest()
            out[r, j] = np.frombuffer(prev, dtype=np.uint8)
    return torch.from_numpy(out)


def write_rows(arena: torch.Tensor, dst: torch.Tensor, src: torch.Tensor | None, pieces: list) -> torch.Tensor:
    """Write tokens into rows of `arena` [R, F]; bool [S]: whether each row written is finite.

    Every piece is [M, A, T, C] (a block's K or V [M, heads, T, head dim]; a hidden state [M, 1, T, D]),
    of the arena's dtype; token tok = m * T + t of a piece is its A vectors [m, a, t, :] one after
    another. Arena row dst[i] gets token src[i] (src None: token i) of every piece, in the pieces'
    order, A * C elements each, adding up to F. A row is finite when none of its F elements is inf or
    NaN. Same-shaped pieces in a row of the list are gathered in one stack, as a forward's blocks' K
    and V are (one copy where a copy per piece would cost a kernel each on a GPU).
    """
    batch, seq = pieces[0].shape[0], pieces[0].shape[2]
    groups: list[list[torch.Tensor]] = []
    for p in pieces:
        if groups and p.shape == groups[-1][0].shape:
            groups[-1].append(p)
        else:
            groups.append([p])
    parts = [g[0].transpose(1, 2).reshape(batch * seq, -1) if len(g) == 1 else
             torch.stack([p.transpose(1, 2) for p in g], dim=2).reshape(batch * seq, -1) for g in groups]
    parts = [p.index_select(0, src) if src is not None else p[: dst.shape[0]] for p in parts]
    finite = torch.isfinite(parts[0]).all(1)
    for p in parts[1:]:
        finite &= torch.isfinite(p).all(1)
    at = 0
    for p in parts:
        arena[:, at : at + p.shape[1]].index_copy_(0, dst, p)
        at += p.shape[1]
    return finite


def read_rows(arena: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, kv: torch.Tensor | None) -> None:
    """Read rows of `arena` [R, F] into `out` and `kv`, in place: the inverse of `write_rows` for a
    stored token's row (the output D, then per block its K then its V, heads x head dim each).

    `rows` int64 [M * T]: token i = m * T + t takes arena row rows[i] (-1: zeros, on the CPU): out
    [M, Tcap, D] at [m, t], then kv [blocks, 2, M, heads, Tcap, head dim] (None: an encoder's rows,
    the output only) at [b, w, m, :, t] for each block b, K (w = 0) then V (w = 1). T <= Tcap;
    positions t >= T are not written. (-1 only on the CPU, where finding one costs no device
    synchronisation: elsewhere this is a GPU's hot path and reads as one index_select, and
    `plan.finish`, the one caller that passes -1, does so on the CPU only.)
    """
    batch, hidden = out.shape[0], out.shape[2]
    seq = rows.shape[0] // batch if batch else 0
    if rows.device.type == "cpu" and rows.numel() and bool((rows < 0).any()):
        states = arena.index_select(0, rows.clamp(min=0)).masked_fill_((rows < 0)[:, None], 0)
    else:
        states = arena.index_select(0, rows)
    out[:, :seq].copy_(states[:, :hidden].view(batch, seq, hidden))
    if kv is not None:
        blocks, _, _, heads, _, dim = kv.shape
        kv[:, :, :, :, :seq].copy_(states[:, hidden:].view(batch, seq, blocks, 2, heads, dim).permute(2, 3, 0, 4, 1, 5))
