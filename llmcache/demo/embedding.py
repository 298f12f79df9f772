"""Part 1, an embedding service: MiniLM through sentence-transformers on a stream of queries with
Zipf-distributed popularity (a few asked often, most once), in requests of 32 texts.

Every request goes through an uncached copy of the model ("off") and the accelerated model
("on") side by side, the order alternating per request, so both see the same machine. The ideal
is what a cache that computes each distinct text once and costs nothing would reach on this
stream: 1 / (1 - the share of rows that repeat an earlier row). Fidelity: every embedding "on"
against the same request's "off", beside how far "off" itself moves for the same text between
requests (a text padded to another batch width takes other kernels: the last bits differ).
"""

from __future__ import annotations

import copy

import torch

import llmcache

from .common import progress, timed
from .texts import repeats, zipf_stream

REQUEST = 32


def _drift(texts: list[str], rows: torch.Tensor) -> float:
    """The largest |difference| between the embeddings of one text at its occurrences."""
    first: dict[str, int] = {}
    worst = 0.0
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if j != i:
            worst = max(worst, float((rows[i] - rows[j]).abs().max()))
    return worst


def run(model, sentences: list[str], rows: int, device: str, seed: int = 0, source: str = "") -> dict:
    """The stream through `model` (a SentenceTransformer, not accelerated; left as it came)."""
    stream = zipf_stream(sentences, rows, seed=seed)
    repeated = repeats(stream)
    encode = lambda m, texts: m.encode(texts, batch_size=REQUEST, convert_to_tensor=True, show_progress_bar=False)
    plain = copy.deepcopy(model)
    with torch.inference_mode():
        encode(plain, ["warm-up, not timed"])
        encode(model, ["warm-up, not timed"])
    llmcache.accelerate(model)
    requests, outs = [], {"off": [], "on": []}
    try:
        starts = range(0, rows, REQUEST)
        for n, start in enumerate(progress(starts, "1 embedding service")):
            texts = stream[start : start + REQUEST]
            seconds = {"off": [], "on": []}
            for name in (("off", "on") if n % 2 == 0 else ("on", "off")):
                with timed(device, seconds[name]):
                    outs[name].append(encode(plain if name == "off" else model, texts).float().cpu())
            requests.append({"rows": len(texts), "repeats": sum(repeated[start : start + REQUEST]),
                             "off_s": seconds["off"][0], "on_s": seconds["on"][0]})
        stats = llmcache.stats(model)
    finally:
        llmcache.disable(model)
    off, on = torch.cat(outs["off"]), torch.cat(outs["on"])
    off_s, on_s = sum(r["off_s"] for r in requests), sum(r["on_s"] for r in requests)
    share = sum(repeated) / rows
    cosine = torch.nn.functional.cosine_similarity(on.double(), off.double(), dim=1)
    return {
        "part": "embedding", "source": source, "rows": rows, "distinct": len(set(stream)), "request": REQUEST,
        "repeat_share": share, "requests": requests, "off_s": off_s, "on_s": on_s,
        "off_rows_per_s": rows / off_s, "on_rows_per_s": rows / on_s, "speedup": off_s / on_s,
        "ideal": 1.0 / (1.0 - share), "hit_rate": stats.hit_rate, "rows_skipped": stats.hits + stats.repeats,
        "max_abs_diff": float((on - off).abs().max()), "min_cosine": float(cosine.min()),
        "identical_rows": int((on == off).all(dim=1).sum()), "off_drift": _drift(stream, off),
        "bytes": stats.bytes,
    }


__all__ = ["REQUEST", "run"]
