"""transformers' own model tests, run plain and with every model accelerated: a peer suite.

    python -m bench.peer.run --out bench/results/peer [--work DIR] [-k EXPR]

Fetches the sdist of the installed transformers from PyPI (`pip download --no-binary :all:`: its
`tests/test_modeling_common.py`, 176 common tests), puts beside it this package's tiny BERT, GPT-2
and Llama testers (`test_peer_models.py`; the sdist has no per-model files) and `conftest.py`, and
runs pytest three times: plain, accelerated with the defaults, and accelerated with
`padding="exact"`. The generation and export mixins the common file imports are not in the sdist:
empty stand-ins take their place, so those tests do not run (and `test_generation_tester_mixin_inheritance`
fails in every run alike). A test that passes plain must pass accelerated: the report lists each
that does not, per run, with the cache's counts summed over the run (rows served, rows run
uncached by reason), and writes `peer.json` and `peer.md` to `--out`. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import transformers

from bench.report import about, header

HERE = Path(__file__).parent
RUNS = {"plain": {}, "accelerated": {"LLMCACHE_PEER": "1"},
        "accelerated, padding=exact": {"LLMCACHE_PEER": "1", "LLMCACHE_PEER_PADDING": "exact"}}
STAND_INS = {"exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
             "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n"}


def assemble(work: Path) -> Path:
    """The run directory: the sdist's common tests, the stand-ins, our testers and conftest."""
    version = transformers.__version__
    sdist = work / f"transformers-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(work), f"transformers=={version}"], check=True)
    shutil.unpack_archive(sdist, work)
    source = work / f"transformers-{version}" / "tests"
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "tests").mkdir(parents=True)
    for name in ("test_modeling_common.py", "test_configuration_common.py"):
        shutil.copy(source / name, run / "tests" / name)
    for path, text in STAND_INS.items():
        (run / "tests" / path).parent.mkdir(exist_ok=True)
        (run / "tests" / path).write_text(text)
        (run / "tests" / path).parent.joinpath("__init__.py").touch()
    (run / "tests" / "__init__.py").touch()
    shutil.copy(HERE / "test_peer_models.py", run / "tests" / "test_peer_models.py")
    shutil.copy(HERE / "conftest.py", run / "conftest.py")
    return run


def outcomes(report: Path) -> dict:
    """{test id: passed | failed | skipped} from a junit XML report (a failed subtest fails its test)."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        test = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        out[test] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return out


def run_once(run: Path, env: dict, select: str | None) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report, stats = Path(tmp) / "junit.xml", Path(tmp) / "stats.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_peer_models.py",
                   f"--junitxml={report}"] + (["-k", select] if select else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMCACHE_PEER_STATS": str(stats), **env}
        done = subprocess.run(command, check=False, cwd=run, env=env, capture_output=True, text=True)
        tests = outcomes(report) if report.exists() else {}
        if not tests or any(t.startswith("::") for t in tests):  # (nothing ran: a collection error)
            print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        return tests, (json.loads(stats.read_text()) if stats.exists() else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="where the sdist is fetched and the run assembled (default: a temporary directory)")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = assemble(work)
        results = {}
        for name, env in RUNS.items():
            tests, counts = run_once(run, env, args.select)
            results[name] = {"tests": tests, "cache": counts}
            print(f"{name}: " + ", ".join(f"{sum(v == o for v in tests.values())} {o}" for o in ("passed", "failed", "skipped")))
    plain = results["plain"]["tests"]
    for name, result in results.items():
        result["pass_plain_fail_here"] = sorted(t for t, o in result["tests"].items() if o == "failed" and plain.get(t) == "passed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"header": header(args), "transformers": transformers.__version__, "select": args.select, "runs": results}
    (out / "peer.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    (out / "peer.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def markdown(summary: dict) -> str:
    lines = [f"transformers {summary['transformers']} common model tests on tiny BERT, GPT-2, Llama (`bench.peer.run`)", "",
             *(f"- {line}" for line in about(summary["header"])), "",
             "| run | passed | failed | skipped | pass plain, fail here | rows | rows served | rows run uncached |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in summary["runs"].items():
        tests, cache = result["tests"], result["cache"]
        count = lambda o, t=tests: sum(v == o for v in t.values())
        uncached = sum(v for k, v in cache.items() if k.startswith("not_cached:"))
        lines.append(f"| {name} | {count('passed')} | {count('failed')} | {count('skipped')} | "
                     f"{len(result['pass_plain_fail_here'])} | {cache.get('rows', '—')} | {cache.get('hits', '—')} | "
                     f"{uncached if cache else '—'} |")
    for name, result in summary["runs"].items():
        if result["pass_plain_fail_here"]:
            lines += ["", f"Pass plain, fail {name}: " + ", ".join(f"`{t}`" for t in result["pass_plain_fail_here"])]
    reasons = {k[len('not_cached:'):]: v for k, v in summary["runs"]["accelerated"]["cache"].items() if k.startswith("not_cached:")}
    if reasons:
        lines += ["", "Rows run uncached (accelerated, by reason): " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
