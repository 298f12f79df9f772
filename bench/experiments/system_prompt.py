"""Time to first token with a shared system prompt: llmcache against what a transformers user
would do instead, on SmolLM2.

    python -m bench.experiments.system_prompt [--prompt-tokens 494] [--questions 12] [--rounds 5]
                                              [--threads 1] [--skip-continuous] [--data DIR] [--out DIR]

One system prompt (`--prompt-tokens` of WikiText-2 when the data directory has it, else of this
file's own text) and `--questions` questions (STS-B sentences, else fixed ones), each asked as
system prompt + question; time to first token (`generate(max_new_tokens=1)`, greedy), per
question, every variant in turn (the order rotating per question), medians over `--rounds` rounds
(each round asks new questions: one asked again would be a whole-prompt hit for llmcache):

- plain: `generate` on the whole prompt (no cache);
- recipe: the prompt-cache recipe of the transformers documentation: the system prompt prefilled
  once, and per question `generate(past_key_values=copy.deepcopy(prefilled))`;
- continuous: transformers' continuous batching with block sharing (`ContinuousBatchingConfig(
  block_size=16, allow_block_sharing=True)`), one request at a time on a persistent manager;
- ideal: the suffix alone (the question) prefilled against a copy of the system prompt's KV cache
  made beforehand, and its first token read (what any prefix reuse could at best cost);
- llmcache: `generate` on the accelerated model (warmed with the system prompt once, untimed).

Reported: each variant's median TTFT and its ratio to the ideal (issue #24's target for
llmcache: <= 1.03x), and whether llmcache's first tokens equal plain `generate`'s. Writes
DIR/system-prompt-smollm2-cpu.json (default bench/out/experiments). Nothing asserts.
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
from llmcache.models import load_smollm2

QUESTIONS = ["What is the main idea of the text above?", "Who is mentioned first?", "Summarise it in one line.",
             "What happened next?", "Is there a date in it?", "Name one place it mentions."]


def texts(prompt_tokens: int, questions: int, tokenizer, data: str | None) -> tuple[list[int], list[list[int]]]:
    """(system prompt ids, each question's ids)."""
    try:
        source = " ".join(streams.load_wikitext(data))
        asks = [a for _, a, _ in streams.load_sts("test", data)][:questions]
    except (FileNotFoundError, OSError):
        source, asks = Path(__file__).read_text() * 4, []
    asks = asks + [f"{q} ({i})" for i, q in enumerate(QUESTIONS * questions)]
    asks = asks[:questions]
    prompt = tokenizer(source, add_special_tokens=False)["input_ids"][:prompt_tokens]
    return prompt, [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in asks]


def first_token(model, ids: list[int], **kwargs) -> int:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=1, do_sample=False, **kwargs)
    return int(out[0, -1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=494)
    p.add_argument("--questions", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-continuous", action="store_true")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="bench/out/experiments")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache, GenerationConfig

    plain, tokenizer = load_smollm2()
    cached = llmcache.accelerate(copy.deepcopy(plain))
    # A new question every time (a question asked again would be a whole-prompt hit for llmcache).
    prompt, questions = texts(args.prompt_tokens, args.questions * args.rounds + 1, tokenizer, args.data)
    with torch.inference_mode():
        prefilled = plain(torch.tensor([prompt]), cache=DynamicCache(), use_cache=True).past_key_values
        first_token(cached, prompt)  # the system prompt, computed once (untimed)

        def ideal(question):
            cache = copy.deepcopy(prefilled)
            start = time.perf_counter()
            logits = plain(torch.tensor([question]), cache=cache, use_cache=True, logits_to_keep=1).logits
            int(logits[0, -1].argmax())
            return time.perf_counter() - start

        def timed(fn):
            def run(question):
                start = time.perf_counter()
                token = fn(question)
                return time.perf_counter() - start, token
            return run

        variants = {
            "plain": timed(lambda q: first_token(plain, prompt + q)),
            "recipe": timed(lambda q: first_token(plain, prompt + q, cache=copy.deepcopy(prefilled))),
            "llmcache": timed(lambda q: first_token(cached, prompt + q)),
        }
        manager = None
        if not args.skip_continuous:
            from transformers import ContinuousBatchingConfig

            batching = copy.deepcopy(plain)
            manager = batching.init_continuous_batching(
                generation_config=GenerationConfig(max_new_tokens=1, do_sample=False),
                continuous_batching_config=ContinuousBatchingConfig(block_size=16, allow_block_sharing=True, use_async_batching=False))
            manager.start()

            def continuous(q, new_tokens=1):
                rid = manager.add_request(prompt + q, max_new_tokens=new_tokens)
                return int(manager.get_result(rid, timeout=600).generated_tokens[0])

            variants["continuous"] = timed(continuous)
            # (Warm: a request that outlives its prefill, so that its prompt's blocks are kept to share.)
            continuous(questions[-1], new_tokens=2)
        times = {name: [] for name in list(variants) + ["ideal"]}
        tokens = {name: [] for name in variants}
        names = list(variants) + ["ideal"]
        for r in range(args.rounds):
            for i in range(args.questions):
                q = questions[r * args.questions + i]
                for name in names[(r + i) % len(names):] + names[: (r + i) % len(names)]:
                    if name == "ideal":
                        times["ideal"].append(ideal(q))
                        continue
                    elapsed, token = variants[name](q)
                    times[name].append(elapsed)
                    tokens[name].append(token)
        if manager is not None:
            manager.stop(block=True)
    ms = {name: 1e3 * median(v) for name, v in times.items()}
    rows = [{"variant": name, "TTFT ms": ms[name], "x ideal": ms[name] / ms["ideal"]} for name in times]
    print_table(rows, {"TTFT ms": ".1f", "x ideal": ".3f"}, "lrr",
                title=f"SmolLM2, a {len(prompt)}-token system prompt, {args.questions} new questions a round, "
                      f"{args.rounds} rounds, {args.threads} thread(s)")
    same = tokens["llmcache"] == tokens["plain"]
    print(f"llmcache's first tokens equal plain generate's: {same}")
    s = llmcache.stats(cached)
    write_json(Path(args.out) / "system-prompt-smollm2-cpu.json",
               {"prompt_tokens": len(prompt), "questions": args.questions, "rounds": args.rounds,
                "threads": args.threads, "ttft_ms": ms, "over_ideal": {k: v / ms["ideal"] for k, v in ms.items()},
                "tokens_equal": same, "continuous_tokens_equal": tokens.get("continuous") == tokens["plain"]
                if "continuous" in tokens else None, "tokens_served": s.tokens_served, "tokens_computed": s.tokens_computed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
