"""bench.experiments.shared: the redis-server, the report files and the small helpers every part uses."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench import report
from llmcache.shared.server import RedisServer, free_port, redis_server, redis_server_version  # noqa: F401

BATCH = 32
PARTS = ("fleet", "breakeven", "soak", "pages")


# ---------------------------------------------------------------- header and reports


def header(args: argparse.Namespace, command: str) -> dict:
    try:
        import redis

        redis_py = redis.__version__
    except ImportError:
        redis_py = None
    return report.header(args, "cpu", machine={"torch_threads": args.threads, "loadavg_start": list(os.getloadavg())},
                         versions={"redis-py": redis_py, "redis-server": redis_server_version()}, command=command)


def write_report(out: Path, part: str, head: dict, record: dict, tables: list[tuple[str, list[dict]]],
                 notes: list[str], suffix: str = "", stem: str | None = None) -> Path:
    """DIR/shared/<stem><suffix>.json (header + record) and .md (header, tables, notes); stem
    defaults to shared-<part>."""
    head = {**head, "machine": {**head["machine"], "loadavg_end": list(os.getloadavg())}}
    m, v = head["machine"], head["versions"]
    fmt = lambda la: " / ".join(f"{x:.2f}" for x in la)
    lines = [
        f"command: `{head['command']}`",
        f"date: {head['date']}",
        (f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, device cpu; "
        f"load average (1/5/15 min) {fmt(m['loadavg_start'])} at the start, {fmt(m['loadavg_end'])} at the end "
        "(a machine shared with another engineer's test runs: timings are noisy, ratios are side by side)"),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"args: `{json.dumps(head['args'])}`",
    ]
    return report.write_report(Path(out) / "shared", f"{stem or 'shared-' + part}{suffix}", head, record, tables, notes,
                               title=f"llmcache shared tier: {part}", lines=lines, notes_heading=True)


# ---------------------------------------------------------------- models


def load_model(name: str, data: str | None = None):
    """(model, tokenizer) in eval mode, float32 on the CPU: "minilm" (real), "bert-base" (random
    weights, seed 0), "tiny" (random BertModel of 2 blocks, width 64)."""
    from bench.experiments import e2e

    if name == "minilm":
        from llmcache.models import load_minilm

        return load_minilm()
    if name == "bert-base":
        return e2e.random_weight_model("bert-base"), e2e.random_weight_tokenizer(None, data)
    if name == "tiny":
        return e2e.random_weight_model("bert-base", "tiny"), e2e.random_weight_tokenizer(None, data)
    raise ValueError(name)


def encode(tok, sentences: list[str]) -> dict:
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def shared_delta(after, before) -> dict:
    """The shared tier's counters of `after` minus those of `before` (SharedStats; dicts per key)."""
    out = {}
    for name in ("lookups", "hits", "round_trips", "latency_s", "bytes_read", "bytes_written", "writes"):
        out[name] = getattr(after, name) - (getattr(before, name) if before is not None else 0)
    for name in ("skipped", "refused", "write_drops", "errors"):
        a, b = getattr(after, name), getattr(before, name) if before is not None else {}
        out[name] = {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) - b.get(k, 0)}
    out["latency_p50_s"] = after.latency_p50_s
    out["latency_p99_s"] = after.latency_p99_s
    out["compute_s_per_token"] = after.compute_s_per_token
    out["round_trip_s"] = after.round_trip_s
    out["state"] = after.state
    out["last_error"] = after.last_error
    return out


def counts_delta(after, before) -> dict:
    return {"rows": after.rows - before.rows, "hits": after.hits - before.hits,
            "repeats": after.repeats - before.repeats}


# ---------------------------------------------------------------- fleet
