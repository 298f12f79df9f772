"""The shared tier on a real redis-server: a fleet of replicas, where a round trip pays, a soak.

    python -m bench.experiments.shared {fleet,breakeven,soak,pages,all} [--quick] [--out DIR] [--repeats 3]
                                       [--threads 1] [--suffix S] [--rows 2048] [--replicas 1,2,4]
                                       [--soak-requests 100000] [--data DIR] [--prompts 32] [--system-tokens 500]
                                       [--rounds 5] [--uncached 3] [--big-layers 16] [--big-dtype bfloat16]

Every part starts its own redis-server (`--save "" --appendonly no`, a free loopback port) and
stops it at the end; results go to DIR/shared/shared-<part>.json and .md (default DIR:
bench/out/experiments; header: date, machine,
versions, arguments, the command; the load average before and after, since the machine is shared).

fleet: one stream of --rows STS-B test sentences (`streams.repeat_stream`, 70 % exact repeats,
seed 1) in batches of 32, split round-robin by batch over K replica processes (multiprocessing
"spawn"; replica i gets batches i, i + K, ...) that run concurrently, each with the real MiniLM
and --threads torch threads. Every replica runs its share twice per mode (a barrier lines up
the passes of all replicas): cached and uncached (`llmcache.bypass`), in an order that flips
from one repeat to the next. Modes: "local" (`accelerate(model)`, the local tier only) and
"shared" (`accelerate(model, shared=Shared(url, lookup="always"))`, Redis FLUSHALL-ed before
each K). Before its timed passes a replica runs one warm-up forward of a sentence outside the
stream (it computes the model fingerprint once: a one-off cost that is not the stream's) and
counts from there. K = 1 in mode "local" is the single process that sees the whole stream:
its hit rate (rows served from the bank / rows) is the reference; "local" at K > 1 is what
replicas reach today. Reported per K (medians over --repeats): hit rate shared / single and
local / single (also with in-batch repeats counted), the median over replicas of uncached /
cached time, shared hits, write drops and errors.

breakeven: per model (MiniLM, real; "bert-base", random weights; "tiny", a random 2-block
width-64 BERT) and row length (8, 32, 128 real tokens: synthetic token ids, no padding), a
batch of 32 distinct rows, medians over --repeats of (a) an uncached forward (bypass), (b) a
forward whose every row is served from Redis (`llmcache.reset` empties the local bank, then a
one-row forward of another row recomputes the fingerprint outside the timing), (c) the same
forward again, every row a local hit. Per row: (a) / 32, (b) / 32, (c) / 32; compute / shared
hit = a / b; the MGET's own time (`SharedStats.latency_s`) and bytes per row; the break-even
row length where b = a (linear interpolation between measured lengths; "always" / "never"
within the range otherwise). Then `lookup="auto"` on a stream (repeat_stream, STS-B): the
first half is written to Redis by an "always" replica, the second runs from a cold local bank
with lookup "auto", "always" and without the shared tier (Redis re-filled before each; medians
of --repeats): skipped "not_worth", hits, wall times, and whether auto's choice agrees with
the break-even and with the timings. Then compression: zlib level 1 (and lz4 where it is
importable; it is not a dependency) on real MiniLM and random bert-base states (float32, the
bytes an entry holds): ratio, compress / decompress time per row, and the loopback time saved
per row (MGET of 32 raw values vs 32 compressed ones, medians).

soak: --soak-requests rows in batches of 32 through the tiny BERT (rows of 4-32 synthetic
tokens, every batch padded to 32 so that outputs are comparable bit for bit; half the rows
repeat an earlier row at a geometric distance, mean 1500 distinct rows, the rest are new) with
the shared tier ("always") on a redis-server run with --maxmemory 8mb --maxmemory-policy
allkeys-lru, and a local bank of max_bytes 4 MiB. Every forward is wrapped (exceptions
counted); every 20th forward's output is compared with torch.equal (at real tokens: both
multiplied by the mask) to an uncached copy of the model; every --sample-every forwards the
client's VmRSS (/proc/self/status) and the server's used_memory, maxmemory and evicted_keys
are sampled. Reported: RSS after warm-up, max, end, the least-squares slope over the second
half (bytes per 1000 requests), failures, mismatches, server used_memory (max of the samples
and its own used_memory_peak) vs maxmemory, evicted keys, client write drops and errors.

pages: the decoder's KV pages through Redis, on SmolLM2 (and a ~1B random Llama): a fleet of K
replicas on a chat-like stream sharing a system prompt (tokens served vs one process), the time to
first token of a prompt whose 512-token prefix another process computed (vs a local prefix hit and
vs computing it), the break-even prefix length and what lookup="auto" decides, and a restarted
process's hit rate on a warm Redis; results in DIR/shared/pages-smollm2.json and .md
(bench/experiments/shared/pages.py says how each is measured).

--quick: a smoke run (fleet 256 rows, K = 1, 2, one repeat; breakeven tiny and MiniLM at 8
and 32 tokens; soak 2,000 requests; pages on a random tiny Llama, K = 1, 2, 12 prompts, no 1B model:
pages-tiny.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from .breakeven import breakeven
from .common import PARTS, header, write_report
from .fleet import fleet
from .pages import pages
from .soak import soak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*PARTS, "all"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--out", default="bench/out/experiments", help="results go to OUT/shared/")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 for the fleet with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: faster on a busy machine)")
    p.add_argument("--rows", type=int, default=2048, help="fleet: rows of the stream")
    p.add_argument("--replicas", default="1,2,4", help="fleet: replica counts K")
    p.add_argument("--soak-requests", type=int, default=100_000)
    p.add_argument("--sample-every", type=int, default=500, help="soak: forwards between samples")
    p.add_argument("--data", default=None, help="data directory (default $LLMCACHE_DATA or ../shared/data)")
    p.add_argument("--suffix", default="", help="added to the result files' names (shared-<part><suffix>.json)")
    p.add_argument("--prompts", type=int, default=32, help="pages: prompts of the fleet's (and restart's) stream")
    p.add_argument("--system-tokens", type=int, default=500, help="pages: system prompt + few-shot block tokens")
    p.add_argument("--rounds", type=int, default=5, help="pages: timed rounds of remote / local / compute")
    p.add_argument("--uncached", type=int, default=3, help="pages: prompts per replica timed uncached")
    p.add_argument("--big-layers", type=int, default=16, help="pages: blocks of the ~1B Llama (0: skip it)")
    p.add_argument("--big-dtype", default="bfloat16", choices=["float32", "bfloat16"], help="pages: the ~1B's dtype")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    command = "python -m bench.experiments.shared " + " ".join(argv)
    out = Path(args.out)
    parts = PARTS if args.part == "all" else (args.part,)
    for part in parts:
        run_args = copy.copy(args)
        if args.quick and part == "fleet":
            run_args.rows, run_args.replicas = min(args.rows, 256), "1,2"
        if args.quick and part == "pages":
            run_args.replicas, run_args.prompts, run_args.system_tokens = "1,2", min(args.prompts, 12), 64
            run_args.rounds, run_args.uncached = min(args.rounds, 2), min(args.uncached, 1)
        if run_args.repeats is None:
            run_args.repeats = 1 if args.quick and part == "fleet" else 3
        head = header(run_args, command)
        t0 = time.perf_counter()
        result = {"fleet": fleet, "breakeven": breakeven, "soak": soak, "pages": pages}[part](run_args, head)
        result["record"]["wall_s"] = time.perf_counter() - t0
        write_report(out, part, head, result["record"], result["tables"], result["notes"], args.suffix,
                     stem=result.get("stem"))
    return 0
