"""A decoder replica for tests/test_shared_pages.py: a tiny Llama (seeded weights) accelerated with
the shared tier at URL prefills prompts that share a 512-token system prompt, generates from
them, and saves its outputs, an uncached copy's, and its counters.

    python tests/shared_pages_worker.py URL OUT.pt FIRST_QUESTION [--save FILE] [--load FILE]

Prompt i = the system prompt + question FIRST_QUESTION + i (2 prompts). With --load the cache
starts from a file another process saved (and no shared tier); --save writes one at the end.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_model

import llmcache

SYSTEM = 512
CONFIG = {"max_position_embeddings": 1024}


def prompts(first: int) -> list:
    system = torch.randint(3, 256, (SYSTEM,), generator=torch.Generator().manual_seed(11))
    return [torch.cat([system, torch.randint(3, 256, (9 + q,), generator=torch.Generator().manual_seed(100 + q))])
            for q in range(first, first + 2)]


def main() -> None:
    url, out, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = tiny_model("llama", "ForCausalLM", **CONFIG)
    plain = copy.deepcopy(model)
    flags = sys.argv[4:]
    if "--load" in flags:
        llmcache.accelerate(model)
        llmcache.load(model, flags[flags.index("--load") + 1])
    else:
        llmcache.accelerate(model, shared=llmcache.Shared(url, lookup="always", timeout=2.0))
    result = {"logits": [], "plain_logits": [], "tokens": [], "plain_tokens": [], "served": []}
    with torch.inference_mode():
        for ids in prompts(first):
            result["logits"].append(model(input_ids=ids[None]).logits)
            result["served"].append(llmcache.stats(model).last_tokens[0])
            result["plain_logits"].append(plain(input_ids=ids[None]).logits)
            kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
            result["tokens"].append(model.generate(input_ids=ids[None], **kwargs))
            result["plain_tokens"].append(plain.generate(input_ids=ids[None], **kwargs))
    s = llmcache.stats(model)
    if s.shared is not None:
        result["shared"] = {"hits": s.shared.hits, "tokens_served": s.shared.tokens_served,
                            "refused": dict(s.shared.refused), "writes": s.shared.writes}
        assert llmcache.flush(model, timeout=20.0)
    if "--save" in flags:
        llmcache.save(model, flags[flags.index("--save") + 1])
    torch.save(result, out)


if __name__ == "__main__":
    main()
