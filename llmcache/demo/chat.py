"""Part 2, a chat: SmolLM2 answering three conversations of three turns that share one system
prompt with worked examples (`llmcache/data/demo_chat.json`), the turns of the conversations
interleaved as a server would see them.

Each prompt is the conversation so far in the model's chat template (`apply_chat_template` on
the messages, the previous answers as text, as a chat server keeps them) and is answered greedily
by `generate` twice, side by side (the order alternating): an uncached copy of the model ("off")
and the accelerated model ("on"). Time to first token (TTFT) is read by a streamer when the first
new token arrives. The cache reuses the system prompt across conversations and, from the second
turn on, the conversation's own history, its generated answers included (`generate` stores them
as pages when it ends). The ideal "on" TTFT is the uncached model's on the tokens left to compute
alone (measured: a cache that served the rest for free). The check: the generated tokens on equal
those off, for every prompt.
"""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from statistics import median

import torch

import llmcache

from .common import progress, sync

ANSWER_TOKENS = 24


def script() -> dict:
    return json.loads(resources.files("llmcache").joinpath("data/demo_chat.json").read_text(encoding="utf-8"))


class _FirstToken:
    """A `generate` streamer that notes when the first new token arrives (its first `put` is the prompt)."""

    def __init__(self, device):
        self.device, self.puts, self.at = device, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            sync(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def _answer(model, inputs: dict, device, pad: int, tokens: int) -> tuple[float, list[int]]:
    """(TTFT seconds, the new token ids) of one greedy `generate`."""
    streamer = _FirstToken(device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=pad, streamer=streamer)
    return streamer.at - start, out[0, inputs["input_ids"].shape[1]:].tolist()


def run(model, tokenizer, device: str, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """The conversations through `model` (a causal LM, not accelerated; left as it came)."""
    chat = script()
    opening = [{"role": "system", "content": chat["system"]}]
    for question, answer in chat["examples"]:
        opening += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    histories = [list(opening) for _ in chat["conversations"]]
    turns = [(t, c) for t in range(len(chat["conversations"][0])) for c in range(len(chat["conversations"]))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plain = copy.deepcopy(model)
    warm = tokenizer("warm-up, not timed", return_tensors="pt").to(device)
    _answer(plain, warm, device, pad, 2)
    _answer(model, warm, device, pad, 2)
    llmcache.accelerate(model)
    prompts = []
    try:
        for n, (turn, c) in enumerate(progress(turns, "2 chat")):
            messages = histories[c] + [{"role": "user", "content": chat["conversations"][c][turn]}]
            inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True).to(device)
            result = {}
            for name in (("off", "on") if n % 2 == 0 else ("on", "off")):
                before = llmcache.stats(model)
                result[name] = _answer(plain if name == "off" else model, inputs, device, pad, answer_tokens)
                if name == "on":
                    after = llmcache.stats(model)
                    served = after.tokens_served - before.tokens_served
                    computed = after.tokens_computed - before.tokens_computed
            length = inputs["input_ids"].shape[1]
            # The ideal: what computing only the tokens left costs, the uncached model on them alone.
            rest = {k: v[:, served:] for k, v in inputs.items()}
            ideal = _answer(plain, rest, device, pad, 1)[0] if served else result["off"][0]
            prompts.append({
                "conversation": c + 1, "turn": turn + 1, "prompt_tokens": length, "served": served,
                "computed": computed, "off_s": result["off"][0], "on_s": result["on"][0],
                "ideal_s": ideal,
                "identical": result["off"][1] == result["on"][1], "answer_tokens": len(result["off"][1]),
            })
            histories[c] = messages + [{"role": "assistant",
                                        "content": tokenizer.decode(result["off"][1], skip_special_tokens=True)}]
        stats = llmcache.stats(model)
    finally:
        llmcache.disable(model)
    ratio = lambda key: median([p["off_s"] / p[key] for p in prompts])
    return {
        "part": "chat", "prompts": prompts, "answer_tokens": answer_tokens,
        "served_share": sum(p["served"] for p in prompts) / sum(p["prompt_tokens"] for p in prompts),
        "speedup": ratio("on_s"), "ideal": ratio("ideal_s"), "identical": sum(p["identical"] for p in prompts),
        "off_ttft_s": median([p["off_s"] for p in prompts]), "on_ttft_s": median([p["on_s"] for p in prompts]),
        "decode_pages": stats.decode_pages, "bytes": stats.bytes,
        "shared_tokens": len(tokenizer.apply_chat_template(opening, return_dict=True)["input_ids"]),
    }


__all__ = ["ANSWER_TOKENS", "run", "script"]
