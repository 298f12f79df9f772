"""Query streams for the benchmarks and their tests: documented, seeded, reproducible.

STS-Benchmark rows are `genre, file, year, id, score, sentence1, sentence2[, extra...]`,
tab-separated without quoting (split on tabs, take columns 5-7). The data directory is an
argument, else $LLMCACHE_DATA, else `../shared/data` beside the repository.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The evaluation data directory (may not exist: callers check and skip)."""
    if path is not None:
        return Path(path)
    if os.environ.get("LLMCACHE_DATA"):
        return Path(os.environ["LLMCACHE_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_sts(split: str = "test", path: str | os.PathLike | None = None) -> list[tuple[float, str, str]]:
    """[(score 0-5, sentence1, sentence2)] of an STS-B split (`llmcache.demo.texts.read_sts`)."""
    from llmcache.demo.texts import read_sts

    return read_sts(data_dir(path) / "stsbenchmark", split)


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


# --------------------------------------------------------------------------------------------
# Semantic (near-duplicate) cache evaluation streams.
#
# A stream is a list of StreamItem. Each item is "new" (text unrelated to everything before it),
# a "repeat" (exact copy of an earlier item), a "paraphrase" (the second sentence of an STS-B
# pair scored >= PARAPHRASE_MIN_SCORE whose first sentence appeared earlier as "new"), or a
# near-duplicate: one small edit of an earlier item's text, labelled with the edit (NEAR_KINDS).
#
# Held-out splits: split "train"/"dev"/"test" draws STS-B pairs from that split only, and drops
# every pair with a sentence that also occurs in another split's file (STS-B shares a few hundred
# sentences between splits), so text calibrated on train/dev never reappears in a test stream.
# WikiText-2 lines (distinct lines of load_wikitext(), cut to WIKI_MAX_WORDS words) are split by
# their index i in that list: i % 3 == 0 -> test, 1 -> dev, 2 -> train. "New" text is STS-B and
# WikiText mixed 2:1 (WIKI_SHARE). The project's own sentences (project_sentences()) are used only
# by split "project", which needs no data files and has no paraphrases; they are kept out of the
# data splits because one fixed list would appear in every split and break the hold-out.
#
# To keep "new" items unrelated, each STS pair contributes at most one item to a stream (its
# partner is never used as another "new" item), except the deliberate paraphrase pairs.
# --------------------------------------------------------------------------------------------

NEAR_KINDS = ("casing", "punctuation", "digit", "typo", "swap", "insert", "drop")
STREAM_SPLITS = ("train", "dev", "test", "project")
PARAPHRASE_MIN_SCORE = 4.0
WIKI_SHARE = 1 / 3
WIKI_MAX_WORDS = 40
INSERT_WORDS = ("really", "also", "very", "just", "actually", "quite")
SWAP_WORDS = (
    "house", "river", "garden", "phone", "coffee", "train", "window", "dog", "music", "paper",
    "doctor", "market", "winter", "camera", "bridge", "teacher", "engine", "forest", "ticket", "table",
)
_STOP_WORDS = frozenset((
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one", "our",
    "out", "has", "his", "how", "its", "may", "who", "did", "yes", "yet", "nor", "off", "own", "too", "why",
    "with", "this", "that", "from", "they", "have", "were", "been", "what", "when", "your", "into", "than",
    "then", "them", "some", "such", "only", "also", "very", "just", "does", "will", "there", "their", "which",
    "would", "could",
))
_END_MARKS = ".!?"

_PROJECT_SENTENCES = (
    "How do I reset my router password?",
    "What is the capital city of Australia?",
    "Show me cheap flights from Boston to Denver in March.",
    "The meeting has been moved to Thursday afternoon.",
    "Can you recommend a quiet laptop for writing code?",
    "Why does bread go stale faster in the fridge?",
    "Noise cancelling headphones under 200 dollars",
    "My package was marked delivered but never arrived.",
    "Explain the difference between a virus and a bacterium.",
    "Our team shipped the new billing dashboard yesterday.",
    "What time does the pharmacy on Elm Street close?",
    "Translate good morning into Portuguese.",
    "Is it safe to leave a phone charging overnight?",
    "The hiking trail was closed after the storm.",
    "Waterproof running shoes for wide feet",
    "How many cups of flour go into a basic pancake batter?",
    "Summarize the plot of a famous detective novel in two lines.",
    "The printer on the third floor keeps jamming.",
    "Which houseplants survive in low light?",
    "Write a polite email asking for a deadline extension.",
    "Stainless steel water bottle that keeps drinks cold",
    "What causes the northern lights?",
    "She finished the marathon in just over four hours.",
    "How do I cancel a subscription on my tablet?",
    "Compare the battery life of two popular smartwatches.",
    "The museum offers free entry on the first Sunday of each month.",
    "What is a good name for a small bakery?",
    "Ergonomic office chair with lumbar support",
    "Why is the sky darker at the top of a mountain?",
    "The train to the airport leaves every fifteen minutes.",
    "How long should I boil an egg for a soft yolk?",
    "List three ways to reduce food waste at home.",
    "The library extended its opening hours during exams.",
    "Which programming language should a beginner learn first?",
    "Portable projector for outdoor movie nights",
    "What does compound interest mean?",
    "Our cat refuses to eat dry food.",
    "How can I improve my sleep without medication?",
    "The bridge will be repainted over the summer.",
    "Suggest a vegetarian dinner that takes twenty minutes.",
    "Kids bicycle with training wheels for a five year old",
    "Who painted the ceiling of the Sistine Chapel?",
    "The conference badge must be worn at all times.",
    "How do solar panels work on cloudy days?",
    "Draft a short speech for a retirement party.",
    "Mechanical keyboard with quiet switches",
    "What is the fastest way to learn basic chess openings?",
    "The bakery sold out of croissants before nine.",
    "Why do onions make people cry?",
    "Find a hotel near the stadium with free parking.",
    "The software update fixed the login bug.",
    "How much water should a small dog drink per day?",
    "Recommend a board game for six players.",
    "Winter jacket rated for minus twenty degrees",
    "Where can I recycle old batteries?",
    "The orchestra rehearses on Tuesday evenings.",
    "What is the boiling point of water at high altitude?",
    "Help me plan a three day trip to Kyoto.",
    "The elevator in building B is out of service.",
    "Can I freeze cooked rice safely?",
)


def project_sentences() -> list[str]:
    """Sixty short varied queries and statements written for this project (no dataset text)."""
    return list(_PROJECT_SENTENCES)


def _case_variants(word: str) -> list[str]:
    return sorted({word.lower(), word.upper(), word.capitalize()} - {word})


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def _perturb_once(sentence: str, kind: str, rng: random.Random) -> str | None:
    """Apply edit `kind` once, or None where it does not apply to `sentence`."""
    words = sentence.split()
    if kind == "casing":
        cands = [i for i, w in enumerate(words) if _case_variants(w)]
        if not cands:
            return None
        i = rng.choice(cands)
        words[i] = rng.choice(_case_variants(words[i]))
        return " ".join(words)
    if kind == "punctuation":
        body = sentence.rstrip()
        if body and body[-1] in _END_MARKS:
            return body[:-1] + rng.choice(["", *(m for m in _END_MARKS if m != body[-1])])
        if len(words) >= 3 and rng.random() < 0.5:  # a comma after an inner word
            i = rng.randrange(len(words) - 1)
            if words[i][-1:] not in ",;:":
                words[i] += ","
                return " ".join(words)
        return body + rng.choice(_END_MARKS)
    if kind == "digit":
        digits = [i for i, c in enumerate(sentence) if c.isdigit()]
        if not digits:
            return None
        i = rng.choice(digits)
        return sentence[:i] + rng.choice([d for d in "0123456789" if d != sentence[i]]) + sentence[i + 1:]
    if kind == "typo":
        spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", sentence)]
        if not spans:
            return None
        a, b = rng.choice(spans)
        w = sentence[a:b]
        op = rng.choice(("swap", "drop", "duplicate"))
        j = rng.randrange(1, len(w) - 1)  # never the first letter; j + 1 is a letter too
        if op == "swap" and w[j] != w[j + 1]:
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "duplicate":
            w = w[:j] + w[j] + w[j:]
        else:
            w = w[:j] + w[j + 1:]
        return sentence[:a] + w + sentence[b:]
    if kind == "swap":
        spans = [m.span() for m in re.finditer(r"[A-Za-z]{3,}", sentence)
                 if m.group().lower() not in _STOP_WORDS]
        if not spans:
            return None
        a, b = rng.choice(spans)
        old = sentence[a:b]
        new = rng.choice([w for w in SWAP_WORDS if w != old.lower()])
        return sentence[:a] + _match_case(new, old) + sentence[b:]
    if kind == "insert":
        i = rng.randint(1, len(words)) if words else 0
        return " ".join(words[:i] + [rng.choice(INSERT_WORDS)] + words[i:])
    if kind == "drop":
        if len(words) < 2:
            return None
        i = rng.randrange(len(words))
        return " ".join(words[:i] + words[i + 1:])
    raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {NEAR_KINDS}")


def _applies(sentence: str, kind: str) -> bool:
    """Whether edit `kind` applies to `sentence` without falling back."""
    if kind == "casing":
        return any(_case_variants(w) for w in sentence.split())
    if kind == "digit":
        return any(c.isdigit() for c in sentence)
    if kind == "typo":
        return re.search(r"[A-Za-z]{4,}", sentence) is not None
    if kind == "swap":
        return any(m.group().lower() not in _STOP_WORDS for m in re.finditer(r"[A-Za-z]{3,}", sentence))
    if kind == "drop":
        return len(sentence.split()) >= 2
    return True


# Where an edit does not apply (no digit, no long word, one word...), this one is used instead.
_FALLBACK = {"casing": "punctuation", "digit": "punctuation", "typo": "punctuation", "swap": "insert",
             "drop": "insert", "insert": "punctuation", "punctuation": "punctuation"}


def _perturb(sentence: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """(perturbed text, the kind actually applied after any fallback); the text always differs."""
    if kind not in NEAR_KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {NEAR_KINDS}")
    seen = set()
    while kind not in seen:
        seen.add(kind)
        out = _perturb_once(sentence, kind, rng)
        if out is not None and out != sentence:
            return out, kind
        kind = _FALLBACK[kind]
    # Only "punctuation" can end here, and it changes the last mark, so this is unreachable
    # in practice; appending a mark to the raw text always differs.
    return sentence + ".", "punctuation"


def perturb(sentence: str, kind: str, rng: random.Random) -> str:
    """One small edit of `sentence` (see NEAR_KINDS), always different from it:
    casing: change the case of one word; punctuation: add, remove or change one mark (the final
    one or a comma); digit: change one digit; typo: swap, drop or duplicate one letter inside a
    word of >= 4 letters; swap: replace one content word by a word from SWAP_WORDS; insert: insert
    one of INSERT_WORDS; drop: drop one word. Edits that do not apply fall back deterministically
    (digit/casing/typo -> punctuation, swap/drop -> insert). Whitespace is normalised to single
    spaces by the word-level edits (casing, insert, drop, comma)."""
    return _perturb(sentence, kind, rng)[0]


@dataclass
class StreamItem:
    text: str
    kind: str  # "new", "repeat", "paraphrase", or one of NEAR_KINDS
    origin: int  # index in the stream of the item it repeats/paraphrases/perturbs (-1 for new)
    pair_partner: str | None = None  # STS-derived items: the other sentence of the STS pair


def sts_pairs(split: str, path: str | os.PathLike | None = None, min_score: float | None = None,
              held_out: bool = True) -> list[tuple[float, str, str]]:
    """STS-B pairs of `split` (score >= min_score if given) with two different sentences. With
    `held_out`, pairs with a sentence that occurs in another split's file (if present) are dropped."""
    other: set[str] = set()
    if held_out:
        for s in ("train", "dev", "test"):
            if s != split and (data_dir(path) / "stsbenchmark" / f"sts-{s}.csv").exists():
                other.update(x for _, a, b in load_sts(s, path) for x in (a, b))
    return [(score, a, b) for score, a, b in load_sts(split, path)
            if a != b and (min_score is None or score >= min_score) and a not in other and b not in other]


def wikitext_split(split: str, path: str | os.PathLike | None = None) -> list[str]:
    """Distinct WikiText-2 lines with index % 3 == {test: 0, dev: 1, train: 2}, cut to
    WIKI_MAX_WORDS words."""
    offset = {"test": 0, "dev": 1, "train": 2}[split]
    lines = list(dict.fromkeys(" ".join(x.split()[:WIKI_MAX_WORDS]) for x in load_wikitext(path)))
    return lines[offset::3]


def _layout(n_new: int, n_rep: int, n_para: int, n_near: int, rng: random.Random) -> tuple[list[str], dict]:
    """Shuffled labels ("new"/"repeat"/"paraphrase"/"near") with item 0 new and each paraphrase
    matched to its own earlier new item: returns (labels, {paraphrase index: new index})."""
    labels = ["new"] * n_new + ["repeat"] * n_rep + ["paraphrase"] * n_para + ["near"] * n_near
    rng.shuffle(labels)
    if labels[0] in ("repeat", "near"):
        j = labels.index("new")
        labels[0], labels[j] = labels[j], labels[0]
    free: list[int] = []  # earlier new items not yet used as a paraphrase origin
    match: dict[int, int] = {}
    for i, lab in enumerate(labels):
        if lab == "paraphrase" and not free:  # swap with the next new item (exists: n_new >= n_para)
            j = labels.index("new", i + 1)
            labels[i], labels[j] = "new", "paraphrase"
            lab = "new"
        if lab == "new":
            free.append(i)
        elif lab == "paraphrase":
            match[i] = free.pop(rng.randrange(len(free)))
    return labels, match


def semantic_stream(split: str, length: int, repeat: float = 0.5, paraphrase: float = 0.1, near: float = 0.1,
                    seed: int = 0, path: str | os.PathLike | None = None) -> list[StreamItem]:
    """A seeded stream of `length` items for evaluating a semantic cache (see the section comment).

    Exactly round(fraction * length) items are repeats / paraphrases / near-duplicates, the rest
    are new. Repeats and near-duplicates take their origin uniformly among earlier items; a near
    kind is drawn uniformly from NEAR_KINDS and the origin redrawn (a few times) until the edit
    applies, else the fallback edit is used and recorded as the kind. Items derived from an STS
    sentence (new, repeats of it, paraphrases, near-duplicates) carry its pair partner.
    Raises ValueError if the fractions are invalid or the split cannot supply enough text."""
    if split not in STREAM_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {STREAM_SPLITS}")
    if length < 1 or min(repeat, paraphrase, near) < 0 or repeat + paraphrase + near > 1:
        raise ValueError("need length >= 1 and fractions >= 0 summing to at most 1")
    n_rep, n_para, n_near = (round(f * length) for f in (repeat, paraphrase, near))
    n_new = length - n_rep - n_para - n_near
    if n_new < max(1, n_para):
        raise ValueError(f"{n_new} new items cannot seed {n_para} paraphrases (and the first item must be new)")
    rng = random.Random(seed)
    n_plain = n_new - n_para  # new items that are not paraphrase origins

    if split == "project":
        if n_para:
            raise ValueError("split 'project' has no paraphrase pairs; use paraphrase=0")
        plain = project_sentences()
        if len(plain) < n_plain:
            raise ValueError(f"split 'project' has {len(plain)} sentences; the stream needs {n_plain} new ones")
        rng.shuffle(plain)
        plain_items = [(s, None) for s in plain[:n_plain]]
        para_pairs: list[tuple[str, str]] = []
    else:
        pairs = sts_pairs(split, path)
        rng.shuffle(pairs)
        used: set[str] = set()  # sentences of pairs already drawn: never reused
        para_pairs = []
        for score, a, b in pairs:
            if len(para_pairs) < n_para and score >= PARAPHRASE_MIN_SCORE and a not in used and b not in used:
                used.update((a, b))
                para_pairs.append((a, b) if rng.random() < 0.5 else (b, a))
        if len(para_pairs) < n_para:
            raise ValueError(f"split {split!r} has {len(para_pairs)} usable STS pairs scored >= "
                             f"{PARAPHRASE_MIN_SCORE}; the stream needs {n_para}")
        n_wiki = round(n_plain * WIKI_SHARE)
        sts_items = []
        for _, a, b in pairs:
            if len(sts_items) < n_plain - n_wiki and a not in used and b not in used:
                used.update((a, b))
                sts_items.append((a, b) if rng.random() < 0.5 else (b, a))
        if len(sts_items) < n_plain - n_wiki:
            raise ValueError(f"split {split!r} has {len(sts_items)} unused STS pairs; the stream needs {n_plain - n_wiki}")
        wiki = wikitext_split(split, path)
        if len(wiki) < n_wiki:
            raise ValueError(f"split {split!r} has {len(wiki)} WikiText lines; the stream needs {n_wiki}")
        plain_items = sts_items + [(s, None) for s in rng.sample(wiki, n_wiki)]
        rng.shuffle(plain_items)

    labels, match = _layout(n_new, n_rep, n_para, n_near, rng)
    origins = set(match.values())
    para_of = dict(zip(sorted(origins), para_pairs))  # origin index -> (first, second)
    plain_iter = iter(plain_items)
    stream: list[StreamItem] = []
    for i, lab in enumerate(labels):
        if lab == "new":
            text, partner = para_of[i] if i in origins else next(plain_iter)
            stream.append(StreamItem(text, "new", -1, partner))
        elif lab == "paraphrase":
            o = match[i]
            stream.append(StreamItem(stream[o].pair_partner, "paraphrase", o, stream[o].text))
        elif lab == "repeat":
            o = rng.randrange(i)
            stream.append(StreamItem(stream[o].text, "repeat", o, stream[o].pair_partner))
        else:
            kind = rng.choice(NEAR_KINDS)
            for _ in range(8):  # prefer an origin the edit applies to
                o = rng.randrange(i)
                if _applies(stream[o].text, kind):
                    break
            text, applied = _perturb(stream[o].text, kind, rng)
            stream.append(StreamItem(text, applied, o, stream[o].pair_partner))
    return stream
