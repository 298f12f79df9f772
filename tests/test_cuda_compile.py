"""What of the CUDA kernels can be checked without a GPU: ptxas's resource report, and the launch plans.

Every kernels/*.cu is compiled for each architecture of setup.py's default list (sm_80 and
sm_90) with the flags and include paths the real build uses (setup.py's nvcc arguments, read
from its source, plus torch's COMMON_NVCC_FLAGS that CUDAExtension adds), device code only,
with `-Xptxas -v`. For every kernel instantiation the test then asserts no spills, no stack
frame and no ABI calls (either puts per-thread state in local memory, i.e. DRAM traffic on the
hot path), and registers and static shared memory within the limits below, which state the
occupancy each kernel is designed for. A launch that the GPU would refuse or an occupancy cliff
thus fails here, on any machine with nvcc, before a GPU is ever lent.

The launch plans (grids, splits, workspace sizes, copy units) are the host functions the
launchers themselves call, exposed by a CUDA build of llmcache._C as torch.ops.llmcache_plan.*;
their invariants (every row covered once, no empty split, grid dimensions within the hardware's
limits, workspaces as large as the kernels index) are checked on the CPU.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "kernels").glob("*.cu"))
INCLUDES = [ROOT / "csrc", ROOT / "kernels"]  # setup.py's include_dirs
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
STATIC_SMEM_MAX = 48 * 1024  # beyond it a kernel needs dynamic shared memory and an opt-in


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (nor in CUDA_HOME): nothing to compile with")


def setup_build() -> tuple[list[str], str]:
    """(nvcc arguments, default LLMCACHE_CUDA_ARCHS) exactly as written in setup.py."""
    flags, archs = None, None
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "args['nvcc']":
            flags = ast.literal_eval(node.value)
        call = isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.get" and len(node.args) == 2
        if call and ast.unparse(node.args[0]) == "'LLMCACHE_CUDA_ARCHS'":
            archs = ast.literal_eval(node.args[1])
    assert flags is not None, "setup.py no longer assigns args['nvcc'] = [...]: update this test"
    assert archs is not None, "setup.py no longer reads LLMCACHE_CUDA_ARCHS with a default: update this test"
    return flags, archs


NVCC_FLAGS, DEFAULT_ARCHS = setup_build()
ARCHS = [int(a.removesuffix("+PTX").replace(".", "")) for a in DEFAULT_ARCHS.split(";")]


@dataclass(frozen=True)
class Usage:
    """One kernel instantiation as ptxas reports it."""

    name: str  # mangled
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    call_stack: int  # "cumulative stack size": present when the kernel makes ABI calls
    smem: int  # static shared memory, bytes


@dataclass(frozen=True)
class Limit:
    registers: int
    smem: int
    why: str


def limit_for(name: str) -> Limit:
    """The resource budget of a kernel (mangled or demangled name); unknown kernels fail."""
    family = re.search(r"([a-z_]+_kernel)", name)
    family = family.group(1) if family else name
    if family == "hamming_scan_kernel":
        words = re.search(r"hamming_scan_kernel(?:<|ILi)(\d+)", name)
        assert words, f"cannot read W from {name}"
        if int(words.group(1)) <= 8:
            return Limit(REGISTERS_PER_SM // (2 * 256), STATIC_SMEM_MAX, "codes up to 512 bits: 2 blocks of 256 per SM")
        # Query, tile share and list in registers; 255 is the hardware cap, 200 keeps headroom.
        return Limit(200, STATIC_SMEM_MAX, "wider codes: 1 block of 256 threads per SM")
    if family in ("hamming_merge_kernel", "simhash_project_kernel", "masked_sum_kernel"):
        return Limit(REGISTERS_PER_SM // (2 * 256), STATIC_SMEM_MAX, "2 blocks of 256 threads per SM")
    if family == "gather_with_mask_kernel":
        # A copy needs many loads in flight: at least half of an SM's 2048 threads resident.
        return Limit(REGISTERS_PER_SM // 1024, 0, "a pure copy: 4 blocks of 256 per SM, no shared memory")
    raise AssertionError(f"no resource limit is written for kernel {name}: add one to limit_for()")


# Kernel instantiations per file: a template added or a parse that silently finds nothing fails.
EXPECTED_KERNELS = {
    "hamming_topk.cu": 16 * 4 + 4,  # scan <W = 1..16, KR = 1, 2, 4, 8>, merge <KR>
    "simhash.cu": 3 + 1 + 3 * 2,  # project <dense fp32/fp16/bf16, pooled>, masked sum <dtype, aligned>
    "gather_with_mask.cu": 5,  # copy units of 16, 8, 4, 2, 1 bytes
}

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_CALL_STACK = re.compile(r"(\d+) bytes cumulative stack size")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(report: str) -> list[Usage]:
    """The per-kernel entries of a `-Xptxas -v` report."""
    usages = []
    pieces = _ENTRY.split(report)
    for name, _arch, body in zip(pieces[1::3], pieces[2::3], pieces[3::3]):
        frame, used = _FRAME.search(body), _USED.search(body)
        assert frame and used, f"unreadable ptxas report for {name}:\n{body[:400]}"
        call_stack, smem = _CALL_STACK.search(body), _SMEM.search(body)
        usages.append(
            Usage(
                name=name,
                registers=int(used.group(1)),
                stack_frame=int(frame.group(1)),
                spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)),
                call_stack=int(call_stack.group(1)) if call_stack else 0,
                smem=int(smem.group(1)) if smem else 0,
            )
        )
    return usages


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    pretty = out.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def violations(usage: Usage, pretty: str) -> list[str]:
    limit = limit_for(pretty)
    found = []
    if usage.spill_stores or usage.spill_loads:
        found.append(f"spills {usage.spill_stores} B stored / {usage.spill_loads} B loaded (limit 0)")
    if usage.stack_frame:
        found.append(f"{usage.stack_frame} B stack frame (limit 0: per-thread arrays in local memory)")
    if usage.call_stack:
        found.append(f"{usage.call_stack} B call stack (a device function was not inlined)")
    if usage.registers > limit.registers:
        found.append(f"{usage.registers} registers > {limit.registers} ({limit.why})")
    if usage.smem > limit.smem:
        found.append(f"{usage.smem} B static shared memory > {limit.smem} ({limit.why})")
    return found


def compile_report(source: Path, arch: int, nvcc_flags: list[str], out_dir: str) -> subprocess.CompletedProcess:
    cmd = [NVCC, *nvcc_flags, *(f"-I{p}" for p in INCLUDES), f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v"]
    cmd += [str(source), "-o", os.path.join(out_dir, f"{source.stem}.sm_{arch}.cubin")]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def reports():
    """ptxas reports of every (source, arch), compiled in parallel once per test run."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what CUDAExtension adds to every .cu

    flags = [*NVCC_FLAGS, *(f for f in COMMON_NVCC_FLAGS if f not in NVCC_FLAGS)]
    jobs = [(source, arch) for source in SOURCES for arch in ARCHS]
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda job: compile_report(*job, flags, out_dir), jobs))
    return {(source.name, arch): result for (source, arch), result in zip(jobs, results)}


def test_every_kernel_file_is_checked():
    assert sorted(EXPECTED_KERNELS) == [s.name for s in SOURCES], "give every kernels/*.cu its expected kernel count"


def test_default_archs_cover_a100_h100_and_embed_ptx():
    assert {80, 90} <= set(ARCHS), f"setup.py's default LLMCACHE_CUDA_ARCHS {DEFAULT_ARCHS!r} lost sm_80 or sm_90"
    assert DEFAULT_ARCHS.split(";")[-1].endswith("+PTX"), (
        f"setup.py's default LLMCACHE_CUDA_ARCHS {DEFAULT_ARCHS!r} embeds no PTX: a newer card could not run the kernels"
    )


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_ptxas_resources_within_limits(reports, source, arch):
    result = reports[(source, arch)]
    assert result.returncode == 0, f"nvcc failed on {source} for sm_{arch}:\n{result.stderr[-4000:]}"
    usages = parse_ptxas(result.stderr + result.stdout)
    assert len(usages) == EXPECTED_KERNELS[source], (
        f"{source} sm_{arch}: ptxas reported {len(usages)} kernels, expected {EXPECTED_KERNELS[source]}"
    )
    pretty = demangle([u.name for u in usages])
    problems = [f"  {pretty[u.name]}: {'; '.join(found)}" for u in usages if (found := violations(u, pretty[u.name]))]
    assert not problems, f"{source} for sm_{arch}, {len(problems)} kernels over their limits:\n" + "\n".join(problems)


def test_parser_reads_a_spilling_report():
    # The check itself must be able to fail: a report with spills, a call stack and too many registers.
    report = (
        "ptxas info    : Compiling entry function '_Z19hamming_scan_kernelILi4ELi1EEvv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z19hamming_scan_kernelILi4ELi1EEvv\n"
        "    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 130 registers, used 1 barriers, 16 bytes cumulative stack size, 10528 bytes smem\n"
    )
    (usage,) = parse_ptxas(report)
    read = (usage.registers, usage.spill_stores, usage.spill_loads, usage.call_stack, usage.smem)
    assert read == (130, 12, 20, 16, 10528)
    found = violations(usage, usage.name)
    assert len(found) == 4 and "130 registers > 128" in found[-1]


# ---- launch plans (host arithmetic of a CUDA build, run on the CPU) ----------------------------
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535


@pytest.fixture
def plans():
    from llmcache.ops._library import extension_has_cuda

    if not extension_has_cuda():
        pytest.skip("llmcache._C was built without CUDA kernels: no launch plans to check")
    return torch.ops.llmcache_plan


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


HAMMING_SIZES = [
    (1, 0, 1), (1, 1, 1), (1, 2**20, 1), (3, 4097, 5), (8, 2049, 256), (64, 2**20, 1), (2**20, 5000, 1), (5, 2**24, 64),
    (1, 2**30, 256),
]


@pytest.mark.parametrize("B,N,k", HAMMING_SIZES, ids=[f"B{b}-N{n}-k{k}" for b, n, k in HAMMING_SIZES])
def test_hamming_plan_covers_the_bank_once(plans, B, N, k):
    per_block, blocks, splits, rows, workspace = plans.hamming_topk(B, N, k)
    assert per_block in (1, 2, 4, 8) and per_block >= min(B, 8) and per_block < 2 * B, "queries per block"
    assert blocks == ceil_div(B, per_block) and blocks <= GRID_X_MAX
    assert 1 <= splits <= 512 and splits <= GRID_YZ_MAX and rows % 256 == 0
    if N > 0:
        assert splits * rows >= N > (splits - 1) * rows, "every bank row in exactly one split, none empty"
    assert workspace == (splits * B * k * 8 if splits > 1 else 0), "pass 1 writes [B, splits, k] int64 keys"


def test_hamming_plan_splits_a_lone_query_for_the_merge(plans):
    # B = 1, N = 2^20: 512 splits, so pass 2 merges 512 keys (one coalesced step per warp).
    _, blocks, splits, _, workspace = plans.hamming_topk(1, 2**20, 1)
    assert (blocks, splits, workspace) == (1, 512, 512 * 8)


SIMHASH_SIZES = [(1, 1, 64), (1, 4099, 128), (17, 384, 256), (256, 768, 256), (2**20, 64, 1024), (3, 0, 64)]


@pytest.mark.parametrize("B,d,nbits", SIMHASH_SIZES, ids=[f"B{b}-d{d}-bits{n}" for b, d, n in SIMHASH_SIZES])
def test_simhash_plan_covers_d_once(plans, B, d, nbits):
    row_blocks, words, splits, d_per_split, sums_bytes, tickets = plans.simhash(B, d, nbits)
    assert row_blocks == ceil_div(B, 8) <= GRID_X_MAX and words == nbits // 64 <= GRID_YZ_MAX
    assert 1 <= splits <= 64 and d_per_split % 256 == 0 and d_per_split > 0
    if d > 0:
        assert splits * d_per_split >= d > (splits - 1) * d_per_split, "every column of d in exactly one split"
    if splits > 1:
        assert sums_bytes >= splits * B * nbits * 4 and sums_bytes % 16 == 0
        assert tickets == row_blocks * words, "one ticket per (row block, word)"
    else:
        assert (sums_bytes, tickets) == (0, 0)


POOLED_SIZES = [(1, 1, 8), (1, 3000, 64), (256, 128, 768), (3, 0, 16), (2, 5, 0), (70000, 3, 8)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,T,d", POOLED_SIZES, ids=[f"B{b}-T{t}-d{d}" for b, t, d in POOLED_SIZES])
def test_simhash_pooled_plan_covers_the_tokens_once(plans, dtype, B, T, d):
    col_tiles, splits, per_split, nbytes = plans.simhash_pooled(getattr(torch, dtype), B, T, d)
    columns = 128 if dtype == "float32" else 256  # 32 lanes x one 16-byte load
    assert col_tiles == max(1, ceil_div(d, columns)) and B * col_tiles <= GRID_X_MAX
    assert 1 <= splits <= 64
    if T > 0:
        assert splits * per_split >= T > (splits - 1) * per_split, "every token in exactly one split"
    assert nbytes >= splits * B * d * 4 and nbytes % 16 == 0, "fp32 partial sums [splits, B, d], 16-byte padded"


@pytest.mark.parametrize(
    "inner,address,unit",
    [(64, 0, 16), (64, 80, 16), (64, 4, 4), (64, 8, 8), (64, 2, 2), (6, 0, 2), (3, 0, 1), (16, 1, 1), (0, 0, 16)],
    ids=lambda v: str(v),
)
def test_gather_plan_picks_the_widest_aligned_unit(plans, inner, address, unit):
    got_unit, chunks, blocks = plans.gather_with_mask(3, 5, inner, address)
    assert got_unit == unit
    assert chunks == max(1, ceil_div(3 * inner // unit, 256 * 8)) and blocks == 5 * chunks


def test_gather_plan_strides_past_a_million_blocks(plans):
    # 2^21 rows of one 16-byte position: the grid stops at 2^20 blocks and the kernel strides.
    unit, chunks, blocks = plans.gather_with_mask(1, 2**21, 16, 0)
    assert (unit, chunks, blocks) == (16, 1, 2**20)
    unit, chunks, blocks = plans.gather_with_mask(4096, 7, 4096, 0)
    assert (chunks, blocks) == (4096 * 4096 // 16 // 2048, 7 * 512)
