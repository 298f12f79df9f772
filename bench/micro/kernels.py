"""Kernel microbenchmark: every llmcache backend beside the baseline a user would pick, and the hardware floor.

    python -m bench.micro.kernels [--quick] [--out DIR] [--device cpu|cuda] [--repeats R]

Ops and baselines, all in one run on one device:
    hamming_topk (k=1)  N in 2^12, 2^16, 2^20; nbits 64, 256; B 1, 8, 64, 256; on the CPU also every popcount
                        path the machine runs, forced (rows cpp/<path>; plain `cpp` is what dispatch picks).
                        Baselines: faiss
                        IndexBinaryFlat (GpuIndexBinaryFlat on CUDA when faiss has GPU support) and
                        Hamming through a +-1 matrix product in torch (fp32 on CPU, bf16 on GPU).
                        Every llmcache answer is checked against faiss's distances (faiss breaks ties
                        its own way: distances only; without faiss, against the C++ kernel on the host
                        copy). The reference backend only runs where N*B <= 2^22.
    hamming route       for B >= 64, the tensor-core formulations beside the popcount kernel that dispatch
                        picks now: codes as int8 +-1 through torch._int_mm (and bf16 +-1 through torch.mm
                        on CUDA), x.y = nbits - 2 d_H, the top-k taken on x.y right after. The "routes"
                        list of the JSON says per size which is faster, so a GPU run decides the dispatch.
    simhash_pooled      B 1, 64, 256; T=128, d=384, nbits=256; fp32 (and bf16 on CUDA). Baseline: the
                        PyTorch reference (masked mean, matmul, sign, pack).
    gather_with_mask    B=256, T=128, d=384, half the rows hit; fp32 (and bf16 on CUDA). Baselines:
                        the reference, torch.where over two gathers, and a plain copy of the same bytes.
--quick keeps N=2^12 and B <= 64 (gather B=64): a smoke run of a few seconds.

Timing: CUDA uses triton.testing.do_bench's median; CPU one warm-up call, then the median of R calls
(fewer when a call is slow, so the default CPU run stays well under 4 minutes). Floors, the least time
the hardware allows:
    tensor cores   2*B*N*nbits integer (or bf16) operations / the card's dense int8 (bf16) peak
                   (datasheet table below; GPU only), in the routes list.
    hamming_topk   max(B*N*W 64-bit popcounts / popcount rate, N*W*8 bank bytes / bandwidth). CPU
                   rate: llmcache._C.popcount_peak_rate(path) (all OpenMP threads, the row's own popcount
                   path: faiss rows get the scalar POPCNT rate, avx2* the nibble lookup's); CPU bandwidth:
                   llmcache._C.read_rate of the bank itself (where it lives: L3 or DRAM). GPU rate: SMs x 16 POPC/clk/SM (CUDA guide throughput table, cc 5.x-9.x) x
                   SM clock / 2 (a 64-bit popcount is two 32-bit POPC).
    simhash_pooled B*T*d*elem bytes read / bandwidth.
    gather         2*B*T*d*elem bytes (read + write) / bandwidth.
CPU rates are measured at the start and at the end of the run and the best is kept (other processes only
slow a measurement down); GPU rates come from the datasheet table below. The table is printed once the
floors are known; progress goes to stderr.

--threads N sets torch's and faiss's threads; LLMCACHE_CPU_CAP=avx2 (environment) makes an AVX-512 machine stand
in for an AVX2-only one. Writes the rows and a header (machine, versions, llmcache.build_info()) to
DIR/kernels-<device>[-<N>t][-<cap>].json
and .csv (default bench/out/micro/), then checks the performance targets (PASS/SHORT, never asserts). The
JSON is also written after each op (header "partial": true), so a run stopped early keeps its rows.
The exit status is 1 when an llmcache result disagreed with faiss or with the reference gather.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.report import header, median, now, print_table, print_targets, target, write_csv, write_json
from llmcache import ops
from llmcache.ops import reference

try:
    import faiss
except ImportError:  # the benchmark still runs; the faiss rows and checks are left out
    faiss = None

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "micro"
REFERENCE_LOOKUPS = 1 << 22  # the reference hamming_topk runs only where N * B <= this (it is slow)
POPC_PER_CLK_PER_SM = 16
# Peak HBM bandwidth (bytes/s) by device-name fragments, first match wins (vendor datasheets).
GPU_BANDWIDTH = (
    (("GH200",), 4.0e12),
    (("H200",), 4.8e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),
    (("A100", "80GB"), 2.039e12),
    (("A100",), 1.555e12),
)
# Dense tensor-core peaks (operations/s, no sparsity) by device-name fragments, first match wins (datasheets).
GPU_TENSOR_PEAK = (
    (("H100", "PCIe"), {"int8": 1.513e15, "bf16": 7.56e14}),
    (("H100",), {"int8": 1.979e15, "bf16": 9.89e14}),
    (("H200",), {"int8": 1.979e15, "bf16": 9.89e14}),
    (("A100",), {"int8": 6.24e14, "bf16": 3.12e14}),
)
TENSOR_CORE_MIN_BATCH = 64  # below this the matrix product's tiles are mostly padding
CPU_PATHS = ("scalar", "avx2", "avx2_harley_seal", "avx2_tables", "avx512_vpopcntdq")  # csrc/cpu/hamming_topk.cpp
FEW_QUERIES = 8  # below this many queries the CPU dispatch is in its "few" regime
TENSOR_CORE_ROUTES = {"int8-mm": "int8", "bf16-mm": "bf16"}


@dataclass
class Sizes:
    hamming_logn: tuple[int, ...]
    hamming_bits: tuple[int, ...]
    hamming_batch: tuple[int, ...]
    pooled_batch: tuple[int, ...]
    gather_batch: int
    seq: int = 128
    dim: int = 384
    pooled_bits: int = 256
    row_budget_s: float = 5.0  # timed seconds per row on CPU before repeats are cut


FULL = Sizes((12, 16, 20), (64, 256), (1, 8, 64, 256), (1, 64, 256), 256)
QUICK = Sizes((12,), (64, 256), (1, 64), (1, 64), 64, row_budget_s=0.5)


@dataclass
class Row:
    op: str
    device: str
    backend: str
    role: str  # "llmcache" (a backend of the library) or "baseline"
    shape: str
    params: dict
    ms: float | None = None
    reps: int | None = None  # timed calls on CPU; None under do_bench
    popcounts: int = 0  # 64-bit popcounts the op needs at least (hamming_topk)
    bytes_moved: int = 0  # DRAM bytes the op reads and writes at least
    floor_ms: float | None = None  # set by `apply_floors` once the machine's rates are final
    floor_by: str = ""
    popcount_floor_ms: float | None = None
    path: str = ""  # CPU hamming rows: the popcount path that ran (its rate is the popcount floor)
    read_bytes_per_s: float | None = None  # CPU hamming rows: read_rate of this bank (the memory floor)
    default: bool = False
    check: str = ""
    faiss_match: bool | None = None
    speedup: dict = field(default_factory=dict)

    @property
    def pct_of_floor(self) -> float | None:
        if self.ms is None or not self.floor_ms:
            return None
        return 100.0 * self.floor_ms / self.ms


# ---------------------------------------------------------------- the machine


def cpu_copy_bandwidth(quick: bool) -> float:
    """Bytes/s (read + write) of a torch copy far larger than the caches, median of a few."""
    src = torch.ones(1 << (24 if quick else 26))
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / median(times)


def gpu_spec() -> dict:
    """The CUDA device's popcount rate and bandwidth, and where each number comes from."""
    props = torch.cuda.get_device_properties(0)
    name = props.name
    clock_hz = getattr(props, "clock_rate", 0) * 1e3
    clock_src = "torch device properties"
    if not clock_hz:
        try:
            mhz = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.split()[0]
            clock_hz, clock_src = float(mhz) * 1e6, "nvidia-smi clocks.max.sm"
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            clock_hz, clock_src = 1.98e9, "assumed 1.98 GHz (H100/H200 boost)"
    bandwidth, bw_src = None, ""
    for fragments, value in GPU_BANDWIDTH:
        if all(f in name for f in fragments):
            bandwidth, bw_src = value, f"datasheet ({' '.join(fragments)})"
            break
    if bandwidth is None:  # HBM is double data rate: clock x 2 x bus width
        bandwidth = props.memory_clock_rate * 1e3 * 2 * props.memory_bus_width / 8
        bw_src = "memory clock x 2 x bus width from torch device properties"
    sms = props.multi_processor_count
    return {
        "name": name,
        "sms": sms,
        "sm_clock_hz": clock_hz,
        "sm_clock_source": clock_src,
        "popcount64_per_s": sms * POPC_PER_CLK_PER_SM * clock_hz / 2,
        "popcount_assumption": f"{sms} SMs x {POPC_PER_CLK_PER_SM} POPC/clk/SM x {clock_hz / 1e9:.2f} GHz "
        "/ 2 POPC per 64-bit word",
        "bandwidth": bandwidth,
        "bandwidth_source": bw_src,
        "tensor_peak": tensor_peaks(name),
    }


# ---------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of a call: do_bench on CUDA, warm-up + perf_counter repeats on the host."""

    def __init__(self, device: torch.device, repeats: int, budget_s: float):
        self.device, self.repeats, self.budget_s = device, repeats, budget_s

    def warm(self, fn: Callable, host: bool = False):
        """The warm-up call: its output (for the correctness check) and its seconds (to size the repeats)."""
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda" and not host:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def measure(self, fn: Callable, warm_s: float, host: bool = False) -> tuple[float, int | None]:
        if self.device.type == "cuda" and not host:
            from triton.testing import do_bench

            return float(do_bench(fn, return_mode="median")), None
        reps = self.repeats
        if warm_s * reps > self.budget_s:  # a very slow call: fewer repeats keep the run short
            reps = max(1, min(reps, int(self.budget_s / max(warm_s, 1e-9))))
        # A call of microseconds is timed as the mean of a batch of calls lasting ~1 ms, the median
        # over `reps` batches (one call per sample would measure the machine's jitter).
        batch = max(1, min(1000, int(1e-3 / max(warm_s, 1e-7))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            times.append((time.perf_counter() - start) / batch)
        return 1e3 * median(times), reps


# ---------------------------------------------------------------- data and baselines


def random_codes(rows: int, words: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, (rows, words), dtype=torch.int64, generator=gen)


def as_faiss_bytes(codes: torch.Tensor) -> np.ndarray:
    """int64 [N, W] -> uint8 [N, 8W]: the same bits, so faiss's Hamming distance is ours."""
    return codes.contiguous().numpy().view(np.uint8)


def unpack_plus_minus(codes: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 16) -> torch.Tensor:
    """int64 [N, W] codes -> [N, 64W] of +-1, in row chunks so the int64 bit temporary stays small."""
    shifts = torch.arange(64, device=codes.device)
    out = torch.empty(codes.shape[0], 64 * codes.shape[1], dtype=dtype, device=codes.device)
    for start in range(0, codes.shape[0], chunk):
        bits = (codes[start : start + chunk].unsqueeze(-1) >> shifts) & 1
        out[start : start + chunk] = bits.flatten(1).to(dtype) * 2 - 1
    return out


def matmul_topk(queries_pm: torch.Tensor, bank_pm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming top-k the plain-torch way: d_H = (nbits - x.y) / 2 for +-1 codes, then torch.topk.

    The bank is scanned in chunks so the [B, chunk] score matrix stays under 2^24 elements.
    """
    batch, nbits = queries_pm.shape
    half = torch.full((1,), nbits / 2, dtype=bank_pm.dtype, device=bank_pm.device)
    chunk = max(1024, (1 << 24) // batch)
    dists, idxs = [], []
    for start in range(0, bank_pm.shape[0], chunk):
        dist = torch.addmm(half, queries_pm, bank_pm[start : start + chunk].T, alpha=-0.5)
        value, index = dist.topk(k, dim=1, largest=False)
        dists.append(value)
        idxs.append(index + start)
    value, pick = torch.cat(dists, 1).topk(k, dim=1, largest=False)
    return value, torch.cat(idxs, 1).gather(1, pick)


def dot_topk(queries_pm: torch.Tensor, bank_pm: torch.Tensor, k: int,
             chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming top-k on the tensor cores: for +-1 codes x.y = nbits - 2 d_H, so the k largest dot
    products are the k nearest codes, and only those k are turned into distances.

    int8 codes go through torch._int_mm (int32 dot products, exact); bf16 through torch.mm, exact
    for nbits <= 256 (fp32 accumulation of +-1, and every even integer up to 256 is a bf16). The bank
    is scanned in chunks so the [B, chunk] product stays under `chunk_elems` elements.
    """
    batch, nbits = queries_pm.shape
    mm = torch._int_mm if queries_pm.dtype == torch.int8 else torch.mm
    chunk = max(1024, chunk_elems // batch)
    dots, idxs = [], []
    for start in range(0, bank_pm.shape[0], chunk):
        dot = mm(queries_pm, bank_pm[start : start + chunk].T)
        value, index = dot.max(dim=1, keepdim=True) if k == 1 else dot.topk(k, dim=1)
        dots.append(value)
        idxs.append(index + start)
    value, pick = torch.cat(dots, 1).topk(k, dim=1)
    return (nbits - value.to(torch.int32)) // 2, torch.cat(idxs, 1).gather(1, pick)


def tensor_peaks(name: str) -> dict:
    """The dense int8 and bf16 tensor-core peaks of a GPU by name ({} when unknown)."""
    for fragments, peaks in GPU_TENSOR_PEAK:
        if all(f in name for f in fragments):
            return dict(peaks, source=f"datasheet ({' '.join(fragments)}), dense")
    return {}


def routes(rows: list[Row], default: str, machine: dict) -> list[dict]:
    """Per hamming_topk size with B >= 64: the popcount kernel dispatch picks now beside the tensor-core
    formulations that agreed with the oracle, their floors, and which was faster."""
    out = []
    for pop in rows:
        if pop.op != "hamming_topk" or pop.backend != default or not pop.ms or pop.params["B"] < TENSOR_CORE_MIN_BATCH:
            continue
        ms = {default: pop.ms}
        floors = {default: pop.floor_ms}
        for row in rows:
            if row.backend in TENSOR_CORE_ROUTES and row.params == pop.params and row.ms and row.check != "MISMATCH":
                ms[row.backend] = row.ms
                peak = machine.get("tensor_peak", {}).get(TENSOR_CORE_ROUTES[row.backend])
                ops_needed = 2 * pop.params["B"] * pop.params["N"] * pop.params["nbits"]
                floors[row.backend] = 1e3 * ops_needed / peak if peak else None
        winner = min(ms, key=ms.get)
        out.append({"N": pop.params["N"], "nbits": pop.params["nbits"], "B": pop.params["B"], "ms": ms,
                    "floor_ms": floors, "winner": winner, "tensor_core_wins": winner != default})
    return out


def apply_floors(rows: list[Row], machine: dict) -> None:
    """floor_ms = max(popcounts / popcount rate, bytes / bandwidth), and which of the two binds.

    On the CPU a hamming row's popcount rate is that of the path it ran (faiss: the scalar POPCNT
    path's, the instruction it uses) and its bandwidth the rate at which this bank itself is read
    where it lives (L3 or DRAM); other rows use the copy bandwidth."""
    rate, bandwidth = machine["popcount64_per_s"], machine["bandwidth"]
    for row in rows:
        row_rate = rate.get(row.path) if isinstance(rate, dict) else rate
        row.popcount_floor_ms = 1e3 * row.popcounts / row_rate if row.popcounts and row_rate else None
        if not (row.popcounts or row.bytes_moved):
            continue
        memory_ms = 1e3 * row.bytes_moved / (row.read_bytes_per_s or bandwidth)
        row.floor_ms, row.floor_by = max((row.popcount_floor_ms or 0.0, "popcnt"), (memory_ms, "mem"))


def default_backend(device: torch.device) -> str:
    """The backend `auto` picks: the first available in _library's preference order."""
    return ops.available_backends(device)[0]


def speedups(rows: list[Row]) -> None:
    """Give every llmcache backend row (not the reference) its speedup over each baseline row."""
    baselines = [r for r in rows if r.role == "baseline" and r.ms]
    for row in rows:
        if row.role == "llmcache" and row.backend != "reference" and row.ms:
            row.speedup = {b.backend: b.ms / row.ms for b in baselines}


# ---------------------------------------------------------------- the three ops


@dataclass
class Bank:
    """One hamming_topk bank in every form a contender reads: llmcache codes, +-1 matrix, faiss indexes."""

    log_n: int
    nbits: int
    codes_cpu: torch.Tensor
    codes: torch.Tensor
    plus_minus: torch.Tensor
    plus_minus_int8: torch.Tensor
    read_bytes_per_s: float | None = None  # CPU: llmcache._C.read_rate of codes_cpu
    index: object = None  # faiss.IndexBinaryFlat, also the correctness oracle
    gpu_index: object = None  # faiss.GpuIndexBinaryFlat when faiss has GPU support
    gpu_resources: object = None  # kept alive as long as gpu_index


class Bench:
    """Runs each op's rows on one device and keeps them in `rows` (progress on stderr)."""

    def __init__(self, device: torch.device, sizes: Sizes, timer: Timer):
        self.device, self.sizes, self.timer = device, sizes, timer
        self.backends = ops.available_backends(device)
        self.default = default_backend(device)
        self.gen = torch.Generator().manual_seed(0)
        self.rows: list[Row] = []
        self.on_gpu = device.type == "cuda"
        self.cpu_paths = [] if self.on_gpu else runnable_cpu_paths()

    def auto_path(self, backend: str, batch: int) -> str:
        """The popcount path the C++ CPU kernel picks by itself for this many queries ('' elsewhere)."""
        ext = ops._library.extension()
        if backend != "cpp" or self.on_gpu or ext is None:
            return ""
        return ext.cpu_kernel_paths()["few_queries" if batch < FEW_QUERIES else "many_queries"]["path"]

    def float_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16) if self.on_gpu else (torch.float32,)

    def emit(self, rows: list[Row]) -> None:
        speedups(rows)
        for row in rows:
            row.default = row.role == "llmcache" and row.backend == self.default
        # Progress only: the table waits for the floors, which wait for the last rate measurement.
        print(f"  {rows[0].op} {rows[0].shape}: " + ", ".join(f"{r.backend} {number(r.ms)} ms" for r in rows),
              file=sys.stderr, flush=True)
        self.rows.extend(rows)

    def timed(self, row: Row, fn: Callable, check: Callable | None = None, host: bool = False) -> Row:
        """Warm up, check the warm-up output (before timing), then time: fills row.ms and row.reps."""
        out, warm_s = self.timer.warm(fn, host)
        if check is not None:
            check(row, out)
        row.ms, row.reps = self.timer.measure(fn, warm_s, host)
        return row

    # ---- hamming_topk
    def hamming_topk(self) -> None:
        sizes = self.sizes
        for log_n in sizes.hamming_logn:
            for nbits in sizes.hamming_bits:
                bank = self.make_bank(log_n, nbits)
                queries = random_codes(max(sizes.hamming_batch), nbits // 64, self.gen)
                for batch in sizes.hamming_batch:
                    self.emit(self.hamming_rows(bank, queries[:batch].contiguous()))

    def make_bank(self, log_n: int, nbits: int) -> Bank:
        codes_cpu = random_codes(1 << log_n, nbits // 64, self.gen)
        codes = codes_cpu.to(self.device)
        bank = Bank(log_n, nbits, codes_cpu, codes, unpack_plus_minus(codes, self.plus_minus_dtype()),
                    unpack_plus_minus(codes, torch.int8))
        ext = ops._library.extension()
        if not self.on_gpu and ext is not None:
            bank.read_bytes_per_s = max(ext.read_rate(codes_cpu, 0.1) for _ in range(3))
        if faiss is not None:
            bank.index = faiss.IndexBinaryFlat(nbits)
            bank.index.add(as_faiss_bytes(codes_cpu))
            if self.on_gpu and hasattr(faiss, "StandardGpuResources"):
                bank.gpu_resources = faiss.StandardGpuResources()
                bank.gpu_index = faiss.GpuIndexBinaryFlat(bank.gpu_resources, nbits)
                bank.gpu_index.add(as_faiss_bytes(codes_cpu))
        return bank

    def plus_minus_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.on_gpu else torch.float32

    def hamming_rows(self, bank: Bank, q_cpu: torch.Tensor) -> list[Row]:
        batch, words = q_cpu.shape
        bank_rows = bank.codes.shape[0]
        q = q_cpu.to(self.device)
        q_pm = unpack_plus_minus(q, self.plus_minus_dtype())
        params = {"N": bank_rows, "nbits": bank.nbits, "B": batch, "k": 1}
        shape = f"N=2^{bank.log_n} bits={bank.nbits} B={batch}"

        def row(backend: str, role: str, device: str = self.device.type, check: str = "", path: str = "") -> Row:
            here = device == self.device.type  # faiss-cpu in a CUDA run: no floor of this device applies
            return Row("hamming_topk", device, backend, role, shape, params, check=check,
                       popcounts=batch * bank_rows * words if here else 0,
                       bytes_moved=bank_rows * words * 8 if here else 0, path=path,
                       read_bytes_per_s=bank.read_bytes_per_s)

        rows, oracle, oracle_name = [], None, "faiss"

        def against_faiss(r: Row, out) -> None:
            if oracle is None:
                r.check = "no oracle"
                return
            dist = torch.as_tensor(out[0])[:, 0].cpu()
            dist = (dist.float().round() if dist.is_floating_point() else dist).long()
            match = bool(torch.equal(dist, oracle))
            if oracle_name == "faiss":
                r.faiss_match = match
            r.check = f"={oracle_name}" if match else "MISMATCH"

        if bank.index is not None:
            q_bytes = as_faiss_bytes(q_cpu)
            out, warm_s = self.timer.warm(lambda: bank.index.search(q_bytes, 1), host=True)
            oracle = torch.from_numpy(out[0][:, 0]).long()
            if bank.gpu_index is None:  # on CUDA without faiss-gpu, faiss-cpu is what a user has
                faiss_row = row("faiss-flat", "baseline", device="cpu", check="oracle", path="scalar")
                faiss_row.ms, faiss_row.reps = self.timer.measure(lambda: bank.index.search(q_bytes, 1), warm_s,
                                                                  host=True)
                rows.append(faiss_row)
            else:
                rows.append(self.timed(row("faiss-gpu", "baseline"), lambda: bank.gpu_index.search(q_bytes, 1),
                                       against_faiss, host=True))
        elif ops._library.extension() is not None:  # no faiss (the GPU image has none): C++ on the host copy
            oracle_name = "cpp"
            oracle = ops.hamming_topk(q_cpu, bank.codes_cpu, 1, backend="cpp")[0][:, 0].long()
        for backend in self.backends:
            if backend == "reference" and bank_rows * batch > REFERENCE_LOOKUPS:
                continue
            rows.append(self.timed(row(backend, "llmcache", path=self.auto_path(backend, batch)),
                                   lambda b=backend: ops.hamming_topk(q, bank.codes, 1, backend=b), against_faiss))
        for path in self.cpu_paths:  # every popcount path the CPU runs, forced
            with forced_path(path):
                rows.append(self.timed(row(f"cpp/{path}", "llmcache", path=path),
                                       lambda: ops.hamming_topk(q, bank.codes, 1, backend="cpp"), against_faiss))
        rows.append(self.timed(row("torch-mm", "baseline"), lambda: matmul_topk(q_pm, bank.plus_minus, 1),
                               against_faiss))
        if batch >= TENSOR_CORE_MIN_BATCH:
            rows += self.tensor_core_rows(bank, q, row, against_faiss)
        return rows

    def tensor_core_rows(self, bank: Bank, q: torch.Tensor, row: Callable, check: Callable) -> list[Row]:
        """The tensor-core route (dot_topk) in int8, and in bf16 on CUDA (CPU bf16 products are slow and
        torch-mm already stands for the float route there). A formulation the library build rejects is
        reported in the row's check, not raised: the other rows of a lent GPU's only run still count."""
        contenders = [("int8-mm", torch.int8, bank.plus_minus_int8)]
        if self.on_gpu and bank.nbits <= 256:
            contenders.append(("bf16-mm", torch.bfloat16, bank.plus_minus))
        chunk = 1 << (26 if self.on_gpu else 24)  # fewer launches on the GPU, whose memory has room
        rows = []
        for name, dtype, bank_pm in contenders:
            q_pm, r = unpack_plus_minus(q, dtype), row(name, "baseline")
            try:
                rows.append(self.timed(r, lambda q_pm=q_pm, b=bank_pm: dot_topk(q_pm, b, 1, chunk), check))
            except RuntimeError as err:
                r.check = "error: " + str(err).splitlines()[0][:80]
                rows.append(r)
        return rows

    # ---- simhash_pooled
    def simhash_pooled(self) -> None:
        planes = ops.random_planes(self.sizes.dim, self.sizes.pooled_bits, device=self.device)
        for dtype in self.float_dtypes():
            for batch in self.sizes.pooled_batch:
                self.emit(self.pooled_rows(batch, dtype, planes))

    def pooled_rows(self, batch: int, dtype: torch.dtype, planes: torch.Tensor) -> list[Row]:
        seq, dim, nbits = self.sizes.seq, self.sizes.dim, planes.shape[1]
        embeds = torch.randn(batch, seq, dim, generator=self.gen).to(self.device, dtype)
        lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=self.gen)
        mask = (torch.arange(seq) < lengths).to(self.device)  # right padding, at least half the tokens real
        want = reference.simhash_pooled(embeds, mask, planes)
        params = {"B": batch, "T": seq, "d": dim, "nbits": nbits, "dtype": dtype_name(dtype)}
        shape = f"B={batch} T={seq} d={dim} bits={nbits} {dtype_name(dtype)}"

        def against_reference(r: Row, out: torch.Tensor) -> None:
            # Bits may differ where a projection is within rounding of zero: count, never fail.
            differ = int(reference.popcount64(out ^ want).sum())
            r.check = "=ref" if differ == 0 else f"{differ} bits!=ref"

        rows = []
        for backend in self.backends:
            role = "baseline" if backend == "reference" else "llmcache"
            rows.append(self.timed(
                Row("simhash_pooled", self.device.type, backend, role, shape, params,
                    bytes_moved=embeds.numel() * embeds.element_size()),
                lambda b=backend: ops.simhash_pooled(embeds, mask, planes, backend=b),
                None if backend == "reference" else against_reference,
            ))
        return rows

    # ---- gather_with_mask
    def gather_with_mask(self) -> None:
        for dtype in self.float_dtypes():
            self.emit(self.gather_rows(self.sizes.gather_batch, dtype))

    def gather_rows(self, batch: int, dtype: torch.dtype) -> list[Row]:
        dev, seq, dim = self.device, self.sizes.seq, self.sizes.dim
        slots, misses = 2 * batch, batch // 2
        values = torch.randn(slots, seq, dim, generator=self.gen).to(dev, dtype)
        computed = torch.randn(misses, seq, dim, generator=self.gen).to(dev, dtype)
        hit = torch.zeros(batch, dtype=torch.bool)
        hit[torch.randperm(batch, generator=self.gen)[: batch - misses]] = True
        slot = torch.full((batch,), -1, dtype=torch.int64)
        slot[hit] = torch.randperm(slots, generator=self.gen)[: batch - misses]
        row_of = torch.full((batch,), -1, dtype=torch.int64)
        row_of[~hit] = torch.arange(misses)
        slot, row_of, hit = slot.to(dev), row_of.to(dev), hit.to(dev)
        last_used = torch.zeros(slots, dtype=torch.int64, device=dev)
        hit_count = torch.zeros(slots, dtype=torch.int64, device=dev)
        want = reference.gather_with_mask(values, slot, computed, row_of, last_used.clone(), hit_count.clone(), 1)
        moved = 2 * want.numel() * want.element_size()  # every output byte is read once and written once
        params = {"B": batch, "T": seq, "d": dim, "hits": batch - misses, "dtype": dtype_name(dtype)}
        shape = f"B={batch} T={seq} d={dim} hits=50% {dtype_name(dtype)}"

        def row(backend: str, role: str, check: str = "") -> Row:
            return Row("gather_with_mask", dev.type, backend, role, shape, params, check=check, bytes_moved=moved)

        def against_reference(r: Row, out: torch.Tensor) -> None:
            r.check = "=ref" if torch.equal(out, want) else "MISMATCH"

        rows = []
        for backend in self.backends:
            role = "baseline" if backend == "reference" else "llmcache"
            rows.append(self.timed(
                row(backend, role),
                lambda b=backend: ops.gather_with_mask(values, slot, computed, row_of, last_used, hit_count, 1,
                                                      backend=b),
                against_reference,
            ))
        # What a user writes without the fused op (and without the counter updates): two gathers and a select.
        safe_slot, safe_row, hit3 = slot.clamp_min(0), row_of.clamp_min(0), hit.view(-1, 1, 1)
        rows.append(self.timed(row("torch-where", "baseline"),
                               lambda: torch.where(hit3, values[safe_slot], computed[safe_row]), against_reference))
        # The bandwidth probes: a copy of the output's bytes into a reused buffer, and one into a fresh tensor as
        # the op itself must return (on CPU a fresh large tensor pays a page fault per 4 KiB page on first write).
        src, dst = want.clone(), torch.empty_like(want)
        rows.append(self.timed(row("torch-copy", "baseline", check="same bytes"), lambda: dst.copy_(src)))
        rows.append(self.timed(row("torch-clone", "baseline", check="same bytes"), src.clone))
        return rows


@contextmanager
def forced_path(path: str):
    """LLMCACHE_CPU_ISA=path for the calls inside (the C++ dispatch reads it on every call)."""
    before = os.environ.get("LLMCACHE_CPU_ISA")
    os.environ["LLMCACHE_CPU_ISA"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["LLMCACHE_CPU_ISA"]
        else:
            os.environ["LLMCACHE_CPU_ISA"] = before


def runnable_cpu_paths() -> list[str]:
    """The popcount paths this CPU runs (a forced path it lacks falls back, which this detects)."""
    ext = ops._library.extension()
    if ext is None:
        return []
    out = []
    for path in CPU_PATHS:
        with forced_path(path):
            if ext.cpu_kernel_paths()["many_queries"]["path"] == path:
                out.append(path)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------- output


COLUMNS = ("op", "device", "backend", "shape", "reps", "ms", "floor ms", "by", "% floor", "check",
           "speedup vs baselines")
ALIGN = "llllrrrlrll"  # numbers to the right


def number(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 100 else f"{x:.4g}"


def table_row(row: Row) -> dict:
    pct = row.pct_of_floor
    gains = ", ".join(f"{name} {x:.3g}x" for name, x in row.speedup.items())
    return dict(zip(COLUMNS, [
        row.op, row.device, row.backend + ("*" if row.default else ""), row.shape,
        "-" if row.reps is None else str(row.reps), number(row.ms), number(row.floor_ms), row.floor_by,
        "-" if pct is None else f"{pct:.1f}%", row.check, gains,
    ]))


def row_record(row: Row) -> dict:
    record = asdict(row)
    record["pct_of_floor"] = row.pct_of_floor
    return record


def output_name(device: torch.device, args) -> str:
    """kernels-<name>.json: the device, then -<N>t when --threads is given and -<cap> under LLMCACHE_CPU_CAP."""
    cap = os.environ.get("LLMCACHE_CPU_CAP")
    return device.type + (f"-{args.threads}t" if args.threads else "") + (f"-{cap}" if cap else "")


def write_outputs(out_dir: Path, device: str, header: dict, rows: list[Row], targets: list[dict],
                  route_rows: list[dict]) -> Path:
    records = [row_record(r) for r in rows]
    path = write_json(out_dir / f"kernels-{device}.json",
                      {"header": header, "rows": records, "targets": targets, "routes": route_rows})
    fields = ["op", "device", "backend", "role", "default", "shape", "reps", "ms", "floor_ms", "floor_by",
              "pct_of_floor", "popcount_floor_ms", "popcounts", "bytes_moved", "check", "faiss_match", "speedup",
              "params"]
    flat = [r | {"speedup": ";".join(f"{k}={v:.4g}" for k, v in r["speedup"].items()),
                 "params": json.dumps(r["params"])} for r in records]
    # The header record as the first line, read back with comment='#'.
    write_csv(out_dir / f"kernels-{device}.csv", flat, fields, comment=json.dumps(header, default=str))
    return path


# ---------------------------------------------------------------- targets


def find(rows: list[Row], op: str, backend: str, **params) -> Row | None:
    for row in rows:
        if row.op == op and row.backend == backend and row.ms and all(row.params.get(k) == v for k, v in params.items()):
            return row
    return None


def cpu_hamming_targets(rows: list[Row], default: str) -> list[dict]:
    """#26's CPU targets for 256-bit codes, against faiss in the same run: >= 2x at N=2^20, B=64; >= 1.2x at
    B=1; ahead at every N and B in {1, 8, 64}; >= 60 % of the floor that binds at N=2^20, B=1 and 64."""
    out = []
    for batch, goal in ((64, 2.0), (1, 1.2)):
        mine, base = (find(rows, "hamming_topk", b, N=1 << 20, nbits=256, B=batch) for b in (default, "faiss-flat"))
        ratio = base.ms / mine.ms if mine and base else None
        detail = f"{mine.ms:.3f} ms vs faiss {base.ms:.3f} ms" if ratio else "not measured"
        out.append(target(f"{default} hamming_topk N=2^20 256b B={batch} >= {goal}x faiss", ratio, goal, detail,
                          unit="x"))
    pairs = [(find(rows, "hamming_topk", default, N=1 << n, nbits=256, B=b),
              find(rows, "hamming_topk", "faiss-flat", N=1 << n, nbits=256, B=b)) for n in (12, 16, 20) for b in (1, 8, 64)]
    ratios = {f"2^{m.params['N'].bit_length() - 1}/B={m.params['B']}": f.ms / m.ms for m, f in pairs if m and f}
    worst = min(ratios.values()) if ratios else None
    detail = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) if ratios else "not measured"
    out.append(target(f"{default} hamming_topk 256b ahead of faiss at every N and B in 1, 8, 64", worst, 1.0, detail,
                      unit="x"))
    for batch in (64, 1):
        mine = find(rows, "hamming_topk", default, N=1 << 20, nbits=256, B=batch)
        frac = mine.floor_ms / mine.ms if mine and mine.floor_ms else None
        detail = f"{mine.ms:.3f} ms vs floor {mine.floor_ms:.3f} ms ({mine.floor_by}, {mine.path})" if frac else "not measured"
        out.append(target(f"{default} hamming_topk N=2^20 256b B={batch} >= 60% of its floor", frac, 0.6, detail,
                          unit="frac"))
    return out


def check_targets(rows: list[Row], device: torch.device, default: str) -> list[dict]:
    lookup = {"N": 1 << 20, "nbits": 256, "B": 64}
    fast = find(rows, "hamming_topk", default, **lookup)
    out = []
    if device.type == "cpu":
        out += cpu_hamming_targets(rows, default)
        mine = find(rows, "simhash_pooled", default, B=64, dtype="fp32")
        ref = find(rows, "simhash_pooled", "reference", B=64, dtype="fp32")
        ratio = ref.ms / mine.ms if mine and ref else None
        detail = f"{mine.ms:.3f} ms vs {ref.ms:.3f} ms" if ratio else "not measured"
        out.append(target(f"{default} simhash_pooled B=64 fp32 >= 3x reference", ratio, 3, detail, unit="x"))
        return out
    frac = fast.floor_ms / fast.ms if fast else None
    detail = f"{fast.ms:.4f} ms vs floor {fast.floor_ms:.4f} ms ({fast.floor_by})" if fast else "not measured"
    out.append(target(f"{default} hamming_topk N=2^20 256b B=64 >= 50% of floor", frac, 0.5, detail, unit="frac"))
    for dtype in ("fp32", "bf16"):
        mine = find(rows, "simhash_pooled", default, B=256, dtype=dtype)
        frac = mine.floor_ms / mine.ms if mine else None
        detail = f"{mine.ms:.4f} ms vs floor {mine.floor_ms:.4f} ms" if mine else "not measured"
        out.append(target(f"{default} simhash_pooled B=256 {dtype} within 2x of bandwidth floor", frac, 0.5, detail,
                          unit="frac"))
        mine = find(rows, "gather_with_mask", default, dtype=dtype)
        copy = find(rows, "gather_with_mask", "torch-copy", dtype=dtype)
        frac = copy.ms / mine.ms if mine and copy else None
        detail = f"{mine.ms:.4f} ms vs copy {copy.ms:.4f} ms" if frac else "not measured"
        out.append(target(f"{default} gather_with_mask {dtype} >= 70% of copy bandwidth", frac, 0.7, detail,
                          unit="frac"))
    return out


def format_route(r: dict) -> str:
    times = ", ".join(f"{name} {number(ms)} ms (floor {number(r['floor_ms'][name])})" for name, ms in r["ms"].items())
    return f"  N=2^{r['N'].bit_length() - 1} bits={r['nbits']} B={r['B']}: {times} -> {r['winner']}"


# ---------------------------------------------------------------- main


def header_record(device: torch.device, args, machine: dict, date: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine = {"faiss_threads": faiss.omp_get_max_threads() if faiss else None,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **machine}
    versions = {"triton": triton_version, "faiss": faiss.__version__ if faiss else None}
    notes = [
        f"hamming_topk reference backend runs only where N*B <= 2^{REFERENCE_LOOKUPS.bit_length() - 1} (too slow)",
        "faiss breaks distance ties its own way: only distances are compared with faiss",
        ("CPU: warm-up call then the median of `reps` samples, each the mean of a batch of calls lasting ~1 ms "
         "(one call for slower ones); CUDA: triton do_bench median"),
        "floor = least time the hardware allows, by popcount rate (popcnt) or DRAM bandwidth (mem)",
        "% floor = floor_ms / ms (above 100% when the data sits in cache); speedup = baseline ms / ms",
    ]
    return header(args, device.type, machine=machine, versions=versions, notes=notes) | {"date": date}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset for CI smoke runs (< 40 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for kernels-<device>.json/.csv")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP and faiss threads (default: torch's); the output name gets -<N>t")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per CPU row, fewer for slow calls (CUDA rows use do_bench)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def measure_cpu_rates(machine: dict, quick: bool) -> None:
    """Measure the CPU's popcount rate per path and its copy bandwidth (again): the floors use the fastest
    measurement of each, since other processes on the machine can only ever slow one down."""
    ext = ops._library.extension()
    measured = machine.setdefault("popcount64_per_s_measured", {})
    bandwidths = machine.setdefault("bandwidth_measured", [])
    if ext is not None:
        for path in runnable_cpu_paths():
            measured.setdefault(path, []).append(ext.popcount_peak_rate(0.3, path))
    bandwidths.append(cpu_copy_bandwidth(quick))
    machine["popcount64_per_s"] = {path: max(rates) for path, rates in measured.items()}
    machine["popcount_source"] = ("llmcache._C.popcount_peak_rate(0.3, path): the path's popcount in a "
                                  "register-resident loop (avx2*: the nibble lookup), best of start and end of run")
    machine["bandwidth"] = max(bandwidths)
    machine.setdefault("load_average_1min", []).append(os.getloadavg()[0])
    machine["bandwidth_source"] = (f"torch copy of {64 if quick else 256} MiB, (read + write) bytes / median time, "
                                   "best of start and end of run; hamming rows: llmcache._C.read_rate of the bank")


def print_rates(machine: dict, threads: int) -> None:
    if "popcount64_per_s_measured" in machine:
        rates = ", ".join(f"{path} {rate / 1e9:.1f}" for path, rate in machine["popcount64_per_s"].items())
        print(f"popcount floor, G 64-bit popcounts/s on {threads} threads: {rates or 'none: llmcache._C missing'}")
        bandwidths = ", ".join(f"{b / 1e9:.1f}" for b in machine["bandwidth_measured"])
        print(f"bandwidth: {machine['bandwidth'] / 1e9:.1f} GB/s ({bandwidths} measured by torch copy, best taken); "
              "hamming rows: the bank's own read rate")
    else:
        print(f"popcount floor: {machine['popcount64_per_s'] / 1e9:.0f} G/s = {machine['popcount_assumption']} "
              f"(clock: {machine['sm_clock_source']})")
        print(f"bandwidth: {machine['bandwidth'] / 1e9:.0f} GB/s ({machine['bandwidth_source']})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    date = now()
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
    machine: dict = {}
    if device.type == "cpu":
        measure_cpu_rates(machine, args.quick)
    else:
        machine.update(gpu_spec())
    default = default_backend(device)
    print(f"llmcache kernel benchmark  {date}  device={device.type}{'  (quick)' if args.quick else ''}", flush=True)

    # On CUDA only faiss-cpu rows are host-timed: 1 s each keeps the GPU check inside its step budget.
    bench = Bench(device, sizes, Timer(device, args.repeats, sizes.row_budget_s if device.type == "cpu" else 1.0))
    for op in (bench.hamming_topk, bench.simhash_pooled, bench.gather_with_mask):
        op()
        apply_floors(bench.rows, machine)  # CPU floors are provisional until the end-of-run rates
        partial = header_record(device, args, machine, date) | {"partial": True}
        write_outputs(args.out, output_name(device, args), partial, bench.rows, [], routes(bench.rows, default, machine))
    if device.type == "cpu":
        measure_cpu_rates(machine, args.quick)
    apply_floors(bench.rows, machine)
    head = header_record(device, args, machine, date)

    m, versions = head["machine"], head["versions"]
    print(f"cpu: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, "
          f"faiss threads {m['faiss_threads']}; gpu: {m['gpu']}")
    print(f"torch {versions['torch']}, triton {versions['triton']}, faiss {versions['faiss']}; "
          f"backends {ops.available_backends(device)} (default {default}, marked *); "
          f"cpu kernel {head['build_info']['cpu_kernel']}")
    if head["build_info"].get("cpu_kernel_paths"):
        for regime, choice in head["build_info"]["cpu_kernel_paths"].items():
            print(f"  {regime}: {choice['path']} ({choice['why']})")
    if os.environ.get("LLMCACHE_CPU_CAP"):
        print(f"LLMCACHE_CPU_CAP={os.environ['LLMCACHE_CPU_CAP']}: wider CPU features hidden (cpu_features above)")
    print_rates(machine, m["torch_threads"])
    loads, cores = machine.get("load_average_1min", []), os.cpu_count() or 1
    # The end reading includes this run's own threads; the start reading is (mostly) everyone else.
    if loads and (loads[0] > 0.5 * cores or loads[-1] > 1.5 * cores):
        print(f"WARNING: the machine was busy (1-min load average {', '.join(f'{x:.1f}' for x in loads)} at start and "
              f"end, {cores} cores): OpenMP timings jump by scheduler ticks and the floors measured here are "
              "low, so % floor reads high")
    for note in head["notes"]:
        print(f"note: {note}")
    print()
    print_table([table_row(row) for row in bench.rows], align=ALIGN)

    route_rows = routes(bench.rows, default, machine)
    print(f"\nhamming_topk route, popcount ({default}) or tensor cores, B >= {TENSOR_CORE_MIN_BATCH} (floor ms):")
    for r in route_rows:
        print(format_route(r))
    targets = check_targets(bench.rows, device, default)
    print()
    print_targets(targets, f"targets ({device.type}):")
    head["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = write_outputs(args.out, output_name(device, args), head, bench.rows, targets, route_rows)
    bad = [f"{r.op} {r.backend} {r.shape}" for r in bench.rows if r.faiss_match is False or r.check == "MISMATCH"]
    print(f"\nwrote {path} and {path.with_suffix('.csv')} in {head['elapsed_s']} s")
    if bad:
        print("RESULT MISMATCH (the benchmark's correctness check failed):\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
