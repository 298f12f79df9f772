"""The verified semantic tier on held-out text: does the promise hold, and what does it buy?

    python -m bench.experiments.semantic [--model minilm|smollm2] [--cal-rows 6000] [--rows 2000] [--repeats 3]
                                         [--batch 16] [--deltas 0.005,0.01,0.02,0.05] [--data DIR] [--out DIR]

MiniLM (all-MiniLM-L6-v2, mean pooling: its sentence-transformers pooling), or SmolLM2 (the
tolerance: the same greedy next token; the task metric: the stream texts' perplexity, tier on
against off; calibration with serve "states" only). Tuning: for each
tolerance, `llmcache.calibrate` on a *train*-split stream (STS-B train, WikiText-2 train lines);
evaluation: `bench.streams.semantic_stream` on the *test* split (text the tuning never saw):
50 % exact repeats, 10 % STS-B paraphrases (score >= 4), 10 % near-duplicates (casing,
punctuation, digits, typos, one-word swaps, inserted or dropped words), 30 % new text.

Tolerances: cosine >= 0.99 and >= 0.95 of the mean-pooled embedding to the true one, and a
paraphrase decision: a service that matches each query against a catalog (the STS-B partner
sentences of its stream) and answers "paraphrase of catalog item j" when the best cosine is >=
theta (theta: the accuracy-best cosine threshold for "score >= 4" on STS-B train pairs), else
"none"; a served embedding is right when that answer is unchanged. Calibration uses the train
stream's catalog, evaluation the test stream's.

Per tolerance and max_error delta: the semantic hit rate (of all rows), the realised error
(served semantic hits outside tolerance, judged against an uncached pass) with its 95 %
Clopper-Pearson upper bound, the speedup over the exact tier alone (medians over --repeats
passes, run alternately in one process, each pass from an empty cache with the calibration's
evidence), and STS-B test Spearman with the tier on (both columns encoded after the stream,
warm cache) against uncached. Writes DIR/semantic/semantic-<model>.json and .md, and per tolerance
calibration-<model>-<tolerance>.md and .png (default DIR: bench/results/experiments).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.report import fmt_pct, fmt_x, markdown_table, median, median_ratio, write_json, write_md
from llmcache import bound


class CatalogDecision:
    """A paraphrase decision against a catalog, as a tolerance: (served, true) -> bool."""

    __name__ = "paraphrase decision"

    def __init__(self, catalog: torch.Tensor, theta: float):
        self.catalog = torch.nn.functional.normalize(catalog.float(), dim=-1)
        self.theta = theta

    def decide(self, embedding: torch.Tensor) -> int:
        cos = self.catalog @ torch.nn.functional.normalize(embedding.float(), dim=-1)
        best = int(cos.argmax())
        return best if float(cos[best]) >= self.theta else -1

    def __call__(self, served: torch.Tensor, true: torch.Tensor) -> bool:
        return self.decide(served) == self.decide(true)


def encode(model, tok, texts: list[str], batch: int) -> torch.Tensor:
    """float32 [N, H] mean-pooled embeddings (one forward per batch, in order)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            x = tok(texts[i : i + batch], return_tensors="pt", padding=True)
            h = model(**x).last_hidden_state.float()
            m = x["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def best_theta(model, tok, batch: int, data) -> float:
    """The cosine threshold that best separates STS-B train pairs scored >= 4 from the rest."""
    pairs = streams.load_sts("train", data)
    a = encode(model, tok, [p[1] for p in pairs], batch)
    b = encode(model, tok, [p[2] for p in pairs], batch)
    cos = torch.nn.functional.cosine_similarity(a, b)
    gold = torch.tensor([p[0] >= 4.0 for p in pairs])
    grid = torch.linspace(0.3, 0.99, 140)
    accuracy = torch.stack([((cos >= t) == gold).float().mean() for t in grid])
    return float(grid[int(accuracy.argmax())])


def catalog(model, tok, items, batch: int) -> torch.Tensor:
    partners = sorted({it.pair_partner for it in items if it.pair_partner})
    return encode(model, tok, partners, batch)


def batches(tok, texts: list[str], batch: int, positions: bool = False) -> list[dict]:
    """Tokenised batches; `positions`: with position ids counted from each row's first real token
    (as `generate` gives a decoder), so a prompt's key does not depend on its batch's padding."""
    out = []
    for i in range(0, len(texts), batch):
        x = dict(tok(texts[i : i + batch], return_tensors="pt", padding=True))
        if positions:
            x["position_ids"] = (x["attention_mask"].cumsum(1) - 1).clamp_min(0)
        out.append(x)
    return out


def run_stream(model, inputs: list[dict], semantic: llmcache.Semantic | None, num_bits: int):
    """One pass from an empty cache: (seconds, outputs [N, H] mean-pooled, semantic rows, stats)."""
    llmcache.accelerate(model, semantic=semantic, num_bits=num_bits)
    outputs, served = [], []
    at = 0
    with torch.inference_mode():
        start = time.perf_counter()
        for x in inputs:
            outputs.append(row_reads(model(**x), x))
            if semantic is not None:
                served += [at + r for r in llmcache.stats(model).last_semantic_rows]
            at += x["input_ids"].shape[0]
        seconds = time.perf_counter() - start
    return seconds, torch.cat(outputs).float(), served, llmcache.stats(model)


def row_reads(output, x: dict) -> torch.Tensor:
    """Per row: an encoder's mean-pooled embedding [H]; a decoder's (greedy next token at its
    last real token, summed NLL of its own tokens, tokens predicted) [3]."""
    mask = x["attention_mask"]
    if not hasattr(output, "logits"):
        h = output.last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
    logits = output.logits.float()
    last = (mask != 0).long().cumsum(1).argmax(1)
    nxt = logits[torch.arange(logits.shape[0]), last].argmax(-1).double()
    real = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x["input_ids"][:, 1:], reduction="none")
    return torch.stack([nxt, (nll * real).double().sum(1), real.sum(1).double()], 1)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def sts_spearman(model, tok, batch: int, data) -> float:
    pairs = streams.load_sts("test", data)
    a = encode(model, tok, [p[1] for p in pairs], batch)
    b = encode(model, tok, [p[2] for p in pairs], batch)
    return spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), [p[0] for p in pairs])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    parser.add_argument("--cal-rows", type=int, default=6000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--deltas", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="bench/results/experiments")
    args = parser.parse_args(argv)
    deltas = [float(d) for d in args.deltas.split(",")]
    from llmcache.models import load_minilm, load_smollm2

    decoder = args.model == "smollm2"
    model, tok = (load_smollm2 if decoder else load_minilm)()
    model.eval()
    train = streams.semantic_stream("train", args.cal_rows, seed=1, path=args.data)
    test = streams.semantic_stream("test", args.rows, seed=2, path=args.data)
    cal_inputs = batches(tok, [it.text for it in train], args.batch, decoder)
    inputs = batches(tok, [it.text for it in test], args.batch, decoder)
    _, truth, _, _ = run_stream(model, inputs, None, 256)
    llmcache.disable(model)
    if decoder:
        metric = perplexity  # of the stream's own texts
        tolerances = {"next token": ("next_token", "next_token")}
    else:
        theta = best_theta(model, tok, args.batch, args.data)
        metric = lambda reads: sts_spearman(model, tok, args.batch, args.data)  # (warm cache, tier on)
        tolerances = {
            "cosine 0.99": (0.99, 0.99),
            "cosine 0.95": (0.95, 0.95),
            f"paraphrase decision (theta {theta:.3f})": (
                CatalogDecision(catalog(model, tok, train, args.batch), theta),
                CatalogDecision(catalog(model, tok, test, args.batch), theta)),
        }
    baseline = metric(truth)
    kinds = [it.kind for it in test]
    results = []
    for name, (cal_tol, eval_tol) in tolerances.items():
        start = time.perf_counter()
        cal = llmcache.calibrate(model, cal_inputs, tolerance=cal_tol, max_error=deltas[0],
                                 serve=("states",) if decoder else ("states", "pooled"))
        cal_s = time.perf_counter() - start
        judge = llmcache.Semantic(tolerance=eval_tol)
        for delta in deltas:
            chosen = cal.at(delta)
            semantic = chosen.semantic.replace(tolerance=eval_tol)
            times = {"exact": [], "semantic": []}
            for repeat in range(args.repeats):
                for tier in ("exact", "semantic"):
                    seconds, outputs, served, s = run_stream(model, inputs, semantic if tier == "semantic" else None,
                                                             chosen.num_bits)
                    times[tier].append(seconds)
                    if tier == "semantic" and repeat == args.repeats - 1:
                        sem_stats, sem_outputs, sem_served = s, outputs, served
                        rho = metric(outputs)
                    llmcache.disable(model)
            rows = torch.tensor(sem_served, dtype=torch.long)
            wrong = 0
            if len(sem_served):
                served_reads, true_reads = sem_outputs.index_select(0, rows), truth.index_select(0, rows)
                if decoder:  # the next token column
                    served_reads, true_reads = served_reads[:, 0].long(), true_reads[:, 0].long()
                ok = judge.agree(served_reads, true_reads)
                wrong = len(ok) - sum(ok)
            n = len(sem_served)
            ratio = median_ratio(times["exact"], times["semantic"])
            by_kind = {}
            for r in sem_served:
                by_kind[kinds[r]] = by_kind.get(kinds[r], 0) + 1
            results.append({
                "tolerance": name, "max_error": delta, "num_bits": chosen.num_bits, "serve": semantic.serve,
                "predicted_hit_share": next(s["hit_share"] for s in chosen.settings
                                            if s["serve"] == semantic.serve and s["num_bits"] == chosen.num_bits),
                "semantic_hits": n, "rows": len(test), "semantic_hit_rate": n / len(test), "wrong": wrong,
                "realised_error": wrong / n if n else None, "realised_upper95": bound.upper(wrong, n, 0.05) if n else None,
                "exact_hits": sem_stats.exact_hits, "state": sem_stats.semantic.state,
                "online_checks": sem_stats.semantic.verified, "online_failed": sem_stats.semantic.failed,
                "speedup_over_exact": ratio, "exact_s": median(times["exact"]),
                "semantic_s": median(times["semantic"]), "metric": "perplexity" if decoder else
                "sts_spearman", "metric_on": rho, "metric_off": baseline, "served_by_kind": by_kind,
                "calibration_s": cal_s,
            })
            print(json.dumps(results[-1]), flush=True)
        out = Path(args.out) / "semantic"
        out.mkdir(parents=True, exist_ok=True)
        slug = name.split(" (")[0].replace(" ", "-")
        write_md(out / f"calibration-{args.model}-{slug}.md", [cal.at(0.01).table(), ""])
        try:
            cal.at(0.01).figure(out / f"calibration-{args.model}-{slug}.png")
        except ImportError:
            pass
    write(results, Path(args.out) / "semantic", args)


def perplexity(reads: torch.Tensor) -> float:
    return float(torch.exp(reads[:, 1].sum() / reads[:, 2].sum().clamp_min(1.0)))


def write(results: list, out: Path, args) -> None:
    write_json(out / f"semantic-{args.model}.json", {"args": vars(args), "results": results})
    metric = "perplexity" if args.model == "smollm2" else "STS-B Spearman"
    rows = [{
        "tolerance": r["tolerance"], "max_error": f"{100 * r['max_error']:g} %", "serve": r["serve"],
        "semantic hits": f"{r['semantic_hits']} ({fmt_pct(r['semantic_hit_rate'])})",
        "realised error (95 % upper)": f"{fmt_pct(r['realised_error'])} ({fmt_pct(r['realised_upper95'])})",
        "speedup over exact": fmt_x(r["speedup_over_exact"], 3),
        f"{metric} on (off)": f"{r['metric_on']:.4f} ({r['metric_off']:.4f})",
        "online checks (failed)": f"{r['online_checks']} ({r['online_failed']})", "state": r["state"],
    } for r in results]
    table = markdown_table(rows, align="lrlrrrrrl")
    write_md(out / f"semantic-{args.model}.md", [table, ""])
    print(table)


if __name__ == "__main__":
    main()
