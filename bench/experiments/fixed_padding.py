"""Batches padded to a fixed length: what a miss costs when every row is new.

    python -m bench.experiments.fixed_padding [--batches 12] [--batch 32] [--max-length 128]
                                              [--threads 1] [--data DIR] [--out DIR]

Callers that tokenise to a fixed width (`padding="max_length"`: exported graphs, static shapes)
make the model run every padding position. Where the caller sees no padding (an encoder's
default), llmcache's exact tier runs the rows that compute only up to the last real token among
them. MiniLM (real weights), STS-B test sentences (first column; the packaged demo corpus without
the data directory), `--batches` batches of `--batch` new sentences each tokenised to
`--max-length`: each batch through the plain model and through the accelerated one (every row a
miss: computed and stored), the order alternating; the first two pairs are warm-up. Reported: the
median times, plain / llmcache, the real tokens per row, and the largest difference at real tokens.
Writes DIR/fixed-padding-minilm-cpu.json (default bench/out/experiments). Nothing asserts.
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
from bench.report import median, print_table, write_json


def sentences(data) -> list[str]:
    try:
        return [a for _, a, _ in streams.load_sts("test", data)]
    except FileNotFoundError:
        from llmcache.demo.texts import load_corpus

        return load_corpus().sentences()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="bench/out/experiments")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmcache.models import load_minilm

    plain, tokenizer = load_minilm()
    accelerated = llmcache.accelerate(copy.deepcopy(plain))
    texts = list(dict.fromkeys(sentences(args.data)))
    times: dict = {"plain": [], "llmcache": []}
    worst, real = 0.0, []
    with torch.inference_mode():
        for i in range(args.batches):
            chunk = texts[(i * args.batch) % len(texts) :][: args.batch]
            batch = tokenizer(chunk, padding="max_length", max_length=args.max_length, truncation=True,
                              return_tensors="pt")
            llmcache.reset(accelerated)  # (every row a miss, even where the corpus wraps around)
            out = {}
            for name in ("plain", "llmcache") if i % 2 else ("llmcache", "plain"):
                model = plain if name == "plain" else accelerated
                start = time.perf_counter()
                out[name] = model(**batch).last_hidden_state
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
            mask = batch["attention_mask"].bool()
            worst = max(worst, float((out["llmcache"] - out["plain"])[mask].abs().max()))
            real += batch["attention_mask"].sum(1).tolist()
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    row = {"batch": args.batch, "max_length": args.max_length, "real tokens / row (mean)": sum(real) / len(real),
           "real tokens / row (max)": max(real), "plain ms": ms["plain"], "llmcache ms": ms["llmcache"],
           "plain / llmcache": ms["plain"] / ms["llmcache"]}
    print_table([row], {"real tokens / row (mean)": ".1f", "plain ms": ".1f", "llmcache ms": ".1f",
                        "plain / llmcache": ".2f"}, "rrrrrrr",
                title=f"MiniLM, batches padded to max_length, every row new, {args.threads} thread(s)")
    print(f"largest |llmcache - plain| at real tokens: {worst:.2e}")
    write_json(Path(args.out) / "fixed-padding-minilm-cpu.json",
               {"args": vars(args), "result": row, "max_abs_diff_real_tokens": worst,
                "batches_timed": len(times["plain"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
