"""`PagedArena`, the exact tier's pages of token states: what it holds survives every growth, on
the CPU's reserving path (address space taken at the first growth, nothing copied after) and on
the doubling path (what CUDA and deterministic fill take), and it never counts more pages than
asked for nor grows past its budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcache.bank import PagedArena

PAGE, F = 4, 3


@pytest.fixture(params=["reserving", "doubling"])
def fill_mode(request):
    """The doubling path: deterministic mode with fill, which would write every reserved byte."""
    if request.param == "reserving":
        yield request.param
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(before)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(8, 64))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_growth_keeps_every_written_page(fill_mode, asks, max_pages):
    arena = PagedArena(PAGE, F, torch.float32, torch.device("cpu"), max_pages)
    written: dict[int, torch.Tensor] = {}
    for ask in asks:
        before = arena.num_pages
        pages = arena.grow(min(ask, max_pages))
        assert pages >= min(ask, max_pages) and pages >= before and pages <= max_pages
        assert arena.num_pages == pages and arena.reserved_bytes == pages * PAGE * F * 4
        rows = torch.arange(pages * PAGE)[torch.randperm(pages * PAGE)[: PAGE + 1]]
        states = torch.randn(len(rows), F)
        arena.write(rows, states)
        written.update({int(r): s for r, s in zip(rows, states)})
        keys = sorted(written)
        assert torch.equal(arena.read(torch.tensor(keys)), torch.stack([written[k] for k in keys]))
    arena.clear()
    assert arena.num_pages == 0 and arena.reserved_bytes == 0


ROWS = {"short": [5, 6, 7, 8], "run": list(range(20, 100)), "descending": list(range(99, 19, -1)),
        "two-runs": [*range(40), *range(70, 110)], "many-runs": [r for r in range(128) if r % 3],
        "from-zero-to-end": list(range(128))}


@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
def test_moves_land_at_their_rows(rows):
    """A write puts each state at its token row, whether the rows run in a few slices (written as
    slice copies on the CPU) or not, and touches no other row;
    a read (into a fresh tensor or a given buffer) gives them back in order."""
    arena = PagedArena(PAGE, F, torch.float32, torch.device("cpu"), 64)
    arena.grow(32)
    everywhere = torch.arange(128, dtype=torch.int64)
    arena.write(everywhere, torch.zeros(128, F))
    states = torch.arange(len(rows) * F, dtype=torch.float32).view(len(rows), F) + 1
    index = torch.tensor(rows, dtype=torch.int64)
    arena.write(index, states)
    got = arena.read(everywhere)
    assert torch.equal(got[index], states)
    others = [r for r in range(128) if r not in rows]
    assert not got[others].any()
    assert torch.equal(arena.read(index), states)
    buffer = torch.full((len(rows) + 5, F), -1.0)
    assert torch.equal(arena.read(index, buffer), states) and torch.equal(buffer[: len(rows)], states)
