"""Bad inputs get errors that name the argument and say what to do; forcing an unavailable
backend says why it is unavailable."""

from __future__ import annotations

import pytest
import torch

from llmcache import ops

Q = torch.zeros(2, 4, dtype=torch.int64)
BANK = torch.zeros(10, 4, dtype=torch.int64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"queries": Q.int()}, "queries must have dtype"),
        ({"queries": Q[0]}, "queries must have 2 dimensions"),
        ({"bank": torch.zeros(10, 3, dtype=torch.int64)}, "bank must have shape"),
        ({"bank": BANK.t().contiguous().t()}, "bank must be contiguous"),
        ({"k": 0}, "k must be an int >= 1"),
        ({"valid": torch.ones(9, dtype=torch.bool)}, "valid must have shape"),
        ({"valid": torch.ones(10)}, "valid must have dtype"),
        ({"query_tag": torch.zeros(2, dtype=torch.int64)}, "query_tag and bank_tag go together"),
        ({"queries": torch.zeros(2, 17, dtype=torch.int64), "bank": torch.zeros(3, 17, dtype=torch.int64)},
         "words"),
        ({"k": 1.5}, "k must be an int"),
        ({"query_tag": torch.zeros(2, dtype=torch.int32), "bank_tag": torch.zeros(10, dtype=torch.int32)},
         "query_tag must have dtype"),
        ({"query_tag": torch.zeros(3, dtype=torch.int64), "bank_tag": torch.zeros(10, dtype=torch.int64)},
         "query_tag must have shape"),
        ({"query_tag": torch.zeros(2, dtype=torch.int64), "bank_tag": torch.zeros(9, dtype=torch.int64)},
         "bank_tag must have shape"),
        ({"valid": torch.ones(10, 1, dtype=torch.bool)}, "valid must have 1 dimensions"),
    ],
    ids=["dtype", "rank", "shape", "noncontiguous", "k", "valid-shape", "valid-dtype", "tags", "too-wide",
         "k-float", "tag-dtype", "query-tag-shape", "bank-tag-shape", "valid-rank"],
)
def test_hamming_topk_rejects(kwargs, match):
    args = {"queries": Q, "bank": BANK, "k": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ops.hamming_topk(args.pop("queries"), args.pop("bank"), **args)


@pytest.mark.parametrize(
    "x,planes,match",
    [
        (torch.zeros(3, 8, dtype=torch.int32), torch.zeros(8, 64), "x must have dtype"),
        (torch.zeros(3, 8), torch.zeros(7, 64), "planes must have shape"),
        (torch.zeros(3, 8), torch.zeros(8, 100), "multiple of 64"),
        (torch.zeros(3, 8), torch.zeros(8, 2048), "up to 1024"),
        (torch.zeros(3, 8)[:, ::2], torch.zeros(4, 64), "x must be contiguous"),
    ],
    ids=["dtype", "d-mismatch", "nbits", "too-many-bits", "noncontiguous"],
)
def test_simhash_rejects(x, planes, match):
    with pytest.raises(ValueError, match=match):
        ops.simhash(x, planes)


def test_simhash_pooled_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.simhash_pooled(torch.zeros(2, 5, 8), torch.ones(2, 4, dtype=torch.long), torch.zeros(8, 64))


def test_gather_rejects_mismatched_dtypes():
    values = torch.zeros(4, 3, 8)
    with pytest.raises(ValueError, match="computed must have dtype"):
        ops.gather_with_mask(values, torch.tensor([-1]), torch.zeros(1, 3, 8, dtype=torch.float16),
                             torch.tensor([0]), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0)


def test_gather_rejects_out_of_range_slots_on_cpu():
    values = torch.zeros(4, 3, 8)
    counters = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    with pytest.raises((RuntimeError, IndexError)):
        ops.gather_with_mask(values, torch.tensor([7]), torch.zeros(0, 3, 8), torch.tensor([0]), *counters, 0)


def test_unknown_or_unavailable_backend_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.hamming_topk(Q, BANK, backend="tpu")
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        ops.hamming_topk(Q, BANK, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.hamming_topk(Q, BANK, backend="triton")
    monkeypatch.setenv("LLMCACHE_BACKEND", "tpu")
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.hamming_topk(Q, BANK)
    monkeypatch.setenv("LLMCACHE_BACKEND", "reference")  # read on every call, set or unset
    assert ops.hamming_topk(Q, BANK)[1].tolist() == ops.reference.hamming_topk(Q, BANK, 1)[1].tolist()
    monkeypatch.delenv("LLMCACHE_BACKEND")
    ops.hamming_topk(Q, BANK)
