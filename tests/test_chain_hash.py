"""`ops.chain_hash`: the content-addressed page keys, C++ against the reference, and the reference
against its written contract (BLAKE2b-256 of parent key, count, width and the page's tokens)."""

import hashlib

import numpy as np
import pytest
import torch

import llmcache
from llmcache import ops

BACKENDS = ["reference"] + (["cpp"] if llmcache.build_info()["extension"] else [])


def spec(seed: bytes, tokens: np.ndarray, start: int, count: int, page: int) -> list[bytes]:
    """The keys of one row written out from the contract, with hashlib."""
    keys, prev = [], seed
    for a in range(start, start + count, page):
        chunk = np.ascontiguousarray(tokens[:, a : min(a + page, start + count)].T)
        narrow = bool(((chunk >= -(2**31)) & (chunk < 2**31)).all())
        body = chunk.astype("<i4" if narrow else "<i8").tobytes()
        prev = hashlib.blake2b(prev + chunk.shape[0].to_bytes(4, "little") + bytes([4 if narrow else 8]) + body,
                               digest_size=32).digest()
        keys.append(prev)
    return keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels,batch,seq,page,high", [(3, 1, 1, 1, 10), (3, 5, 17, 4, 1000), (4, 3, 33, 16, 2**40),
                                                         (1, 2, 300, 7, 2**31), (3, 9, 8, 32, 50)])
def test_keys_follow_the_contract(backend, channels, batch, seq, page, high):
    g = torch.Generator().manual_seed(seq * 31 + page)
    tokens = torch.randint(-high, high, (channels, batch, seq), generator=g)
    start = torch.randint(0, seq, (batch,), generator=g)
    count = torch.minimum(torch.randint(0, seq + 1, (batch,), generator=g), seq - start)
    seeds = torch.randint(0, 256, (batch, 32), generator=g, dtype=torch.uint8)
    pages = -(-int(count.max()) // page) + 1  # one page more than any row has: left zero
    got = ops.chain_hash(seeds, tokens, start, count, page, pages, backend=backend).numpy()
    for r in range(batch):
        want = spec(bytes(seeds[r].numpy()), tokens[:, r].numpy(), int(start[r]), int(count[r]), page)
        assert [bytes(k) for k in got[r, : len(want)]] == want
        assert not got[r, len(want) :].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_names_its_whole_prefix(backend):
    tokens = torch.arange(3 * 2 * 12).reshape(3, 2, 12) % 7
    tokens[:, 1] = tokens[:, 0]
    tokens[0, 1, 2] += 1  # row 1 differs from row 0 in its first page only
    seeds = torch.zeros(2, 32, dtype=torch.uint8)
    keys = ops.chain_hash(seeds, tokens, torch.zeros(2, dtype=torch.long), torch.full((2,), 12), 4, 3, backend=backend)
    assert all(not torch.equal(keys[0, j], keys[1, j]) for j in range(3))
    same = ops.chain_hash(seeds, tokens[:, :1].repeat(1, 2, 1).contiguous(), torch.zeros(2, dtype=torch.long),
                          torch.tensor([12, 8]), 4, 3, backend=backend)
    assert torch.equal(same[0, :2], same[1, :2]) and not same[1, 2].any()
    seeds[1, 0] = 1  # another seed (header): every key differs
    other = ops.chain_hash(seeds, tokens[:, :1].repeat(1, 2, 1).contiguous(), torch.zeros(2, dtype=torch.long),
                           torch.full((2,), 12), 4, 3, backend=backend)
    assert all(not torch.equal(other[0, j], other[1, j]) for j in range(3))


def test_arguments_are_checked():
    seeds, tokens = torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(3, 2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="span"):
        ops.chain_hash(seeds, tokens, torch.tensor([0, 3]), torch.tensor([1, 3]), 4, 1)
    with pytest.raises(ValueError, match="seeds"):
        ops.chain_hash(seeds[:1], tokens, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long), 4, 1)
