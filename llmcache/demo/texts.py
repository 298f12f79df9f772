"""The demo's query stream: a corpus with repeats, encoded in batches, run with the cache off and on."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

import llmcache

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


