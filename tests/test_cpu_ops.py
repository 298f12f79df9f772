"""The C++ CPU kernels (and the dispatcher's default CPU path) against the reference.

Integers (codes of a lookup, distances, indices, gathered bytes, counters) must match exactly.
SimHash bits may differ only where the projection is within float rounding of zero: the test
ignores bit j of row b when |x_b . p_j| <= tol * sum_i |x_bi * p_ij| (tol 1e-5 for fp32 sums of
fp32 products; the fp16/bf16 inputs are converted exactly to fp32, so the same rule holds).
"""

import pytest
import torch
from conftest import random_codes

import llmcache
from llmcache import ops
from llmcache.ops import reference

needs_ext = pytest.mark.skipif(not llmcache.build_info()["extension"], reason="llmcache._C not built")
CPU_BACKENDS = ["reference"] + (["cpp"] if llmcache.build_info()["extension"] else [])


def unstable_bits(x: torch.Tensor, planes: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """[B, nbits] bool: projections too close to zero for their sign to be defined."""
    x64, p64 = x.double(), planes.double()
    return (x64 @ p64).abs() <= tol * (x64.abs() @ p64.abs())


def bits_of(codes: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(64)
    return ((codes.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)


def assert_codes_match(got, x, planes):
    want = (x.double() @ planes.double()) >= 0
    ok = (bits_of(got) == want) | unstable_bits(x, planes)
    assert ok.all(), f"{(~ok).sum().item()} stable bits differ"


SIMHASH_CASES = [(1, 1, 64), (3, 33, 64), (17, 384, 256), (64, 576, 1024), (5, 100, 192)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,d,nbits", SIMHASH_CASES, ids=[f"B{b}-d{d}-bits{n}" for b, d, n in SIMHASH_CASES])
def test_simhash(backend, dtype, B, d, nbits, gen):
    x = torch.randn(B, d, generator=gen).to(dtype)
    planes = torch.randn(d, nbits, generator=gen)
    assert_codes_match(ops.simhash(x, planes, backend=backend), x.float(), planes)


POOLED_CASES = [(1, 1, 8, 64), (4, 7, 33, 64), (8, 50, 384, 256), (3, 129, 64, 1024)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B,T,d,nbits", POOLED_CASES, ids=[f"B{b}-T{t}-d{d}-bits{n}" for b, t, d, n in POOLED_CASES]
)
def test_simhash_pooled(backend, dtype, B, T, d, nbits, gen):
    embeds = torch.randn(B, T, d, generator=gen).to(dtype)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0] = False  # an empty row hashes the zero vector: every bit set
    planes = torch.randn(d, nbits, generator=gen)
    codes = ops.simhash_pooled(embeds, mask.long(), planes, backend=backend)
    assert_codes_match(codes, reference.masked_mean(embeds, mask), planes)
    assert codes[0].eq(-1).all()


TOPK_CASES = [
    (1, 1, 1, 1),
    (3, 0, 2, 1),
    (1, 4097, 3, 1),
    (5, 1000, 4, 5),
    (7, 3001, 16, 3),
    (4, 50, 2, 80),
    (65, 20000, 4, 1),
    (2, 777, 9, 16),
    (6, 300, 5, 2),
]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("filtering", ["none", "valid", "tags"])
@pytest.mark.parametrize("B,N,W,k", TOPK_CASES, ids=[f"B{b}-N{n}-W{w}-k{k}" for b, n, w, k in TOPK_CASES])
@needs_ext
def test_hamming_topk_cpp(B, N, W, k, filtering, sparse, gen):
    q, bank = random_codes(B, W, gen, sparse), random_codes(N, W, gen, sparse)
    valid = (torch.rand(N, generator=gen) > 0.25) if filtering != "none" else None
    tags = {}
    if filtering == "tags":
        tags = {
            "query_tag": torch.randint(0, 3, (B,), generator=gen), "bank_tag": torch.randint(0, 3, (N,), generator=gen)
        }
    got = ops.hamming_topk(q, bank, k, valid, backend="cpp", **tags)
    want = reference.hamming_topk(q, bank, k, valid, **tags)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64


CPU_PATHS = ["portable", "scalar", "avx2", "avx2_harley_seal", "avx2_tables", "avx512_vpopcntdq"]
PATH_CASES = [  # B, N, W, k: below and above the few-query regime (8), tile and block edges, W = 4's own paths
    (1, 1, 4, 1), (1, 4097, 4, 1), (7, 3001, 4, 3), (8, 257, 4, 1), (9, 20001, 4, 2), (17, 5000, 4, 5),
    (13, 1029, 1, 2), (9, 999, 2, 1), (3, 2000, 3, 4), (12, 700, 5, 1), (8, 300, 16, 3),
    (2, 6000, 1, 3), (11, 4098, 1, 2),  # W = 1: whole tiles read in place, then a last one copied (4098)
]


def forced_path(monkeypatch, path: str) -> None:
    """Force a popcount path, or skip where this CPU cannot run it (the switch then falls back)."""
    monkeypatch.setenv("LLMCACHE_CPU_ISA", path)
    active = llmcache.build_info()["cpu_kernel_paths"]
    if active["many_queries"]["path"] != path:
        pytest.skip(f"this CPU does not run the {path} path")
    assert active["few_queries"]["path"] == path and "forced" in active["many_queries"]["why"]


@needs_ext
@pytest.mark.parametrize("filtering", ["none", "valid", "tags"])
@pytest.mark.parametrize("B,N,W,k", PATH_CASES, ids=[f"B{b}-N{n}-W{w}-k{k}" for b, n, w, k in PATH_CASES])
@pytest.mark.parametrize("path", CPU_PATHS)
def test_hamming_topk_every_path(path, B, N, W, k, filtering, gen, monkeypatch):
    forced_path(monkeypatch, path)
    q, bank = random_codes(B, W, gen, sparse=True), random_codes(N, W, gen, sparse=True)
    valid = (torch.rand(N, generator=gen) > 0.25) if filtering != "none" else None
    tags = {}
    if filtering == "tags":
        tags = {"query_tag": torch.randint(0, 3, (B,), generator=gen), "bank_tag": torch.randint(0, 3, (N,), generator=gen)}
    got = ops.hamming_topk(q, bank, k, valid, backend="cpp", **tags)
    want = reference.hamming_topk(q, bank, k, valid, **tags)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_ext
@pytest.mark.parametrize("path", CPU_PATHS)
def test_hamming_topk_every_path_far_codes(path, gen, monkeypatch):
    """The only eligible answers 255 and 256 bits away (the query's complement, and it with one bit
    flipped back) are exact on every path, though the table path's byte counters saturate at 255."""
    forced_path(monkeypatch, path)
    q = random_codes(1, 4, gen).repeat(9, 1)
    near = ~q[:1]
    near[0, 0] ^= 1
    bank = torch.cat([random_codes(600, 4, gen), ~q[:1], near])
    valid = torch.zeros(len(bank), dtype=torch.bool)
    valid[600:] = True
    dist, idx = ops.hamming_topk(q, bank, 2, valid, backend="cpp")
    assert dist.tolist() == [[255, 256]] * 9 and idx.tolist() == [[601, 600]] * 9


@needs_ext
def test_cpu_kernel_paths_are_explained():
    """build_info names the path each regime runs and why (the CPU's only one, or the calibration)."""
    paths = llmcache.build_info()["cpu_kernel_paths"]
    assert set(paths) == {"few_queries", "many_queries"}
    for regime in paths.values():
        assert regime["path"] in CPU_PATHS and regime["why"]
    assert llmcache.build_info()["cpu_kernel"] == paths["many_queries"]["path"]


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_simhash_pooled_every_projection(isa, gen, monkeypatch):
    """The AVX2 and plain projections (forced by the same switch) agree with the reference."""
    monkeypatch.setenv("LLMCACHE_CPU_ISA", isa)
    embeds = torch.randn(7, 19, 384, generator=gen)
    mask = torch.rand(7, 19, generator=gen) > 0.3
    planes = torch.randn(384, 256, generator=gen)
    codes = ops.simhash_pooled(embeds, mask.long(), planes, backend="cpp")
    assert_codes_match(codes, reference.masked_mean(embeds, mask), planes)


@needs_ext
def test_hamming_topk_all_invalid(gen):
    q, bank = random_codes(3, 2, gen), random_codes(100, 2, gen)
    dist, idx = ops.hamming_topk(q, bank, 4, torch.zeros(100, dtype=torch.bool), backend="cpp")
    assert idx.eq(-1).all() and dist.eq(129).all()


GATHER_CASES = [((4,), 3, 5, 2), ((8,), 1, 1, 1), ((2, 3), 6, 4, 7), ((16,), 0, 9, 5)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("align_end", [False, True], ids=["start", "end"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "feat,T,Tv,B", GATHER_CASES, ids=[f"F{'x'.join(map(str, f))}-T{t}-Tv{tv}-B{b}" for f, t, tv, b in GATHER_CASES]
)
def test_gather_with_mask(backend, align_end, dtype, feat, T, Tv, B, gen):
    N = 6
    values = torch.randn((N, Tv) + feat, generator=gen).to(dtype)
    slot = torch.randint(-1, N, (B,), generator=gen)
    slot[0] = 2
    if B > 1:
        slot[1] = 2  # two rows read one slot: its hit count goes up by two
    misses = int((slot < 0).sum())
    computed = torch.randn((misses, T) + feat, generator=gen).to(dtype)
    row = torch.where(slot < 0, (slot < 0).cumsum(0) - 1, 0)
    counters = [torch.randint(0, 5, (N,), generator=gen) for _ in range(2)]
    want_counters = [c.clone() for c in counters]
    want = reference.gather_with_mask(values, slot, computed, row, *want_counters, 11, align_end)
    got = ops.gather_with_mask(values, slot, computed, row, *counters, 11, align_end, backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(counters[0], want_counters[0]) and torch.equal(counters[1], want_counters[1])
    assert counters[1][2] >= 2 if B > 1 else True


def test_opcheck_every_op(gen):
    x = torch.randn(5, 32, generator=gen)
    planes = torch.randn(32, 128, generator=gen)
    torch.library.opcheck(torch.ops.llmcache.simhash, (x, planes))
    embeds, mask = torch.randn(3, 7, 32, generator=gen), torch.ones(3, 7, dtype=torch.long)
    torch.library.opcheck(torch.ops.llmcache.simhash_pooled, (embeds, mask, planes))
    q, bank = random_codes(4, 2, gen), random_codes(50, 2, gen)
    torch.library.opcheck(torch.ops.llmcache.hamming_topk, (q, bank, 3, torch.rand(50) > 0.5, None, None))
    values = torch.randn(6, 4, 8, generator=gen)
    slot, row = torch.tensor([1, -1, 3]), torch.tensor([0, 0, 0])
    computed = torch.randn(1, 4, 8, generator=gen)
    last, hits = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    torch.library.opcheck(torch.ops.llmcache.gather_with_mask, (values, slot, computed, row, last, hits, 3, False))
    arena, pieces = torch.zeros(9, 8), [torch.randn(2, 1, 3, 4, generator=gen), torch.randn(2, 2, 3, 2, generator=gen)]
    torch.library.opcheck(torch.ops.llmcache.write_rows, (arena, torch.tensor([8, 0, 3]), torch.tensor([5, 0, 2]), pieces))
    arena, out, kv = torch.randn(9, 12, generator=gen), torch.zeros(2, 4, 4), torch.zeros(2, 2, 2, 1, 4, 2)
    torch.library.opcheck(torch.ops.llmcache.read_rows, (arena, torch.tensor([8, 0, 3, 3, 1, 5]), out, kv))
    torch.library.opcheck(torch.ops.llmcache.read_rows, (arena, torch.tensor([8, 0]), torch.zeros(2, 1, 12), None))


def test_ops_trace_under_torch_compile(gen):
    planes = torch.randn(16, 64, generator=gen)

    @torch.compile(fullgraph=True, backend="eager")
    def fingerprint_and_lookup(embeds, mask, bank):
        codes = torch.ops.llmcache.simhash_pooled(embeds, mask, planes)
        return torch.ops.llmcache.hamming_topk(codes, bank, 1, None, None, None)

    embeds, mask = torch.randn(2, 5, 16, generator=gen), torch.ones(2, 5, dtype=torch.long)
    bank = ops.simhash_pooled(embeds, mask, planes)
    dist, idx = fingerprint_and_lookup(embeds, mask, bank)
    assert idx.flatten().tolist() == [0, 1] and dist.eq(0).all()


def test_hamming_topk_traces_under_fake_tensors():
    """Fake tensors (what make_fx and export trace with) go through the dispatcher's op and its fake
    kernel: an eager CPU call's shortcut to the C++ kernel must not take them."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        queries, bank = torch.empty(2, 4, dtype=torch.int64), torch.empty(100, 4, dtype=torch.int64)
        dist, idx = ops.hamming_topk(queries, bank, 3)
    assert isinstance(dist, FakeTensor) and isinstance(idx, FakeTensor)
    assert dist.shape == (2, 3) and idx.shape == (2, 3) and dist.dtype == torch.int32 and idx.dtype == torch.int64


WRITE_CASES = [(1, 1, 1, 1, 1), (3, 5, 2, 4, 6), (4, 17, 3, 64, 48)]  # M, T, heads, head dim, hidden


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("M,T,H,hd,D", WRITE_CASES, ids=[f"M{m}-T{t}-H{h}-hd{d}-D{e}" for m, t, h, d, e in WRITE_CASES])
@pytest.mark.parametrize("selected", [False, True])
def test_write_rows(backend, dtype, M, T, H, hd, D, selected, gen):
    """Each arena row written is token src[i] (or i) of every piece in order, the pieces taken as
    strided views where the model left them (K/V cut from a longer cache), the other rows untouched;
    a row holding an inf or a NaN, and only that row, is flagged."""
    out = torch.randn(M, T, D, generator=gen).to(dtype)
    cache = [torch.randn(M, H, T + 3, hd, generator=gen).to(dtype) for _ in range(4)]
    pieces = [out.unsqueeze(1)] + [c[:, :, 2 : T + 2] for c in cache]
    S = M * T if not selected else max(1, M * T // 2)
    src = torch.randperm(M * T, generator=gen)[:S] if selected else None
    rows = M * T + 7
    dst = torch.randperm(rows, generator=gen)[:S]
    if S > 1:
        poisoned = int(src[1]) if selected else 1
        cache[2][poisoned // T, H - 1, 2 + poisoned % T, hd - 1] = float("nan" if M % 2 else "inf")
    arena = torch.full((rows, D + 4 * H * hd), 7.0, dtype=dtype)
    finite = ops.write_rows(arena, dst, src, pieces, backend=backend)
    tokens = src if selected else torch.arange(S)
    want = torch.cat([p.transpose(1, 2).reshape(M * T, -1) for p in pieces], 1)[tokens]
    torch.testing.assert_close(arena[dst], want, rtol=0, atol=0, equal_nan=True)  # (the poisoned row: NaN)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[dst] = False
    assert (arena[untouched] == 7).all()
    assert finite.dtype == torch.bool and finite.tolist() == [i != 1 for i in range(S)] if S > 1 else finite.all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("M,T,H,hd,D", WRITE_CASES, ids=[f"M{m}-T{t}-H{h}-hd{d}-D{e}" for m, t, h, d, e in WRITE_CASES])
def test_read_rows(backend, dtype, M, T, H, hd, D, gen):
    """Token m * T + t of out and of every block's K and V is arena row rows[m * T + t], split in
    that order (rows repeating, in any order), positions after T untouched; reading back what
    write_rows wrote from a forward's K/V gives that K/V; an encoder's rows read into out alone."""
    rows = M * T + 7
    arena = torch.randn(rows, D + 4 * H * hd, generator=gen).to(dtype)
    picked = torch.randint(0, rows, (M * T,), generator=gen)
    out = torch.full((M, T + 3, D), 7.0, dtype=dtype)
    kv = torch.full((2, 2, M, H, T + 3, hd), 7.0, dtype=dtype)  # (two blocks, room for 3 more tokens)
    ops.read_rows(arena, picked, out, kv, backend=backend)
    pieces = [out[:, :T]] + [kv[b, w, :, :, :T].transpose(1, 2).reshape(M, T, -1) for b in range(2) for w in range(2)]
    assert torch.equal(torch.cat(pieces, -1).reshape(M * T, -1), arena[picked])
    assert (out[:, T:] == 7).all() and (kv[:, :, :, :, T:] == 7).all()

    dst = torch.randperm(rows, generator=gen)[: M * T]
    hidden, cache = torch.randn(M, T, D, generator=gen).to(dtype), torch.randn(2, 2, M, H, T, hd, generator=gen).to(dtype)
    ops.write_rows(arena, dst, None, [hidden.unsqueeze(1)] + [cache[b, w] for b in range(2) for w in range(2)])
    back_out, back_kv = torch.zeros_like(hidden), torch.zeros_like(cache)
    ops.read_rows(arena, dst, back_out, back_kv, backend=backend)
    assert torch.equal(back_out, hidden) and torch.equal(back_kv, cache)

    whole = torch.zeros(M, T, D + 4 * H * hd, dtype=dtype)
    ops.read_rows(arena, picked, whole, None, backend=backend)
    assert torch.equal(whole.reshape(M * T, -1), arena[picked])

    padded = picked.clone()
    padded[::3] = -1  # (-1: a position no token is held for, a served batch's padding: zeros)
    arena[picked[0]] = float("nan")  # (a row -1 stands beside reads zeros, not what a masked read leaves)
    ops.read_rows(arena, padded, whole, None, backend=backend)
    want = torch.where((padded >= 0)[:, None], arena[padded.clamp(min=0)], torch.zeros((), dtype=dtype))
    torch.testing.assert_close(whole.reshape(M * T, -1), want, rtol=0, atol=0, equal_nan=True)
    assert not whole.reshape(M * T, -1)[0].any()


@needs_ext
def test_read_rows_refuses_what_it_cannot_read(gen):
    arena = torch.zeros(4, 6)
    out, kv = torch.zeros(2, 3, 2), torch.zeros(1, 2, 2, 1, 3, 2)
    with pytest.raises(RuntimeError, match="rows out of"):
        ops.read_rows(arena, torch.tensor([0, 4]), out, kv, backend="cpp")
    with pytest.raises(RuntimeError, match="rows out of"):  # (-1 reads zeros; nothing below it reads)
        ops.read_rows(arena, torch.tensor([0, -2]), out, kv, backend="cpp")
    with pytest.raises(RuntimeError, match="do not split"):
        ops.read_rows(arena, torch.tensor([0, 1, 2]), out, kv, backend="cpp")
    with pytest.raises(RuntimeError, match="out holds 3"):
        ops.read_rows(arena, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), out, kv, backend="cpp")
    with pytest.raises(RuntimeError, match="elements a row"):
        ops.read_rows(arena, torch.tensor([0, 1]), out[..., :1], kv, backend="cpp")
    with pytest.raises(RuntimeError, match="arena's dtype"):
        ops.read_rows(arena, torch.tensor([0, 1]), out, kv.double(), backend="cpp")
    with pytest.raises(RuntimeError, match="kv must be"):
        ops.read_rows(arena, torch.tensor([0, 1]), out, kv[:, :, :1], backend="cpp")


@needs_ext
def test_write_rows_refuses_what_it_cannot_write(gen):
    arena = torch.zeros(4, 6)
    piece = torch.randn(2, 1, 3, 6, generator=gen)
    with pytest.raises(RuntimeError, match="dst out of"):
        ops.write_rows(arena, torch.tensor([0, 4]), None, [piece], backend="cpp")
    with pytest.raises(RuntimeError, match="src out of"):
        ops.write_rows(arena, torch.tensor([0, 1]), torch.tensor([0, 6]), [piece], backend="cpp")
    with pytest.raises(RuntimeError, match="elements a row"):
        ops.write_rows(arena, torch.tensor([0]), None, [piece[..., :5]], backend="cpp")
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        ops.write_rows(torch.zeros(4, 6, dtype=torch.int64), torch.tensor([0]), None, [piece.long()], backend="cpp")
