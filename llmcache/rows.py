"""What identifies a row: namespaces, the exact tier's keys, and the semantic tier's tags and hashes.

Exact keys (`chain_keys`): content-addressed, 32 bytes each: the BLAKE2b-256 digest
(`ops.chain_hash`, one host call for a whole batch) of everything that decides a row's output:
a seed holding the header (layout version, namespace, the model's state: dtype, autocast,
attention implementation, adapters and the other switches of `llmcache.state`) and what the
row's span holds besides its tokens (padding the caller sees, ids before it that decide
positions), then the row's real token ids, their position ids and token type ids, in order.
Trailing padding (mask == 0) is not part of it; the positions are, so a row moved by padding to
other positions (absolute or rotary embeddings) is another row. Finding two rows with one key is
a 2^128 search: no collision can be crafted, and none happens by chance.

A decoder row is keyed page by page (`page_keys`: `chain_keys` with kind b"P"): each page's key is the digest of the key of
the page before it and its own tokens, so a key names the whole prefix up to it, the longest
cached prefix of a row is its longest run of pages found from its start
(`llmcache.tiers.exact.prefix`), and the same prefix has the same key in every process.

An entry keeps a `label` beside its key, what the key was made from (`describe_label`), for
`llmcache.held` and `llmcache.save`.

Semantic tier (per-layer banks, `llmcache.tiers.layerwise`): a 64-bit hash of the same fields
(`token_keys`) and an int64 tag packing namespace, first position, token count and padding side.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .ops._library import extension, resolve_backend
from .ops.chain_hash import chain_hash_unchecked

_CPU = torch.device("cpu")
LAYOUT_VERSION = 5  # of exact keys and of what an entry stores; part of every key (5: content-addressed)

# A context variable, not a thread-local: asyncio runs many requests on one thread, and each task
# (and each `contextvars.copy_context()`, as `asyncio.to_thread` and `loop.run_in_executor` with a
# copied context use) sees only the namespaces it entered itself.
_namespace: contextvars.ContextVar[str] = contextvars.ContextVar("llmcache_namespace", default="")


def current_namespace() -> str:
    return _namespace.get()


@contextlib.contextmanager
def namespace(name: str):
    """Rows computed inside only match entries inserted under the same `name` (tenant isolation).

    Namespaces nest (the innermost wins). They follow the context, not the thread: an asyncio task
    sees the namespace it entered, never one another task entered while it waits, and a new
    thread starts in the default namespace, "" (`asyncio.to_thread` carries the caller's along).
    """
    if not isinstance(name, str):
        raise TypeError(f"namespace name must be a str, got {type(name).__name__}")
    token = _namespace.set(name)
    try:
        yield
    finally:
        _namespace.reset(token)


# ---- exact tier ---------------------------------------------------------------------------
def switches_bytes(dtype: str, switches: str) -> bytes:
    """The model's state in a key (`state.ModelState`): its dtype and its other switches."""
    text = switches.encode()
    return dtype.encode().ljust(16, b" ") + len(text).to_bytes(4, "little") + text


def key_header(namespace_name: str, switches: bytes) -> bytes:
    """The part of every key shared by a forward's rows: the namespace and the model's state
    (`switches_bytes`). The weights are not in it: when they change, every entry is dropped
    (`state.ModelState`'s watch), so keys stay valid across processes."""
    ns = namespace_name.encode()
    return b"".join([LAYOUT_VERSION.to_bytes(2, "little"), len(ns).to_bytes(4, "little"), ns, switches])


@dataclass(frozen=True)
class Spans:
    """Where each row of a batch has its real tokens, and what the caller sees of its padding.

    start, count: int64 [B], its real tokens' first position and number. keyed: bool [B], it has
    real tokens and no gap in its mask (a row that is not keyed runs uncached, counted as
    "no_tokens" or "mask_gaps"). lead, trail: int64 [B], the padding before / after its real
    tokens that the caller sees (`CacheConfig.padding`; 0 where the row is not keyed).
    """

    start: np.ndarray
    count: np.ndarray
    keyed: np.ndarray
    lead: np.ndarray
    trail: np.ndarray


def spans(mask: np.ndarray, padding: tuple[bool, bool] = (False, False), counts: dict | None = None) -> Spans:
    """The `Spans` of a host mask [B, T] (no loop over rows); rows that cannot be keyed are added
    to `counts` (reason -> rows) when given."""
    if mask.all():  # (no padding anywhere: the common case, in a few array ops)
        zeros = np.zeros(mask.shape[0], dtype=np.int64)
        return Spans(zeros, np.full(mask.shape[0], mask.shape[1], dtype=np.int64), np.ones(mask.shape[0], dtype=bool),
                     zeros, zeros)
    real = mask != 0
    count = real.sum(1)
    seq = mask.shape[1]
    start = np.where(count > 0, real.argmax(1), 0)
    end = np.where(count > 0, seq - real[:, ::-1].argmax(1), 0)
    keyed = (count > 0) & ((end - start) == count)
    if counts is not None:
        _count_unkeyed(counts, int((count == 0).sum()), int((~keyed & (count > 0)).sum()))
    lead = np.where(keyed & padding[0], start, 0)
    trail = np.where(keyed & padding[1], seq - start - count, 0)
    return Spans(start, count, keyed, lead, trail)


def _count_unkeyed(counts: dict | None, no_tokens: int, gaps: int) -> None:
    """Add the rows that cannot be keyed to `counts` (reason -> rows), when given."""
    if counts is None:
        return
    for reason, n in (("no_tokens", no_tokens), ("mask_gaps", gaps)):
        if n:
            counts[reason] = counts.get(reason, 0) + n


def padding_mark(pads: tuple[int, int] | None) -> bytes:
    """What a header adds when a row's tokens include padding: b"M", then the leading and trailing counts."""
    if pads is None:
        return b""
    return b"M" + pads[0].to_bytes(4, "little") + pads[1].to_bytes(4, "little")


def marked_header(header: bytes, lead: int, trail: int, before: int) -> bytes:
    """The header of one row's key: `header`, the padding its span holds (`padding_mark`), and how
    many ids before its span its key covers (b"B" and the count: RoBERTa-style positions)."""
    mark = padding_mark((lead, trail)) if lead or trail else b""
    return header + mark + (b"B" + before.to_bytes(4, "little") if before else b"")


@functools.lru_cache(maxsize=4096)
def _seed(kind: bytes, header: bytes) -> bytes:
    return hashlib.blake2b(kind + header, digest_size=32).digest()


def chain_seed(kind: bytes, header: bytes) -> bytes:
    """The key a row's chain starts from (what its first page's key is chained on)."""
    return _seed(kind, header)


def _seeds(kind: bytes, headers: list) -> torch.Tensor:
    """uint8 [B, 32]: the chain seed of each row's (marked) header."""
    return torch.frombuffer(bytearray(b"".join([_seed(kind, h) for h in headers])), dtype=torch.uint8).view(-1, 32)


def marked_headers(header: bytes, lead: np.ndarray, trail: np.ndarray, before: np.ndarray) -> list:
    """`marked_header` of every row (int64 [B] each); one header shared where none has a mark."""
    if not (lead.any() or trail.any() or before.any()):
        return [header] * len(lead)
    return [marked_header(header, a, b, c) for a, b, c in zip(lead.tolist(), trail.tolist(), before.tolist())]


def chain_keys(kind: bytes, headers: list, host: np.ndarray, start: np.ndarray, count: np.ndarray,
               page: int, after: np.ndarray | None = None) -> np.ndarray:
    """uint8 [B, P, 32]: the keys of the pages of `page` tokens of each row's span start..start+count
    of `host` int64 [4, B, T] (ids, mask, positions, types), chained from the seed of its header
    (`kind`: b"R" a whole row, b"P" a decoder's page), or with `after` (uint8 [B, 32]) from those
    keys: the pages go on a chain that ends in them. Rows with count 0 get zero keys."""
    longest = int(count.max()) if len(count) else 0
    pages = -(-longest // page) if longest else 0
    tokens = torch.from_numpy(np.ascontiguousarray(host[[0, 2, 3]]))
    seeds = _seeds(kind, headers) if after is None else torch.from_numpy(np.ascontiguousarray(after, dtype=np.uint8))
    keys = chain_hash_unchecked(seeds, tokens, torch.from_numpy(np.ascontiguousarray(start)),
                                torch.from_numpy(np.ascontiguousarray(count)), page, pages)
    return keys.numpy()


def row_keys(header: bytes, host: np.ndarray, padding: tuple[bool, bool] = (False, False), ids_before: bool = False,
             counts: dict | None = None, *, backend: str | None = None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """The exact tier's whole-row keys of a batch, `host` int64 [4, B, T] (ids, mask, positions,
    types): (keys, start, count, marks). Row r's key covers its real tokens (`spans`) and the
    padding the caller sees (`padding`: leading, trailing), from `start[r]`, `count[r]` tokens (0
    where it cannot be keyed: its key is None and it is added to `counts` by reason); with
    `ids_before` the ids left of that span too (they decide positions). `marks` int64 [3, B]: each
    row's (lead, trail, before), what its key header adds (`marked_header`). One host call where
    the extension is built (`csrc/cpu/row_keys.cpp`); `_row_keys_reference` is the contract."""
    ext = extension()
    if ext is None or resolve_backend(backend, _CPU) == "reference":
        return _row_keys_reference(header, host, padding, ids_before, counts)
    keys, blob, no_tokens, gaps = ext.row_keys(np.ascontiguousarray(host, dtype=np.int64), header, padding[0],
                                               padding[1], ids_before)
    _count_unkeyed(counts, no_tokens, gaps)
    arrays = np.frombuffer(blob, dtype=np.int64).reshape(5, -1)
    return keys, arrays[0], arrays[1], arrays[2:]


def _row_keys_reference(header: bytes, host: np.ndarray, padding: tuple[bool, bool], ids_before: bool,
                        counts: dict | None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    found = spans(host[1], padding, counts)
    start = found.start - found.lead
    count = np.where(found.keyed, found.count + found.lead + found.trail, 0)
    before = start if ids_before else np.zeros_like(start)
    headers = marked_headers(header, found.lead, found.trail, before)
    keys = split_keys(chain_keys(b"R", headers, host, start - before, count + before, host.shape[2])[:, 0]) \
        if len(count) and count.any() else [None] * len(count)
    keys = [k if keyed and n else None for k, keyed, n in zip(keys, found.keyed.tolist(), count.tolist())]
    return keys, start, count, np.stack([found.lead, found.trail, before])


@dataclass(frozen=True)
class PageKeys:
    """A decoder batch's page keys (`page_keys`). keys: every row's pages' keys, row after row,
    `per_row` each (32 bytes; zeros past a row's span or for a row not keyed). start, count: int64
    [B], the span each row keys (its real tokens and the leading padding the caller sees); keyed,
    lead, trail: as `Spans`'. headers: each row's marked header (`marked_header` with its lead)."""

    keys: list
    per_row: int
    start: np.ndarray
    count: np.ndarray
    keyed: np.ndarray
    lead: np.ndarray
    trail: np.ndarray
    headers: list


def page_keys(header: bytes, host: np.ndarray, page: int, padding: tuple[bool, bool] = (False, False),
              counts: dict | None = None, *, backend: str | None = None) -> PageKeys:
    """The exact tier's page keys of a decoder batch, `host` int64 [4, B, T] (ids, mask, positions,
    types): each row's span (`spans`; the leading padding the caller sees, `padding`, is keyed
    with the row and marks its header; trailing padding is not keyed: it is computed after the
    row) in pages of `page` tokens, chained (`chain_keys`, kind b"P") from its marked header's
    seed. Rows that cannot be keyed are added to `counts`. One host call where the extension is
    built (`csrc/cpu/row_keys.cpp`); `_page_keys_reference` is the contract."""
    ext = extension()
    if ext is None or resolve_backend(backend, _CPU) == "reference":
        return _page_keys_reference(header, host, page, padding, counts)
    keys, per_row, blob, keyed, no_tokens, gaps = ext.page_keys(np.ascontiguousarray(host, dtype=np.int64), header,
                                                                padding[0], padding[1], page)
    _count_unkeyed(counts, no_tokens, gaps)
    start, count, lead, trail = np.frombuffer(blob, dtype=np.int64).reshape(4, -1)
    none = np.zeros_like(lead)
    return PageKeys(keys, per_row, start, count, np.frombuffer(keyed, dtype=np.bool_), lead, trail,
                    marked_headers(header, lead, none, none))


def _page_keys_reference(header: bytes, host: np.ndarray, page: int, padding: tuple[bool, bool],
                         counts: dict | None) -> PageKeys:
    found = spans(host[1], padding, counts)
    start, count = found.start - found.lead, found.count + found.lead
    none = np.zeros_like(start)
    headers = marked_headers(header, found.lead, none, none)
    keys = chain_keys(b"P", headers, host, start, np.where(found.keyed, count, 0), page)
    return PageKeys(split_keys(keys), keys.shape[1], start, count, found.keyed, found.lead, found.trail, headers)


def split_keys(keys: np.ndarray) -> list:
    """The 32-byte keys of a uint8 [..., 32] array, flattened, as bytes (one C loop where the
    extension is built: a decoder batch has a key per page)."""
    ext = extension()
    if ext is not None:
        return ext.split_keys(np.ascontiguousarray(keys))
    blob = keys.tobytes()
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


def _label_fields(label: tuple) -> np.ndarray:
    """int64 [3, n]: the ids, positions and token types a label names (of a [4, B, T] host batch
    with its mask, or of a [3, 1, n] array that `parse_label` read)."""
    _, tokens, r, s, n = label
    return tokens[[0, 2, 3] if len(tokens) == 4 else [0, 1, 2], r, s : s + n]


def label_bytes(label: tuple) -> bytes:
    """An entry's label (marked header, host tokens [3 or 4, B, T], row, first position, count)
    as bytes (`llmcache.save`); `parse_label` reads it back."""
    return len(label[0]).to_bytes(4, "little") + label[0] + _label_fields(label).astype(np.int64).tobytes()


def parse_label(blob: bytes) -> tuple:
    size = int.from_bytes(blob[:4], "little")
    fields = np.frombuffer(blob[4 + size :], dtype=np.int64).reshape(3, 1, -1)
    return blob[4 : 4 + size], fields, 0, 0, fields.shape[2]


def describe_label(label: tuple) -> dict:
    """The fields of an entry's label: namespace, dtype, switches (the rest of the state header,
    as text), `pads` (leading, trailing padding among its tokens), ids, positions, types."""
    header, fields = label[0], _label_fields(label)
    ns_len = int.from_bytes(header[2:6], "little")
    at = 6 + ns_len
    switches_len = int.from_bytes(header[at + 16 : at + 20], "little")
    rest = header[at + 20 + switches_len :]
    pads = (0, 0)
    if rest[:1] == b"M":
        pads = (int.from_bytes(rest[1:5], "little"), int.from_bytes(rest[5:9], "little"))
    return {"namespace": header[6:at].decode(), "dtype": header[at : at + 16].decode().strip(),
            "switches": header[at + 20 : at + 20 + switches_len].decode(), "pads": pads,
            "ids": fields[0], "positions": fields[1], "types": fields[2]}


def near_keys(header: bytes, host: np.ndarray, ids_before: bool, any_length: bool = False,
              padding: tuple[bool, bool] = (False, False)) -> list:
    """Per row of a batch (`host` int64 [4, B, T]: ids, mask, positions, types): what a semantic
    neighbour must share with it (namespace and dtype, its real tokens' positions and token
    types, the ids before its first real token when they decide positions), or None when the
    row has no real token. Rows with equal near keys differ only in their token ids.
    `any_length` (a neighbour serves its pooled output): namespace, dtype and whether the row
    has more than one token type only. A row whose padding the caller sees (`padding`: leading,
    trailing) gets None: a neighbour holds none of its padding."""
    ids, mask, positions, types = host
    rows = spans(mask, padding)
    out = []
    for r in range(ids.shape[0]):
        n, s = int(rows.count[r]), int(rows.start[r])
        if not rows.keyed[r] or rows.lead[r] or rows.trail[r]:
            out.append(None)
            continue
        if any_length:
            out.append(header + (b"Q1" if (types[r, s : s + n] != types[r, s]).any() else b"Q0"))
            continue
        before = ids[r, :s] if ids_before else ids[r, :0]
        out.append(b"".join([header, b"N", positions[r, s : s + n].tobytes(), types[r, s : s + n].tobytes(),
                             before.tobytes()]))
    return out


_PIXEL_WEIGHTS: dict = {}  # (words per image, device) -> int64 [2, words] random odd weights


def _pixel_weights(words: int, device: torch.device) -> torch.Tensor:
    key = (words, str(device))
    if key not in _PIXEL_WEIGHTS:
        index = torch.arange(words, dtype=torch.int64)
        weights = _mix64(torch.stack([index * 2 + 1, index * 2 + 2]) * 0x9E3779B97F4A7C15) | 1
        with torch.inference_mode(False):
            _PIXEL_WEIGHTS[key] = weights.to(device)
    return _PIXEL_WEIGHTS[key]


def pixel_hashes(pixels: torch.Tensor) -> torch.Tensor:
    """int64 [B, 2]: two 64-bit hashes of each image's bytes (pixel_values [B, ...]), on its device.

    Each 32-bit word w_i (the float's bits) goes through a bijective mix (a multiply by an odd
    constant, then an xor-shift) and is summed under two independent fixed random odd weights
    per position, modulo 2^64. Two different images share both hashes with probability about
    2^-128 for inputs not chosen against the fixed weights: the cache treats equal hashes (and
    shape and dtype, in the key) as the same image. About 8 passes over the pixels on the device;
    on the CPU, the 128-bit BLAKE2b digest of each image's bytes instead.
    """
    batch = pixels.shape[0]
    words = pixels.contiguous().view(batch, -1)
    if pixels.device.type == "cpu":
        # On the host a cryptographic digest of the bytes is cheaper than the passes below.
        raw = words.numpy().view(np.uint8).reshape(batch, -1)
        digests = b"".join(hashlib.blake2b(memoryview(row), digest_size=16).digest() for row in raw)
        return torch.from_numpy(np.frombuffer(digests, dtype=np.int64).reshape(batch, 2).copy())
    words = words.view(torch.int32) if words.element_size() == 4 else words.view(torch.int16)
    mixed = words.long() * -7046029254386353131  # 0x9E3779B97F4A7C15, odd
    mixed = mixed ^ (mixed >> 31)
    weights = _pixel_weights(words.shape[1], pixels.device)
    return torch.stack([(mixed * weights[0]).sum(1), (mixed * weights[1]).sum(1)], dim=1)


def pixel_key(header: bytes, hashes: np.ndarray, seq: int) -> bytes:
    """The exact key of one image from its `pixel_hashes` row and its hidden sequence length."""
    return b"".join([header, b"pixels", seq.to_bytes(4, "little"), hashes.astype(np.int64).tobytes()])


# ---- semantic tier ------------------------------------------------------------------------
# A tag packs what a row must share with an entry to match: namespace id | position of the first
# token | token count | padding side (1 = left). Rows that may not be cached get a negative tag.
SIDE_BITS, TOKEN_BITS, POSITION_BITS = 1, 21, 20


def make_tag(namespace_id: int, first_position: torch.Tensor, ntokens: torch.Tensor, left_padded: bool) -> torch.Tensor:
    """int64 tags from a namespace id and per-row first positions and token counts."""
    return (
        (namespace_id << (POSITION_BITS + TOKEN_BITS + SIDE_BITS))
        | (first_position.long() << (TOKEN_BITS + SIDE_BITS))
        | (ntokens.long() << SIDE_BITS)
        | int(left_padded)
    )


def tag_fits(first_position: torch.Tensor, ntokens: torch.Tensor) -> torch.Tensor:
    """bool: the row's position and token count fit in a tag."""
    return (first_position >= 0) & (first_position < (1 << POSITION_BITS)) & (ntokens < (1 << TOKEN_BITS))


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts through masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def token_keys(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """int64 [B]: a hash of each row's real (token id, position id, token type) triples."""
    real = mask != 0
    mixed = _mix64(ids.long() * 0x9E3779B97F4A7C15 + positions.long() * 0x632BE59BD9B4E019
                   + types.long() * 0x1B873593 + 0x2545F4914F6CDD1D)
    return _mix64((mixed * real).sum(1))


def first_index(keys: torch.Tensor) -> torch.Tensor:
    """int64 [M]: for each element of `keys` (int64 [M]), the index of the first element equal to it."""
    order = torch.arange(keys.numel(), device=keys.device)
    _, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full_like(keys, keys.numel()).scatter_reduce(0, inverse, order, "amin")
    return first.index_select(0, inverse)


def first_of_key(keys: torch.Tensor) -> torch.Tensor:
    """bool [M]: True at the first occurrence of each value of `keys` (int64 [M])."""
    return first_index(keys) == torch.arange(keys.numel(), device=keys.device)
