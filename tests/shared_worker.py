"""A replica for tests/test_shared.py: a tiny BERT (seeded weights) accelerated with the shared
tier at URL runs fixed batches and saves its outputs and shared-tier counters.

    python tests/shared_worker.py URL OUT.pt [--no-flush]

With --no-flush the process exits right after its last forward (the tier's exit hook hands its
queued entries over).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import batch
from models import tiny_model

import llmcache


def batches():
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(3):
        inputs = batch("right", [12, 8, 12, 12, 5, 12], gen)
        out.append((inputs["input_ids"], inputs["attention_mask"]))
    return out


def main() -> None:
    url, path = sys.argv[1], sys.argv[2]
    model = llmcache.accelerate(tiny_model("bert"), shared=llmcache.Shared(url, lookup="always", timeout=1.0))
    outputs = []
    with torch.inference_mode():
        for ids, mask in batches():
            outputs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None])
    s = llmcache.stats(model)
    torch.save({"outputs": outputs, "hits": s.hits, "rows": s.rows, "shared_hits": s.shared.hits,
                "shared_lookups": s.shared.lookups, "tokens_computed": s.tokens_computed}, path)
    if "--no-flush" not in sys.argv:
        assert llmcache.flush(model, timeout=10.0)


if __name__ == "__main__":
    main()
