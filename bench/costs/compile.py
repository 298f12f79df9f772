"""torch.compile with and without the cache, on the same stream, in one process.

    python -m bench.costs.compile [--model minilm] [--rows 256] [--batch 32] [--passes 5] [--threads 1]
                                  [--out DIR]

Four variants of one model (copies of the same weights): eager, eager + cache,
`torch.compile(model)` and `torch.compile(llmcache.accelerate(model))`. Each runs the 70 %-repeat
stream (bench.experiments.e2e's) once to warm up — for the compiled ones that pass includes compiling, and
its excess over the steady-state pass is reported as the compile time — then `--passes` timed
passes, round robin over the variants, each from empty banks; times are medians. Dynamo's counters give the graphs compiled and
the graph breaks (the cache's bookkeeping is left out of the graph on purpose: `compiler.disable`
on the base-model wrapper and the block splice, two breaks per cached block call). Writes
DIR/compile-<model>-cpu.json (default bench/out/costs).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.experiments import e2e
from bench.report import fmt_x, header, median, print_table, write_json


def one_pass(model, encoded, cached: bool) -> float:
    """Seconds for one pass over the stream; cached passes start from empty banks."""
    if cached:
        llmcache.reset(getattr(model, "_orig_mod", model))
    start = time.perf_counter()
    for enc in encoded:
        model(**enc)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=["minilm", "bert-base", "gpt2"])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--out", default="bench/out/costs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    model, tok = e2e.load(args.model, "cpu", torch.float32, None, args.data, args.size)
    stream = streams.repeat_stream(e2e.stream_sentences(args.data), args.rows, 0.7, seed=1)
    encoded = e2e.batches(tok, stream, args.batch, "cpu")
    variants = {
        "eager": (model, False),
        "eager+cache": (llmcache.accelerate(copy.deepcopy(model)), True),
        "compiled": (torch.compile(copy.deepcopy(model)), False),
        "compiled+cache": (torch.compile(llmcache.accelerate(copy.deepcopy(model))), True),
    }
    rows = {}
    # The variants share code objects (the same BertModel.forward): room for every variant's
    # graphs, so that one variant's recompiles do not push another's out.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch.inference_mode():
        for name, (m, cached) in variants.items():  # warm-up pass: compiles
            counters.clear()
            rows[name] = {"first_s": one_pass(m, encoded, cached), "all_s": [],
                          "graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": sum(counters["graph_break"].values())}
        for _ in range(args.passes):  # round robin: the machine's noise falls on every variant alike
            for name, (m, cached) in variants.items():
                rows[name]["all_s"].append(one_pass(m, encoded, cached))
    for name, (m, cached) in variants.items():
        r = rows[name]
        r["steady_s"] = median(r["all_s"])
        r["compile_s"] = max(r["first_s"] - r["steady_s"], 0.0)
        if cached:
            r["hit_rate"] = llmcache.stats(getattr(m, "_orig_mod", m)).hit_rate
    base = rows["eager"]["steady_s"]
    print_table([{"variant": name, "steady ms": 1e3 * r["steady_s"], "vs eager": fmt_x(base / r["steady_s"]),
                  "first pass ms": 1e3 * r["first_s"], "graphs": r["graphs"], "breaks": r["graph_breaks"]}
                 for name, r in rows.items()], {"steady ms": ".1f", "first pass ms": ".1f"}, "lrrrrr")
    ratio = rows["eager+cache"]["steady_s"] / rows["compiled+cache"]["steady_s"]
    print(f"compiled+cache vs eager+cache: {ratio:.2f}x (target >= 1.00); compile time "
          f"{rows['compiled+cache']['compile_s']:.1f} s with the cache, {rows['compiled']['compile_s']:.1f} s without")
    path = write_json(Path(args.out) / f"compile-{args.model}-cpu.json",
                      {"header": header(args, "cpu"), "rows": rows, "compiled_cache_vs_eager_cache": ratio})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
