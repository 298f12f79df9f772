"""The host path of a forward on tiny-dims twins: what the cache's own work costs when arithmetic
is negligible (as a GPU forward looks from the host).

    python -m bench.costs.hostpath [--rounds 9] [--threads 1] [--out FILE]

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
import sys
import time

import torch
import transformers

import llmcache
from bench.report import median, print_table, write_json

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
    ms = {k: 1e3 * median(v) for k, v in times.items()}
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
    print_table([{"twin": r["model"], "B x T": f"{r['rows']} x {r['tokens']}", "uncached ms": r["uncached_ms"],
                  "hit ms": r["hit_ms"], "miss ms": r["miss_ms"], "hit/unc": r["hit_over_uncached"],
                  "miss/unc": r["miss_over_uncached"]} for r in rows],
                {"uncached ms": ".2f", "hit ms": ".2f", "miss ms": ".2f", "hit/unc": ".3f", "miss/unc": ".3f"},
                "lrrrrrr")
    if args.out:
        write_json(args.out, {"llmcache": llmcache.__file__, "torch": torch.__version__, "threads": args.threads,
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
