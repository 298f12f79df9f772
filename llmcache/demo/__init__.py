"""`llmcache demo`: what the layer cache buys on a query stream, and what it costs in fidelity.

    llmcache demo [--model minilm|smollm2] [--rows 600] [--batch-size 32] [--threshold TAU]
                  [--mode state|residual] [--sweep] [--device cpu|cuda] [--threads N]
                  [--data FILE] [--seed 0] [--out ./llmcache-demo/]

One process runs the same stream in the same batches twice: uncached ("off"), then through
`llmcache.accelerate(model, layerwise=Layerwise(threshold=TAU, mode=MODE))` from an empty cache
("on"); --sweep adds
one run per threshold of SWEEP, each with a fresh cache. It prints one table, and writes the
figure `demo-<model>.png` (hit rate by layer; speed against fidelity) and the table with every
number behind it, `demo-<model>.json`, into --out.

The stream (`build_stream`, seeded by --seed) is drawn from `llmcache/data/demo_corpus.txt`,
everyday queries written for this project. Each query is, independently:
  * with probability 0.4 an exact repeat of a query already in the stream (uniform over them);
  * with probability 0.2 an unused close paraphrase of a base query already in the stream;
  * otherwise (0.4) new: the next base query or unrelated sentence, in a seeded shuffled order.
A kind that cannot be drawn falls back to new, then paraphrase, then repeat: the first query is
always new, and early paraphrase draws become new queries until bases with paraphrases have
appeared. The header line gives the counts drawn. `--data FILE` replaces the stream by the
file's non-empty lines in order, repeats and all (`--rows N`: its first N lines).

Columns:
  rows/s, speedup   rows per second of model forward time (tokenisation and the fidelity maths
                    excluded); speedup = off time / on time. "on" includes allocating the banks.
  exact%, sem%      hits / lookups over all cached layers, by tier; "layer hit% exact+sem" gives
                    them per layer (layers with equal rates folded into one range).
  MiniLM fidelity   per row, the cosine between its mean-pooled (attention-masked) sentence
                    embedding with the cache on and off: mean, minimum, share of rows below 0.99.
  SmolLM2 fidelity  perplexity of the stream's texts (per-token NLL over real tokens) off and on,
                    its relative change, and the share of rows whose mean NLL moved by over 1 %.
  cache MiB         bytes held by the banks (llmcache.stats(model).bytes: allocated at the first
                    insert, capacity x max_tokens per layer, whether filled or not).

Semantic reuse is opt-in. Without --threshold the library default runs: the exact tier only,
which is lossless (fidelity 1.0 up to the last bits of a different batch width). With a
threshold, a row whose SimHashed mean input embedding is within tau of a cached row's (and has
the same token count) is served that row's states, which changes its output: the fidelity
columns say by how much, on this stream.

Reading the numbers: a repeat counts as an exact hit whether its first occurrence came in an
earlier batch (served from the bank) or earlier in the same batch (served that row's freshly
computed states); with a threshold a row served from another row's entry is not inserted, so its
own later repeats become semantic hits too, and the exact rate falls below the share of repeats. Each run is one timed pass: on a shared CPU the
times are noisy (--threads 1 steadies them), the hit rates and fidelity are not.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict
from pathlib import Path

import torch

import llmcache

SWEEP = (0.80, 0.85, 0.90, 0.95, 0.98)

from .report import format_table, layer_rates, plot
from .stream import (
    PARAPHRASE,
    REPEAT,
    build_stream,
    encode,
    fidelity,
    load_corpus,
    read_queries,
    run_stream,
    stream_counts,
)


def _calibrate(model, tokenizer, args, rows: int):
    """`llmcache.calibrate` on another draw of the corpus (seed + 1): the same corpus, so the
    demo's text is not held out (bench.experiments.semantic evaluates on held-out text)."""
    other = build_stream(load_corpus(), max(rows, 600) * 4, seed=args.seed + 1)
    data = encode(tokenizer, [q.text for q in other], args.batch_size, args.device)
    return llmcache.calibrate(model, data, tolerance=args.semantic, max_error=args.max_error)


def _promise(stats, served: list, off_rows: torch.Tensor, on_rows: torch.Tensor, args, calibration) -> dict:
    """What the verified semantic tier promised, what it served, and how many served rows broke it."""
    from .. import bound

    s = stats.semantic
    rows = torch.tensor(served, dtype=torch.long)
    cosine = torch.nn.functional.cosine_similarity(on_rows.index_select(0, rows), off_rows.index_select(0, rows))
    wrong = int((cosine < args.semantic).sum()) if served else 0
    pct = lambda x: "never measured" if x is None else f"{100 * x:.2f} %"
    text = (f"semantic tier: promise {s.promise}; calibrated on {calibration.rows} rows of another draw; "
            f"{s.state}; served {len(served)} rows; {wrong} of them below cosine {args.semantic:g} against the "
            f"uncached run (realised error {pct(wrong / len(served) if served else None)}, 95 % upper "
            f"{pct(bound.upper(wrong, len(served), 0.05) if served else None)}); online checks {s.verified} "
            f"({s.failed} outside tolerance); error bound {pct(s.error_bound)}")
    return {"promise": text, "semantic_served": len(served), "semantic_wrong": wrong, "semantic_state": s.state,
            "semantic_error_bound": s.error_bound}


# ---- the command ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmcache demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    p.add_argument("--threshold", type=float, default=None,
                   help="semantic-tier cosine tau in (0, 1] (default: none, the exact tier only, lossless)")
    p.add_argument("--mode", default="state", choices=["state", "residual"])
    p.add_argument("--semantic", type=float, default=None, metavar="COSINE",
                   help="also run the verified semantic tier: llmcache.Semantic(tolerance=COSINE, max_error="
                        "--max-error), calibrated first on another draw of the corpus (MiniLM only)")
    p.add_argument("--max-error", type=float, default=0.05, help="the semantic tier's max_error (default 0.05)")
    p.add_argument("--sweep", action="store_true", help=f"also run thresholds {', '.join(map(str, SWEEP))}")
    p.add_argument("--rows", type=int, default=None, help="stream length (default 600; --data: all its lines)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: its own choice; 1 is steadier on a busy machine)")
    p.add_argument("--data", default=None, help="a text file, one query per line: the stream, in order")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the corpus stream")
    p.add_argument("--out", default="llmcache-demo", help="folder for the figure and the JSON (default ./llmcache-demo)")
    args = p.parse_args(argv)
    if args.rows is not None and args.rows < 1:
        p.error("--rows must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        p.error("--threshold must be in (0, 1]")
    if args.semantic is not None and (not 0.0 < args.semantic <= 1.0 or args.model != "minilm" or args.data):
        p.error("--semantic takes a cosine in (0, 1], with --model minilm and the corpus stream (no --data)")
    if not 0.0 < args.max_error < 1.0:
        p.error("--max-error must be in (0, 1)")
    return args


def _run_config(model, batches, decoder: bool, stream, args, label: str, config: dict, off_s: float, off_rows,
                calibration) -> dict:
    """The stream through a fresh cache of `config`: speed, hit rates and fidelity against off."""
    llmcache.accelerate(model, **config)  # a fresh, empty cache
    served: list = []
    try:
        on_s, on_rows = run_stream(model, batches, decoder, args.device, label, served)
        stats = llmcache.stats(model)
    finally:
        llmcache.disable(model)
    run = _promise(stats, served, off_rows, on_rows, args, calibration) if "semantic" in config else {}
    run.update({
        "label": label, "threshold": config["layerwise"].threshold if "layerwise" in config else None,
        "mode": args.mode, "seconds": on_s,
        "rows_per_s": len(stream) / on_s, "speedup": off_s / on_s, "hit_rate": stats.hit_rate,
        "exact_hit_rate": stats.exact_hits / stats.lookups if stats.lookups else 0.0,
        "semantic_hit_rate": stats.semantic_hits / stats.lookups if stats.lookups else 0.0,
        "bytes": stats.bytes, "layers": layer_rates(stats),
        "fidelity": fidelity(decoder, off_rows, on_rows, stream),
    })
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..models import load_minilm, load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.data:
        stream = read_queries(args.data, args.rows)
    else:
        stream = build_stream(load_corpus(), args.rows or 600, seed=args.seed)
    decoder = args.model == "smollm2"
    model, tokenizer = (load_smollm2 if decoder else load_minilm)(args.device)
    batches = encode(tokenizer, [q.text for q in stream], args.batch_size, args.device)
    counts = stream_counts(stream)
    drawn = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "rows")
    title = (f"llmcache demo: {args.model}, {len(stream)} rows ({drawn}), batch {args.batch_size}, {args.device}, "
             f"{torch.get_num_threads()} threads, mode {args.mode}")

    with torch.inference_mode():
        model(**batches[0])  # warm-up (one-time allocations), not timed
    off_s, off_rows = run_stream(model, batches, decoder, args.device, "off")
    off = {"seconds": off_s, "rows_per_s": len(stream) / off_s}
    if decoder:
        off["ppl"] = math.exp(float(off_rows[:, 0].sum() / off_rows[:, 1].sum().clamp_min(1.0)))

    thresholds = [args.threshold] + ([t for t in SWEEP if t != args.threshold] if args.sweep else [])
    configs = [("exact only", {}) if t is None else
               (f"tau={t:.2f}", {"layerwise": llmcache.Layerwise(threshold=t, mode=args.mode)}) for t in thresholds]
    calibration = None
    if args.semantic is not None:
        calibration = _calibrate(model, tokenizer, args, len(stream))
        configs.append((f"sem {args.semantic:g}", {"semantic": calibration.semantic, "num_bits": calibration.num_bits}))
    runs = [_run_config(model, batches, decoder, stream, args, label, config, off_s, off_rows, calibration)
            for label, config in configs]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure, table_path = out / f"demo-{args.model}.png", out / f"demo-{args.model}.json"
    report = {
        "title": title, "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "llmcache": llmcache.__version__, "args": vars(args), "stream": counts, "off": off, "runs": runs,
        "figure": str(figure), "queries": [asdict(q) for q in stream],
    }
    report["table"] = format_table(report)
    print(title)
    print(report["table"])
    for run in runs:
        if "promise" in run:
            print(run["promise"])
    plot(report, figure)
    table_path.write_text(json.dumps(report, indent=1))
    print(f"figure: {figure}")
    print(f"table:  {table_path}")
    return 0


__all__ = ["PARAPHRASE", "REPEAT", "SWEEP", "build_stream", "load_corpus", "main", "parse_args", "read_queries"]
