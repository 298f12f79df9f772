"""What the shared tier writes to Redis: keys that say which model and row, values that describe
themselves and are checked before anything is served.

Key: b"<prefix>:<namespace>:" + hex(blake2b(model fingerprint + entry key, 20 bytes)).
Value (little-endian):

    magic b"LLMC" | version u16 | dtype code u16 | ntokens u32 | features u32 | key length u32 |
    parent length u32 | payload length u64 | model fingerprint 32 B | checksum u32 | entry key |
    parent key | payload

An entry is a whole row (an encoder's) or one page of a decoder row, whose key is chained over
the pages before it (`rows.chain_keys`) and whose parent key is the page before it (empty for a
row's first page and for whole rows). The payload is the entry's states [ntokens, features] in
the model's dtype (what the device bank holds: the last cached block's output at its tokens and,
for decoders, every cached block's K and V). The checksum is a CRC-32 over the fingerprint, the
keys and the payload (it catches corruption; a value cannot pass for another entry's, since
the full keys are in it and checked, and a digest collision of Redis keys cannot serve another
entry. `decode` returns the states or the reason it refuses them: "format" (not an llmcache
value, or shorter than its header), "layout" (another value version: an older or newer
writer's), "model" (another model, weights, dtype or cached span), "key" (another entry),
"parent" (another page before it), "shape" (other token count, width or dtype), "truncated"
(payload shorter or longer than its header says), "checksum", "non_finite". ("orphan", counted
by the reader: a page held whose chain is broken before it, never read.)
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import torch

from ..ops._library import extension

VERSION = 3  # of the value layout below; a reader refuses every other
MAGIC = b"LLMC"
HEAD = struct.Struct("<4sHHIIIIQ32sI")
HEAD_BYTES = HEAD.size
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REASONS = ("format", "layout", "model", "key", "parent", "shape", "truncated", "checksum", "non_finite", "orphan")


def redis_key(key_prefix: bytes, fingerprint: bytes, row_key: bytes) -> bytes:
    return key_prefix + hashlib.blake2b(fingerprint + row_key, digest_size=20).hexdigest().encode()


def _checksum(fingerprint: bytes, row_key: bytes, parent: bytes, payload, into: torch.Tensor | None = None) -> int:
    """CRC-32 (zlib's) over the fingerprint, the keys and the payload; with `into` (a contiguous
    host tensor of the payload's size), the payload is copied there in the same pass over it
    (`csrc/cpu/crc32.cpp`, where the extension is built; zlib and a copy otherwise)."""
    head = zlib.crc32(fingerprint + len(row_key).to_bytes(4, "little") + row_key + len(parent).to_bytes(4, "little")
                      + parent)
    target = None if into is None else into.view(-1).view(torch.uint8).numpy()
    ext = extension()
    if ext is not None:
        return ext.crc32_copy(payload, target, head)
    if target is not None:
        target[:] = np.frombuffer(payload, dtype=np.uint8)
    return zlib.crc32(payload, head)


def encode(fingerprint: bytes, row_key: bytes, states: np.ndarray, dtype: torch.dtype, parent: bytes = b"") -> bytes:
    """The value of one entry: `states` [ntokens, features], the raw bytes of `dtype` values
    (a uint8/int16 view for dtypes numpy lacks); `parent`: the key of the page it extends."""
    payload = np.ascontiguousarray(states).tobytes()
    ntokens, features = states.shape
    head = HEAD.pack(MAGIC, VERSION, DTYPES.index(dtype), ntokens, features, len(row_key), len(parent),
                      len(payload), fingerprint, _checksum(fingerprint, row_key, parent, payload))
    return b"".join([head, row_key, parent, payload])


def decode(value: bytes, fingerprint: bytes, row_key: bytes, ntokens: int, features: int,
           dtype: torch.dtype, parent: bytes = b"", out: torch.Tensor | None = None) -> torch.Tensor | str:
    """The states [ntokens, features] of `dtype` (host) that `value` holds for this entry (a
    page: after the page `parent`), or the reason it is refused (one of REASONS). `out`: a
    contiguous host tensor [ntokens, features] of `dtype` to copy them into; its finiteness is
    then the caller's to check (in one pass over many values)."""
    if len(value) < HEAD_BYTES:
        return "format"
    magic, version, code, n, f, key_len, parent_len, payload_len, fp, checksum = HEAD.unpack_from(value)
    if magic != MAGIC:
        return "format"
    if version != VERSION:
        return "layout"
    if fp != fingerprint:
        return "model"
    if value[HEAD_BYTES : HEAD_BYTES + key_len] != row_key:
        return "key"
    if value[HEAD_BYTES + key_len : HEAD_BYTES + key_len + parent_len] != parent:
        return "parent"
    if n != ntokens or f != features or code >= len(DTYPES) or DTYPES[code] != dtype:
        return "shape"
    itemsize = torch.empty((), dtype=dtype).element_size()
    start = HEAD_BYTES + key_len + parent_len
    if payload_len != n * f * itemsize or len(value) != start + payload_len:
        return "truncated"
    states = torch.empty((n, f), dtype=dtype) if out is None else out
    if _checksum(fingerprint, row_key, parent, memoryview(value)[start:], into=states) != checksum:
        return "checksum"
    if out is None and not bool(finite_rows(states).all()):
        return "non_finite"
    return states


def finite_rows(states: torch.Tensor) -> torch.Tensor:
    """bool [n]: whether each row of `states` [n, F] is finite, by its sum (a NaN or an infinity
    makes it non-finite; so would finite values whose sum overflows: refused, never served
    wrong). One pass, several times faster than isfinite on the CPU."""
    return torch.isfinite(states.sum(1, dtype=torch.float64 if states.dtype == torch.float64 else torch.float32))


def host_bytes(states: torch.Tensor) -> np.ndarray:
    """[n, F] states as a host array of their raw bytes' width (bfloat16 has no numpy dtype)."""
    t = states.detach().contiguous().cpu()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width).numpy()
