"""How much the uncached model itself moves when a row is computed in another batch composition.

    python -m bench.experiments.batch_noise [--seeds 12] [--out bench/results/experiments]

SmolLM2 (the real offline model), batches of two right-padded rows of 6 random tokens, the second
with a gap in its mask (the exact-matrix test's "mask-gap" case): the logits of row 1 computed in the
batch of two against the same row computed alone, at its real positions. This is the floor under
the tolerance the tests hold rows computed in another composition to (tests/helpers.py CLOSE_DEEP).
Writes batch-noise-smollm2-cpu.json; nothing asserts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.report import print_table, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--out", default="bench/results/experiments")
    args = p.parse_args(argv)
    from llmcache.models import load_smollm2

    model, _ = load_smollm2("cpu")
    rows = []
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, model.config.vocab_size, (2, 6), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 2] = 0
        with torch.inference_mode():
            pair = model(input_ids=ids, attention_mask=mask).logits[1]
            alone = model(input_ids=ids[1:], attention_mask=mask[1:]).logits[0]
        real = mask[1].bool()
        diff = (pair[real] - alone[real]).abs()
        rows.append({"seed": seed, "max_abs_diff": diff.max().item(), "max_abs_logit": pair[real].abs().max().item(),
                     "over_1e-5_bound": bool((diff > 1e-5 + 1e-5 * pair[real].abs()).any()),
                     "over_1e-4_bound": bool((diff > 1e-4 + 1e-4 * pair[real].abs()).any())})
    print_table(rows, {"max_abs_diff": ".2e", "max_abs_logit": ".1f"})
    worst = max(r["max_abs_diff"] for r in rows)
    print(f"worst {worst:.2e}; beyond 1e-5 + 1e-5|x| for {sum(r['over_1e-5_bound'] for r in rows)} of {len(rows)} "
          f"seeds, beyond 1e-4 + 1e-4|x| for {sum(r['over_1e-4_bound'] for r in rows)}")
    write_json(Path(args.out) / "batch-noise-smollm2-cpu.json", {"seeds": args.seeds, "worst": worst, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
