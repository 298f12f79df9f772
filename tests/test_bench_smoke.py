"""Smoke test of the kernel benchmark: `bench.kernels --quick` runs, writes its rows, and agrees with faiss.

Nothing is timed against a goal here; the numbers are the benchmark's business.
"""

import json
import sys
from pathlib import Path

import pytest

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
