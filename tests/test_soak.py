"""Bounded memory: 100,000 requests through a small byte budget never exceed it, and the
process does not grow beyond the budget plus a constant."""

from __future__ import annotations

import pytest
import torch
from models import VOCAB, tiny_model

import llmcache


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_100k_requests_stay_within_the_budget(gen):
    model = tiny_model("bert")
    budget = 2 * 1024 * 1024
    requests, per_batch = 100_000, 1000
    llmcache.accelerate(model, max_bytes=budget)
    pool = torch.randint(5, VOCAB, (3000, 8), generator=gen)  # repeats make hits, the rest evicts
    peak_bank = 0
    with torch.inference_mode():
        for step in range(requests // per_batch):
            ids = pool[torch.randint(0, pool.shape[0], (per_batch,), generator=gen)]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            st = llmcache.stats(model)
            peak_bank = max(peak_bank, st.bytes_reserved)
            assert st.bytes <= st.bytes_reserved <= budget
            if step == 30:
                # After the allocator has seen the batch's range of sub-batch sizes: glibc's heap
                # grows by up to ~50 MB of fragmentation over the first few dozen batches, then
                # stays flat (measured); a per-forward leak would keep growing after this.
                baseline = rss_bytes()
    st = llmcache.stats(model)
    assert st.lookups == st.rows == requests  # one lookup per row, whatever the number of blocks
    assert st.hits > 0 and st.evictions > 0
    assert peak_bank <= budget
    growth = rss_bytes() - baseline
    assert growth <= budget + 64 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB after batch 30"
