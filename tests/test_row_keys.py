"""`rows.row_keys`: the exact tier's whole-row keys of a batch, the C++ host op against its Python
reference (spans, marked headers, chain_hash) on awkward masks, and against the written contract."""

import hashlib
import itertools

import numpy as np
import pytest

import llmcache
from llmcache import rows

HAS_EXT = llmcache.build_info()["extension"]
HEADER = rows.key_header("tenant", rows.switches_bytes("torch.float32", "autocast=None"))


def batch(masks: list[list[int]], high: int = 1000, seed: int = 0) -> np.ndarray:
    """int64 [4, B, T]: random ids and types, the given masks, positions counted over real tokens."""
    g = np.random.default_rng(seed)
    mask = np.asarray(masks, dtype=np.int64).reshape(len(masks), -1)
    b, t = mask.shape
    ids = g.integers(-high, high, (b, t))
    positions = np.cumsum(mask, 1) - 1
    types = g.integers(0, 2, (b, t))
    return np.ascontiguousarray(np.stack([ids, mask, positions, types]))


MASKS = {
    "B1-T1": [[1]],
    "B3-T5-whole": [[1] * 5] * 3,
    "B4-T6-left": [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]],
    "B3-T7-right": [[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]],
    "B5-T6-gaps-empty": [[1, 0, 1, 1, 0, 0], [0] * 6, [0, 1, 1, 0, 0, 0], [1] * 6, [0, 0, 1, 0, 1, 0]],
    "B2-T3-empty": [[0, 0, 0], [0, 0, 0]],
    "B17-T33": (np.random.default_rng(3).random((17, 33)) > 0.2).astype(int).tolist(),
}


@pytest.mark.skipif(not HAS_EXT, reason="the C++ host op needs the extension")
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("lead,trail,before", list(itertools.product([False, True], repeat=3)))
def test_the_host_op_equals_the_reference(name, lead, trail, before):
    for high in (1000, 2**40):  # (ids past int32: the wide form of the key's tokens)
        host = batch(MASKS[name], high)
        counts_cpp, counts_ref = {}, {}
        got = rows.row_keys(HEADER, host, (lead, trail), before, counts_cpp)
        want = rows.row_keys(HEADER, host, (lead, trail), before, counts_ref, backend="reference")
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(a, b)
        assert counts_cpp == counts_ref


@pytest.mark.parametrize("backend", [None, "reference"])
def test_keys_follow_the_contract(backend):
    """Row 0 (left padding seen, positions from the ids): its seed is BLAKE2b-256 of "R", the header and
    its marks; its key is chain_hash's one page over every id from position 0 on."""
    host = batch([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]])
    counts = {}
    keys, start, count, marks = rows.row_keys(HEADER, host, (True, False), True, counts, backend=backend)
    assert keys[2] is None and keys[3] is None and counts == {"no_tokens": 1, "mask_gaps": 1}
    assert start.tolist()[:2] == [0, 0] and count.tolist() == [5, 3, 0, 0]
    assert marks[:, 0].tolist() == [2, 0, 0]  # lead 2; before = start = 0
    seed = hashlib.blake2b(b"R" + HEADER + b"M" + (2).to_bytes(4, "little") + (0).to_bytes(4, "little"),
                           digest_size=32).digest()
    tokens = np.ascontiguousarray(host[[0, 2, 3], 0, :].T).astype("<i4").tobytes()
    want = hashlib.blake2b(seed + (5).to_bytes(4, "little") + bytes([4]) + tokens, digest_size=32).digest()
    assert keys[0] == want
    # Row 1 (trailing padding not seen): its real tokens only, under the plain header.
    seed = hashlib.blake2b(b"R" + HEADER, digest_size=32).digest()
    tokens = np.ascontiguousarray(host[[0, 2, 3], 1, :3].T).astype("<i4").tobytes()
    assert keys[1] == hashlib.blake2b(seed + (3).to_bytes(4, "little") + bytes([4]) + tokens, digest_size=32).digest()


@pytest.mark.skipif(not HAS_EXT, reason="the C++ host op needs the extension")
@pytest.mark.parametrize("shape", [(0, 32), (1, 32), (3, 5, 32), (2, 1, 4, 32)])
def test_split_keys_gives_every_32_byte_key_in_order(shape):
    keys = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    blob = keys.tobytes()
    want = [blob[i : i + 32] for i in range(0, len(blob), 32)]
    assert rows.split_keys(keys) == want
    if len(shape) == 3:  # (a strided view: what a decoder's routing takes is keys[:, 0])
        assert rows.split_keys(keys[:, 0]) == [k for i, k in enumerate(want) if i % shape[1] == 0]
    with pytest.raises(RuntimeError):
        llmcache.ops._library.extension().split_keys(np.zeros((2, 31), dtype=np.uint8))


@pytest.mark.skipif(not HAS_EXT, reason="the C++ host op needs the extension")
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("lead,trail", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("page", [1, 3, 8])
def test_the_page_keys_host_op_equals_the_reference(name, lead, trail, page):
    for high in (1000, 2**40):
        host = batch(MASKS[name], high)
        counts_cpp, counts_ref = {}, {}
        got = rows.page_keys(HEADER, host, page, (lead, trail), counts_cpp)
        want = rows.page_keys(HEADER, host, page, (lead, trail), counts_ref, backend="reference")
        assert got.keys == want.keys and got.per_row == want.per_row and got.headers == want.headers
        for field in ("start", "count", "keyed", "lead", "trail"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert counts_cpp == counts_ref


@pytest.mark.parametrize("backend", [None, "reference"])
def test_page_keys_follow_the_contract(backend):
    """Row 0 (leading padding seen): its pages start at position 0 under a header marked with that
    padding, each page's key chained on the one before; row 1 (trailing padding seen): its real
    tokens only, the padding after them not keyed; row 2 (a gap): no key, counted."""
    host = batch([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 0]])
    counts = {}
    got = rows.page_keys(HEADER, host, 2, (True, True), counts, backend=backend)
    assert counts == {"mask_gaps": 1} and got.per_row == 3
    assert got.start.tolist()[:2] == [0, 0] and got.count.tolist() == [5, 3, 2]
    assert got.lead.tolist() == [2, 0, 0] and got.trail.tolist() == [0, 2, 0] and got.keyed.tolist() == [True, True, False]

    def chain(seed, r, first, n):
        keys = []
        for a in range(first, first + n, 2):
            tokens = np.ascontiguousarray(host[[0, 2, 3], r, a : min(a + 2, first + n)].T).astype("<i4")
            seed = hashlib.blake2b(seed + len(tokens).to_bytes(4, "little") + bytes([4]) + tokens.tobytes(),
                                   digest_size=32).digest()
            keys.append(seed)
        return keys + [bytes(32)] * (3 - len(keys))

    marked = HEADER + b"M" + (2).to_bytes(4, "little") + (0).to_bytes(4, "little")
    assert got.headers == [marked, HEADER, HEADER]
    assert got.keys[:3] == chain(hashlib.blake2b(b"P" + marked, digest_size=32).digest(), 0, 0, 5)
    assert got.keys[3:6] == chain(hashlib.blake2b(b"P" + HEADER, digest_size=32).digest(), 1, 0, 3)
    assert got.keys[6:] == [bytes(32)] * 3
