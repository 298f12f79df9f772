"""The Triton kernels against `llmcache.ops.reference` on fresh random inputs with awkward shapes.

Runs on CPU tensors under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before
triton is imported when there is no GPU), and compiled on CUDA tensors when a GPU is present.
Each test draws a new seed and prints
it in the failure message. Integers compare bit for bit. SimHash bits compare exactly except where
the projection is within float rounding of zero (rule in `_assert_codes_match`).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("compiled Triton needs a GPU; run with TRITON_INTERPRET=1", allow_module_level=True)

from llmcache import ops
from llmcache.ops import reference
from llmcache.ops.triton_kernels import gather_with_mask as triton_gather
from llmcache.ops.triton_kernels import hamming_topk as triton_hamming
from llmcache.ops.triton_kernels._grid import MAX_GRID

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.int32, torch.int64, torch.uint8]
# Both sides sum the same fp32 values (fp16/bf16 -> fp32 is exact) in different orders. Summing d
# products in fp32 errs by at most ~d * 2^-24 * sum_i |x_i p_i| <= d * 6e-8 * ||x|| * ||p|| (Cauchy-
# Schwarz), 2.3e-5 at d = 384; the pooled mean adds a relative error of the same order. A bit may
# therefore differ only where |x . p| < 1e-4 * ||x|| * ||p||, whatever the input dtype.
SIMHASH_REL_TOL = 1e-4


def _generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def _random_codes(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=gen)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data_ptr is one element past a 16-byte boundary (Triton's other variant)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    out = flat.view(t.shape).copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------------------- simhash


def _assert_codes_match(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, planes: torch.Tensor, seed: int):
    """Equal bits, except where |x . plane_j| < SIMHASH_REL_TOL * ||x|| * ||plane_j|| (x, planes in fp64)."""
    x64 = x.double().cpu()
    planes64 = planes.double().cpu()
    proj = x64 @ planes64
    margin = SIMHASH_REL_TOL * x64.norm(dim=1, keepdim=True) * planes64.norm(dim=0, keepdim=True)
    exact = (proj.abs() >= margin).reshape(x.shape[0], -1, 64)
    bits = torch.tensor(reference._BIT_VALUES, dtype=torch.int64)
    differ = ((got.cpu() ^ want.cpu()).unsqueeze(-1) & bits) != 0
    assert not (differ & exact).any(), f"seed {seed}: {int((differ & exact).sum())} bits differ away from zero"
    # The rule must leave almost every bit checked, or the test would be vacuous.
    assert exact.float().mean() > 0.99, f"seed {seed}"


SIMHASH_SHAPES = [(1, 1, 64), (3, 17, 128), (37, 100, 192), (5, 384, 1024)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SIMHASH_SHAPES, ids=lambda s: f"B{s[0]}-d{s[1]}-bits{s[2]}")
def test_simhash(shape, dtype):
    batch, dim, nbits = shape
    gen, seed = _generator()
    x = torch.randn(batch, dim, generator=gen).to(dtype).to(DEVICE)
    planes = torch.randn(dim, nbits, generator=gen).to(DEVICE)
    got = ops.simhash(x, planes, backend="triton")
    want = ops.simhash(x, planes, backend="reference")
    assert got.dtype == torch.int64 and got.shape == (batch, nbits // 64)
    _assert_codes_match(got, want, x.float(), planes, seed)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_simhash_exact_zero_projections(dtype):
    """Small integers make every projection exact, many exactly 0: the >= 0 rule must match bit for bit."""
    gen, seed = _generator()
    x = torch.randint(-2, 3, (19, 24), generator=gen).to(dtype).to(DEVICE)
    x[0] = 0
    planes = torch.randint(-1, 2, (24, 256), generator=gen).float().to(DEVICE)
    got = ops.simhash(x, planes, backend="triton")
    assert torch.equal(got, ops.simhash(x, planes, backend="reference")), f"seed {seed}"
    assert torch.equal(got[0], torch.full_like(got[0], -1)), "the zero vector hashes to all ones"


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 5, 64), (2, 0, 7, 64), (6, 19, 100, 192), (3, 40, 33, 128)],
    ids=lambda s: "B{}-T{}-d{}-bits{}".format(*s),
)
def test_simhash_pooled(shape, dtype, mask_dtype):
    batch, seq, dim, nbits = shape
    gen, seed = _generator()
    embeds = torch.randn(batch, seq, dim, generator=gen).to(dtype).to(DEVICE)
    keep = torch.rand(batch, seq, generator=gen) < 0.6
    keep[-1] = False  # a row with no token: the zero vector, every bit set
    if mask_dtype == torch.bool:
        mask = keep
    else:  # any non-zero value counts as a token
        fill = 1 if mask_dtype == torch.uint8 else -3
        mask = torch.where(keep, torch.randint(1, 4, keep.shape, generator=gen) * fill, 0).to(mask_dtype)
    mask = mask.to(DEVICE)
    planes = torch.randn(dim, nbits, generator=gen).to(DEVICE)
    got = ops.simhash_pooled(embeds, mask, planes, backend="triton")
    want = ops.simhash_pooled(embeds, mask, planes, backend="reference")
    mean = reference.masked_mean(embeds.double(), mask)
    _assert_codes_match(got, want, mean, planes, seed)
    assert torch.equal(got[-1], torch.full_like(got[-1], -1)), f"seed {seed}"


# ----------------------------------------------------------------------------------- hamming_topk

# (B, N, W, k, valid, tags): valid is None, "random" or "none" (every slot invalid).
HAMMING_CASES = [
    (1, 4097, 3, 1, None, False),
    (1, 1, 1, 1, None, False),
    (5, 1000, 1, 4, "random", False),
    (17, 777, 16, 8, None, True),
    (6, 2500, 8, 2, "random", True),
    (3, 0, 4, 3, None, False),
    (2, 0, 1, 1, "random", True),
    (4, 10, 2, 20, "random", False),
    (2, 300, 5, 5, "none", False),
    (3, 50, 2, 100, "random", True),
    (9, 200, 16, 70, "random", False),
    (16, 1500, 4, 64, None, False),
    (33, 4999, 12, 1, "random", True),
    (20, 3001, 2, 16, None, True),
    (2, 129, 6, 65, None, False),
    (1, 2, 1, 2, None, False),
    (16, 1100, 16, 16, "random", True),
    (40, 300, 4, 64, "random", False),
]


def _hamming_id(case) -> str:
    batch, slots, words, k, valid, tags = case
    return f"B{batch}-N{slots}-W{words}-k{k}" + (f"-valid_{valid}" if valid else "") + ("-tags" if tags else "")


def _hamming_inputs(gen, batch, slots, words, valid_kind, tags):
    queries = _random_codes(gen, batch, words)
    bank = _random_codes(gen, slots, words)
    if slots:
        # Near neighbours (a few flipped bits) and exact duplicates, so small distances and ties abound.
        near = torch.randint(0, slots, (min(slots, 4 * batch),), generator=gen)
        flips = _random_codes(gen, near.shape[0], words) & _random_codes(gen, near.shape[0], words)
        bank[near] = queries[torch.arange(near.shape[0]) % batch] ^ (flips & _random_codes(gen, near.shape[0], words))
        dups = torch.randint(0, slots, (slots // 4,), generator=gen)
        bank[dups] = bank[dups.flip(0)]
    valid = None
    if valid_kind == "random":
        valid = torch.rand(slots, generator=gen) < 0.7
    elif valid_kind == "none":
        valid = torch.zeros(slots, dtype=torch.bool)
    query_tag = torch.randint(0, 3, (batch,), generator=gen) if tags else None
    bank_tag = torch.randint(0, 3, (slots,), generator=gen) if tags else None
    move = [t if t is None else t.to(DEVICE) for t in (queries, bank, valid, query_tag, bank_tag)]
    return move


def _assert_topk_equal(queries, bank, k, valid, query_tag, bank_tag, seed):
    dist, idx = ops.hamming_topk(queries, bank, k, valid, query_tag=query_tag, bank_tag=bank_tag, backend="triton")
    want_dist, want_idx = reference.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)
    assert dist.dtype == torch.int32 and idx.dtype == torch.int64
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert torch.equal(dist, want_dist), f"seed {seed}: distances differ"
    assert torch.equal(idx, want_idx), f"seed {seed}: indices differ"
    return dist, idx


@pytest.mark.parametrize("case", HAMMING_CASES, ids=_hamming_id)
def test_hamming_topk(case):
    batch, slots, words, k, valid_kind, tags = case
    gen, seed = _generator()
    queries, bank, valid, query_tag, bank_tag = _hamming_inputs(gen, batch, slots, words, valid_kind, tags)
    dist, idx = _assert_topk_equal(queries, bank, k, valid, query_tag, bank_tag, seed)
    if valid_kind == "none" or slots == 0:
        assert (idx == -1).all() and (dist == 64 * words + 1).all()


@pytest.mark.parametrize("words", [1, 7, 16])
def test_hamming_topk_extreme_distances(words):
    """Distances 0 and 64 * W (every bit differs) at the edges of the packed keys."""
    gen, seed = _generator()
    queries = torch.zeros(2, words, dtype=torch.int64)
    queries[1] = -1
    bank = _random_codes(gen, 130, words)
    bank[[3, 129]] = 0
    bank[[5, 64]] = -1
    valid = torch.zeros(130, dtype=torch.bool)
    valid[[3, 5, 64]] = True
    queries, bank, valid = queries.to(DEVICE), bank.to(DEVICE), valid.to(DEVICE)
    dist, idx = _assert_topk_equal(queries, bank, 3, None, None, None, seed)
    assert dist[:, :2].tolist() == [[0, 0], [0, 0]] and idx[:, :2].tolist() == [[3, 129], [5, 64]]
    far = 64 * words
    for k in (3, 130):  # registers path and all-keys path
        dist, idx = _assert_topk_equal(queries, bank, k, valid, None, None, seed)
        assert dist[0, :3].tolist() == [0, far, far] and idx[0, :3].tolist() == [3, 5, 64]
        assert dist[1, :3].tolist() == [0, 0, far] and idx[1, :3].tolist() == [5, 64, 3]
        assert (idx[:, 3:] == -1).all() and (dist[:, 3:] == far + 1).all()


@pytest.mark.parametrize("k", [1, 9, 70], ids=lambda k: f"k{k}")
def test_hamming_topk_misaligned_inputs(k):
    """queries and bank whose base pointers are not 16-byte aligned (views one int64 in)."""
    gen, seed = _generator()
    queries, bank, valid, query_tag, bank_tag = _hamming_inputs(gen, 5, 700, 3, "random", True)
    _assert_topk_equal(_misaligned(queries), _misaligned(bank), k, valid, query_tag, bank_tag, seed)


@pytest.mark.parametrize("batch,k", [(19, 1), (19, 9), (40, 70)], ids=lambda v: str(v))
def test_hamming_topk_small_grid_limit(batch, k):
    """A 2 x 2 grid limit: the keys kernel loops over query blocks and bank tiles, top-k splits fewer."""
    gen, seed = _generator()
    queries, bank, valid, query_tag, bank_tag = _hamming_inputs(gen, batch, 5000, 2, "random", True)
    launch = triton_hamming.launch_config(batch, 5000, k, 132, max_grid=(2, 2))
    assert launch.grid[0] <= 2 and launch.grid[1] <= 2
    if launch.all_keys:  # loops: more work per axis than programs
        assert launch.q_blocks > launch.grid[0] and launch.slot_blocks > launch.grid[1]
    dist, idx = triton_hamming.hamming_topk_triton(queries, bank, k, valid, query_tag, bank_tag, max_grid=(2, 2))
    want_dist, want_idx = reference.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)
    assert torch.equal(dist, want_dist) and torch.equal(idx, want_idx), f"seed {seed}"


@pytest.mark.parametrize("k", [1, 64, 65], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("slots", [8_400_000, 2**31 + 5], ids=lambda n: f"N{n}")
def test_hamming_topk_grid_fits_past_65535(slots, k):
    """Banks past 65,535 tiles: no grid axis beyond its limit, and the programs still cover every tile."""
    for batch in (1, 16, 10_000):
        launch = triton_hamming.launch_config(batch, slots, k, 132)
        assert all(size <= limit for size, limit in zip(launch.grid, MAX_GRID)), launch
        if launch.all_keys:
            assert launch.slot_blocks * launch.block_n >= slots
        else:
            assert launch.slot_blocks * launch.slots_per_split >= slots
            assert launch.slots_per_split % launch.block_n == 0


def test_hamming_topk_refuses_an_impossible_grid():
    with pytest.raises(ValueError, match="grid axis 0"):
        triton_hamming.launch_config(100, 10, 1, 132, max_grid=(2, 2))


# ------------------------------------------------------------------------------- gather_with_mask

# (N, Tv, T, F, B, M): bank rows, stored length, batch length, trailing shape, batch rows, misses.
GATHER_CASES = [
    (5, 7, 9, (3, 4), 6, 2),
    (4, 12, 5, (2,), 5, 0),
    (1, 3, 3, (), 1, 0),
    (0, 3, 4, (3,), 3, 3),
    (3, 2, 3, (0,), 4, 1),
    (6, 50, 41, (33,), 7, 3),
    (3, 1, 1100, (1,), 4, 2),
    (4, 1, 1, (1,), 5, 2),
    (3, 6, 1, (7,), 4, 1),
    (2, 1, 5, (), 3, 1),
    (4, 16, 32, (64,), 16, 16),
]


def _gather_id(case) -> str:
    slots, stored, seq, feat, batch, misses = case
    return f"N{slots}-Tv{stored}-T{seq}-F{'x'.join(map(str, feat)) or 'none'}-B{batch}-M{misses}"


@pytest.mark.parametrize("align_end", [False, True], ids=["align_start", "align_end"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", GATHER_CASES, ids=_gather_id)
def test_gather_with_mask(case, dtype, align_end):
    gen, seed = _generator()
    values, slot, computed, row, last_used, hit_count = _gather_inputs(gen, case, dtype)
    tick = 2**40 + random.randrange(100)
    args = [t.to(DEVICE) for t in (values, slot, computed, row)]
    got_last, got_count = last_used.clone().to(DEVICE), hit_count.clone().to(DEVICE)
    got = ops.gather_with_mask(*args, got_last, got_count, tick, align_end, backend="triton")
    want = reference.gather_with_mask(values, slot, computed, row, last_used, hit_count, tick, align_end)
    _assert_gather_equal(got, got_last, got_count, want, last_used, hit_count, seed)


def _gather_inputs(gen, case, dtype):
    """values, slot, computed, row, last_used, hit_count for a GATHER_CASES entry (on the CPU)."""
    slots, stored, seq, feat, batch, misses = case
    values = torch.randn(slots, stored, *feat, generator=gen).to(dtype)
    computed = torch.randn(misses, seq, *feat, generator=gen).to(dtype)
    hit = torch.rand(batch, generator=gen) < 0.6
    if misses == 0:
        hit[:] = True
    if slots == 0:
        hit[:] = False
    slot = torch.where(hit, torch.randint(0, max(slots, 1), (batch,), generator=gen), -1)
    row = torch.where(hit, -1, torch.randint(0, max(misses, 1), (batch,), generator=gen))
    last_used = torch.randint(0, 100, (slots,), generator=gen)
    hit_count = torch.randint(0, 100, (slots,), generator=gen)
    return values, slot, computed, row, last_used, hit_count


def _assert_gather_equal(got, got_last, got_count, want, last_used, hit_count, seed):
    bits = {2: torch.int16, 4: torch.int32}[want.element_size()]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu().view(bits), want.view(bits)), f"seed {seed}: outputs differ"
    assert torch.equal(got_last.cpu(), last_used), f"seed {seed}: last_used differs"
    assert torch.equal(got_count.cpu(), hit_count), f"seed {seed}: hit_count differs"


@pytest.mark.parametrize("align_end", [False, True], ids=["align_start", "align_end"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_with_mask_misaligned_inputs(dtype, align_end):
    """values and computed whose base pointers are one element past a 16-byte boundary."""
    gen, seed = _generator()
    values, slot, computed, row, last_used, hit_count = _gather_inputs(gen, (5, 16, 24, (64,), 9, 4), dtype)
    got_last, got_count = last_used.clone().to(DEVICE), hit_count.clone().to(DEVICE)
    args = (_misaligned(values.to(DEVICE)), slot.to(DEVICE), _misaligned(computed.to(DEVICE)), row.to(DEVICE))
    got = ops.gather_with_mask(*args, got_last, got_count, 11, align_end, backend="triton")
    want = reference.gather_with_mask(values, slot, computed, row, last_used, hit_count, 11, align_end)
    _assert_gather_equal(got, got_last, got_count, want, last_used, hit_count, seed)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_with_mask_out_of_range_rows_read_zeros(dtype):
    """A slot >= N or a miss row outside [0, M) gives a zero row and moves no counter, as the CUDA kernel.

    The reference and the CPU kernel raise instead; a GPU kernel cannot without a host sync.
    """
    gen, seed = _generator()
    values = torch.randn(3, 4, 5, generator=gen).to(dtype)
    computed = torch.randn(2, 4, 5, generator=gen).to(dtype)
    slot = torch.tensor([1, 3, 7, -1, -1, -1, 1])
    row = torch.tensor([-1, -1, -1, 0, 2, -5, -1])
    last_used, hit_count = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    got_last, got_count = last_used.clone().to(DEVICE), hit_count.clone().to(DEVICE)
    args = [t.to(DEVICE) for t in (values, slot, computed, row)]
    got = ops.gather_with_mask(*args, got_last, got_count, 9, False, backend="triton").cpu()
    in_range = torch.tensor([0, 3, 6])
    want = reference.gather_with_mask(values, slot[in_range], computed, row[in_range], last_used, hit_count, 9)
    assert torch.equal(got[in_range].float(), want.float()), f"seed {seed}"
    assert (got[[1, 2, 4, 5]] == 0).all() and not torch.signbit(got[[1, 2, 4, 5]].float()).any()
    assert got_last.tolist() == [0, 9, 0] and got_count.tolist() == [0, 2, 0]


@pytest.mark.parametrize("align_end", [False, True], ids=["align_start", "align_end"])
def test_gather_with_mask_small_grid_limit(align_end):
    """Two programs for 4 rows x 3 chunks: each program walks several (row, chunk) items."""
    gen, seed = _generator()
    case = (4, 900, 1000, (3,), 4, 2)  # 3000 float32 elements per row: 3 chunks of 1024
    values, slot, computed, row, last_used, hit_count = _gather_inputs(gen, case, torch.float32)
    launch = triton_gather.launch_config(4, 1000, 900, 3, 4, align_end, max_grid=(2,))
    assert launch.grid == (2,) and launch.num_items == 12
    got_last, got_count = last_used.clone().to(DEVICE), hit_count.clone().to(DEVICE)
    args = [t.to(DEVICE) for t in (values, slot, computed, row)]
    got = triton_gather.gather_with_mask_triton(*args, got_last, got_count, 5, align_end, max_grid=(2,))
    want = reference.gather_with_mask(values, slot, computed, row, last_used, hit_count, 5, align_end)
    _assert_gather_equal(got, got_last, got_count, want, last_used, hit_count, seed)


@pytest.mark.parametrize("shape", [(2, 70_000_000, 1), (3, 1, 80_000_000), (2**20, 2**16, 2**10)], ids=str)
def test_gather_with_mask_grid_fits_past_65535(shape):
    """Rows of more than 65,535 chunks, and more items than axis 0 allows: one capped axis covers them all."""
    batch, seq, features = shape
    launch = triton_gather.launch_config(batch, seq, seq, features, 2, True)
    assert len(launch.grid) == 1 and 1 <= launch.grid[0] <= MAX_GRID[0]
    assert launch.chunks_per_row * launch.block >= seq * features
    assert launch.num_items == batch * launch.chunks_per_row
