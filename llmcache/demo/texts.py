"""The demo's text: the bundled corpus, STS-Benchmark where it is found, and the streams drawn from them.

The bundled corpus (`llmcache/data/demo_corpus.txt`, everyday queries written for this project:
base queries, their close paraphrases, unrelated sentences) is always there. STS-B is read from
`--data DIR`, else $LLMCACHE_DATA, else `../shared/data` (a folder holding `stsbenchmark/`); when
none holds it the demo runs on the bundled corpus and says so.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPEAT, PARAPHRASE = 0.4, 0.2  # the semantic part's held-out stream
ZIPF = 1.0  # the embedding service's query popularity: P(rank k) ~ 1 / k^ZIPF


@dataclass
class Corpus:
    """Base queries by id, their close paraphrases by base id, unrelated sentences; `source` names it."""

    base: dict[str, str]
    paraphrases: dict[str, list[str]]
    other: list[str]
    source: str = "bundled corpus"

    def sentences(self) -> list[str]:
        """Every distinct sentence, in corpus order."""
        texts = list(self.base.values()) + [p for ps in self.paraphrases.values() for p in ps] + self.other
        return list(dict.fromkeys(texts))


@dataclass
class Query:
    """One row of a stream. kind: "new", "repeat" or "para". source: the stream index of the earlier
    row it repeats ("repeat") or whose paraphrase it is ("para": the first row holding its base)."""

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


def sts_folder(data: str | os.PathLike | None = None) -> Path | None:
    """The `stsbenchmark` folder: under `data` (an error when it is not there), else under
    $LLMCACHE_DATA or ../shared/data, else None."""
    if data is not None:
        folder = Path(data) / "stsbenchmark"
        if not (folder / "sts-test.csv").is_file():
            raise FileNotFoundError(f"--data {data}: no stsbenchmark/sts-test.csv there")
        return folder
    for root in (os.environ.get("LLMCACHE_DATA"), "../shared/data"):
        if root and (Path(root) / "stsbenchmark" / "sts-test.csv").is_file():
            return Path(root) / "stsbenchmark"
    return None


def read_sts(folder: str | os.PathLike, split: str) -> list[tuple[float, str, str]]:
    """[(score 0-5, sentence1, sentence2)] of `folder`/sts-<split>.csv: rows `genre, file, year, id,
    score, sentence1, sentence2[, extra...]`, tab-separated without quoting (the benchmarks read it here too)."""
    rows = []
    for line in (Path(folder) / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 7:
            rows.append((float(cols[4]), cols[5], cols[6]))
    return rows


def sts_corpus(folder: Path, split: str) -> Corpus:
    """A Corpus of one STS-B split: each pair's first sentence a base, its second a paraphrase when
    scored >= 4, an unrelated-enough sentence when scored < 2, left out otherwise."""
    corpus = Corpus(base={}, paraphrases={}, other=[], source=f"STS-B {split} ({folder})")
    seen: set[str] = set()
    for score, first, second in read_sts(folder, split):
        first, second = first.strip(), second.strip()
        if not first or not second or first in seen or second in seen:
            continue
        ident = f"s{len(corpus.base)}"
        corpus.base[ident] = first
        seen.add(first)
        if score >= 4.0 or score < 2.0:
            (corpus.paraphrases.setdefault(ident, []) if score >= 4.0 else corpus.other).append(second)
            seen.add(second)
    return corpus


def corpora(data: str | None = None) -> tuple[Corpus, Corpus]:
    """(calibration, evaluation) corpora that share no sentence: STS-B train and test where found,
    else the bundled corpus split in two (alternate base queries and unrelated sentences)."""
    folder = sts_folder(data)
    if folder is not None:
        return sts_corpus(folder, "train"), sts_corpus(folder, "test")
    whole = load_corpus()
    halves = []
    for half in (0, 1):
        base = {k: v for i, (k, v) in enumerate(whole.base.items()) if i % 2 == half}
        halves.append(Corpus(base, {k: v for k, v in whole.paraphrases.items() if k in base}, whole.other[half::2],
                             f"bundled corpus, half {half + 1} of 2 (STS-B not found)"))
    return halves[0], halves[1]


def zipf_stream(sentences: list[str], rows: int, exponent: float = ZIPF, seed: int = 0) -> list[str]:
    """`rows` queries drawn independently from `sentences` (popularity ranks in a seeded order),
    P(rank k) proportional to 1 / k^exponent: a few queries are asked often, most once."""
    if rows < 1 or not sentences:
        raise ValueError(f"need rows >= 1 and a sentence, got {rows} rows, {len(sentences)} sentences")
    rng = random.Random(seed)
    ranked = rng.sample(sentences, len(sentences))
    weights = [1.0 / (k + 1) ** exponent for k in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=rows)


def repeats(stream: list[str]) -> list[bool]:
    """Per row: does its text occur earlier in the stream (what a perfect lossless cache skips)."""
    seen: set[str] = set()
    out = []
    for text in stream:
        out.append(text in seen)
        seen.add(text)
    return out


def build_stream(
    corpus: Corpus, rows: int, repeat: float = REPEAT, paraphrase: float = PARAPHRASE, seed: int = 0
) -> list[Query]:
    """`rows` queries, each independently: with probability `repeat` an exact repeat of an earlier
    row (uniform); with `paraphrase` an unused paraphrase of a base already in the stream; else new
    (the next base or unrelated sentence in a seeded order). A kind that cannot be drawn falls back
    to new, then paraphrase, then repeat; the first row is always new."""
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


__all__ = ["PARAPHRASE", "REPEAT", "ZIPF", "Corpus", "Query", "build_stream", "corpora", "load_corpus", "read_sts",
           "repeats", "sts_corpus", "sts_folder", "zipf_stream"]
