"""Before/after on the tiny-dims twins: `bench.costs.hostpath` run by two checkouts in turn.

    python -m bench.costs.ab --before DIR [--after DIR] [--pairs 6] [--rounds 9]
                             [--configs TWIN:B:T ...] [--out FILE]

Each run is `python -m bench.costs.hostpath --configs ... --rounds R` started in a checkout's root with
that checkout first on PYTHONPATH, so each side runs its own package and its own copy of the bench (a
before checkout older than `--configs` needs this hostpath.py copied in). The sides alternate which goes
first, pair after pair; the machine's drift is shared within a pair. Per shape and ratio (miss, full-bank
miss, whole-row hit, prefix hit and decode step, each over the same run's uncached forward): each side's
median and the median of after/before taken pair by pair, with its min and max. Writes JSON (every run
kept) to `--out`; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import median, print_table, write_json

RATIOS = ("miss_over_uncached", "full_miss_over_uncached", "hit_over_uncached", "mixed_over_uncached",
          "prefix_hit_over_uncached", "decode_over_uncached")
DEFAULT_CONFIGS = ["minilm:32:16", "minilm:256:16", "bert-base:32:128", "llama:1:128", "llama:8:128", "llama:32:128"]


def run(tree: Path, configs: list[str], rounds: int) -> dict:
    """One run of the host-path bench by the checkout at `tree`: its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "bench.costs.hostpath", "--configs", *configs, "--rounds", str(rounds),
                        "--out", str(out)], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def compare(runs: dict, configs: list[str]) -> dict:
    """{config: {ratio: {before, after, after_over_before_pairwise_median, min, max}}}."""
    summary: dict = {}
    for j, config in enumerate(configs):
        summary[config] = {}
        for key in RATIOS:
            before = [r["rows"][j].get(key) for r in runs["before"]]
            after = [r["rows"][j].get(key) for r in runs["after"]]
            if any(v is None for v in before + after):
                continue
            pairs = [a / b for a, b in zip(after, before)]
            summary[config][key] = {"before": median(before), "after": median(after),
                                    "after_over_before_pairwise_median": median(pairs), "min": min(pairs), "max": max(pairs)}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the checkout before the change (a git worktree)")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[2], help="default: this checkout")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="TWIN:B:T")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict = {"before": [], "after": []}
    for i in range(args.pairs):
        for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
            runs[side].append(run(trees[side], args.configs, args.rounds))
            print(f"pair {i + 1}/{args.pairs}: {side} done", file=sys.stderr)
    summary = compare(runs, args.configs)
    print_table([{"twin B:T": c, "ratio": k.removesuffix("_over_uncached"), "before": v["before"], "after": v["after"],
                  "after/before": v["after_over_before_pairwise_median"]} for c, row in summary.items() for k, v in row.items()],
                {"before": ".3f", "after": ".3f", "after/before": ".3f"}, "llrrr")
    if args.out:
        write_json(args.out, {"command": " ".join(["python -m bench.costs.ab", *(argv if argv is not None else sys.argv[1:])]),
                              "trees": {k: str(v) for k, v in trees.items()}, "pairs": args.pairs, "rounds": args.rounds,
                              "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
