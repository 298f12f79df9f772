"""Semantic-cache evaluation streams (bench.streams): perturbations, layout, hold-out. No model."""

import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from bench import streams

EDGE_SENTENCES = ["", "a", "Hi", "OK.", "1234", "aaaa bbbb", "Room 101 opens at 9:30.", "Call 555 0199 now!",
                  "The 3 cats ate 12 fish in 2004", "   spaced   out   words  ", "?!", "Über café naïve"]


def need_data():
    d = streams.data_dir()
    files = [d / "stsbenchmark" / f"sts-{s}.csv" for s in ("train", "dev", "test")]
    files.append(d / "wikitext-2-raw" / "wiki.test.raw")
    for f in files:
        if not f.exists():
            pytest.skip(f"evaluation data missing: {f}")


def sentences_for_perturb():
    out = streams.project_sentences() + EDGE_SENTENCES
    d = streams.data_dir()
    if (d / "stsbenchmark" / "sts-dev.csv").exists():
        out += [a for _, a, _ in streams.load_sts("dev")[:300]]
    return out


def _one_token_differs(a, b):
    ta, tb = a.split(), b.split()
    return len(ta) == len(tb) and sum(x != y for x, y in zip(ta, tb)) == 1


def _removes_one(longer, shorter):
    return len(longer) == len(shorter) + 1 and any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer)))


def check_edit(kind, a, b):
    """Assert that `b` is one edit of kind `kind` of `a`."""
    assert a != b
    ta, tb = a.split(), b.split()
    if kind == "casing":
        assert [w.lower() for w in ta] == [w.lower() for w in tb] and _one_token_differs(a, b), (a, b)
    elif kind == "punctuation":
        assert re.sub(r"[.,!?;:\s]", "", a) == re.sub(r"[.,!?;:\s]", "", b), (a, b)
    elif kind == "digit":
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(a) == len(b) and len(diff) == 1 and a[diff[0]].isdigit() and b[diff[0]].isdigit(), (a, b)
    elif kind == "typo":
        assert _one_token_differs(a, b), (a, b)
        x, y = next((x, y) for x, y in zip(ta, tb) if x != y)
        if len(x) == len(y):  # adjacent letters swapped
            d = [i for i in range(len(x)) if x[i] != y[i]]
            assert len(d) == 2 and d[1] == d[0] + 1 and x[d[0]] == y[d[1]] and x[d[1]] == y[d[0]], (a, b)
        else:  # one letter dropped or duplicated
            assert _removes_one(x, y) or _removes_one(y, x), (a, b)
    elif kind == "swap":
        assert _one_token_differs(a, b), (a, b)
        new = next(y for x, y in zip(ta, tb) if x != y)
        assert any(w in new.lower() for w in streams.SWAP_WORDS), (a, b)
    elif kind == "insert":
        assert len(tb) == len(ta) + 1, (a, b)
        assert any(tb[:i] + tb[i + 1:] == ta and tb[i] in streams.INSERT_WORDS for i in range(len(tb))), (a, b)
    elif kind == "drop":
        assert _removes_one(ta, tb), (a, b)
    else:
        raise AssertionError(f"unexpected kind {kind}")


def test_perturb_always_differs_and_is_seeded():
    sents = sentences_for_perturb()
    for kind in streams.NEAR_KINDS:
        for seed, s in enumerate(sents):
            out = streams.perturb(s, kind, random.Random(seed))
            assert out != s, (kind, s)
            assert out == streams.perturb(s, kind, random.Random(seed))


def test_perturb_makes_the_named_edit():
    # Project sentences all have several words, long words and content words; the digit kind is
    # checked on sentences that contain digits. Each must make exactly the edit it names.
    digit_sents = [s for s in EDGE_SENTENCES if any(c.isdigit() for c in s)]
    for kind in streams.NEAR_KINDS:
        sents = digit_sents if kind == "digit" else streams.project_sentences()
        for seed in range(5):
            for s in sents:
                check_edit(kind, s, streams.perturb(s, kind, random.Random(seed)))


def test_perturb_falls_back_where_edit_does_not_apply():
    rng = random.Random(0)
    check_edit("punctuation", "No digits here.", streams.perturb("No digits here.", "digit", rng))
    check_edit("insert", "Hello", streams.perturb("Hello", "drop", rng))
    check_edit("punctuation", "Hi", streams.perturb("Hi", "typo", rng))
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        streams.perturb("x", "shout", rng)


def test_project_sentences():
    sents = streams.project_sentences()
    assert 55 <= len(sents) <= 65 and len(set(sents)) == len(sents)
    assert all(3 <= len(s.split()) <= 15 for s in sents)
    assert sum(s.endswith("?") for s in sents) >= 15  # questions as well as statements and queries


def test_project_stream_needs_no_data():
    st = streams.semantic_stream("project", 100, repeat=0.5, paraphrase=0.0, near=0.2, seed=3)
    proj = set(streams.project_sentences())
    assert all(it.text in proj for it in st if it.kind == "new")
    assert all(it.text == st[it.origin].text for it in st if it.kind == "repeat")
    assert Counter(it.kind for it in st)["repeat"] == 50
    assert all(it.pair_partner is None for it in st)
    with pytest.raises(ValueError, match="no paraphrase"):
        streams.semantic_stream("project", 100, paraphrase=0.1)
    with pytest.raises(ValueError, match="60 sentences"):
        streams.semantic_stream("project", 1000, paraphrase=0.0)


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="unknown split"):
        streams.semantic_stream("validation", 10)
    with pytest.raises(ValueError, match="fractions"):
        streams.semantic_stream("project", 10, repeat=0.8, paraphrase=0.0, near=0.3)
    with pytest.raises(ValueError, match="paraphrases"):
        streams.semantic_stream("test", 10, repeat=0.4, paraphrase=0.3, near=0.1)


def test_stream_reproducible():
    need_data()
    a = streams.semantic_stream("dev", 500, seed=7)
    assert a == streams.semantic_stream("dev", 500, seed=7)
    assert a != streams.semantic_stream("dev", 500, seed=8)


@pytest.mark.parametrize("split", ["train", "test"])
def test_stream_shares_and_origins(split):
    need_data()
    fr = {"repeat": 0.4, "paraphrase": 0.1, "near": 0.15}
    st = streams.semantic_stream(split, 2000, repeat=fr["repeat"], paraphrase=fr["paraphrase"], near=fr["near"],
                                 seed=1)
    assert len(st) == 2000 and st[0].kind == "new"
    kinds = Counter(it.kind for it in st)
    near_count = sum(kinds[k] for k in streams.NEAR_KINDS)
    assert set(kinds) <= {"new", "repeat", "paraphrase", *streams.NEAR_KINDS}
    assert abs(kinds["repeat"] / 2000 - fr["repeat"]) < 0.02
    assert abs(kinds["paraphrase"] / 2000 - fr["paraphrase"]) < 0.02
    assert abs(near_count / 2000 - fr["near"]) < 0.02
    assert abs(kinds["new"] / 2000 - 0.35) < 0.02
    assert all(kinds[k] >= 5 for k in streams.NEAR_KINDS), kinds  # every edit kind is represented

    score = {}
    for s, a, b in streams.load_sts(split):
        score[a, b] = score[b, a] = max(s, score.get((a, b), 0.0))
    para_origins = []
    for i, it in enumerate(st):
        if it.kind == "new":
            assert it.origin == -1
            continue
        assert 0 <= it.origin < i, (i, it)
        src = st[it.origin]
        if it.kind == "repeat":
            assert it.text == src.text and it.pair_partner == src.pair_partner
        elif it.kind == "paraphrase":
            assert src.kind == "new" and src.pair_partner == it.text and it.pair_partner == src.text
            assert score[src.text, it.text] >= streams.PARAPHRASE_MIN_SCORE
            para_origins.append(it.origin)
        else:
            check_edit(it.kind, src.text, it.text)
            assert it.pair_partner == src.pair_partner
    assert len(para_origins) == len(set(para_origins))  # each paraphrase has its own origin

    # New items are distinct and unrelated: no new text or partner is another new item's text,
    # and STS-derived items carry partners, WikiText items (<= 40 words) do not.
    new = [it for it in st if it.kind == "new"]
    texts = [it.text for it in new] + [it.text for it in st if it.kind == "paraphrase"]
    assert len(texts) == len(set(texts))
    assert not {it.pair_partner for it in new if it.pair_partner} & {it.text for it in new}
    sts_sents = {x for _, a, b in streams.load_sts(split) for x in (a, b)}
    wiki = [it for it in new if it.pair_partner is None]
    assert all(it.text in sts_sents for it in new if it.pair_partner is not None)
    assert all(len(it.text.split()) <= streams.WIKI_MAX_WORDS and it.text not in sts_sents for it in wiki)
    assert 0.25 < len(wiki) / (len(new) - kinds["paraphrase"]) < 0.4  # STS : WikiText about 2 : 1


def test_test_stream_holds_out_train_and_dev():
    need_data()
    other = {x for s in ("train", "dev") for _, a, b in streams.load_sts(s) for x in (a, b)}
    st = streams.semantic_stream("test", 1500, seed=2)
    src = [it for it in st if it.kind in ("new", "repeat", "paraphrase")]
    assert sum(it.pair_partner is not None for it in src) > 500
    assert not {it.text for it in src} & other
    assert not {it.pair_partner for it in st if it.pair_partner} & other


def test_wikitext_lines_disjoint_between_splits():
    need_data()

    def wiki_texts(split, seed):
        st = streams.semantic_stream(split, 1500, seed=seed)
        return {it.text for it in st if it.kind == "new" and it.pair_partner is None}

    test_lines, train_lines = wiki_texts("test", 0), wiki_texts("train", 0)
    assert len(test_lines) >= 90 and len(train_lines) >= 90
    assert not test_lines & train_lines
    assert not test_lines & set(streams.wikitext_split("dev"))
    assert test_lines <= set(streams.wikitext_split("test"))


def test_stream_too_long_for_split(tmp_path):
    need_data()
    with pytest.raises(ValueError, match="scored >= 4.0"):
        streams.semantic_stream("test", 20000, repeat=0.5, paraphrase=0.1, near=0.1)
    with pytest.raises(ValueError, match="unused STS pairs"):
        streams.semantic_stream("test", 8000, repeat=0.6, paraphrase=0.0, near=0.0)
    # A data directory (the `path` argument) with the real STS-B but only 30 WikiText lines.
    (tmp_path / "stsbenchmark").mkdir()
    for s in ("train", "dev", "test"):
        name = f"sts-{s}.csv"
        (tmp_path / "stsbenchmark" / name).write_text((streams.data_dir() / "stsbenchmark" / name).read_text())
    (tmp_path / "wikitext-2-raw").mkdir()
    lines = [f"Line number {i} of a small made up article about rivers ." for i in range(30)]
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    st = streams.semantic_stream("test", 40, seed=0, path=tmp_path)
    assert {it.text for it in st if it.kind == "new" and it.pair_partner is None} <= set(lines[0::3])
    with pytest.raises(ValueError, match="has 10 WikiText lines"):
        streams.semantic_stream("test", 200, seed=0, path=tmp_path)
