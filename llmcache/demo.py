"""`llmcache demo`: what the layer cache buys on a query stream, and what it costs in fidelity.

    llmcache demo [--model minilm|smollm2] [--rows 600] [--batch-size 32] [--threshold TAU]
                  [--mode state|residual] [--sweep] [--device cpu|cuda] [--threads N]
                  [--data FILE] [--seed 0] [--out ./llmcache-demo/]

One process runs the same stream in the same batches twice: uncached ("off"), then through
`llmcache.accelerate(model, threshold=TAU, mode=MODE)` from an empty cache ("on"); --sweep adds
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
import random
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

import llmcache

SWEEP = (0.80, 0.85, 0.90, 0.95, 0.98)
REPEAT, PARAPHRASE = 0.4, 0.2
MAX_LENGTH = 256  # tokens a row is truncated to (rows over CacheConfig.max_tokens run uncached)
LOW_FIDELITY = 0.99


# ---- the stream ----------------------------------------------------------------------------
@dataclass
class Corpus:
    """The demo corpus: base queries by id, their paraphrases by base id, unrelated sentences."""

    base: dict[str, str]
    paraphrases: dict[str, list[str]]
    other: list[str]


@dataclass
class Query:
    """One row of the stream. kind: "new", "repeat", "para" (corpus stream) or "file" (--data).
    source: the stream index of the earlier row it repeats ("repeat") or whose paraphrase it is
    ("para": the first row holding its base query); None otherwise."""

    text: str
    kind: str
    source: int | None = None


def load_corpus(path: str | Path | None = None) -> Corpus:
    """Parse `id<TAB>kind<TAB>text` lines (kind: base, para:<base id>, other; '#' comments)."""
    if path is None:
        text = resources.files("llmcache").joinpath("data/demo_corpus.txt").read_text(encoding="ascii")
    else:
        text = Path(path).read_text(encoding="utf-8")
    corpus = Corpus(base={}, paraphrases={}, other=[])
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"corpus line {number}: expected id<TAB>kind<TAB>text, got {line!r}")
        ident, kind, sentence = fields
        if kind == "base":
            corpus.base[ident] = sentence
        elif kind == "other":
            corpus.other.append(sentence)
        elif kind.startswith("para:") and kind[5:] in corpus.base:
            corpus.paraphrases.setdefault(kind[5:], []).append(sentence)
        else:
            raise ValueError(f"corpus line {number}: kind {kind!r} is not base, other or para:<earlier base id>")
    return corpus


def build_stream(
    corpus: Corpus, rows: int, repeat: float = REPEAT, paraphrase: float = PARAPHRASE, seed: int = 0
) -> list[Query]:
    """`rows` queries drawn as the module docstring describes (seeded, reproducible)."""
    if rows < 1 or not 0 <= repeat <= 1 or not 0 <= paraphrase <= 1 - repeat:
        raise ValueError(f"need rows >= 1 and repeat + paraphrase <= 1, got {rows}, {repeat}, {paraphrase}")
    rng = random.Random(seed)
    fresh = [(ident, text) for ident, text in corpus.base.items()] + [(None, text) for text in corpus.other]
    rng.shuffle(fresh)
    fresh.reverse()  # pop() from the end
    unused = {ident: rng.sample(texts, len(texts)) for ident, texts in corpus.paraphrases.items()}
    first_row: dict[str, int] = {}  # base id -> first stream index holding it
    eligible: list[str] = []  # base ids in the stream with paraphrases left, in order of arrival
    stream: list[Query] = []
    for _ in range(rows):
        draw = rng.random()
        wanted = "repeat" if draw < repeat else "para" if draw < repeat + paraphrase else "new"
        feasible = {"new": bool(fresh), "para": bool(eligible), "repeat": bool(stream)}
        kind = next((k for k in (wanted, "new", "para", "repeat") if feasible[k]), None)
        if kind is None:
            raise ValueError("the corpus is empty")
        if kind == "repeat":
            source = rng.randrange(len(stream))
            stream.append(Query(stream[source].text, "repeat", source))
        elif kind == "para":
            ident = rng.choice(eligible)
            stream.append(Query(unused[ident].pop(), "para", first_row[ident]))
            if not unused[ident]:
                eligible.remove(ident)
        else:
            ident, text = fresh.pop()
            if ident is not None:
                first_row[ident] = len(stream)
                if unused.get(ident):
                    eligible.append(ident)
            stream.append(Query(text, "new"))
    return stream


def read_queries(path: str | Path, rows: int | None = None) -> list[Query]:
    """The non-empty lines of a text file, in order (the first `rows` of them)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    queries = [Query(line, "file") for line in lines if line]
    if not queries:
        raise ValueError(f"{path} has no non-empty line")
    return queries[:rows] if rows else queries


def stream_counts(stream: list[Query]) -> dict[str, int]:
    counts = {"rows": len(stream), "distinct": len({q.text for q in stream})}
    for q in stream:
        counts[q.kind] = counts.get(q.kind, 0) + 1
    return counts


# ---- running the stream --------------------------------------------------------------------
def encode(tokenizer, texts: list[str], batch_size: int, device: str) -> list[dict]:
    """Tokenised batches on `device`; left-padded ones get position_ids that skip the padding."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        if tokenizer.padding_side == "left":
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
        batches.append(batch)
    return batches


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _row_result(decoder: bool, output, batch: dict) -> torch.Tensor:
    """MiniLM: [B, H] mean-pooled embeddings. SmolLM2: [B, 2] (summed NLL, predicted tokens)."""
    mask = batch["attention_mask"]
    if not decoder:
        hidden = output.last_hidden_state.double()
        weights = mask.unsqueeze(-1).double()
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    logits = output.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    real = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)  # a real token predicted from a real one
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    nll = (nll * real).double()
    return torch.stack([nll.sum(1), real.sum(1).double()], dim=1)


def run_stream(model, batches: list[dict], decoder: bool, device: str, label: str,
               served: list | None = None) -> tuple[float, torch.Tensor]:
    """(seconds of model forward time, per-row results on the CPU) over every batch in order;
    `served` collects the stream rows the verified semantic tier served."""
    from tqdm import tqdm

    seconds, results, at = 0.0, [], 0
    with torch.inference_mode():
        for batch in tqdm(batches, desc=f"{label:>12}", unit="batch", file=sys.stderr, leave=False):
            _sync(device)
            start = time.perf_counter()
            output = model(**batch)
            _sync(device)
            seconds += time.perf_counter() - start
            results.append(_row_result(decoder, output, batch).cpu())
            if served is not None:
                served += [at + r for r in llmcache.stats(model).last_semantic_rows]
            at += batch["input_ids"].shape[0]
    return seconds, torch.cat(results)


# ---- what the runs show --------------------------------------------------------------------
def _summary(values: torch.Tensor, low: torch.Tensor) -> dict:
    return {"rows": int(values.numel()), "mean": float(values.mean()), "min": float(values.min()),
            "below_0.99": float(low.double().mean())}


def fidelity(decoder: bool, off: torch.Tensor, on: torch.Tensor, stream: list[Query]) -> dict:
    """How far the cached run's per-row results are from the uncached ones (see the docstring)."""
    kind_of = [q.kind for q in stream]
    rows_of = {k: torch.tensor([i for i, q in enumerate(kind_of) if q == k]) for k in sorted(set(kind_of))}
    if not decoder:
        cosine = torch.nn.functional.cosine_similarity(on, off, dim=1)
        low = cosine < LOW_FIDELITY
        worst = torch.argsort(cosine)[:10].tolist()
        return {
            "metric": "cosine",
            **_summary(cosine, low),
            "by_kind": {k: _summary(cosine[rows], low[rows]) for k, rows in rows_of.items()},
            "worst": [{"row": i, "kind": kind_of[i], "cosine": float(cosine[i]), "text": stream[i].text}
                      for i in worst],
            "cosines": [round(float(c), 9) for c in cosine],
        }
    nll_off, nll_on, tokens = off[:, 0], on[:, 0], off[:, 1].clamp_min(1.0)
    ppl_off = math.exp(float(nll_off.sum() / off[:, 1].sum().clamp_min(1.0)))
    ppl_on = math.exp(float(nll_on.sum() / off[:, 1].sum().clamp_min(1.0)))
    moved = ((nll_on - nll_off) / tokens).abs() > 0.01 * (nll_off / tokens).abs().clamp_min(1e-6)
    return {"metric": "perplexity", "ppl_off": ppl_off, "ppl_on": ppl_on, "ppl_change": ppl_on / ppl_off - 1.0,
            "rows_nll_moved_1pct": float(moved.double().mean()),
            "by_kind": {k: float(moved[rows].double().mean()) for k, rows in rows_of.items()}}


def layer_rates(stats: llmcache.CacheStats) -> list[dict]:
    rate = lambda n, s: n / s.lookups if s.lookups else 0.0
    return [{"layer": s.layer, "lookups": s.lookups, "exact_hits": s.exact_hits, "semantic_hits": s.semantic_hits,
             "exact_rate": rate(s.exact_hits, s), "semantic_rate": rate(s.semantic_hits, s)} for s in stats.layers]


def _fold_layers(layers: list[dict], most: int = 6) -> str:
    """'0-5 40.0+0.0': runs of consecutive layers with equal (rounded) exact+semantic hit rates;
    past `most` runs, the range over all layers instead ('0-29 27.8..28.3+21.5..33.2')."""
    parts, start = [], 0
    cell = lambda r: f"{100 * r['exact_rate']:.1f}+{100 * r['semantic_rate']:.1f}"
    for i in range(1, len(layers) + 1):
        if i == len(layers) or cell(layers[i]) != cell(layers[start]):
            first, last = layers[start]["layer"], layers[i - 1]["layer"]
            parts.append(f"{first}{'' if first == last else f'-{last}'} {cell(layers[start])}")
            start = i
    if len(parts) > most:
        span = lambda key: f"{100 * min(r[key] for r in layers):.1f}..{100 * max(r[key] for r in layers):.1f}"
        return f"{layers[0]['layer']}-{layers[-1]['layer']} {span('exact_rate')}+{span('semantic_rate')}"
    return ", ".join(parts)


def format_table(report: dict) -> str:
    decoder = report["model"] == "smollm2"
    fid_head = (f"{'ppl':>8} {'ppl +%':>8} {'NLL>1%':>7}" if decoder
                else f"{'cos mean':>9} {'cos min':>9} {'<0.99':>6}")
    head = f"{'run':<11} {'rows/s':>8} {'speedup':>7} {'exact%':>6} {'sem%':>6} {fid_head} {'MiB':>7}  layer hit% exact+sem"
    off = report["off"]
    ref = f"{off['ppl']:>8.3f} {'':>8} {'':>7}" if decoder else f"{'(reference)':>26}"
    lines = [head, f"{'off':<11} {off['rows_per_s']:>8.1f} {'1.00x':>7} {'-':>6} {'-':>6} {ref} {'-':>7}  -"]
    for run in report["runs"]:
        f = run["fidelity"]
        fid = (f"{f['ppl_on']:>8.3f} {100 * f['ppl_change']:>+7.2f}% {100 * f['rows_nll_moved_1pct']:>6.1f}%"
               if decoder else f"{f['mean']:>9.6f} {f['min']:>9.6f} {100 * f['below_0.99']:>5.1f}%")
        lines.append(
            f"{run['label']:<11} {run['rows_per_s']:>8.1f} {run['speedup']:>6.2f}x {100 * run['exact_hit_rate']:>6.1f} "
            f"{100 * run['semantic_hit_rate']:>6.1f} {fid} {run['bytes'] / 2**20:>7.1f}  {_fold_layers(run['layers'])}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: hit rate by layer, exact and semantic stacked, one bar group per run. Right: speedup
    against fidelity, one point per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    decoder = report["model"] == "smollm2"
    runs = report["runs"]
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    colors = [f"C{i}" for i in range(len(runs))]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        x = [layer["layer"] - 0.4 + (i + 0.5) * width for layer in run["layers"]]
        exact = [100 * layer["exact_rate"] for layer in run["layers"]]
        semantic = [100 * layer["semantic_rate"] for layer in run["layers"]]
        left.bar(x, exact, width, color=colors[i], label=run["label"])
        left.bar(x, semantic, width, bottom=exact, color=colors[i], alpha=0.35, hatch="//", edgecolor=colors[i])
    left.set_xlabel("layer")
    left.set_ylabel("hit rate (% of lookups)")
    left.set_title("hit rate by layer (solid: exact, hatched: semantic)")
    left.set_xticks([layer["layer"] for layer in runs[0]["layers"]])
    left.set_ylim(0, 100)
    left.legend(fontsize=8, ncols=3, loc="upper right")
    for i, run in enumerate(runs):
        f = run["fidelity"]
        y = f["ppl_off"] / f["ppl_on"] if decoder else f["mean"]
        right.scatter(run["speedup"], y, color=colors[i], s=50, zorder=3, label=run["label"])
        if not decoder:
            right.scatter(run["speedup"], f["min"], color=colors[i], s=50, facecolors="none", zorder=3)
            right.plot([run["speedup"]] * 2, [f["min"], f["mean"]], color=colors[i], lw=1)
        right.annotate(run["label"], (run["speedup"], y), textcoords="offset points", xytext=(6, 4 - 12 * (i % 2)),
                       fontsize=8)
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    if not decoder:
        right.axhline(LOW_FIDELITY, color="gray", lw=0.8, ls=":")
    right.axvline(1.0, color="gray", lw=0.8, ls="--")
    right.set_xlabel("speedup over uncached (x)")
    right.set_ylabel("perplexity off / on (1 = lossless)" if decoder
                     else "embedding cosine on vs off (filled: mean, hollow: min)")
    right.set_title("speed vs fidelity")
    fig.suptitle(report["title"], fontsize=10)
    fig.savefig(path, dpi=110)


def _calibrate(model, tokenizer, args, rows: int):
    """`llmcache.calibrate` on another draw of the corpus (seed + 1): the same corpus, so the
    demo's text is not held out (bench.semantic evaluates on held-out text)."""
    other = build_stream(load_corpus(), max(rows, 600) * 4, seed=args.seed + 1)
    data = encode(tokenizer, [q.text for q in other], args.batch_size, args.device)
    return llmcache.calibrate(model, data, tolerance=args.semantic, max_error=args.max_error)


def _promise(stats, served: list, off_rows: torch.Tensor, on_rows: torch.Tensor, args, calibration) -> dict:
    """What the verified semantic tier promised, what it served, and how many served rows broke it."""
    from . import bound

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .models import load_minilm, load_smollm2

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
    configs = [("exact only" if t is None else f"tau={t:.2f}", {"threshold": t, "mode": args.mode}) for t in thresholds]
    calibration = None
    if args.semantic is not None:
        calibration = _calibrate(model, tokenizer, args, len(stream))
        configs.append((f"sem {args.semantic:g}", {"semantic": calibration.semantic, "num_bits": calibration.num_bits}))
    runs = []
    for label, config in configs:
        llmcache.accelerate(model, **config)  # a fresh, empty cache
        served: list = []
        try:
            on_s, on_rows = run_stream(model, batches, decoder, args.device, label, served)
            stats = llmcache.stats(model)
        finally:
            llmcache.disable(model)
        run = _promise(stats, served, off_rows, on_rows, args, calibration) if "semantic" in config else {}
        runs.append(run)
        run.update({
            "label": label, "threshold": config.get("threshold"), "mode": args.mode, "seconds": on_s,
            "rows_per_s": len(stream) / on_s, "speedup": off_s / on_s, "hit_rate": stats.hit_rate,
            "exact_hit_rate": stats.exact_hits / stats.lookups if stats.lookups else 0.0,
            "semantic_hit_rate": stats.semantic_hits / stats.lookups if stats.lookups else 0.0,
            "bytes": stats.bytes, "layers": layer_rates(stats),
            "fidelity": fidelity(decoder, off_rows, on_rows, stream),
        })

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


if __name__ == "__main__":
    sys.exit(main())
