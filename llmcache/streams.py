"""Query streams for benchmarks and the demo: documented, seeded, reproducible.

STS-Benchmark rows are `genre, file, year, id, score, sentence1, sentence2[, extra...]`,
tab-separated without quoting (split on tabs, take columns 5-7). The data directory is an
argument, else $LLMCACHE_DATA, else `../shared/data` beside the repository.
"""

from __future__ import annotations

import os
import random
from pathlib import Path


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The evaluation data directory (may not exist: callers check and skip)."""
    if path is not None:
        return Path(path)
    if os.environ.get("LLMCACHE_DATA"):
        return Path(os.environ["LLMCACHE_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_sts(split: str = "test", path: str | os.PathLike | None = None) -> list[tuple[float, str, str]]:
    """[(score 0-5, sentence1, sentence2)] of an STS-B split."""
    file = data_dir(path) / "stsbenchmark" / f"sts-{split}.csv"
    rows = []
    with open(file, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 7:
                rows.append((float(cols[4]), cols[5], cols[6]))
    return rows


def load_wikitext(path: str | os.PathLike | None = None, min_words: int = 8) -> list[str]:
    """Non-heading lines of WikiText-2 raw test with at least `min_words` words."""
    file = data_dir(path) / "wikitext-2-raw" / "wiki.test.raw"
    lines = []
    with open(file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("=") and len(line.split()) >= min_words:
                lines.append(line)
    return lines


def repeat_stream(sentences: list[str], length: int, repeat_rate: float, seed: int = 0) -> list[str]:
    """`length` queries: each is, with probability `repeat_rate`, an exact repeat of a query
    already in the stream (uniformly among them), else the next unused sentence. The first
    query is always new. Raises if the sentences run out."""
    rng = random.Random(seed)
    fresh = iter(sentences)
    stream: list[str] = []
    for _ in range(length):
        if stream and rng.random() < repeat_rate:
            stream.append(rng.choice(stream))
        else:
            stream.append(next(fresh))
    return stream


def unique_stream(sentences: list[str], length: int, seed: int = 0) -> list[str]:
    """`length` distinct sentences in a seeded random order (no repeats at all)."""
    distinct = list(dict.fromkeys(sentences))
    random.Random(seed).shuffle(distinct)
    if len(distinct) < length:
        raise ValueError(f"only {len(distinct)} distinct sentences for a stream of {length}")
    return distinct[:length]
