"""Property tests (hypothesis): every op against the reference over random shapes, dtypes and
contents, and the RingBuffer's invariants under random interleavings of insert, lookup, read,
evict and reset. Example counts are set per test (`settings(max_examples=...)`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import llmcache
from llmcache import RingBuffer, ops
from llmcache.ops import reference

BACKENDS = ["reference"] + (["cpp"] if llmcache.build_info()["extension"] else [])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def lookups(draw):
    words = draw(st.integers(1, 16))
    queries = draw(st.integers(1, 9))
    rows = draw(st.integers(0, 300))
    sparse = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2**63), 2**63 - 1, (queries, words), generator=g)
    bank = torch.randint(-(2**63), 2**63 - 1, (rows, words), generator=g)
    if sparse:  # few bits set: many equal distances, so the tie rule matters
        q &= torch.randint(-(2**63), 2**63 - 1, q.shape, generator=g)
        bank &= torch.randint(-(2**63), 2**63 - 1, bank.shape, generator=g) & torch.randint(
            -(2**63), 2**63 - 1, bank.shape, generator=g)
    valid = torch.rand(rows, generator=g) > 0.3 if draw(st.booleans()) else None
    tags = {}
    if draw(st.booleans()):
        tags = {"query_tag": torch.randint(0, 3, (queries,), generator=g),
                "bank_tag": torch.randint(0, 3, (rows,), generator=g)}
    return q, bank, draw(st.integers(1, 12)), valid, tags


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(case=lookups())
def test_hamming_topk_property(backend, case):
    q, bank, k, valid, tags = case
    got = ops.hamming_topk(q, bank, k, valid, backend=backend, **tags)
    want = reference.hamming_topk(q, bank, k, valid, **tags)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    batch=st.integers(1, 6), seq=st.integers(1, 9), dim=st.integers(1, 70), words=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1),
)
def test_simhash_pooled_property(backend, batch, seq, dim, words, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Small integers and power-of-two token counts: the sums, the division by the count and every
    # projection are exact in fp32, so every bit must match, projections of exactly 0 included.
    embeds = torch.randint(-3, 4, (batch, seq, dim), generator=g).to(dtype)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        options = [c for c in (0, 1, 2, 4, 8) if c <= seq]
        count = options[int(torch.randint(0, len(options), (1,), generator=g))]
        mask[r, torch.randperm(seq, generator=g)[:count]] = 1
    planes = torch.randint(-2, 3, (dim, 64 * words), generator=g).float()
    sums = (embeds.float() * mask.unsqueeze(-1)).sum(1)
    # sign(mean . p) = sign(sum . p): compare with the exact integer projection of the sum.
    want = reference.pack_bits((sums.double() @ planes.double()) >= 0)
    got = ops.simhash_pooled(embeds, mask, planes, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    rows=st.integers(1, 8), bank=st.integers(1, 6), seq=st.integers(0, 6), stored=st.integers(1, 6),
    feat=st.integers(1, 5), align_end=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_gather_property(backend, rows, bank, seq, stored, feat, align_end, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(bank, stored, feat, generator=g)
    slot = torch.randint(-1, bank, (rows,), generator=g)
    misses = int((slot < 0).sum())
    computed = torch.randn(misses, seq, feat, generator=g)
    row = torch.where(slot < 0, (slot < 0).cumsum(0) - 1, 0)
    a = [torch.zeros(bank, dtype=torch.long) for _ in range(2)]
    b = [torch.zeros(bank, dtype=torch.long) for _ in range(2)]
    got = ops.gather_with_mask(values, slot, computed, row, *a, 5, align_end, backend=backend)
    want = reference.gather_with_mask(values, slot, computed, row, *b, 5, align_end)
    assert torch.equal(got, want) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class RingBufferMachine(RuleBasedStateMachine):
    """A RingBuffer beside a plain dict model of what it should hold."""

    CAPACITY = 5

    def __init__(self):
        super().__init__()
        self.bank = RingBuffer(self.CAPACITY, 1, (2, 3), torch.float32, torch.device("cpu"))
        self.model = {}  # key -> state tensor [2, 3]
        self.pointers = [t.data_ptr() for t in self.bank._tensors()]

    @rule(keys=st.lists(st.integers(0, 12), min_size=1, max_size=7), bad=st.booleans())
    def insert(self, keys, bad):
        keys = [k for k in keys if k not in self.model]
        if not keys:
            return
        states = torch.randn(len(keys), 2, 3)
        if bad:
            states[0, 0, 0] = float("nan")
        slots = self.bank.insert(torch.tensor([[k] for k in keys]), torch.tensor(keys),
                                 torch.zeros(len(keys), dtype=torch.long), states, False)
        stored = self.bank.keys[slots, 0].tolist()
        first = {}
        for i, k in enumerate(keys):
            if not (bad and i == 0):
                first.setdefault(k, i)
        assert set(stored) <= set(first)
        live = {int(k) for k in self.bank.keys[self.bank.valid, 0].tolist()}
        self.model = {k: v for k, v in self.model.items() if k in live}
        for slot, k in zip(slots.tolist(), stored):
            self.model[k] = states[first[k]].clone()

    @rule(key=st.integers(0, 12))
    def lookup_and_read(self, key):
        slot = self.bank.lookup_exact(torch.tensor([key]), torch.zeros(1, dtype=torch.long))
        if key in self.model:
            assert slot.item() >= 0
            out = self.bank.gather(slot, torch.zeros(0, 2, 3), torch.zeros(1, dtype=torch.long), False)
            assert torch.equal(out[0], self.model[key])
        else:
            assert slot.item() == -1
        self.bank.advance()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def evict(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        slot = self.bank.lookup_exact(torch.tensor([key]), torch.zeros(1, dtype=torch.long))
        self.bank.evict(slot)
        del self.model[key]

    @rule()
    def reset(self):
        self.bank.reset()
        self.model.clear()

    @invariant()
    def consistent(self):
        assert self.bank.occupied == len(self.model) <= self.CAPACITY
        assert [t.data_ptr() for t in self.bank._tensors()] == self.pointers
        valid_keys = self.bank.keys[self.bank.valid, 0].tolist()
        assert len(valid_keys) == len(set(valid_keys))
        assert np.isfinite(self.bank.values[self.bank.valid].numpy()).all()


TestRingBuffer = RingBufferMachine.TestCase
TestRingBuffer.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
