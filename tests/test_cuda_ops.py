"""The CUDA kernels (kernels/*.cu through llmcache._C) against the reference, on the GPU.

Integers (lookup distances and indices, gathered bytes, counters) must match exactly. SimHash
bits may differ only where the projection is within float rounding of zero: the test ignores
bit j of row b when |x_b . p_j| <= 1e-3 * sum_i |x_bi * p_ij| (computed in float64; this is at
most 1e-3 * |x_b| * |p_j| by Cauchy-Schwarz). Any fp32 summation order is within
d * 2^-24 * sum_i |x_bi * p_ij| of the exact sum (2.4e-4 of it at d = 4096), and a TF32 matmul
in the reference within about 2^-11 of it, so every other bit is the exact sign in both. For the
pooled hash the rounding of the fp32 mean adds count * 2^-24 * mean_t |e_ti| per component, so
there the bound uses |p_ij| times the masked mean of |e_ti| (>= the mean's own magnitude).
"""

import pytest
import torch
from conftest import random_codes

from llmcache import ops
from llmcache.ops import reference
from llmcache.ops._library import extension_has_cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not extension_has_cuda(), reason="llmcache._C was built without CUDA kernels"
    ),
]

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
TOL = 1e-3
MAX_K = 256  # kernels/cuda_kernels.h kHammingMaxK


def bits_of(codes: torch.Tensor) -> torch.Tensor:
    """int64 [B, W] -> bool [B, 64 * W], bit j of word w at column 64 * w + j."""
    shifts = torch.arange(64, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)


def assert_bits_match(got, want, x64, magnitude64, planes):
    """got/want int64 codes; x64 the exact input of the projection; magnitude64 bounds |x64| per component."""
    p64 = planes.double().cpu()
    unstable = (x64 @ p64).abs() <= TOL * (magnitude64 @ p64.abs())
    got_bits, want_bits = bits_of(got.cpu()), bits_of(want.cpu())
    truth = (x64 @ p64) >= 0
    bad = (got_bits != truth) & ~unstable
    assert not bad.any(), f"{int(bad.sum())} stable bits differ from the exact sign"
    bad = (got_bits != want_bits) & ~unstable
    assert not bad.any(), f"{int(bad.sum())} stable bits differ from the reference"


SIMHASH_CASES = [
    (1, 1, 64),
    (3, 33, 64),
    (17, 384, 256),
    (64, 576, 1024),
    (5, 100, 192),
    (9, 4099, 128),
    (1000, 64, 64),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("B,d,nbits", SIMHASH_CASES, ids=[f"B{b}-d{d}-bits{n}" for b, d, n in SIMHASH_CASES])
def test_simhash(dtype, B, d, nbits, gen):
    x = torch.randn(B, d, generator=gen).to(dtype)
    planes = torch.randn(d, nbits, generator=gen)
    xc, pc = x.cuda(), planes.cuda()
    got = ops.simhash(xc, pc, backend="cuda")
    want = ops.simhash(xc, pc, backend="reference")
    assert got.dtype == torch.int64 and got.shape == (B, nbits // 64) and got.device == xc.device
    x64 = x.double()
    assert_bits_match(got, want, x64, x64.abs(), planes)


def test_simhash_planes_in_half_and_offset_input(gen):
    # planes in bf16 are converted to fp32; x starts one row into its storage (not 16-byte aligned).
    base = torch.randn(6, 77, generator=gen)
    planes = torch.randn(77, 128, generator=gen).to(torch.bfloat16)
    x = base.cuda()[1:]
    got = ops.simhash(x, planes.cuda(), backend="cuda")
    want = ops.simhash(x, planes.cuda(), backend="reference")
    x64 = base[1:].double()
    assert_bits_match(got, want, x64, x64.abs(), planes.float())


POOLED_CASES = [
    (1, 1, 8, 64),
    (4, 7, 33, 64),
    (8, 50, 384, 256),
    (3, 129, 64, 1024),
    (1, 3000, 64, 128),  # one row, long T: the token axis is split across blocks
    (2, 513, 1000, 64),
    (3, 0, 16, 64),  # no tokens at all: every row hashes the zero vector
    (2, 5, 0, 64),  # d = 0: every projection is 0
]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("B,T,d,nbits", POOLED_CASES, ids=[f"B{b}-T{t}-d{d}-bits{n}" for b, t, d, n in POOLED_CASES])
def test_simhash_pooled(mask_dtype, dtype, B, T, d, nbits, gen):
    embeds = torch.randn(B, T, d, generator=gen).to(dtype)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0] = False  # an empty row hashes the zero vector: every bit set
    planes = torch.randn(d, nbits, generator=gen)
    mask_in = mask.to(mask_dtype)
    if mask_dtype in (torch.int32, torch.int64):
        mask_in = mask_in * 3  # any nonzero value marks a token
    ec, mc, pc = embeds.cuda(), mask_in.cuda(), planes.cuda()
    got = ops.simhash_pooled(ec, mc, pc, backend="cuda")
    want = ops.simhash_pooled(ec, mc, pc, backend="reference")
    assert got.shape == (B, nbits // 64) and got.dtype == torch.int64
    assert_bits_match(got, want, *_pooled_truth(embeds, mask), planes)
    empty = ~mask.any(1)
    assert empty[0] and got.cpu()[empty].eq(-1).all(), "a row without tokens must hash to all ones"


def _pooled_truth(embeds, mask):
    """The exact masked mean (float64) and the masked mean of |e|, which bounds its rounding."""
    weight = mask.double().unsqueeze(-1)
    count = weight.sum(1).clamp_min(1.0)
    return (embeds.double() * weight).sum(1) / count, (embeds.double().abs() * weight).sum(1) / count


@pytest.mark.parametrize("offset_bytes", [4, 8])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_simhash_pooled_misaligned_embeds(dtype, offset_bytes, gen):
    # d = 40 is a multiple of every vector width, so only the base address (4 or 8 bytes past a
    # 16-byte boundary) sends pass 1 to its scalar loads.
    B, T, d = 2, 9, 40
    skip = offset_bytes // torch.empty((), dtype=dtype).element_size()
    flat = torch.randn(B * T * d + skip, generator=gen).to(dtype).cuda()
    embeds = flat[skip:].view(B, T, d)
    assert embeds.data_ptr() % 16 == offset_bytes, "the view must start off a 16-byte boundary"
    mask = torch.rand(B, T, generator=gen) > 0.2
    planes = torch.randn(d, 64, generator=gen)
    got = ops.simhash_pooled(embeds, mask.cuda(), planes.cuda(), backend="cuda")
    want = ops.simhash_pooled(embeds, mask.cuda(), planes.cuda(), backend="reference")
    assert_bits_match(got, want, *_pooled_truth(embeds.cpu(), mask), planes)


@pytest.mark.parametrize("mask_dtype", [torch.int16, torch.float32, torch.float16], ids=str)
def test_simhash_pooled_op_takes_any_mask_dtype(mask_dtype, gen):
    # Direct torch.ops callers may pass masks the public function refuses: int16 is read as it
    # is, floats become a bool mask first; every nonzero marks a token.
    embeds = torch.randn(3, 11, 48, generator=gen).cuda()
    mask = torch.rand(3, 11, generator=gen) > 0.4
    planes = torch.randn(48, 128, generator=gen).cuda()
    want = torch.ops.llmcache.simhash_pooled(embeds, mask.cuda(), planes)
    got = torch.ops.llmcache.simhash_pooled(embeds, (mask.to(mask_dtype) * -2).cuda(), planes)
    assert torch.equal(got, want)


def test_simhash_pooled_runs_two_kernels(gen):
    # The masked sum and the projection (with the d-split reduction fused into it): no mask
    # conversion, no finalize kernel. B = 256, d = 768, 256 bits splits d across blocks.
    embeds = torch.randn(256, 16, 768, generator=gen).to(torch.bfloat16).cuda()
    mask = torch.ones(256, 16, dtype=torch.long).cuda()
    planes = torch.randn(768, 256, generator=gen).cuda()
    torch.ops.llmcache.simhash_pooled(embeds, mask, planes)  # warm-up: allocator, module load
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        codes = torch.ops.llmcache.simhash_pooled(embeds, mask, planes)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, kernels
    assert sum("masked_sum_kernel" in k for k in kernels) == 1 and sum("simhash_project_kernel" in k for k in kernels) == 1
    assert torch.equal(codes, ops.simhash_pooled(embeds, mask, planes, backend="cuda"))


@pytest.mark.parametrize("B,T,d,nbits", [(70000, 3, 8, 64), (40, 2, 3000, 192)], ids=["B70000", "d-split"])
def test_simhash_pooled_large_grids(B, T, d, nbits, gen):
    # Grid x past 65,535 blocks; and few rows, many columns: the projection splits d and its
    # last block per (rows, word) packs the bits.
    embeds = torch.randn(B, T, d, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    planes = torch.randn(d, nbits, generator=gen)
    got = ops.simhash_pooled(embeds.cuda(), mask.cuda(), planes.cuda(), backend="cuda")
    want = ops.simhash_pooled(embeds.cuda(), mask.cuda(), planes.cuda(), backend="reference")
    assert_bits_match(got, want, *_pooled_truth(embeds, mask), planes)
    x = torch.randn(B, d, generator=gen)
    got = ops.simhash(x.cuda(), planes.cuda(), backend="cuda")
    assert_bits_match(got, ops.simhash(x.cuda(), planes.cuda(), backend="reference"), x.double(), x.double().abs(), planes)


TOPK_CASES = [
    (1, 1, 1, 1),
    (3, 0, 2, 1),  # empty bank
    (1, 4097, 3, 1),
    (5, 1000, 4, 5),
    (7, 3001, 16, 3),
    (4, 50, 2, 80),  # k > N
    (65, 20000, 4, 1),
    (2, 777, 9, 16),
    (6, 300, 5, 2),
    (1, 100003, 1, 64),  # one query, many splits, massive ties at W = 1
    (37, 100003, 2, 33),
    (3, 9000, 8, 256),  # the largest k
    (300, 5000, 12, 100),
    (1, 255, 15, 129),
    (8, 2049, 13, 31),
    (1, 2**20, 4, 1),  # the cache's lookup on a large bank: 512 splits merged in pass 2
    (2, 300000, 4, 256),  # pass 2 over 2 x 147 lists of 256 keys
    (70000, 300, 2, 1),  # more queries than 65,535
]


def _topk_inputs(B, N, W, filtering, sparse, gen):
    q, bank = random_codes(B, W, gen, sparse), random_codes(N, W, gen, sparse)
    if N > 0 and B > 0:
        bank[torch.randint(0, N, (min(N, 3 * B),), generator=gen)] = q.repeat(3, 1)[: min(N, 3 * B)]  # exact hits
    valid = None
    if filtering in ("valid", "tags"):
        valid = torch.rand(N, generator=gen) > 0.25
    if filtering == "invalid":
        valid = torch.zeros(N, dtype=torch.bool)
    tags = {}
    if filtering == "tags":
        tags = {
            "query_tag": torch.randint(0, 4, (B,), generator=gen),
            "bank_tag": torch.randint(0, 3, (N,), generator=gen),
        }
    return q, bank, valid, tags


def _cuda(t):
    return None if t is None else t.cuda()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("filtering", ["none", "valid", "tags", "invalid"])
@pytest.mark.parametrize("B,N,W,k", TOPK_CASES, ids=[f"B{b}-N{n}-W{w}-k{k}" for b, n, w, k in TOPK_CASES])
def test_hamming_topk(B, N, W, k, filtering, sparse, gen):
    q, bank, valid, tags = _topk_inputs(B, N, W, filtering, sparse, gen)
    q, bank, valid = q.cuda(), bank.cuda(), _cuda(valid)
    tags = {name: t.cuda() for name, t in tags.items()}
    got = ops.hamming_topk(q, bank, k, valid, backend="cuda", **tags)
    want = ops.hamming_topk(q, bank, k, valid, backend="reference", **tags)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
    assert got[0].shape == (B, k) and got[1].shape == (B, k) and got[0].device == q.device
    assert torch.equal(got[0], want[0]), "distances differ"
    assert torch.equal(got[1], want[1]), "indices differ"
    if filtering == "invalid":
        assert got[1].eq(-1).all() and got[0].eq(64 * W + 1).all()


@pytest.mark.parametrize("W", range(1, 17), ids=[f"W{w}" for w in range(1, 17)])
def test_hamming_topk_every_width(W, gen):
    q, bank = random_codes(11, W, gen, sparse=True), random_codes(1500, W, gen, sparse=True)
    got = ops.hamming_topk(q.cuda(), bank.cuda(), 7, backend="cuda")
    want = ops.hamming_topk(q.cuda(), bank.cuda(), 7, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_hamming_topk_k_too_large_is_refused(gen):
    q, bank = random_codes(2, 2, gen).cuda(), random_codes(10, 2, gen).cuda()
    with pytest.raises(RuntimeError, match=f"k <= {MAX_K}"):
        ops.hamming_topk(q, bank, MAX_K + 1, backend="cuda")


GATHER_CASES = [
    ((4,), 3, 5, 2),
    ((8,), 1, 1, 1),
    ((2, 3), 6, 4, 7),  # odd feature bytes: narrow copy units
    ((16,), 0, 9, 5),  # T = 0: nothing to copy, counters still move
    ((), 5, 3, 4),  # values [N, Tv]: one element per position
    ((64,), 9, 9, 3),
    ((1024,), 300, 200, 3),  # rows of many copy chunks
    ((1,), 1, 1, 3),  # F = 1, T = 1, Tv = 1: single-token rows
    ((1,), 1, 4, 3),  # T = 1 < Tv
    ((3,), 4, 1, 5),  # Tv = 1 < T
]


@pytest.mark.parametrize("offset", ["aligned", "element", "8B"])
@pytest.mark.parametrize("align_end", [False, True], ids=["start", "end"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "feat,T,Tv,B",
    GATHER_CASES,
    ids=[f"F{'x'.join(map(str, f)) or '1'}-T{t}-Tv{tv}-B{b}" for f, t, tv, b in GATHER_CASES],
)
def test_gather_with_mask(offset, align_end, dtype, feat, T, Tv, B, gen):
    N = 6
    # values and computed start 0 bytes, one element (2 or 4 bytes) or 8 bytes into their
    # storage: the copy unit falls back from 16 bytes to 2, 4 or 8.
    skip = {"aligned": 0, "element": 1, "8B": 8 // torch.empty((), dtype=dtype).element_size()}[offset]
    values = torch.randn((N * Tv * max(1, _numel(feat)) + skip,), generator=gen).to(dtype).cuda()
    values = values[skip:].view((N, Tv) + feat)
    slot = torch.randint(-1, N, (B,), generator=gen)
    slot[0] = 2
    if B > 1:
        slot[1] = 2  # two rows read one slot: its hit count goes up by two
    if B > 2:
        slot[2] = -1
    misses = int((slot < 0).sum())
    flat = torch.randn((misses * T * max(1, _numel(feat)) + skip,), generator=gen).to(dtype).cuda()
    computed = flat[skip:].view((misses, T) + feat)
    row = torch.where(slot < 0, (slot < 0).cumsum(0) - 1, 0)
    slot, row = slot.cuda(), row.cuda()
    counters = [torch.randint(0, 5, (N,), generator=gen).cuda() for _ in range(2)]
    want_counters = [c.clone() for c in counters]
    want = reference.gather_with_mask(values, slot, computed, row, *want_counters, 11, align_end)
    got = ops.gather_with_mask(values, slot, computed, row, *counters, 11, align_end, backend="cuda")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "gathered bytes differ"
    assert torch.equal(counters[0], want_counters[0]), "last_used differs"
    assert torch.equal(counters[1], want_counters[1]), "hit_count differs"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_gather_with_mask_every_row_hits_one_slot(gen):
    # M = 0 computed rows, and 1000 rows hitting 3 slots: the atomic counts must add up.
    values = torch.randn(4, 5, 8, generator=gen).cuda()
    slot = torch.randint(0, 3, (1000,), generator=gen).cuda()
    computed = values.new_empty((0, 5, 8))
    row = torch.zeros(1000, dtype=torch.long).cuda()
    last, hits = torch.zeros(4, dtype=torch.long).cuda(), torch.full((4,), 7, dtype=torch.long).cuda()
    want_last, want_hits = last.clone(), hits.clone()
    want = reference.gather_with_mask(values, slot, computed, row, want_last, want_hits, 5)
    got = ops.gather_with_mask(values, slot, computed, row, last, hits, 5, backend="cuda")
    assert torch.equal(got, want)
    assert torch.equal(last, want_last) and torch.equal(hits, want_hits)
    assert int(hits.sum()) == 4 * 7 + 1000


def test_gather_with_mask_out_of_range_rows_are_zero(gen):
    # A slot >= N or a miss row outside [0, M) cannot be reported without a host sync (direct
    # torch.ops callers only; the public function documents the ranges): the row is zero and no
    # counter moves.
    values = torch.randn(4, 3, 8, generator=gen).cuda()
    computed = torch.randn(2, 3, 8, generator=gen).cuda()
    slot = torch.tensor([1, 4, 99, -1, -1, -1]).cuda()
    row = torch.tensor([0, 0, 0, 1, 2, -5]).cuda()
    last, hits = torch.zeros(4, dtype=torch.long).cuda(), torch.zeros(4, dtype=torch.long).cuda()
    out = torch.ops.llmcache.gather_with_mask(values, slot, computed, row, last, hits, 7, False)
    assert torch.equal(out[0], values[1]) and torch.equal(out[3], computed[1])
    assert out[[1, 2, 4, 5]].eq(0).all(), "out-of-range rows must be zero-filled"
    assert last.tolist() == [0, 7, 0, 0] and hits.tolist() == [0, 1, 0, 0]


def test_gather_with_mask_more_rows_than_blocks(gen):
    # 2^20 + 3 rows of one 16-byte position: more rows than the grid's 2^20 blocks (grid stride).
    B, N = 2**20 + 3, 8
    values = torch.randn(N, 1, 4, generator=gen).cuda()
    slot = torch.randint(-1, N, (B,), generator=gen).cuda()
    computed = torch.randn(B, 1, 4, generator=gen).cuda()
    row = torch.arange(B).cuda()
    counters = [torch.zeros(N, dtype=torch.long).cuda() for _ in range(2)]
    want_counters = [c.clone() for c in counters]
    want = reference.gather_with_mask(values, slot, computed, row, *want_counters, 3)
    got = ops.gather_with_mask(values, slot, computed, row, *counters, 3, backend="cuda")
    assert torch.equal(got, want)
    assert torch.equal(counters[0], want_counters[0]) and torch.equal(counters[1], want_counters[1])


def test_unchecked_entries_match_the_public_functions(gen):
    from llmcache.ops.gather_with_mask import gather_with_mask_unchecked
    from llmcache.ops.hamming_topk import hamming_topk_unchecked
    from llmcache.ops.simhash import simhash_pooled_unchecked

    args = _sample_args(gen)
    embeds, mask, planes = args["simhash_pooled"]
    want = ops.simhash_pooled(embeds, mask, planes, backend="cuda")
    assert torch.equal(simhash_pooled_unchecked(embeds, mask, planes, backend="cuda"), want)
    q, bank, k, valid, _, _ = args["hamming_topk"]
    tags = torch.zeros(q.shape[0], dtype=torch.long).cuda(), torch.zeros(bank.shape[0], dtype=torch.long).cuda()
    got = hamming_topk_unchecked(q, bank, k, valid, *tags, backend="cuda")
    want = ops.hamming_topk(q, bank, k, valid, query_tag=tags[0], bank_tag=tags[1], backend="cuda")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    values, slot, computed, row, last, hits, tick, align_end = args["gather_with_mask"]
    got = gather_with_mask_unchecked(values, slot, computed, row, last, hits, tick, align_end, backend="cuda")
    want = ops.gather_with_mask(values, slot, computed, row, last.clone(), hits.clone(), tick, align_end, backend="cuda")
    assert torch.equal(got, want)


def _sample_args(gen):
    x = torch.randn(5, 32, generator=gen).cuda()
    planes = torch.randn(32, 128, generator=gen).cuda()
    embeds, mask = torch.randn(3, 7, 32, generator=gen).cuda(), torch.ones(3, 7, dtype=torch.long).cuda()
    q, bank = random_codes(4, 2, gen).cuda(), random_codes(50, 2, gen).cuda()
    valid = (torch.rand(50, generator=gen) > 0.5).cuda()
    values = torch.randn(6, 4, 8, generator=gen).cuda()
    slot, row = torch.tensor([1, -1, 3, 1]).cuda(), torch.tensor([0, 0, 0, 0]).cuda()
    computed = torch.randn(1, 4, 8, generator=gen).cuda()
    last, hits = torch.zeros(6, dtype=torch.long).cuda(), torch.zeros(6, dtype=torch.long).cuda()
    return {
        "simhash": (x, planes),
        "simhash_pooled": (embeds, mask, planes),
        "hamming_topk": (q, bank, 3, valid, None, None),
        "gather_with_mask": (values, slot, computed, row, last, hits, 3, False),
    }


@pytest.mark.parametrize("op", ["simhash", "simhash_pooled", "hamming_topk", "gather_with_mask"])
def test_opcheck(op, gen):
    torch.library.opcheck(getattr(torch.ops.llmcache, op), _sample_args(gen)[op])


def test_opcheck_hamming_topk_with_tags_and_splits(gen):
    q, bank = random_codes(2, 3, gen).cuda(), random_codes(9000, 3, gen).cuda()
    qt, bt = torch.randint(0, 2, (2,), generator=gen).cuda(), torch.randint(0, 2, (9000,), generator=gen).cuda()
    torch.library.opcheck(torch.ops.llmcache.hamming_topk, (q, bank, 5, None, qt, bt))


def test_ops_capture_in_a_cuda_graph(gen):
    """No op synchronises with the host: each one records into a CUDA graph and replays exactly."""
    args = _sample_args(gen)
    expected = {
        op: getattr(torch.ops.llmcache, op)(*[a.clone() if torch.is_tensor(a) else a for a in op_args])
        for op, op_args in args.items()
    }
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = {op: getattr(torch.ops.llmcache, op)(*op_args) for op, op_args in args.items()}
    graph.replay()
    torch.cuda.synchronize()
    for op, want in expected.items():
        got = outputs[op]
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w), op
