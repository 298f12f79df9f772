"""Smoke test of the kernel benchmark: `bench.kernels --quick` runs, writes its rows, and agrees with faiss.

Nothing is timed against a goal here; the numbers are the benchmark's business.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("faiss")
kernels = pytest.importorskip("bench.kernels")


def test_quick_run_writes_rows_for_every_op_and_matches_faiss(tmp_path):
    status = kernels.main(["--quick", "--out", str(tmp_path)])
    outputs = sorted(tmp_path.glob("kernels-*.json"))
    assert len(outputs) == 1, outputs
    report = json.loads(outputs[0].read_text())
    assert status == 0, "the benchmark found a result that disagrees with faiss or the reference"

    rows = report["rows"]
    assert {r["op"] for r in rows} == {"hamming_topk", "simhash_pooled", "gather_with_mask"}
    assert all(r["ms"] is not None and r["ms"] > 0 for r in rows)
    assert (tmp_path / outputs[0].name.replace(".json", ".csv")).exists()

    checked = [r for r in rows if r["op"] == "hamming_topk" and r["role"] == "llmcache"]
    assert checked, "no llmcache hamming_topk row was checked against faiss"
    assert all(r["faiss_match"] is True for r in checked), [r["shape"] for r in checked if not r["faiss_match"]]
    assert {r["backend"] for r in checked} >= {kernels.default_backend(kernels.torch.device(report["header"]["device"]))}

    header = report["header"]
    assert {"date", "machine", "versions", "build_info"} <= header.keys()
    assert report["targets"], "the targets section is missing"


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_e2e_measure_accounts_for_the_cached_time(family, gen):
    from models import batch, tiny_model

    import llmcache
    from bench import e2e

    model = tiny_model(family)
    distinct = [batch(family, [6, 6, 4, 5], gen) for _ in range(2)]
    encoded = [distinct[0], distinct[1], distinct[0], distinct[1]]  # half the batches repeat
    with torch.inference_mode():
        r = e2e.measure(model, encoded, "cpu", repeats=2, config=llmcache.CacheConfig())
    assert not llmcache.is_accelerated(model)  # measure() leaves the model as it found it
    assert r["hit_rate"] == pytest.approx(0.5) and r["layer_hit_rates"] == [pytest.approx(0.5)] * 3
    b = r["breakdown"]
    assert b["compute_s"] > 0 and b["bookkeeping_s"] >= 0 and b["other_s"] >= 0
    assert b["compute_s"] + b["bookkeeping_s"] + b["other_s"] == pytest.approx(b["total_s"])
    assert r["ideal_speedup"] > 1 and r["speedup"] > 0 and r["no_bookkeeping_speedup"] > 0
    assert len(r["off_all"]) == len(r["on_all"]) == 2  # one paired pass per repeat
    sc = r["block_scaling"]
    assert sc["rows"] == [1, 2, 4] and all(t > 0 for t in sc["ms"]) and 0 <= sc["fixed_share"] <= 1
    assert 1 <= r["ideal_with_fixed_block_cost"] <= r["ideal_speedup"]
