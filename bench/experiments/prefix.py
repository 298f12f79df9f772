"""Prefix reuse for decoders: a few-shot / chat stream sharing long prefixes, in one process.

    python -m bench.experiments.prefix [--model smollm2|llama-1b|llama-tiny] [--prefixes 256 512 1024]
                                       [--prompts 4] [--repeats 3] [--threads 1] [--data DIR] [--out DIR]

Per prefix length L, `--prompts` prompts share the same L-token prefix and differ in a 32-128
token suffix (text from WikiText-2 when the data directory has it, random ids otherwise). One
prompt of each L warms the cache (untimed); the cache is never reset after (a stream). Then,
round robin per prompt (so the machine's noise falls on every variant alike), each on a prompt
with a suffix no earlier prompt had, medians over `--prompts` x `--repeats`:

- uncached: the model's prefill of the whole prompt (a copy of the same weights, no cache),
  returning the KV cache and the last position's logits (`logits_to_keep=1`, as `generate`'s
  prefill does: logits at every position would cost the LM head on the prefix, which no
  prefix cache can skip);
- cached: the accelerated model's prefill of the prompt (its prefix served, its suffix computed);
- ideal: the model's own prefill of the suffix alone, against a KV cache of the prefix made
  beforehand (what prefix reuse could at best cost);

and the same three for time-to-first-token (`generate(max_new_tokens=1)`). Reported: speedups
over uncached, and cached as a share of the ideal (target >= 90 %). Memory: bytes held against
the bytes of the distinct pages the prompts have (one copy of a prefix however many prompts
extend it: ratio 1). A stream without shared prefixes: cached over uncached time (target <= 2 %
slower; the median over prompts of each prompt's ratio), from an empty cache (cold: its arena grows; on the CPU within address space reserved at its first growth, elsewhere copying at each doubling) and from one at
its budget, evicting (steady). Writes DIR/prefix-<model>-cpu.json (default bench/out/experiments).
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
from bench.report import fmt_pct, fmt_x, header, median, median_ratio, print_table, write_json

LLAMA_1B = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096}
LLAMA_TINY = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def load(name: str):
    """(model, token source: a function n -> int64 [n] ids)."""
    import transformers

    if name == "smollm2":
        from llmcache.models import load_smollm2

        model, tok = load_smollm2()
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**(LLAMA_1B if name == "llama-1b" else LLAMA_TINY))
        model, tok = transformers.LlamaForCausalLM(cfg).eval(), None
    return model.eval(), tok


def text_ids(tok, vocab: int, data: str | None, seed: int):
    """A stream of token ids: WikiText-2 through the tokenizer when both exist, else random ids."""
    path = streams.data_dir(data) / "wikitext-2-raw" / "wiki.test.raw"
    gen = torch.Generator().manual_seed(seed)
    if tok is not None and path.exists():
        ids = torch.tensor(tok(path.read_text()[:400_000])["input_ids"], dtype=torch.long)
        at = [0]

        def take(n: int) -> torch.Tensor:
            if at[0] + n > len(ids):
                at[0] = 0
            at[0] += n
            return ids[at[0] - n : at[0]]
        return take, "wikitext-2"
    return (lambda n: torch.randint(3, vocab, (n,), generator=gen)), "random ids"


def clock(fn, keep: list | None = None, **kwargs) -> float:
    """Seconds of one call fn(**kwargs); its result appended to `keep`."""
    start = time.perf_counter()
    out = fn(**kwargs)
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.append(out)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b", "llama-tiny"])
    p.add_argument("--prefixes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="bench/out/experiments")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    ref, tok = load(args.model)
    model = llmcache.accelerate(copy.deepcopy(ref))
    take, source = text_ids(tok, ref.config.vocab_size, args.data, seed=1)
    gen = torch.Generator().manual_seed(2)
    results, all_prompts = {}, []
    with torch.inference_mode():
        for length in args.prefixes:
            prefix = take(length)
            def fresh(prefix: torch.Tensor = prefix) -> torch.Tensor:
                """A new prompt: the prefix, then a 32-128-token suffix no earlier prompt had."""
                ids = torch.cat([prefix, take(int(torch.randint(32, 129, (1,), generator=gen)))])[None]
                all_prompts.append(ids)
                return ids

            model(input_ids=fresh())  # warms the cache with the prefix (untimed); never reset after
            prefix_cache = ref(input_ids=prefix[None], use_cache=True).cache
            times = {k: [] for k in ("uncached", "cached", "ideal", "ttft_uncached", "ttft_cached", "ttft_ideal")}
            served, deviation = [], []
            kw = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0}
            for _ in range(args.repeats):
                for _ in range(args.prompts):
                    ids = fresh()
                    pair = []
                    times["uncached"].append(clock(ref, pair, input_ids=ids, logits_to_keep=1))
                    times["cached"].append(clock(model, pair, input_ids=ids, logits_to_keep=1))
                    served.append(llmcache.stats(model).last_tokens)
                    deviation.append(float((pair[0].logits - pair[1].logits).abs().max()))
                    cache = copy.deepcopy(prefix_cache)
                    times["ideal"].append(clock(ref, input_ids=ids[:, length:], cache=cache, logits_to_keep=1))
                    ids = fresh()  # generate's prefill would store this prompt's pages: another one
                    times["ttft_uncached"].append(clock(ref.generate, input_ids=ids, **kw))
                    times["ttft_cached"].append(clock(model.generate, input_ids=ids, **kw))
                    cache = copy.deepcopy(prefix_cache)
                    times["ttft_ideal"].append(clock(ref.generate, input_ids=ids, cache=cache, **kw))
            med = {k: median(v) for k, v in times.items()}
            results[length] = {
                "median_s": med, "all_s": times, "served_computed": served[: args.prompts],
                "max_abs_logit_deviation": max(deviation),
                "speedup": med["uncached"] / med["cached"], "ideal_speedup": med["uncached"] / med["ideal"],
                "share_of_ideal": med["ideal"] / med["cached"],
                "ttft_speedup": med["ttft_uncached"] / med["ttft_cached"],
                "ttft_share_of_ideal": med["ttft_ideal"] / med["ttft_cached"],
            }
        # Memory: every prompt once into an empty cache; held bytes against the distinct pages.
        llmcache.reset(model)
        page = llmcache.CacheConfig().page_tokens
        distinct = set()
        for ids in all_prompts:
            model(input_ids=ids)
            row = tuple(ids[0].tolist())
            distinct.update(row[: min(end, len(row))] for end in range(page, len(row) + page, page))
        held = llmcache.held(model).entries
        page_bytes = held[0].bytes // held[0].pages
        memory = {"bytes_held": llmcache.stats(model).bytes, "bytes_distinct_pages": len(distinct) * page_bytes,
                  "pages_held": sum(e.pages for e in held), "distinct_pages": len(distinct)}
        memory["ratio"] = memory["bytes_held"] / memory["bytes_distinct_pages"]
        # No shared prefixes: every prompt new, against a cache in its steady state — its arena
        # grown to a budget of about `--prompts` prompts and evicting (growing from empty costs the
        # first writes into fresh pages, and on CUDA a copy at each doubling: the cold figure).
        def unique_ids() -> torch.Tensor:
            ids = take(int(torch.randint(128, 384, (1,), generator=gen)))[None].clone()
            ids[0, 0] = int(torch.randint(3, ref.config.vocab_size, (1,), generator=gen))
            return ids

        no_shared = {}
        per_token = held[0].bytes // held[0].pages // page
        for state in ("cold", "steady"):
            budget = {"cold": None, "steady": args.prompts * 384 * per_token}[state]
            llmcache.disable(model)  # the same copy of the weights, accelerated afresh with this budget
            streamed = llmcache.accelerate(model, max_bytes=budget or (1 << 30))
            if state == "steady":
                for _ in range(2 * args.prompts):
                    streamed(input_ids=unique_ids(), logits_to_keep=1)  # fills the budget: evicting from here
            unique = {"uncached": [], "cached": []}
            for _ in range(args.repeats):
                for _ in range(2 * args.prompts):
                    ids = unique_ids()
                    unique["uncached"].append(clock(ref, input_ids=ids, logits_to_keep=1))
                    unique["cached"].append(clock(streamed, input_ids=ids, logits_to_keep=1))
            r = {"median_s": {k: median(v) for k, v in unique.items()}, "all_s": unique}
            # Per prompt (same tokens, side by side), then the median: prompt lengths differ.
            r["slowdown"] = median_ratio(unique["cached"], unique["uncached"]) - 1
            st = llmcache.stats(streamed)
            r.update(tokens_served=st.tokens_served, evictions=st.evictions, budget=budget)
            no_shared[state] = r

    print(f"{args.model}, {source}, {args.prompts} prompts per prefix, {args.repeats} repeats, "
          f"{args.threads} thread(s)")
    for length, r in results.items():
        print(f"prefix {length}: largest |logit| difference cached vs uncached (last position): "
              f"{r['max_abs_logit_deviation']:.2e}")
    print_table([{"prefix": length, "uncached ms": 1e3 * r["median_s"]["uncached"],
                  "cached ms": 1e3 * r["median_s"]["cached"], "ideal ms": 1e3 * r["median_s"]["ideal"],
                  "speedup": fmt_x(r["speedup"]), "ideal": fmt_x(r["ideal_speedup"]),
                  "of ideal": fmt_pct(r["share_of_ideal"], 1), "TTFT x": fmt_x(r["ttft_speedup"]),
                  "TTFT of ideal": fmt_pct(r["ttft_share_of_ideal"], 1)} for length, r in results.items()],
                {"uncached ms": ".1f", "cached ms": ".1f", "ideal ms": ".1f"}, "r" * 9)
    print(f"memory: {memory['bytes_held'] / 2**20:.2f} MiB held for {memory['distinct_pages']} distinct pages "
          f"({memory['bytes_distinct_pages'] / 2**20:.2f} MiB): ratio {memory['ratio']:.3f}")
    for state, r in no_shared.items():
        print(f"no shared prefixes, {state} cache: cached {100 * r['slowdown']:+.1f} % against uncached "
              f"({r['tokens_served']} tokens served, {r['evictions']} evictions)")
    path = write_json(Path(args.out) / f"prefix-{args.model}-cpu.json",
                      {"header": header(args, "cpu", source=source),
                       "prefixes": {str(k): v for k, v in results.items()}, "memory": memory, "no_shared": no_shared})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
