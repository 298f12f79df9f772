"""bench.experiments.shared soak: 100,000 requests against a small maxmemory (see
bench/experiments/shared/__init__.py)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

import llmcache

from .common import (
    BATCH,
    redis_server,
)


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class SoakStream:
    """Rows of 4-32 synthetic tokens padded to `width`; a row repeats an earlier distinct row
    (geometric distance, mean `mean_distance`) with probability `repeat_rate`, else is new."""

    def __init__(self, seed: int, vocab: int, width: int = 32, repeat_rate: float = 0.5, mean_distance: int = 1500):
        self.seed, self.vocab, self.width = seed, vocab, width
        self.repeat_rate, self.p = repeat_rate, 1.0 / mean_distance
        self.rng = np.random.default_rng(seed)
        self.distinct = 0

    def row(self, i: int) -> np.ndarray:
        n = 4 + (i * 7919) % (self.width - 3)
        return np.random.default_rng([self.seed, i]).integers(1000, self.vocab - 1, n)

    def batch(self, size: int) -> dict:
        ids = np.zeros((size, self.width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r in range(size):
            if self.distinct and self.rng.random() < self.repeat_rate:
                i = self.distinct - min(int(self.rng.geometric(self.p)), self.distinct)
            else:
                i, self.distinct = self.distinct, self.distinct + 1
            row = self.row(i)
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def slope_per_1000(points: list[tuple[int, int]]) -> float | None:
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def soak(args, head: dict) -> dict:
    from bench.experiments import e2e

    requests = 2000 if args.quick else args.soak_requests
    forwards = -(-requests // BATCH)
    sample_every = min(args.sample_every, max(1, forwards // 10)) if args.quick else args.sample_every
    rss_every = max(1, min(50, forwards // 40))  # the RSS alone (a /proc read) more often, for the slope
    check_every, warmup = 20, max(1, forwards // 20)
    max_bytes = 4 << 20
    model = e2e.random_weight_model("bert-base", "tiny")
    reference = copy.deepcopy(model)
    stream = SoakStream(seed=11, vocab=model.config.vocab_size)
    failures, errors_seen, checked, mismatches, max_diff = 0, [], 0, 0, 0.0
    samples, rss_trace = [], []
    with redis_server("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru") as server:
        client = server.client()
        llmcache.accelerate(model, shared=llmcache.Shared(server.url, lookup="always"), max_bytes=max_bytes)
        start = time.perf_counter()
        with torch.inference_mode():
            for step in range(forwards):
                enc = stream.batch(BATCH)
                try:
                    out = model(**enc).last_hidden_state
                except Exception as err:  # noqa: BLE001 (counted: the soak's failures must be 0)
                    failures += 1
                    if len(errors_seen) < 3:
                        errors_seen.append(repr(err))
                    out = None
                if out is not None and step % check_every == 0:
                    want = reference(**enc).last_hidden_state
                    m = enc["attention_mask"][..., None].to(want.dtype)
                    checked += 1
                    diff = float((out * m - want * m).abs().max())
                    max_diff = max(max_diff, diff)
                    # (Rows computed at another padded width, e.g. a miss run over its own length
                    # only, round differently in the last bits: a wrong entry is far outside this.)
                    if not torch.allclose(out * m, want * m, rtol=1e-5, atol=1e-5):
                        mismatches += 1
                if (step + 1) % rss_every == 0:
                    rss_trace.append(((step + 1) * BATCH, vm_rss()))
                if (step + 1) % sample_every == 0 or step + 1 == forwards or step + 1 == warmup:
                    memory, stats_info = client.info("memory"), client.info("stats")
                    st = llmcache.stats(model)
                    samples.append({"forwards": step + 1, "requests": (step + 1) * BATCH, "rss": vm_rss(),
                                    "used_memory": memory["used_memory"], "maxmemory": memory["maxmemory"],
                                    "evicted_keys": stats_info["evicted_keys"], "keys": client.dbsize(),
                                    "bank_bytes_reserved": st.bytes_reserved, "hits": st.hits,
                                    "shared_hits": st.shared.hits, "queued": st.shared.queued,
                                    "elapsed_s": time.perf_counter() - start})
        elapsed = time.perf_counter() - start
        flushed = llmcache.flush(model, 30)
        st = llmcache.stats(model)
        memory, stats_info = client.info("memory"), client.info("stats")
        llmcache.disable(model)
    after = [s for s in samples if s["forwards"] >= warmup]
    trace = [(n, rss) for n, rss in rss_trace if n >= warmup * BATCH]
    second = [(n, rss) for n, rss in trace if n >= forwards * BATCH / 2]
    sh = st.shared
    result = {
        "model": "tiny BERT (random, 2 blocks x 64)", "requests": forwards * BATCH, "forwards": forwards,
        "elapsed_s": elapsed, "failures": failures, "errors_seen": errors_seen, "checked": checked,
        "mismatches": mismatches, "max_abs_diff": max_diff, "distinct_rows": stream.distinct,
        "rss_start": after[0]["rss"], "rss_max": max([s["rss"] for s in after] + [rss for _, rss in trace]),
        "rss_end": after[-1]["rss"], "rss_slope_second_half_bytes_per_1000": slope_per_1000(second),
        "rss_slope_samples": len(second), "rss_every": rss_every, "rss_trace": rss_trace,
        "server_used_memory_max_sampled": max(s["used_memory"] for s in samples),
        "server_used_memory_peak": memory["used_memory_peak"], "server_maxmemory": memory["maxmemory"],
        "server_evicted_keys": stats_info["evicted_keys"], "server_keys_end": samples[-1]["keys"],
        "hits": st.hits, "rows": st.rows, "repeats": st.repeats, "shared_lookups": sh.lookups,
        "shared_hits": sh.hits, "shared_writes": sh.writes, "write_drops": dict(sh.write_drops),
        "errors": dict(sh.errors), "refused": dict(sh.refused), "skipped": dict(sh.skipped), "flushed": flushed,
        "bank_bytes_reserved_max": max(s["bank_bytes_reserved"] for s in samples), "bank_max_bytes": max_bytes,
        "latency_p50_s": sh.latency_p50_s, "latency_p99_s": sh.latency_p99_s, "sample_every": sample_every,
        "samples": samples,
    }
    r = result
    print(f"[soak] {r['requests']} requests in {elapsed:.1f} s: failures {failures}, mismatches {mismatches}/{checked}, "
          f"RSS {r['rss_start'] / 2**20:.1f} -> max {r['rss_max'] / 2**20:.1f} -> end {r['rss_end'] / 2**20:.1f} MiB, "
          f"slope {r['rss_slope_second_half_bytes_per_1000']} B/1000 req; server peak {r['server_used_memory_peak']} of "
          f"{r['server_maxmemory']}, evicted {r['server_evicted_keys']}; drops {r['write_drops']} errors {r['errors']}",
          flush=True)
    mib = lambda b: f"{b / 2**20:.1f}"
    table = [{"requests": r["requests"], "distinct rows": r["distinct_rows"], "hit rate": f"{r['hits'] / r['rows']:.3f}",
              "shared hits": r["shared_hits"], "failures": failures, "mismatches / checked": f"{mismatches} / {checked}",
              "RSS start / max / end MiB": f"{mib(r['rss_start'])} / {mib(r['rss_max'])} / {mib(r['rss_end'])}",
              "RSS slope 2nd half B/1000 req": "-" if r["rss_slope_second_half_bytes_per_1000"] is None
              else f"{r['rss_slope_second_half_bytes_per_1000']:.0f}",
              "server used_memory max sampled / peak / maxmemory MiB":
                  f"{mib(r['server_used_memory_max_sampled'])} / {mib(r['server_used_memory_peak'])} / "
                  f"{mib(r['server_maxmemory'])}",
              "evicted keys": r["server_evicted_keys"], "write drops": sum(r["write_drops"].values()),
              "errors": sum(r["errors"].values()), "time s": f"{elapsed:.1f}"}]
    sample_table = [{"requests": s["requests"], "RSS MiB": mib(s["rss"]), "server used MiB": mib(s["used_memory"]),
                     "evicted": s["evicted_keys"], "keys": s["keys"], "bank reserved MiB": mib(s["bank_bytes_reserved"]),
                     "shared hits": s["shared_hits"], "queued": s["queued"]} for s in samples]
    notes = [
        (f"model: the tiny BERT (random weights, 2 blocks of width 64): {forwards} forwards finish in minutes on 2 "
        "busy cores."),
        (f"stream: rows of 4-32 synthetic tokens, half repeat an earlier distinct row at a geometric distance (mean "
        f"1500), {stream.distinct} distinct rows; batches of {BATCH}; local bank max_bytes {max_bytes >> 20} MiB; "
        "Shared(lookup='always') with its defaults (timeout 50 ms, queue 1024)."),
        (f"RSS = VmRSS of this process (not trimmed), sampled with the server every {sample_every} forwards "
        f"(table below) and alone every {rss_every} forwards; start = after {warmup} warm-up forwards; slope = "
        f"least squares over the {len(second)} RSS readings of the second half."),
        (f"outputs of every {check_every}th forward compared with an uncached deep copy at real tokens, within 1e-5 + "
         "1e-5 |x| (rows computed at another padded width round differently in the last bits: the exact tier runs "
         "a miss over its own positions where a longer row of its batch is served); the largest difference is "
         "recorded (max_abs_diff)."),
        ("server: redis-server --maxmemory 8mb --maxmemory-policy allkeys-lru; used_memory sampled with the RSS, "
        "used_memory_peak is the server's own maximum."),
    ]
    return {"record": {"result": result},
            "tables": [("Soak", table), ("Samples", sample_table)], "notes": notes}


# ---------------------------------------------------------------- main
