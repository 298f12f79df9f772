"""What the per-block lock costs: several threads sharing one model, cache off vs on.

    python -m bench.costs.threads [--threads 4] [--batches 24] [--batch 8] [--repeats 3] [--out DIR]

Each thread sends its own batches of distinct STS-B sentences (no repeats, so the cache only adds
its bookkeeping and its lock) through the real MiniLM. The cache holds one lock per cached block
from lookup to insert, so the threads' blocks run one at a time while the cache is on; with it
off they run concurrently. Reported: rows/s of all threads together off and on (medians), and
the same with a single thread, so the lock's share of the cost is the difference of the ratios.
Writes DIR/threads-minilm-cpu.json (default bench/out/costs).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.report import median, print_table, write_json
from llmcache.models import load_minilm


def run_threads(model, work: list[list[dict]]) -> float:
    def run(batches):
        with torch.inference_mode():
            for enc in batches:
                model(**enc)

    threads = [threading.Thread(target=run, args=(w,)) for w in work]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--batches", type=int, default=24, help="batches per thread")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="bench/out/costs")
    args = p.parse_args(argv)
    model, tok = load_minilm()
    sentences = streams.unique_stream([s for _, a, b in streams.load_sts("test", args.data) for s in (a, b)],
                                      args.threads * args.batches * args.batch, seed=2)
    chunks = [sentences[i : i + args.batch] for i in range(0, len(sentences), args.batch)]
    encoded = [dict(tok(c, padding=True, return_tensors="pt")) for c in chunks]
    work = [encoded[t :: args.threads] for t in range(args.threads)]
    rows = len(sentences)
    result = {}
    llmcache.accelerate(model)
    for name, plan in (("single", [encoded]), (f"{args.threads} threads", work)):
        off, on = [], []
        with llmcache.bypass(model):
            run_threads(model, plan)  # warm-up
        for _ in range(args.repeats):
            with llmcache.bypass(model):
                off.append(run_threads(model, plan))
            llmcache.reset(model)
            on.append(run_threads(model, plan))
        result[name] = {"off_rows_per_s": rows / median(off), "on_rows_per_s": rows / median(on)}
    llmcache.disable(model)
    print_table([{"": name, "off rows/s": r["off_rows_per_s"], "on rows/s": r["on_rows_per_s"],
                  "on/off": r["on_rows_per_s"] / r["off_rows_per_s"]} for name, r in result.items()],
                {"off rows/s": ".1f", "on rows/s": ".1f", "on/off": ".3f"})
    write_json(Path(args.out) / "threads-minilm-cpu.json",
               {"args": vars(args), "torch_threads": torch.get_num_threads(), "results": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
