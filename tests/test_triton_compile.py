"""Every Triton kernel variant the launchers can launch, compiled for sm_80 and sm_90 without a GPU.

The interpreter (TRITON_INTERPRET=1, what the other Triton tests run on CPU) accepts code that
Triton's compiler rejects: an int argument equal to 1 arrives at the compiler as a compile-time
constant, which has no `.to`. So this module compiles for real, with an explicit target.

How the variants are found: a worker process (this file run as a script, without the
interpreter) calls the real launchers on CPU tensors of many shapes (sizes 1, multiples of 16 and
awkward ones; base pointers 16-byte aligned and not), with each kernel's launch intercepted.
Triton's own binder turns each intercepted call into the signature, constexprs and
divisibility attributes a GPU launch would compile, and each distinct one is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. The tests then check that
every variant compiled, that the constexpr choices seen are all those the launchers' own
`launch_config` can make (a new tile choice cannot escape), that size-1 and misaligned cases were
among them, and each kernel's ptxas resource use (re-run `ptxas -v` on its PTX, Triton's flags)
against the limits below.

Marked slow: a cold compile of all variants takes about a minute on two shared cores (Triton's
cache makes reruns take seconds), so it runs in the full pass of tests/run.sh, not the quick one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ARCHS = (80, 90)
ROOT = Path(__file__).resolve().parent.parent
# ptxas limits per kernel. Registers: <= 128 keeps >= 4 blocks of 4 warps per SM (65,536 registers),
# enough warps to hide memory latency in these streaming kernels; the copy kernel needs far fewer.
# No spills. A stack frame of at most 8 bytes: ptxas saves a register there around the warp-shuffle
# fallback it emits for reductions inside the top-k insertion loop (not register pressure; the
# review found 1.7 KB). Shared memory is Triton's reduction scratch and, for simhash, the tl.dot
# operands; 32 KB still leaves room for several blocks per SM on every target.
LIMITS = {
    "_topk_kernel": {"registers": 128, "stack": 8, "shared": 16384},
    "_keys_kernel": {"registers": 128, "stack": 0, "shared": 16384},
    "_gather_with_mask_kernel": {"registers": 64, "stack": 0, "shared": 0},
    "_simhash_kernel": {"registers": 128, "stack": 0, "shared": 32768},
    "_masked_mean_kernel": {"registers": 128, "stack": 0, "shared": 16384},
}
# Int arguments that never equal 1 for any launch (padded tile multiples): exempt from the size-1 check.
NEVER_ONE = {"_topk_kernel": {"slots_per_split"}, "_simhash_kernel": {"nbits"}}
# Pointers a launcher allocates itself are always aligned: exempt from the misaligned check.
ALWAYS_ALIGNED = {
    "_topk_kernel": {"cand_ptr"},
    "_keys_kernel": {"keys_ptr"},
    "_gather_with_mask_kernel": {"out_ptr", "slot_ptr", "row_ptr", "last_used_ptr", "hit_count_ptr"},
    "_simhash_kernel": {"codes_ptr"},
    "_masked_mean_kernel": {"mean_ptr"},
}


# What decides whether the gather can move 16-byte vectors: its data pointers and copy bounds.
VECTOR_ARGS = ("values_ptr", "computed_ptr", "out_ptr", "row_len", "stored_len", "copy_begin", "copy_end", "shift")


# ------------------------------------------------------------------------------------ the worker


def _misaligned(t):
    """The same values in a tensor whose data_ptr is one element past a 16-byte boundary."""
    import torch

    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return flat.view(t.shape).copy_(t)


def _hamming_calls():
    import torch

    from llmcache.ops.triton_kernels import hamming_topk as ham

    # (B, N, W, k, filters, misaligned, SMs): one generic row per (BLOCK_Q, K_PAD) the launcher
    # picks, then sizes 1, multiples of 16, misaligned inputs and a GPU's worth of splits.
    cases = [(b, 1000, 3, k, True, False, 1) for b in (1, 2, 3, 5, 17) for k in (1, 5, 17, 65)]
    cases += [
        (1, 1, 1, 1, False, False, 1),
        (1, 1, 1, 2, True, False, 1),
        (1, 1, 1, 100, True, False, 1),
        (16, 4096, 16, 16, False, False, 132),
        (32, 4096, 4, 64, True, False, 132),
        (48, 8192, 16, 80, False, False, 132),
        (3, 777, 5, 3, True, True, 1),
        (17, 5000, 16, 1, False, True, 132),
        (64, 3001, 2, 70, True, True, 1),
    ]
    for batch, slots, words, k, filters, misaligned, sms in cases:
        queries = torch.zeros(batch, words, dtype=torch.int64)
        bank = torch.zeros(slots, words, dtype=torch.int64)
        if misaligned:
            queries, bank = _misaligned(queries), _misaligned(bank)
        valid = torch.ones(slots, dtype=torch.bool) if filters else None
        query_tag = torch.zeros(batch, dtype=torch.int64) if filters else None
        bank_tag = torch.zeros(slots, dtype=torch.int64) if filters else None
        if misaligned and filters:
            valid, query_tag, bank_tag = _misaligned(valid), _misaligned(query_tag), _misaligned(bank_tag)
        ham._sm_count = lambda device, sms=sms: sms
        ham.hamming_topk_triton(queries, bank, k, valid, query_tag, bank_tag)


def _gather_calls():
    import torch

    from llmcache.ops.triton_kernels.gather_with_mask import gather_with_mask_triton

    # (N, Tv, T, F, B, M, align_end, misaligned, tick)
    cases = [
        (5, 7, 9, 12, 6, 2, False, False, 2**40),
        (5, 7, 9, 12, 6, 2, True, False, 7),
        (1, 1, 1, 1, 1, 1, False, False, 1),
        (1, 1, 1, 1, 1, 1, True, True, 1),
        (4, 16, 32, 64, 16, 16, False, False, 32),
        (4, 32, 16, 64, 16, 16, True, False, 2**40),
        (4, 16, 32, 64, 16, 16, True, True, 3),
        (3, 1, 1100, 1, 4, 2, True, False, 5),
        (2, 3, 4, 0, 3, 0, False, False, 5),
        (2, 1, 2, 1, 3, 1, True, False, 5),  # copy_begin == 1
        (2, 2, 1, 1, 3, 1, True, False, 5),  # shift == 1
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for slots, stored, seq, feat, batch, misses, align_end, misaligned, tick in cases:
            values = torch.zeros(slots, stored, feat, dtype=dtype)
            computed = torch.zeros(misses, seq, feat, dtype=dtype)
            if misaligned:
                values, computed = _misaligned(values), _misaligned(computed)
            slot = torch.arange(batch) % max(slots, 1)
            row = torch.full((batch,), -1)
            counters = torch.zeros(slots, dtype=torch.int64)
            gather_with_mask_triton(values, slot, computed, row, counters, counters.clone(), tick, align_end)


def _simhash_calls():
    import torch

    from llmcache.ops.triton_kernels.simhash import simhash_pooled_triton, simhash_triton

    floats = (torch.float32, torch.float16, torch.bfloat16)
    for x_dtype in floats:
        for planes_dtype in floats:
            simhash_triton(torch.zeros(5, 33, dtype=x_dtype), torch.zeros(33, 128, dtype=planes_dtype))
    for rows, dim, nbits, misaligned in ((1, 1, 64, False), (16, 384, 1024, False), (3, 100, 192, True)):
        x, planes = torch.zeros(rows, dim), torch.zeros(dim, nbits)
        if misaligned:
            x, planes = _misaligned(x), _misaligned(planes)
        simhash_triton(x, planes)
    masks = (torch.bool, torch.int32, torch.int64, torch.uint8)
    for embeds_dtype in floats:
        for mask_dtype in masks:
            simhash_pooled_triton(
                torch.zeros(3, 7, 50, dtype=embeds_dtype), torch.ones(3, 7, dtype=mask_dtype), torch.zeros(50, 64)
            )
    for rows, seq, dim, misaligned in ((1, 1, 1, False), (16, 32, 256, False), (2, 5, 33, True)):
        embeds, mask = torch.zeros(rows, seq, dim), torch.ones(rows, seq, dtype=torch.int32)
        if misaligned:
            embeds, mask = _misaligned(embeds), _misaligned(mask)
        simhash_pooled_triton(embeds, mask, torch.zeros(dim, 64))


def _intercepted_launches() -> list:
    """(kernel, args, kwargs) of every launch the launchers make on the shapes above, none run."""
    from llmcache.ops.triton_kernels import gather_with_mask, hamming_topk, simhash

    calls = []
    kernels = [
        hamming_topk._topk_kernel,
        hamming_topk._keys_kernel,
        gather_with_mask._gather_with_mask_kernel,
        simhash._simhash_kernel,
        simhash._masked_mean_kernel,
    ]
    for kernel in kernels:
        # JITFunction.__getitem__ calls self.run(grid=..., warmup=False, ...): shadow it per instance.
        kernel.run = lambda *args, grid, warmup, kernel=kernel, **kwargs: calls.append((kernel, args, kwargs))
    _hamming_calls()
    _gather_calls()
    _simhash_calls()
    return calls


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes from `ptxas -v`, run with the flags Triton's make_cubin uses."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "kernel.o")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "stack": int(frame.group(1)),
        "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)),
    }


def _compile_all(archs) -> list[dict]:
    """One record per distinct (kernel, arch, specialisation): its id, error or resources and PTX facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launches = _intercepted_launches()
    records, seen = [], set()
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for kernel, args, kwargs in launches:
            # The binder JITFunction.run uses: the specialisation a GPU launch with these args compiles.
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            key = (kernel.__name__, arch, str(specialization), str(options))
            if key in seen:
                continue
            seen.add(key)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            spec = {name: list(s) for name, s in zip(kernel.arg_names, specialization)}
            record = {"kernel": kernel.__name__, "arch": arch, "spec": spec}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - any compiler error is a finding, reported with its variant
                record["error"] = f"{type(err).__name__}: {err}"[:2000]
            else:
                ptx = compiled.asm["ptx"]
                record.update(_ptxas_usage(ptx, arch))
                record["shared"] = compiled.metadata.shared
                record["popc_b64"] = "popc.b64" in ptx
                record["vector_loads"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
                record["vector_stores"] = len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx))
            records.append(record)
    return records


# ------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("triton_compile") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _variant_id(record: dict) -> str:
    parts = [
        f"{name}={v[1]!r}" if v[0] == "constexpr" else f"{name}:{v[0]}{v[1] or ''}"
        for name, v in record["spec"].items()
    ]
    return f"{record['kernel']}[sm_{record['arch']}]({', '.join(parts)})"


def _of(variants, kernel, arch=None):
    return [r for r in variants if r["kernel"] == kernel and (arch is None or r["arch"] == arch)]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_every_variant_compiles(variants, arch):
    mine = [r for r in variants if r["arch"] == arch]
    assert {r["kernel"] for r in mine} == set(LIMITS), "a kernel was never launched by the worker's shapes"
    failed = [f"{_variant_id(r)}: {r['error']}" for r in mine if "error" in r]
    assert not failed, f"{len(failed)} of {len(mine)} variants do not compile:\n" + "\n".join(failed)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_resources_within_limits(variants, arch):
    over = []
    for r in variants:
        if r["arch"] != arch or "error" in r:
            continue
        limit = LIMITS[r["kernel"]]
        if r["registers"] > limit["registers"] or r["shared"] > limit["shared"]:
            over.append(f"{_variant_id(r)}: {r['registers']} registers, {r['shared']} B shared")
        if r["stack"] > limit["stack"] or r["spill_stores"] or r["spill_loads"]:
            over.append(f"{_variant_id(r)}: {r['stack']} B stack, {r['spill_stores']}/{r['spill_loads']} B spilled")
    assert not over, "over the limits in LIMITS:\n" + "\n".join(over)


def test_constexpr_choices_are_all_covered(variants):
    """The tiles compiled are every tile `launch_config` can pick, for any sizes."""
    from llmcache.ops.triton_kernels import gather_with_mask, hamming_topk

    def picked(kernel, names):
        return {tuple(r["spec"][n][1] for n in names) for r in _of(variants, kernel, ARCHS[-1])}

    topk, keys = set(), set()
    for batch in range(1, 40):
        for k in range(1, 70):
            launch = hamming_topk.launch_config(batch, 10_000, k, 132)
            (keys if launch.all_keys else topk).add(
                (launch.block_q, launch.block_n) if launch.all_keys else (launch.k_pad, launch.block_q, launch.block_n)
            )
    assert picked("_topk_kernel", ("K_PAD", "BLOCK_Q", "BLOCK_N")) >= topk
    assert picked("_keys_kernel", ("BLOCK_Q", "BLOCK_N")) >= keys
    blocks = {gather_with_mask.launch_config(1, 9, 9, 9, size, False).block for size in gather_with_mask._BITS_DTYPE}
    assert {b for (b,) in picked("_gather_with_mask_kernel", ("BLOCK",))} >= blocks
    assert all(
        r["spec"]["HW_POPC"] == ["constexpr", True]
        for r in _of(variants, "_topk_kernel") + _of(variants, "_keys_kernel")
    )


@pytest.mark.parametrize("kernel", sorted(LIMITS))
def test_size_one_and_misaligned_arguments_were_compiled(variants, kernel):
    """Each int argument was seen as 1 (a compile-time constant), each input pointer unaligned."""
    mine = _of(variants, kernel)
    names = mine[0]["spec"].keys()
    ints = [n for n in names if any(r["spec"][n][0] in ("i32", "i64") for r in mine)]
    never_one = [n for n in ints if not any(r["spec"][n] == ["constexpr", 1] for r in mine)]
    assert set(never_one) <= NEVER_ONE.get(kernel, set()), f"no variant had these == 1: {never_one}"
    pointers = [n for n in names if mine[0]["spec"][n][0].startswith("*")]
    always = [n for n in pointers if all(r["spec"][n][1] == "D" for r in mine)]
    assert set(always) <= ALWAYS_ALIGNED[kernel], f"no variant had these misaligned: {always}"
    divisible = [n for n in ints if any(r["spec"][n][1] == "D" for r in mine)]
    assert divisible, "no variant had an int argument divisible by 16"


def test_hamming_uses_the_hardware_popcount(variants):
    hamming = _of(variants, "_topk_kernel") + _of(variants, "_keys_kernel")
    assert hamming and all(r.get("popc_b64") for r in hamming), [
        _variant_id(r) for r in hamming if not r.get("popc_b64")
    ]


def test_aligned_gather_moves_16_byte_vectors(variants):
    """With every pointer aligned and every size a multiple of 16, the copy uses 16-byte loads."""
    aligned = [r for r in _of(variants, "_gather_with_mask_kernel") if all(r["spec"][n][1] == "D" for n in VECTOR_ARGS)]
    assert aligned, "no fully aligned gather variant was compiled"
    scalar = [_variant_id(r) for r in aligned if not (r.get("vector_loads") and r.get("vector_stores"))]
    assert not scalar, f"aligned variants without 16-byte loads and stores: {scalar}"


if __name__ == "__main__":
    # The worker: compiled Triton (no interpreter), no GPU needed; writes the records as JSON.
    os.environ.pop("TRITON_INTERPRET", None)
    Path(sys.argv[1]).write_text(json.dumps(_compile_all(ARCHS)))
