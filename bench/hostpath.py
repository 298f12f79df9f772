"""The host path of a forward on tiny-dims twins: what the cache's own work costs when arithmetic
is negligible (as a GPU forward looks from the host).

    python -m bench.hostpath [--rounds 9] [--threads 1] [--out FILE]

Twins: MiniLM's shape (BertModel, 6 blocks, hidden 48) at 1 x 16, 32 x 16 and 256 x 16 tokens, and
a Llama (16 blocks, hidden 64) at 1 x 128 and 8 x 128, random weights. Per round and config, back
to back: the forward uncached (`llmcache.bypass`), the same batch again (every row served) and a
batch of new rows (every row computes and is stored); medians over `--rounds` rounds, ms per
forward, and the ratios to uncached. It uses only `accelerate`, `bypass` and `stats`, so the same
file times an older checkout of the package (PYTHONPATH) for a before/after comparison. Writes
JSON to `--out` (default: stdout only); nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers

import llmcache

CONFIGS = [("minilm", 1, 16), ("minilm", 32, 16), ("minilm", 256, 16), ("llama", 1, 128), ("llama", 8, 128)]


def twin(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "minilm":
        config = transformers.BertConfig(vocab_size=1000, hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
                                         intermediate_size=96, max_position_embeddings=512)
        return transformers.BertModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=16, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def clock(model, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch)
    return time.perf_counter() - start


def measure(name: str, rows: int, tokens: int, rounds: int, gen: torch.Generator) -> dict:
    model = llmcache.accelerate(twin(name))
    new = lambda: {"input_ids": torch.randint(5, 1000, (rows, tokens), generator=gen)}
    times = {"uncached": [], "hit": [], "miss": []}
    with torch.inference_mode():
        for _ in range(3):  # warm-up: shapes, arena
            batch = new()
            model(**batch)
            model(**batch)
        for _ in range(rounds):
            batch = new()
            with llmcache.bypass(model):
                times["uncached"].append(clock(model, batch))
            times["miss"].append(clock(model, batch))
            times["hit"].append(clock(model, batch))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    s = llmcache.stats(model)
    return {"model": name, "rows": rows, "tokens": tokens, **{f"{k}_ms": v for k, v in ms.items()},
            "hit_over_uncached": ms["hit"] / ms["uncached"], "miss_over_uncached": ms["miss"] / ms["uncached"],
            "hits": s.hits, "rows_seen": s.rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    rows = [measure(name, b, t, args.rounds, gen) for name, b, t in CONFIGS]
    print(f"llmcache from {llmcache.__file__}")
    print(f"{'twin':8} {'B x T':>9} {'uncached ms':>12} {'hit ms':>8} {'miss ms':>8} {'hit/unc':>8} {'miss/unc':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['rows']:>4} x {r['tokens']:<3} {r['uncached_ms']:12.2f} {r['hit_ms']:8.2f} "
              f"{r['miss_ms']:8.2f} {r['hit_over_uncached']:8.3f} {r['miss_over_uncached']:9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"llmcache": llmcache.__file__, "torch": torch.__version__, "threads": args.threads,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
