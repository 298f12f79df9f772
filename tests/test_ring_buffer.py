"""RingBuffer: in-place inserts, eviction order per policy, filtering of bad rows, lookups."""

from __future__ import annotations

import torch
from conftest import random_codes

from llmcache import RingBuffer
from llmcache.rows import make_tag


def bank(capacity=4, eviction="lru", words=2, seq=3, feat=5):
    return RingBuffer(capacity, words, (seq, feat), torch.float32, torch.device("cpu"), eviction, half_life=4.0)


def put(rb, keys, gen, seq=3):
    keys = torch.tensor(keys)
    codes = random_codes(len(keys), rb.codes.shape[1], gen)
    states = torch.randn(len(keys), seq, rb.values.shape[2], generator=gen)
    return rb.insert(codes, keys, torch.zeros_like(keys), states, align_end=False), codes, states


def test_insert_overwrites_in_place_and_lookup_finds_exact_keys(gen):
    rb = bank()
    pointers = [t.data_ptr() for t in rb._tensors()]
    slots, codes, states = put(rb, [11, 12, 13], gen)
    assert rb.occupied == 3
    found = rb.lookup_exact(torch.tensor([12, 99]), torch.zeros(2, dtype=torch.long))
    assert found[1] == -1 and torch.equal(rb.values[found[0]], states[1])
    near, dist = rb.lookup(codes[2:3], torch.zeros(1, dtype=torch.long), radius=0)
    assert near.tolist() == [slots[2].item()] and dist.tolist() == [0]
    for _ in range(5):
        put(rb, [21, 22, 23], gen)
    assert [t.data_ptr() for t in rb._tensors()] == pointers  # never reallocated
    assert rb.occupied == 4


def test_lru_evicts_the_least_recently_used(gen):
    rb = bank()
    slots, _, _ = put(rb, [1, 2, 3, 4], gen)
    rb.advance()
    # Read key 1 and 3 so 2 and 4 become the oldest.
    hit = rb.lookup_exact(torch.tensor([1, 3]), torch.zeros(2, dtype=torch.long))
    rb.gather(hit, torch.zeros(0, 3, 5), torch.zeros(2, dtype=torch.long), False)
    rb.advance()
    new, _, _ = put(rb, [5, 6], gen)
    assert sorted(new.tolist()) == sorted([slots[1].item(), slots[3].item()])
    assert rb.hit_count[slots[0]] == 1


def test_staleness_evicts_the_lowest_decayed_match_rate(gen):
    rb = bank(eviction="staleness")
    slots, _, _ = put(rb, [1, 2, 3, 4], gen)
    tag = torch.zeros(1, dtype=torch.long)
    for key, reads in ((1, 3), (2, 1), (3, 5), (4, 2)):
        for _ in range(reads):
            hit = rb.lookup_exact(torch.tensor([key]), tag)
            rb.gather(hit, torch.zeros(0, 3, 5), torch.zeros(1, dtype=torch.long), False)
    rb.advance()
    new, _, _ = put(rb, [9], gen)
    assert new.tolist() == [slots[1].item()]  # key 2: read once


def test_non_finite_rows_and_duplicate_keys_are_not_stored(gen):
    rb = bank(capacity=8)
    keys = torch.tensor([1, 2, 2, 3])
    states = torch.randn(4, 3, 5, generator=gen)
    states[0, 1, 2] = float("nan")
    states[3, 0, 0] = float("inf")
    slots = rb.insert(random_codes(4, 2, gen), keys, torch.zeros(4, dtype=torch.long), states, False)
    assert slots.numel() == 1 and rb.keys[slots[0], 0] == 2
    assert torch.equal(rb.values[slots[0]], states[1])


def test_tags_keep_namespaces_and_lengths_apart(gen):
    rb = bank()
    tags = make_tag(3, torch.tensor([0, 0]), torch.tensor([7, 9]), False)
    rb.insert(random_codes(2, 2, gen), torch.tensor([5, 6]), tags, torch.randn(2, 3, 5, generator=gen), False)
    assert sorted(rb.namespace_ids[rb.valid].tolist()) == [3, 3]
    assert sorted(rb.token_counts[rb.valid].tolist()) == [7, 9]
    other = make_tag(4, torch.tensor([0]), torch.tensor([7]), False)
    assert rb.lookup_exact(torch.tensor([5]), other).tolist() == [-1]
    assert rb.lookup_exact(torch.tensor([5]), tags[:1]).tolist() != [-1]


def test_left_padded_entries_keep_their_last_positions(gen):
    rb = bank(seq=3)
    states = torch.randn(1, 5, 5, generator=gen)
    slot = rb.insert(random_codes(1, 2, gen), torch.tensor([1]), torch.zeros(1, dtype=torch.long), states, True)
    assert torch.equal(rb.values[slot[0]], states[0, 2:])
    out = rb.gather(slot, torch.zeros(0, 4, 5), torch.zeros(1, dtype=torch.long), True)
    assert torch.equal(out[0, 1:], states[0, 2:]) and out[0, 0].eq(0).all()


def test_reset_forgets_everything(gen):
    rb = bank()
    put(rb, [1, 2], gen)
    rb.reset()
    assert rb.occupied == 0
    assert rb.lookup_exact(torch.tensor([1]), torch.zeros(1, dtype=torch.long)).tolist() == [-1]


def test_an_insert_spanning_unused_and_used_slots_counts_evictions(gen):
    # 3 never-used slots, then an insert of 3 more into a bank of 4: one unused slot cannot hold
    # them all, so the policy picks (the free slot first, then the oldest entries).
    rb = bank()
    first, _, _ = put(rb, [1, 2, 3], gen)
    assert first.tolist() == [0, 1, 2] and rb.evictions == 0
    rb.advance()
    rb.evict(first[1:2])  # a free slot below the never-used ones
    rb.advance()
    new, _, _ = put(rb, [4, 5, 6], gen)
    # slot 1 (free), slot 3 (never used), and one of the two oldest entries (0 and 2 tie).
    assert {1, 3} <= set(new.tolist()) and len(set(new.tolist()) & {0, 2}) == 1
    assert rb.evictions == 1 and rb.occupied == 4
    rb.reset()
    again, _, _ = put(rb, [7], gen)
    assert again.tolist() == [0] and rb.occupied == 1


def test_overwriting_a_slot_zeroes_whatever_the_new_entry_does_not_cover(gen):
    rb = bank(capacity=1, seq=4)
    slot = torch.tensor([0])
    for seq, align_end in [(4, False), (2, False), (1, True), (3, False), (2, True), (4, True), (1, False)]:
        states = torch.randn(1, seq, 5, generator=gen) + 10  # never zero
        rb.write_values(slot, states, align_end)
        want = torch.zeros(4, 5)
        if align_end:
            want[4 - seq :] = states[0]
        else:
            want[:seq] = states[0]
        assert torch.equal(rb.values[0], want), (seq, align_end)
