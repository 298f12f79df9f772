"""Smoke tests of the benchmarks: `bench.micro.kernels --quick` runs, writes its rows, and agrees with faiss;
the tensor-core formulation is exact; bench.experiments.e2e's measurement has its parts and its fit clamps.

Nothing here asserts on a time or on a number derived from times (a shared machine makes any such
bound flaky): only structure, counters, and the arithmetic applied to given numbers.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_codes

from llmcache.ops import reference

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("faiss")
kernels = pytest.importorskip("bench.micro.kernels")


def test_quick_run_writes_rows_for_every_op_and_matches_faiss(tmp_path):
    status = kernels.main(["--quick", "--out", str(tmp_path)])
    outputs = sorted(tmp_path.glob("kernels-*.json"))
    assert len(outputs) == 1, outputs
    report = json.loads(outputs[0].read_text())
    assert status == 0, "the benchmark found a result that disagrees with faiss or the reference"

    rows = report["rows"]
    assert {r["op"] for r in rows} == {"hamming_topk", "simhash_pooled", "gather_with_mask"}
    assert all(r["ms"] is not None for r in rows), [r["backend"] for r in rows if r["ms"] is None]
    assert (tmp_path / outputs[0].name.replace(".json", ".csv")).exists()
    assert "partial" not in report["header"]  # the final write replaced the per-op ones

    checked = [r for r in rows if r["op"] == "hamming_topk" and r["role"] == "llmcache"]
    assert checked, "no llmcache hamming_topk row was checked against faiss"
    assert all(r["faiss_match"] is True for r in checked), [r["shape"] for r in checked if not r["faiss_match"]]
    default = kernels.default_backend(kernels.torch.device(report["header"]["device"]))
    assert {r["backend"] for r in checked} >= {default}
    # Every popcount path this CPU runs has its own rows (forced), each judged against its own floor.
    forced = {r["backend"] for r in checked if r["backend"].startswith("cpp/")}
    assert forced == {f"cpp/{path}" for path in kernels.runnable_cpu_paths()}
    assert all(r["path"] and r["popcount_floor_ms"] for r in checked if r["backend"].startswith("cpp"))

    # The tensor-core route: an int8 row beside the popcount kernel at every B >= 64, exact, and one
    # route record per such size naming the faster of the two.
    int8 = [r for r in rows if r["backend"] == "int8-mm"]
    assert int8 and all(r["params"]["B"] >= kernels.TENSOR_CORE_MIN_BATCH and r["faiss_match"] for r in int8)
    routes = report["routes"]
    assert {(r["N"], r["nbits"], r["B"]) for r in routes} == {(r["params"]["N"], r["params"]["nbits"],
                                                               r["params"]["B"]) for r in int8}
    assert all(set(r["ms"]) == {default, "int8-mm"} and r["winner"] in r["ms"] for r in routes)

    header = report["header"]
    assert {"date", "machine", "versions", "build_info"} <= header.keys()
    assert report["targets"], "the targets section is missing"


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("words", [1, 4])
def test_tensor_core_formulation_is_exact(dtype, words, gen):
    queries, bank = random_codes(20, words, gen), random_codes(3001, words, gen, sparse=True)
    q_pm, bank_pm = kernels.unpack_plus_minus(queries, dtype), kernels.unpack_plus_minus(bank, dtype)
    # A 4 K-element product limit makes 1024-row chunks: the merge across chunks is exercised too.
    dist, idx = kernels.dot_topk(q_pm, bank_pm, 5, chunk_elems=1 << 12)
    want, _ = reference.hamming_topk(queries, bank, 5)
    assert torch.equal(dist, want)  # ties may pick other indices: those must be at the same distance
    at_idx = reference.popcount64(queries.unsqueeze(1) ^ bank[idx]).sum(-1)
    assert torch.equal(at_idx.to(torch.int32), dist)


def test_without_faiss_the_hamming_rows_are_checked_against_the_cpp_kernel(monkeypatch):
    from llmcache.ops._library import extension_error

    if extension_error() is not None:
        pytest.skip(f"needs the compiled extension: {extension_error()}")
    monkeypatch.setattr(kernels, "faiss", None)  # as on the GPU image, which has no faiss
    sizes = kernels.Sizes((10,), (64,), (64,), (1,), 8)
    device = torch.device("cpu")
    bench = kernels.Bench(device, sizes, kernels.Timer(device, repeats=1, budget_s=0.1))
    bench.hamming_topk()
    checks = {r.backend: r.check for r in bench.rows}
    assert "faiss-flat" not in checks
    assert checks.keys() >= {"cpp", "reference", "torch-mm", "int8-mm"}
    assert set(checks.values()) == {"=cpp"}, checks


def test_tokenizer_of_random_weight_models_comes_from_the_data_dir_first(tmp_path, monkeypatch):
    from bench.experiments import e2e

    explicit = tmp_path / "mine"
    assert e2e.tokenizer_path(str(explicit), str(tmp_path)) == explicit
    (tmp_path / e2e.TOKENIZER_DIR).mkdir()
    assert e2e.tokenizer_path(None, str(tmp_path)) == tmp_path / e2e.TOKENIZER_DIR
    monkeypatch.setattr(e2e.importlib.util, "find_spec", lambda name: None)  # no model package
    with pytest.raises(FileNotFoundError, match="--prepare"):
        e2e.tokenizer_path(None, str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "ms, share, raw, clamped",
    [
        ([2.0, 3.0, 5.0], 0.2, 0.2, False),  # ms = 1 + r: a fifth of the 4-row call is fixed
        ([1.0, 3.0, 7.0], 0.0, -1 / 7, True),  # ms = -1 + 2r: noise gives a negative intercept
        ([5.0, 1.0, 1.0], 1.0, None, True),  # falling times: the intercept exceeds the full call
    ],
)
def test_fixed_cost_fit_clamps_the_share_and_says_so(ms, share, raw, clamped):
    from bench.experiments import e2e

    fit = e2e.fixed_cost_fit([1, 2, 4], ms)
    assert fit["fixed_share"] == pytest.approx(share)
    assert fit["fixed_share_clamped"] is clamped
    if raw is not None:
        assert fit["fixed_share_raw"] == pytest.approx(raw)
    else:
        assert fit["fixed_share_raw"] > 1
    assert e2e.fixed_cost_fit([1], [3.0])["fixed_share"] == 1.0  # one row count: all of it is fixed


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_e2e_measure_accounts_for_the_cached_time(family, gen):
    from helpers import batch
    from models import tiny_model

    import llmcache
    from bench.experiments import e2e

    model = tiny_model(family)
    distinct = [batch(family, [6, 6, 4, 5], gen) for _ in range(2)]
    encoded = [distinct[0], distinct[1], distinct[0], distinct[1]]  # half the batches repeat
    with torch.inference_mode():
        r = e2e.measure(model, encoded, "cpu", repeats=2, config=llmcache.CacheConfig(padding="masked"))
    assert not llmcache.is_accelerated(model)  # measure() leaves the model as it found it
    assert r["hit_rate"] == pytest.approx(0.5) and r["layer_hit_rates"] == [pytest.approx(0.5)] * 3
    assert set(r["breakdown"]) == {"total_s", "compute_s", "bookkeeping_s", "other_s"}
    assert len(r["off_all"]) == len(r["on_all"]) == 2  # one paired pass per repeat
    assert len(r["block_s"]) == 3  # one time per block
    for key in ("ideal_speedup", "speedup", "no_bookkeeping_speedup", "ideal_with_fixed_block_cost"):
        assert isinstance(r[key], float), key
    sc = r["block_scaling"]
    assert sc["rows"] == [1, 2, 4] and len(sc["ms"]) == 3
    assert isinstance(sc["fixed_share_clamped"], bool) and {"fixed_share", "fixed_share_raw"} <= sc.keys()


@pytest.mark.slow
def test_shared_tier_bench_quick_run_writes_every_part(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install.sh installs it)")
    pytest.importorskip("redis")
    from bench.experiments import shared

    assert shared.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    out = tmp_path / "shared"
    reports = {}
    for part in ("fleet", "breakeven", "soak"):
        assert (out / f"shared-{part}.md").exists(), part
        reports[part] = json.loads((out / f"shared-{part}.json").read_text())
        assert {"date", "command", "machine", "versions", "args"} <= reports[part]["header"].keys()

    fleet = {r["k"]: r for r in reports["fleet"]["results"]}
    assert set(fleet) == {1, 2}
    assert fleet[2]["shared_hits"] > 0  # a replica was served what the other computed
    assert fleet[1]["shared_vs_single"] == pytest.approx(1.0)  # K=1 shared sees all its own repeats locally
    assert all(r["errors"] == 0 and r["refused"] == 0 for r in fleet.values())

    be = reports["breakeven"]
    assert {r["model"] for r in be["rows"]} == {"tiny", "minilm"}
    assert all(r["served_from_redis"] and r["bit_identical"] for r in be["rows"])
    assert set(be["breakeven_tokens"]) == {"tiny", "minilm"}
    assert {a["model"] for a in be["auto"]} == {"tiny", "minilm"}
    assert all({"auto_skipped_not_worth", "auto_shared_hits", "agrees_with_breakeven"} <= a.keys() for a in be["auto"])
    assert be["compression"] and all(c["ratio"] > 0 for c in be["compression"])

    soak = reports["soak"]["result"]
    assert soak["failures"] == 0 and soak["mismatches"] == 0 and soak["checked"] > 0
    assert soak["requests"] >= 2000 and soak["shared_writes"] > 0
    assert soak["rss_start"] > 0 and soak["server_maxmemory"] == 8 * 1024 * 1024


@pytest.mark.slow
def test_shared_pages_bench_quick_run_writes_every_variant(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install.sh installs it)")
    pytest.importorskip("redis")
    from bench.experiments import shared

    assert shared.main(["pages", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "shared" / "pages-tiny.md").exists()
    report = json.loads((tmp_path / "shared" / "pages-tiny.json").read_text())
    assert {"date", "command", "machine", "versions", "args"} <= report["header"].keys()
    assert report["model"] == "tiny" and report["big"] is None  # --quick: no 1B model

    fleet = {r["k"]: r for r in report["fleet"]["runs"]}
    assert set(fleet) == {1, 2}
    for r in fleet.values():
        assert {"local", "shared", "waiting", "predicted"} <= r.keys()
        assert r["shared"]["served"] > 0 and r["local"]["served"] > 0 and r["waiting"]["served"] > 0
        for mode in ("shared", "waiting"):
            assert r[mode]["errors"] == {} and r[mode]["refused"] == 0 and r[mode]["flushed"]
    # One process without Redis serves exactly what the stream's pages allow (a deterministic count).
    assert fleet[1]["local"]["served"] == fleet[1]["predicted"]["single"] == fleet[1]["single_served"]
    assert fleet[1]["shared"]["served"] == fleet[1]["local"]["served"] and fleet[1]["shared"]["redis_served"] == 0

    rows = {r["prefix_tokens"]: r for r in report["breakeven"]}
    assert set(rows) == {8, 32}
    for r in rows.values():
        assert {"remote_s", "local_s", "compute_s", "remote_over_local", "compute_over_remote"} <= r.keys()
        assert r["served_from_redis"] and r["local_prefix_hit"]  # B's remote calls got every prefix page from Redis
        assert r["bytes_per_page"] > 0
    assert [r["prefix_tokens"] for r in report["ttft"]] == [32]
    autos = {a["prefix_tokens"]: a for a in report["auto"]}
    assert set(autos) == {8, 32}
    assert all(a["looked_up"] + a["skipped_not_worth"] == a["forwards"] > 0 for a in autos.values())
    assert all(a["decision"] in ("look up", "skip") and isinstance(a["agrees"], bool) for a in autos.values())

    restart = report["restart"]
    assert restart["new_redis_tokens"] > 0  # the new process was served what the exited one computed
    assert restart["new_rate"] > restart["new_local_only_rate"]
    assert restart["warm_flushed"] and restart["errors"] == {}
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"fleet K=1", "fleet K=2", "restart"}


def test_op_counter_tells_views_from_kernels():
    from bench.costs import ops

    a = torch.randn(4, 5)
    with ops.counted() as count:
        a.view(20)
        a.t()
        a + 1  # (an op that computes)
        a.add_(1)  # (in place: a kernel although its output is its input)
        a.sum()
    assert (count.kernels, count.views) == (3, 2)
    assert count.by_name == {"add": 1, "add_": 1, "sum": 1}


def test_hostpath_op_counts_show_a_hit_dispatching_fewer_kernels_than_the_uncached_forward():
    import llmcache
    from bench.costs import hostpath

    gen = torch.Generator().manual_seed(0)
    model = llmcache.accelerate(hostpath.twin("minilm", "cpu"))
    counts = hostpath.op_counts(model, lambda: torch.randint(5, 1000, (4, 16), generator=gen), 16, decoder=False)
    assert set(counts) == {"uncached", "miss", "hit", "mixed"}
    assert counts["hit"]["kernels"] < counts["uncached"]["kernels"] <= counts["miss"]["kernels"]


def test_ab_bench_runs_both_checkouts_in_turn_and_compares_them_pair_by_pair(tmp_path):
    """Two runs of this checkout against itself, one pair: every ratio of the shape compared."""
    from pathlib import Path

    from bench.costs import ab

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.json"
    assert ab.main(["--before", str(root), "--pairs", "1", "--rounds", "1", "--configs", "minilm:2:8",
                    "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert len(record["runs"]["before"]) == len(record["runs"]["after"]) == 1
    for side in ("before", "after"):  # (each side ran the shape asked for, with the package of its checkout)
        (row,) = record["runs"][side][0]["rows"]
        assert (row["model"], row["rows"], row["tokens"]) == ("minilm", 2, 8)
        assert record["runs"][side][0]["llmcache"].startswith(str(root))
    ratios = record["summary"]["minilm:2:8"]
    assert {"miss_over_uncached", "full_miss_over_uncached", "hit_over_uncached", "mixed_over_uncached"} <= set(ratios)
    assert all(set(v) == {"before", "after", "after_over_before_pairwise_median", "min", "max"} for v in ratios.values())


@pytest.mark.slow
def test_peer_suite_runs_transformers_determinism_plain_and_accelerated(tmp_path):
    """bench.peer.run on transformers' test_determinism and test_model_outputs_equivalence: each passes
    plain, accelerated (the second call served from the cache) and with padding="exact"; skipped where
    PyPI cannot be reached for the sdist."""
    peer = pytest.importorskip("bench.peer.run")
    try:
        peer.assemble(tmp_path / "work")
    except Exception as error:  # noqa: BLE001 (no network, no sdist: nothing to run)
        pytest.skip(f"transformers' sdist unavailable: {error}")
    status = peer.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                        "-k", "test_determinism or test_model_outputs_equivalence"])
    report = json.loads((tmp_path / "out" / "peer.json").read_text())
    assert status == 0 and set(report["runs"]) == set(peer.RUNS)
    for name, run in report["runs"].items():
        assert len(run["tests"]) == 2 * 5 and set(run["tests"].values()) == {"passed"}, (name, run["tests"])  # 5 families
        assert run["pass_plain_fail_here"] == []
    assert report["runs"]["accelerated"]["cache"]["hits"] > 0  # the repeats were served
    assert (tmp_path / "out" / "peer.md").read_text().startswith("transformers ")


def test_cold_bench_times_each_step_twice_per_forward_and_restores_it():
    from bench.costs import cold
    from llmcache import rows

    before = rows.row_keys
    got = cold.measure("minilm", 2, 8, 2)
    assert {r["step"] for r in got} == {"batch defaults", "row keys", "arena write"}  # (an encoder: no page keys)
    assert all(r["calls"] == 2 for r in got)  # (one call of each step per forward; warm-up not recorded)
    assert rows.row_keys is before
