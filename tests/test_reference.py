"""The reference ops against independent, obviously-correct formulations (it is every test's oracle)."""

import math

import pytest
import torch
from conftest import random_codes

from llmcache.ops import hamming_radius, reference


def test_popcount64_matches_python(gen):
    x = random_codes(1000, 1, gen).flatten()
    want = torch.tensor([(v & (2**64 - 1)).bit_count() for v in x.tolist()])
    assert torch.equal(reference.popcount64(x), want)


def test_pack_bits_layout():
    bits = torch.zeros(1, 128, dtype=torch.bool)
    bits[0, 0] = bits[0, 63] = bits[0, 64 + 5] = True
    words = reference.pack_bits(bits)
    assert words[0, 0].item() == 1 - 2**63  # bits 0 and 63
    assert words[0, 1].item() == 1 << 5


def test_hamming_topk_brute_force(gen):
    q, bank = random_codes(5, 3, gen, sparse=True), random_codes(300, 3, gen, sparse=True)
    valid = torch.rand(300, generator=gen) > 0.3
    dist, idx = reference.hamming_topk(q, bank, 4, valid)
    for b in range(5):
        pairs = sorted(
            (sum(((q[b, w].item() ^ bank[n, w].item()) & (2**64 - 1)).bit_count() for w in range(3)), n)
            for n in range(300)
            if valid[n]
        )[:4]
        assert [(int(d), int(i)) for d, i in zip(dist[b], idx[b])] == pairs


def test_hamming_topk_missing_answers():
    dist, idx = reference.hamming_topk(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 5)
    assert idx[:, 3:].eq(-1).all() and dist[:, 3:].eq(129).all()
    assert idx[:, :3].tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("tau", [0.5, 0.75, 0.9, 0.95, 0.99, 1.0])
def test_hamming_radius_inverts_simhash_estimate(tau):
    radius = hamming_radius(tau, 256)
    assert math.cos(math.pi * radius / 256) >= tau - 1e-12
    assert math.cos(math.pi * (radius + 1) / 256) < tau


def test_hamming_radius_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        hamming_radius(0.0, 256)
