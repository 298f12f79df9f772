"""A decoder forward's page routing on the C++ index (`longest_runs`, `reserve_pages`;
csrc/route_pages.cpp) against its references in `tiers.exact.prefix` (`longest_runs`,
`reserve_pages`): two C++ indexes with the same history, one routed by the ops and one by the
references, step after step, return the same runs, entries, writes, failures and chains and end
in the same state, with shared prefixes across and within batches, prefixes that end in a page to
replace, banks that evict, rows longer than the bank, and reservations released instead of
committed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from llmcache.bank.native import NativeIndex
from llmcache.ops import _library
from llmcache.tiers.exact import prefix

pytestmark = pytest.mark.skipif(_library.extension() is None, reason="needs the compiled extension")

PAGE, PER_ROW = 4, 6


def _page_keys(tokens: list) -> list:
    """PER_ROW chained keys of a row's pages (the pages past its tokens keyed too, as
    `rows.chain_keys` does: nothing may read them)."""
    keys, parent = [], b"root"
    padded = tokens + [0] * (PER_ROW * PAGE - len(tokens))
    for j in range(PER_ROW):
        parent = hashlib.blake2b(parent + bytes(padded[j * PAGE : (j + 1) * PAGE]), digest_size=32).digest()
        keys.append(parent)
    return keys


def _rows(rng: np.random.Generator, stems: list) -> tuple[list, list]:
    """A batch: rows that extend one of a few stems (shared prefixes) by a few tokens of a small
    alphabet (so that rows of one batch repeat pages too)."""
    tokens = []
    for _ in range(int(rng.integers(1, 6))):
        stem = stems[int(rng.integers(len(stems)))]
        n = int(rng.integers(1, PER_ROW * PAGE + 1))
        row = (stem + rng.integers(1, 3, size=PER_ROW * PAGE).tolist())[:n]
        tokens.append(row)
    return tokens, [k for row in tokens for k in _page_keys(row)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_pages", [1 << 20, 12, 5])
def test_the_cpp_page_routing_does_what_the_reference_does(seed: int, max_pages: int):
    rng = np.random.default_rng(seed)
    stems = [rng.integers(1, 9, size=int(rng.integers(0, 3 * PAGE))).tolist() for _ in range(3)]
    ops, ref = NativeIndex(PAGE, max_pages, None), NativeIndex(PAGE, max_pages, None)
    host = np.zeros((4, 1, 1), dtype=np.int64)
    reached = {"found": 0, "shared": 0, "failed": 0}
    for step in range(80):
        tokens, flat = _rows(rng, stems)
        batch = len(tokens)
        count = np.asarray([len(t) for t in tokens], dtype=np.int64)
        start = rng.integers(0, 3, size=batch).astype(np.int64)
        headers = [b"h%d" % (r % 2) for r in range(batch)]
        with ops.pinned(), ref.pinned():
            found, covered = ops.longest_runs(flat, PER_ROW, count)
            assert (found, covered) == prefix.longest_runs(ref, flat, PER_ROW, count), f"step {step}"
            for index in (ops, ref):
                index.pin([e for f in found for e in f])
            reached["found"] += sum(map(len, found))
            todo = [r for r in range(batch) if covered[r] < count[r] or rng.random() < 0.2]
            # (now and then the prefix ends in a page that the row's next page replaces)
            full = [found[r][:-1] if found[r] and rng.random() < 0.3 else found[r] for r in todo]
            first = np.asarray([len(f) for f in full], dtype=np.int64)
            opens = np.asarray([f[-1] if f else -1 for f in full], dtype=np.int64)
            chains = bool(rng.random() < 0.5)
            args = (flat, PER_ROW, todo, first, opens, count.tolist(), start, headers, host, chains)
            got = ops.reserve_pages(*args)
            want = prefix.reserve_pages(ref, *args)
        entries, _, _, o_n, failed, mine = got
        assert entries == want[0] and failed == want[4] and mine == want[5], f"step {step}: {got} != {want}"
        for a, b in zip(got[1:4], want[1:4]):
            assert np.array_equal(a, b), f"step {step}"
        reached["shared"] += int(sum(o_n) < sum(count[todo] - first * PAGE)) if todo else 0
        reached["failed"] += len(failed)
        for e in entries:  # the same entries: keys, tokens, parents and labels
            a, b = ops.describe(e), ref.describe(e)
            assert (a.key, a.ntokens, a.serial, a.parent_serial) == (b.key, b.ntokens, b.serial, b.parent_serial)
            assert a.label[0] == b.label[0] and a.label[2:] == b.label[2:] and a.label[1] is host
        commit = rng.random() < 0.85
        for index in (ops, ref):
            if commit:
                index.commit_many(entries)
            else:
                for e in entries:
                    index.release(e)
        assert (ops.entries, ops.held_pages, ops.evictions) == (ref.entries, ref.held_pages, ref.evictions)
    assert reached["found"] > 0 and reached["shared"] > 0  # (the walk reached hits and shared pages)
    if max_pages == 5:
        assert reached["failed"] > 0  # (and rows longer than the bank)


@pytest.mark.parametrize("seed", range(10))
def test_the_cpp_plan_arrays_equal_the_reference(seed: int):
    """`plan_arrays` (csrc/plan_arrays.cpp) against `plan.plan_arrays` on random plans of an index
    holding entries of 1-9 tokens: served rows of several entries each (a decoder's pages) or one
    (`sizes` None), served whole or at an offset, computing rows, repeats, and written entries in
    and out of order."""
    from llmcache.tiers.exact import plan as plans

    rng = np.random.default_rng(seed)
    index = NativeIndex(PAGE, 1 << 20, None)
    held_entries = index.reserve_many([bytes([seed, k]) * 16 for k in range(40)], rng.integers(1, 10, 40), None, None)
    index.commit_many(held_entries)
    for _ in range(60):
        batch, seq = int(rng.integers(1, 7)), int(rng.integers(1, 12))
        rows = rng.permutation(batch)
        n_served, n_copies = int(rng.integers(0, batch + 1)), int(rng.integers(0, 3))
        served, computing = sorted(rows[:n_served].tolist()), sorted(rows[n_served:].tolist())
        copies = computing[1:][:n_copies]  # (rows that repeat a computing row of the batch)
        computing = [r for r in computing if r not in copies]
        copying = [(r, int(rng.choice(computing))) for r in copies]
        pages = rng.random() < 0.5
        sizes = rng.integers(1, 4, len(served)).tolist() if pages else None
        held = rng.choice(held_entries, int(sum(sizes)) if pages else len(served)).tolist()
        starts = [0 if rng.random() < 0.6 else int(rng.integers(0, 3)) for _ in served]
        width = seq if rng.random() < 0.7 else max(1, seq - 2)
        written = [r for r in computing for _ in range(int(rng.integers(0, 3)))]
        entries = index.reserve_many([bytes([seed, 99, i]) + bytes(29) + bytes([len(written)]) for i in
                                      range(len(written))], rng.integers(1, 5, len(written)), None, None)
        w_n = np.asarray([index.describe(e).ntokens for e in entries], dtype=np.int64)
        w_first = np.asarray([int(rng.integers(0, 3)) for _ in entries], dtype=np.int64)
        if rng.random() < 0.5:  # (the block's output in order: each computing row's tokens from 0, back to back)
            w_first = np.zeros(len(entries), dtype=np.int64)
        args = (batch, seq, width, served, starts, held, sizes, computing, [r for r, _ in copying],
                [s for _, s in copying], entries, np.asarray(written, dtype=np.int64), w_first, w_n)
        got, want = index.plan_arrays(*args), plans.plan_arrays(index, *args)
        assert got[1:] == want[1:]
        want_parts = {k: v for k, v in want[0].items() if v is not None}
        assert sorted(got[0]) == sorted(want_parts)
        for name, value in want_parts.items():
            assert np.array_equal(np.asarray(got[0][name]), np.asarray(value)), name
        for e in entries:
            index.release(e)



def _suffix_batch(rng: np.random.Generator, index, held_entries: list) -> tuple:
    """`suffix_arrays`' arguments for a random batch: rows at an offset or not, with trailing
    padding or not, keyed or not, with 0-3 entries found covering their tokens or fewer; written
    entries anywhere in their rows (some before the cached end: pages that replace a partial
    one); a third of the batches uniform (every row from 0, the same cached and computed lengths)."""
    batch = int(rng.integers(1, 6))
    uniform = rng.random() < 0.3
    sizes = rng.integers(0, 4, batch) if not uniform else np.full(batch, int(rng.integers(1, 4)))
    found = rng.choice(held_entries, int(sizes.sum())).tolist()
    ntokens = index.token_counts(np.asarray(found, dtype=np.int64)) if found else np.zeros(0, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(ntokens)])[np.cumsum(sizes)]
    held = ends - np.concatenate([[0], ends[:-1]])  # (each row's entries' tokens)
    if uniform:
        n_real = np.full(batch, int(held.min()) + int(rng.integers(0, 4)))
        trailing, start = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
        covered = np.full(batch, int(held.min()))
        seq = int(n_real[0])
    else:
        n_real = rng.integers(1, 12, batch)
        covered = np.where(rng.random(batch) < 0.7, np.minimum(held, n_real), rng.integers(0, held + 1))
        trailing = np.where(rng.random(batch) < 0.3, rng.integers(1, 4, batch), 0)
        start = np.where(rng.random(batch) < 0.5, rng.integers(0, 3, batch), 0)
        seq = int((start + n_real + trailing).max()) + int(rng.integers(0, 3))
    keyed = (rng.random(batch) < 0.9).astype(np.int64)
    host = rng.integers(0, 100, size=(4, batch, seq)).astype(np.int64)
    w_rows = np.sort(rng.integers(0, batch, int(rng.integers(0, 4))))
    entries = index.reserve_many([bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in w_rows],
                                 rng.integers(1, 5, len(w_rows)), None, None)
    w_n = index.token_counts(np.asarray(entries, dtype=np.int64)) if entries else np.zeros(0, dtype=np.int64)
    w_at = np.asarray([int(rng.integers(0, n_real[r])) for r in w_rows], dtype=np.int64)
    args = (seq, host, start, n_real, covered, keyed, trailing, found, sizes, entries,
            w_rows.astype(np.int64), w_at, w_n)
    return args, entries


@pytest.mark.parametrize("seed", range(10))
def test_the_cpp_suffix_arrays_equal_the_reference(seed: int):
    """`suffix_arrays` (csrc/suffix_arrays.cpp) against `suffix.suffix_arrays` on random batches
    of rows that compute from their cached prefixes on (see `_suffix_batch`)."""
    from llmcache.tiers.exact import suffix

    rng = np.random.default_rng(seed)
    index = NativeIndex(PAGE, 1 << 20, None)
    held_entries = index.reserve_many([bytes([seed, k]) * 16 for k in range(30)], rng.integers(1, PAGE + 1, 30),
                                      None, None)
    index.commit_many(held_entries)
    reached = {"uniform": 0, "straddle": 0, "prefix": 0}
    for _ in range(80):
        args, entries = _suffix_batch(rng, index, held_entries)
        got, want = index.suffix_arrays(*args), suffix.suffix_arrays(index, *args)
        assert got[2:] == want[2:]
        assert np.array_equal(got[1], want[1])
        assert sorted(got[0]) == sorted(want[0])
        for name, value in want[0].items():
            assert np.array_equal(np.asarray(got[0][name]).ravel(), np.asarray(value).ravel()), name
        reached["uniform"] += got[4]
        reached["straddle"] += got[5]
        reached["prefix"] += int(got[1].max() > 0)
        for e in entries:
            index.release(e)
    assert min(reached.values()) > 0, reached  # (the walk reached each kind of batch)


def test_the_cpp_ops_refuse_arguments_that_name_what_is_not_there():
    index = NativeIndex(PAGE, 1 << 20, None)
    entries = index.reserve_many([b"a" * 32, b"b" * 32], [3, 5], None, None)
    index.commit_many(entries)
    host = np.zeros((4, 1, 1), dtype=np.int64)
    flat = _page_keys([1, 2, 3])
    with pytest.raises(RuntimeError, match="no row"):  # (row 1 of a one-row batch)
        index.reserve_pages(flat, PER_ROW, [1], [0], [-1], [3], [0], [b"h"], host, False)
    with pytest.raises(RuntimeError, match="more pages than keys"):
        index.reserve_pages(flat[:1], PER_ROW, [0], [0], [-1], [3 * PAGE], [0], [b"h"], host, False)
    with pytest.raises(RuntimeError, match="sizes must add up"):  # (two entries named, one held)
        index.plan_arrays(1, 8, 8, [0], [0], entries[:1], [2], [], [], [], [], [], [], [])
    with pytest.raises(RuntimeError, match="no entry"):
        index.plan_arrays(1, 8, 8, [0], [0], [7], None, [], [], [], [], [], [], [])
    host = np.zeros((4, 1, 4), dtype=np.int64)
    with pytest.raises(RuntimeError, match="sizes must add up"):  # (one entry found, none named)
        index.suffix_arrays(4, host, [0], [3], [3], [1], [0], [], [1], [], [], [], [])
    with pytest.raises(RuntimeError, match="more tokens than its entries hold"):  # (row 0 covers 8, holds 3)
        index.suffix_arrays(4, np.zeros((4, 2, 4), dtype=np.int64), [0, 0], [4, 4], [8, 3], [1, 1], [0, 0],
                            entries[:1] * 2, [1, 1], [], [], [], [])
    with pytest.raises(RuntimeError, match="outside its T positions"):  # (a span past T)
        index.suffix_arrays(4, host, [2], [3], [0], [0], [0], [], [0], [], [], [], [])
