"""The C++ routing of whole rows (`route_rows`, csrc/route_rows.cpp) against its reference
(`tiers.exact.route.route` on an index without it): the same batches through two stores of the
C++ index, one routed each way, give the same plans, the same entries, labels and counts, step after
step, with hits, in-batch repeats, rows that cannot be keyed, padding to cut, a full bank that
evicts, rows too long for it, and reservations that are released instead of committed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcache.config import CacheConfig
from llmcache.ops import _library
from llmcache.tiers.exact import route as encoder
from llmcache.tiers.exact.store import Store

pytestmark = pytest.mark.skipif(_library.extension() is None, reason="needs the compiled extension")

FEATURES, SEQ, PAGE = 6, 9, 4
PLAN_TENSORS = ("compute", "served_dst", "served_states", "repeat_rows", "repeat_src", "store_src", "store_dst",
                "zeros")
PLAN_FIELDS = ("batch", "seq", "width", "m", "entries", "store_n", "served", "repeats", "tokens", "served_all",
               "store_all", "semantic_rows")


def _store(max_bytes: int | None) -> Store:
    store = Store(CacheConfig(page_tokens=PAGE, max_bytes=max_bytes), FEATURES, torch.float32, torch.device("cpu"))
    assert hasattr(store.index, "route_rows")  # (the C++ index: the only one with the one-call routing)
    return store


def _batch(rng: np.random.Generator, pool: list) -> tuple[encoder.RowKeys, np.ndarray | None]:
    """A batch of rows keyed from a small pool (hits and in-batch repeats), now and then a row
    that cannot be keyed, rows starting anywhere, and sometimes padding the caller does not see."""
    batch = int(rng.integers(1, 7))
    picks = [None if rng.random() < 0.1 else int(rng.integers(len(pool))) for _ in range(batch)]
    keys = [None if k is None else pool[k] for k in picks]
    # (a key names its row's tokens, so a row served holds as many tokens as it has: a pool key's count is its own)
    count = np.asarray([int(rng.integers(1, SEQ + 1)) if k is None else 1 + k % SEQ for k in picks], dtype=np.int64)
    start = np.asarray([int(rng.integers(0, SEQ - n + 1)) for n in count], dtype=np.int64)
    host = rng.integers(0, 50, size=(4, batch, SEQ)).astype(np.int64)
    mask = np.zeros((batch, SEQ), dtype=np.int64)
    for r in range(batch):
        mask[r, start[r] : start[r] + count[r]] = 1
    host[1] = mask
    marks = np.zeros((3, batch), dtype=np.int64)
    if rng.random() < 0.1:  # (a row keyed with its padding: the reference routes it, both ways)
        marks[0, 0] = 1
    keyed = encoder.RowKeys(keys, start, count, b"header", marks, host)
    return keyed, (mask if rng.random() < 0.5 else None)


class Reference:
    """The C++ index without its routing ops: what routes on it is the Python reference."""

    def __init__(self, index):
        self.index = index

    def __getattr__(self, name: str):
        if name in ("route_rows", "longest_runs", "reserve_pages", "plan_arrays", "suffix_arrays"):
            raise AttributeError(name)
        return getattr(self.index, name)


def _route(store: Store, keyed, mask, native: bool):
    counts: dict = {}
    index = store.index
    store.index = index if native else Reference(index)
    try:
        with index.pinned():
            plan = encoder.route(store, keyed, SEQ, torch.device("cpu"), counts, mask=mask)
    finally:
        store.index = index
    return plan, counts


def _same_plans(a, b, step: int) -> None:
    assert (a is None) == (b is None), f"step {step}: one routing planned nothing"
    if a is None:
        return
    for name in PLAN_FIELDS:
        assert getattr(a, name) == getattr(b, name), f"step {step}: {name} {getattr(a, name)} != {getattr(b, name)}"
    for name in PLAN_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), f"step {step}: {name} made by one routing only"
        if x is not None:
            assert torch.equal(x, y), f"step {step}: {name} differs"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_bytes", [None, 12 * PAGE * FEATURES * 4, 2 * PAGE * FEATURES * 4])
def test_the_cpp_routing_plans_what_the_reference_plans(seed: int, max_bytes: int | None):
    rng = np.random.default_rng(seed)
    pool = [bytes([k]) * 32 for k in range(10)]
    stores = {native: _store(max_bytes) for native in (True, False)}
    served = 0
    for step in range(60):
        keyed, mask = _batch(rng, pool)
        (plan, counts), (ref, ref_counts) = (_route(stores[n], keyed, mask, n) for n in (True, False))
        _same_plans(plan, ref, step)
        assert counts == ref_counts, f"step {step}"
        served += plan.served if plan is not None else 0
        if plan is None or not plan.entries:
            continue
        # The same entries, labelled alike: (header, the batch, row, start, count) of each stored row.
        for e in plan.entries:
            a, b = (stores[n].index.describe(e) for n in (True, False))
            assert a.key == b.key and a.ntokens == b.ntokens and a.serial == b.serial, f"step {step}"
            assert a.label[1] is keyed.host and b.label[1] is keyed.host
            assert a.label[:1] + a.label[2:] == b.label[:1] + b.label[2:], f"step {step}: {a.label} {b.label}"
        commit = rng.random() < 0.85
        values = torch.from_numpy(rng.standard_normal((int(sum(plan.store_n)), FEATURES)).astype(np.float32))
        for native, p in ((True, plan), (False, ref)):
            store = stores[native]
            if commit:
                store.arena.grow(store.index.num_pages)
                store.arena.write(p.store_dst, values)
                store.index.commit_many(p.entries)
            else:
                for e in p.entries:
                    store.index.release(e)
        assert stores[True].index.entries == stores[False].index.entries
        assert stores[True].index.evictions == stores[False].index.evictions
    assert served > 0  # (the walk reached hits)

