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

And a plain forward that returns every position's logits (`model(ids).logits`) on the same
prompts: uncached, llmcache, and its ideal (the suffix against a copy of the prefix's KV cache,
plus the LM head over the prefix positions' final hidden states, made beforehand).

Reported: each variant's median time and its ratio to its ideal (issue #24's targets for
llmcache: TTFT <= 1.03x; logits >= 90 % of the ideal's speed, i.e. <= 1.11x), whether llmcache's
first tokens equal plain `generate`'s, and the largest difference of its logits from plain's. Writes
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
    # The logits variants get questions of their own (llmcache keeps what either computed).
    asked = args.questions * args.rounds
    prompt, questions = texts(args.prompt_tokens, 2 * asked + 4, tokenizer, args.data)
    with torch.inference_mode():
        prefilled = plain(torch.tensor([prompt]), cache=DynamicCache(), use_cache=True).past_key_values
        first_token(cached, prompt)  # the system prompt, computed once (untimed)

        prefix_hidden = plain.model(torch.tensor([prompt])).last_hidden_state  # (after the final norm)

        def ideal(question, full=False):
            cache = copy.deepcopy(prefilled)
            start = time.perf_counter()
            logits = plain(torch.tensor([question]), cache=cache, use_cache=True, logits_to_keep=0 if full else 1).logits
            if full:  # every position's logits: the LM head over the prefix too (kept apart: no copy)
                plain.lm_head(prefix_hidden)
            token = int(logits[0, -1].argmax())
            return time.perf_counter() - start, token

        def timed(fn):
            def run(question):
                start = time.perf_counter()
                token = fn(question)
                return time.perf_counter() - start, token
            return run

        def logits_of(model, question):
            return int(model(torch.tensor([prompt + question])).logits[0, -1].argmax())

        variants = {
            "plain": timed(lambda q: first_token(plain, prompt + q)),
            "recipe": timed(lambda q: first_token(plain, prompt + q, cache=copy.deepcopy(prefilled))),
            "llmcache": timed(lambda q: first_token(cached, prompt + q)),
            "ideal": ideal,
            "logits plain": timed(lambda q: logits_of(plain, q)),
            "logits llmcache": timed(lambda q: logits_of(cached, q)),
            "logits ideal": lambda q: ideal(q, full=True),
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
            continuous(questions[-4], new_tokens=2)
        times = {name: [] for name in variants}
        tokens = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for i in range(args.questions):
                at = r * args.questions + i
                for name in names[(r + i) % len(names):] + names[: (r + i) % len(names)]:
                    elapsed, token = variants[name](questions[at + asked if name.startswith("logits") else at])
                    times[name].append(elapsed)
                    tokens[name].append(token)
        if manager is not None:
            manager.stop(block=True)
        # (Untimed: how far llmcache's logits at every position are from plain's, on new questions.)
        extra = questions[-3:]
        worst = max(float((cached(torch.tensor([prompt + q])).logits - plain(torch.tensor([prompt + q])).logits)
                          .abs().max()) for q in extra)
    ms = {name: 1e3 * median(v) for name, v in times.items()}
    ideal_of = lambda name: ms["logits ideal"] if name.startswith("logits") else ms["ideal"]
    rows = [{"variant": name, "ms": ms[name], "x ideal": ms[name] / ideal_of(name)} for name in times]
    print_table(rows, {"ms": ".1f", "x ideal": ".3f"}, "lrr",
                title=f"SmolLM2, a {len(prompt)}-token system prompt, {args.questions} new questions a round, "
                      f"{args.rounds} rounds, {args.threads} thread(s): time to first token, and (logits) a "
                      f"plain forward returning every position's logits")
    same = tokens["llmcache"] == tokens["plain"]
    print(f"llmcache's first tokens equal plain generate's: {same}; largest |logits difference|: {worst:.2e}")
    s = llmcache.stats(cached)
    write_json(Path(args.out) / "system-prompt-smollm2-cpu.json",
               {"prompt_tokens": len(prompt), "questions": args.questions, "rounds": args.rounds,
                "threads": args.threads, "ms": ms, "over_ideal": {k: v / ideal_of(k) for k, v in ms.items()},
                "tokens_equal": same, "logits_max_abs_diff": worst,
                "continuous_tokens_equal": tokens.get("continuous") == tokens["plain"] if "continuous" in tokens else None,
                "tokens_served": s.tokens_served, "tokens_computed": s.tokens_computed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
