"""What the exact tier's own work costs per forward, in µs and as a share of the forward.

    python -m bench.costs.bookkeeping [--batches 12] [--passes 3] [--warm 16] [--batch 32] [--checks 2000]
                                      [--device cpu|cuda] [--threads N] [--data DIR] [--out DIR]

The real MiniLM, default CacheConfig, batches of `--batch` distinct STS-B sentences (all three
splits, seeded order; none seen before by the cache) under inference_mode. Measured:

(a) the model-state check alone: `ModelState.check()` (llmcache/state.py: the watch over every
    parameter, buffer and module of the tree, and the state header), timed in a loop of
    `--checks` calls, median of 5 loops (bench/costs/state.py splits it, and times it on more models);
(b) the host routing per forward: `stats(model).lookup_s` over one forward (key building, the
    host index lookup, the plan, and the forward's one host copy of ids/mask/positions/types),
    on forwards where every row misses and where every row hits;
(c) the whole forward uncached (`llmcache.bypass`), cached with 0 % hits (every row new: it
    computes and is inserted) and cached with 100 % hits (the same batch again: every block is
    skipped), per batch back to back in alternating order (a shared machine's load moves
    between seconds, not within one triple), medians over `--passes` x `--batches` triples.

Before measuring, a warm-up pass of other sentences grows the arena past its first doublings,
as in a server that has been running. The 0 %-hit forward minus the uncached one is the
bookkeeping a miss costs (the issue's unique-stream target: <= 2 % slower). Rows and a header go
to DIR/bookkeeping-minilm-<device>.json (default bench/out/costs); nothing asserts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

import llmcache
from bench.costs.memory import add_run_args, distinct_sentences, encode
from bench.report import fmt_pct, header, median, median_ratio, print_table, print_targets, target, write_rows
from llmcache.models import load_minilm


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(model, enc: dict, device: str, uncached: bool = False) -> tuple[float, float]:
    """(seconds of one forward, seconds of host routing it added to stats.lookup_s)."""
    lookup = llmcache.stats(model).lookup_s
    sync(device)
    start = time.perf_counter()
    if uncached:
        with llmcache.bypass(model):
            model(**enc)
    else:
        model(**enc)
    sync(device)
    spent = time.perf_counter() - start
    return spent, llmcache.stats(model).lookup_s - lookup


def watch_check_us(model, calls: int) -> float:
    """µs per `ModelState.check()` call (the watch and the state header), median of 5 loops of `calls`."""
    state = llmcache.api.owner_of(model).state
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            state.check()
        loops.append((time.perf_counter() - start) / calls)
    return 1e6 * median(loops)


def measure(model, warm: list[dict], passes: list[list[dict]], device: str, checks: int) -> dict:
    llmcache.accelerate(model)
    for enc in warm:  # every shape's first call, and an arena past its first doublings
        with llmcache.bypass(model):
            model(**enc)
        model(**enc)
    triples = []
    for batches in passes:
        for j, enc in enumerate(batches):
            if j % 2:
                miss, miss_lookup = timed(model, enc, device)
                off, _ = timed(model, enc, device, uncached=True)
            else:
                off, _ = timed(model, enc, device, uncached=True)
                miss, miss_lookup = timed(model, enc, device)
            hit, hit_lookup = timed(model, enc, device)
            triples.append({"off_s": off, "miss_s": miss, "hit_s": hit, "miss_lookup_s": miss_lookup,
                            "hit_lookup_s": hit_lookup})
    s = llmcache.stats(model)
    check_us = watch_check_us(model, checks)
    tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    llmcache.disable(model)
    med = lambda key: median(t[key] for t in triples)
    ratio = lambda key: median_ratio((t[key] for t in triples), (t["off_s"] for t in triples))
    return {
        "triples": len(triples),
        "rows_per_forward": statistics.fmean(enc["input_ids"].shape[0] for batches in passes for enc in batches),
        "tokens_per_row": statistics.fmean(float(enc["attention_mask"].sum()) / enc["attention_mask"].shape[0]
                                           for batches in passes for enc in batches),
        "watch_check_us": check_us,
        "watch_tensors": tensors,
        "off_us": 1e6 * med("off_s"),
        "miss_us": 1e6 * med("miss_s"),
        "hit_us": 1e6 * med("hit_s"),
        "miss_over_off": ratio("miss_s"),
        "hit_over_off": ratio("hit_s"),
        "miss_extra_us": 1e6 * median(t["miss_s"] - t["off_s"] for t in triples),
        "miss_lookup_us": 1e6 * med("miss_lookup_s"),
        "hit_lookup_us": 1e6 * med("hit_lookup_s"),
        "stats": {"forwards": s.forwards, "rows": s.rows, "hits": s.hits, "entries": s.entries,
                  "evictions": s.evictions, "not_cached": s.not_cached},
        "all": triples,
    }


def table(r: dict) -> tuple[list[dict], list[dict]]:
    off = r["off_us"]
    share = lambda us: fmt_pct(us / off)
    rows = [
        {"what": "uncached forward", "us": off, "share": share(off)},
        {"what": "cached, 0 % hits (compute + insert)", "us": r["miss_us"], "share": fmt_pct(r["miss_over_off"])},
        {"what": "cached, 100 % hits (every block skipped)", "us": r["hit_us"], "share": fmt_pct(r["hit_over_off"])},
        {"what": "0 % hits minus uncached (per batch)", "us": r["miss_extra_us"], "share": share(r["miss_extra_us"])},
        {"what": f"(a) model-state check ({r['watch_tensors']} tensors)", "us": r["watch_check_us"],
         "share": share(r["watch_check_us"])},
        {"what": "(b) host routing, 0 % hits (lookup_s)", "us": r["miss_lookup_us"], "share": share(r["miss_lookup_us"])},
        {"what": "(b) host routing, 100 % hits (lookup_s)", "us": r["hit_lookup_us"], "share": share(r["hit_lookup_us"])},
    ]
    targets = [target("0 %-hit forward <= 1.02 x uncached (unique stream)", r["miss_over_off"], 1.02,
                      f"median of {r['triples']} per-batch ratios", below=True)]
    return rows, targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=12, help="measured batches per pass")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--warm", type=int, default=16, help="warm-up batches")
    p.add_argument("--checks", type=int, default=2000, help="calls per timed loop of the model-state check")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_minilm(args.device)
    sentences = [sentence for _, sentence in distinct_sentences(tok, args.data)]
    random.Random(3).shuffle(sentences)
    need = (args.warm + args.passes * args.batches) * args.batch
    if len(sentences) < need:
        raise SystemExit(f"only {len(sentences)} distinct sentences; this run needs {need}")
    encoded = encode(tok, sentences[:need], args.batch, args.device)
    warm, rest = encoded[: args.warm], encoded[args.warm :]
    passes = [rest[i * args.batches : (i + 1) * args.batches] for i in range(args.passes)]
    with torch.inference_mode():
        result = measure(model, warm, passes, args.device, args.checks)
    rows, targets = table(result)
    print(f"MiniLM on {args.device}, batches of {args.batch} distinct STS-B sentences "
          f"({result['tokens_per_row']:.1f} real tokens per row), {result['triples']} triples, medians")
    print_table([{"": r["what"], "µs": r["us"], "of uncached": r["share"]} for r in rows], {"µs": ".1f"}, "lrr")
    print_targets(targets)
    write_rows(args.out / f"bookkeeping-minilm-{args.device}.json",
               header(args, args.device, config=repr(llmcache.CacheConfig())), [result | {"table": rows}], targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
