"""Part 3, the semantic promise: serving a *different* input's states, with a bound you set.

`llmcache.Semantic(tolerance=0.95, max_error=0.05)`: at most 5 % of the rows it serves from a
neighbour may come out with an embedding below cosine 0.95 of the true one (at 95 % confidence).
The tier is calibrated (`llmcache.calibrate`) on one stream and then run on a held-out one
(STS-B train and test, or the two halves of the bundled corpus: they share no sentence), each
40 % exact repeats, 20 % close paraphrases of earlier rows, 40 % new. On the held-out stream,
each from an empty cache: the exact tier alone, the verified tier, and the paper's raw
thresholds (`Layerwise(threshold=tau)`: reuse by SimHash distance, no check). Per configuration:
rows served from another input (verified: the tier's own count; raw: the rows whose embedding
moved), how many of those fell below the tolerance against an uncached pass, and what that means
for the bound. Little served is an honest outcome: the tier serves only where its checks have
bounded the error.
"""

from __future__ import annotations

import torch

import llmcache
from llmcache import bound

from .common import progress, timed
from .texts import build_stream, corpora

TOLERANCE, MAX_ERROR = 0.95, 0.05
THRESHOLDS = (0.95, 0.90, 0.80)
BATCH = 16


def _batches(model, texts: list[str], device: str) -> list[dict]:
    out = []
    for start in range(0, len(texts), BATCH):
        prepare = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 / before
        features = prepare(texts[start : start + BATCH])
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()})
    return out


def _pass(model, batches: list[dict], device: str, config: dict | None, label: str) -> dict:
    """One pass over the stream (accelerated with `config` from an empty cache, or uncached when None)."""
    served, rows, seconds, at = [], [], [], 0
    if config is not None:
        llmcache.accelerate(model, **config)
    try:
        with torch.inference_mode(), timed(device, seconds):
            for features in progress(batches, f"3 semantic: {label}"):
                rows.append(model(dict(features))["sentence_embedding"].float().cpu())
                if config is not None and "semantic" in config:
                    served += [at + r for r in llmcache.stats(model).last_semantic_rows]
                at += features["input_ids"].shape[0]
        stats = llmcache.stats(model) if config is not None else None
    finally:
        if config is not None:
            llmcache.disable(model)
    return {"rows": torch.cat(rows), "served": served, "seconds": seconds[0], "stats": stats}


def run(model, rows: int, device: str, data: str | None = None, seed: int = 0) -> dict:
    """Calibrate on one stream, then the configurations on the held-out one (`model`: a
    SentenceTransformer, not accelerated; left as it came)."""
    tuning, held_out = corpora(data)
    cal_stream = build_stream(tuning, 3 * rows, seed=seed + 1)
    stream = build_stream(held_out, rows, seed=seed)
    cal = llmcache.calibrate(model, _batches(model, [q.text for q in cal_stream], device),
                             tolerance=TOLERANCE, max_error=MAX_ERROR)
    batches = _batches(model, [q.text for q in stream], device)
    truth = _pass(model, batches, device, None, "uncached")
    configs = [("exact tier", {}), (f"verified {TOLERANCE:g} / {100 * MAX_ERROR:g} %",
                                    {"semantic": cal.semantic, "num_bits": cal.num_bits})]
    configs += [(f"raw tau {t:.2f}", {"layerwise": llmcache.Layerwise(threshold=t)}) for t in THRESHOLDS]
    results = []
    for label, config in configs:
        p = _pass(model, batches, device, config, label)
        cosine = torch.nn.functional.cosine_similarity(p["rows"].double(), truth["rows"].double(), dim=1)
        moved = (cosine < 1 - 1e-6).nonzero().flatten().tolist()
        served = p["served"] if "semantic" in config else moved
        wrong = int((cosine[served] < TOLERANCE).sum())
        s = p["stats"]
        results.append({
            "label": label, "kind": "verified" if "semantic" in config else "raw" if config else "exact",
            "exact_hits": s.exact_hits, "served": len(served), "wrong": wrong,
            "error": wrong / len(served) if served else None,
            "upper95": bound.upper(wrong, len(served), 0.05) if served else None,
            "rows_moved": len(moved), "min_cosine": float(cosine.min()),
            "speed": truth["seconds"] / p["seconds"],
            "state": s.semantic.state if s.semantic else None,
            "error_bound": s.semantic.error_bound if s.semantic else None,
            "checks": s.semantic.verified if s.semantic else None,
            "checks_failed": s.semantic.failed if s.semantic else None,
        })
    chosen = next(x for x in cal.settings if x["num_bits"] == cal.num_bits and x["serve"] == cal.semantic.serve)
    return {
        "part": "semantic", "tolerance": TOLERANCE, "max_error": MAX_ERROR, "rows": rows,
        "calibration_rows": len(cal_stream), "tuning": tuning.source, "held_out": held_out.source,
        "kinds": {k: sum(q.kind == k for q in stream) for k in ("new", "repeat", "para")},
        "predicted_share": chosen["hit_share"], "calibration_bound": chosen["bound"], "configs": results,
    }


__all__ = ["MAX_ERROR", "THRESHOLDS", "TOLERANCE", "run"]
