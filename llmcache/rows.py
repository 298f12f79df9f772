"""What identifies a row: namespaces, the exact tier's keys, and the semantic tier's tags and hashes.

Exact key (`exact_key`): the bytes of everything that decides a row's output, read on the host
once per forward: a header (layout version, namespace, the model's state: dtype, autocast,
attention implementation, adapters and the other switches of `llmcache.state`) and
the row's real token ids, their position ids and token type ids, in order, and the ids of any left
padding. Trailing padding (mask == 0) is not part of it; the positions are, so a row moved by
padding to other positions (absolute or rotary embeddings) is another row. The bytes themselves are the key, not a hash: no two rows
that differ can collide.

A decoder row is keyed page by page (`page_key`): each page's key holds its tokens and the serial
number of the entry holding the page before it, so a key names the whole prefix up to it and the
longest cached prefix of a row is found by walking its pages (`llmcache.tiers.exact.prefix`).

Semantic tier (per-layer banks, `llmcache.tiers.layerwise`): a 64-bit hash of the same fields
(`token_keys`) and an int64 tag packing namespace, first position, token count and padding side.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

LAYOUT_VERSION = 4  # of exact keys and of what an entry stores; part of every key (4: the state header)

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
    real = mask != 0
    count = real.sum(1)
    seq = mask.shape[1]
    start = np.where(count > 0, real.argmax(1), 0)
    end = np.where(count > 0, seq - real[:, ::-1].argmax(1), 0)
    keyed = (count > 0) & ((end - start) == count)
    if counts is not None:
        for reason, n in (("no_tokens", int((count == 0).sum())), ("mask_gaps", int((~keyed & (count > 0)).sum()))):
            if n:
                counts[reason] = counts.get(reason, 0) + n
    lead = np.where(keyed & padding[0], start, 0)
    trail = np.where(keyed & padding[1], seq - start - count, 0)
    return Spans(start, count, keyed, lead, trail)


def exact_key(header: bytes, ids: np.ndarray, positions: np.ndarray, types: np.ndarray, before: np.ndarray,
              pads: tuple[int, int] | None = None) -> bytes:
    """The key of one row from its real tokens' ids, positions and token types (int64 [n] each),
    and the ids before its first real token (left padding: RoBERTa-style embeddings derive
    positions from every id of the row, padding included). `pads` = (leading, trailing): the
    tokens are the row's span with that much padding (mask 0) on either side, kept with it."""
    return b"".join([header, padding_mark(pads), b"R", len(ids).to_bytes(4, "little"), ids.tobytes(),
                     positions.tobytes(), types.tobytes(), before.tobytes()])


def padding_mark(pads: tuple[int, int] | None) -> bytes:
    """What a key adds when its tokens include padding: b"M", then the leading and trailing counts."""
    if pads is None:
        return b""
    return b"M" + pads[0].to_bytes(4, "little") + pads[1].to_bytes(4, "little")


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


def page_key(header: bytes, parent_serial: int, ids: np.ndarray, positions: np.ndarray, types: np.ndarray) -> bytes:
    """The key of one page of a decoder row: its tokens' ids, positions and token types (int64
    [n] each, n <= page_tokens) after the prefix that the entry numbered `parent_serial` (-1: the
    row's start) names. In a causal model a token's states depend only on the tokens before it,
    so the chain of page keys from the row's start names exactly what decides each page."""
    return b"".join([header, b"P", parent_serial.to_bytes(8, "little", signed=True), len(ids).to_bytes(4, "little"),
                     ids.tobytes(), positions.tobytes(), types.tobytes()])


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


def parse_key(key: bytes) -> dict:
    """The fields of an exact key: namespace, dtype, switches (the rest of the state header, as
    text), ids, positions, types (int64 arrays), `pads` (leading, trailing padding among those
    tokens), and for a decoder's page the serial of the entry it extends (`parent`, -1: none)."""
    ns_len = int.from_bytes(key[2:6], "little")
    namespace_name = key[6 : 6 + ns_len].decode()
    at = 6 + ns_len
    dtype = key[at : at + 16].decode().strip()
    switches_len = int.from_bytes(key[at + 16 : at + 20], "little")
    switches = key[at + 20 : at + 20 + switches_len].decode()
    at += 20 + switches_len
    pads = (0, 0)
    if key[at : at + 1] == b"M":
        pads = (int.from_bytes(key[at + 1 : at + 5], "little"), int.from_bytes(key[at + 5 : at + 9], "little"))
        at += 9
    parent = -1
    if key[at : at + 1] == b"P":
        parent = int.from_bytes(key[at + 1 : at + 9], "little", signed=True)
        at += 8
    at += 1
    n = int.from_bytes(key[at : at + 4], "little")
    at += 4
    fields = np.frombuffer(key[at : at + 24 * n], dtype=np.int64).reshape(3, n)
    return {"namespace": namespace_name, "dtype": dtype, "switches": switches, "ids": fields[0],
            "positions": fields[1], "types": fields[2], "parent": parent, "pads": pads}
