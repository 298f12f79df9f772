"""bench.experiments.shared breakeven: a shared hit against computing the row, lookup="auto", compression (see
bench/experiments/shared/__init__.py)."""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch

import llmcache
from bench import streams
from bench.report import fmt_ms, median

from .common import (
    BATCH,
    RedisServer,
    counts_delta,
    encode,
    load_model,
    redis_server,
    shared_delta,
)


def synthetic_batch(gen: torch.Generator, rows: int, length: int, vocab: int) -> dict:
    ids = torch.randint(1000, vocab - 1, (rows, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def interpolate_breakeven(lengths: list[int], diff: list[float]) -> str | float:
    """The row length where diff (compute - shared hit, per row) crosses 0, linearly between the
    measured lengths; "always" (shared hits cheaper at every length) / "never" otherwise."""
    if all(d > 0 for d in diff):
        return "always"
    if all(d <= 0 for d in diff):
        return "never"
    for (l0, d0), (l1, d1) in zip(zip(lengths, diff), zip(lengths[1:], diff[1:])):
        if (d0 <= 0) != (d1 <= 0):
            return l0 + (l1 - l0) * d0 / (d0 - d1)
    return "mixed"


def diff_at(lengths: list[int], diff: list[float], at: float) -> float:
    """compute - shared hit per row at `at` tokens, linear between measured lengths (clamped)."""
    return float(np.interp(at, lengths, diff))


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_uncached(model, enc: dict) -> float:
    with llmcache.bypass(model):
        return time_call(lambda: model(**enc))


def timed_shared_then_local(model, enc: dict, probe: dict, want: torch.Tensor) -> dict:
    """Empty the local bank (reset), run the 1-row `probe` (another row: it recomputes the model
    fingerprint outside the timing), then time `enc` twice: every row from Redis, then every row
    a local hit."""
    llmcache.reset(model)
    probe_s = time_call(lambda: model(**probe))
    llmcache.flush(model, 30)
    before = llmcache.stats(model)
    start = time.perf_counter()
    served = model(**enc).last_hidden_state
    shared_s = time.perf_counter() - start
    mid = llmcache.stats(model)
    local_s = time_call(lambda: model(**enc))
    after = llmcache.stats(model)
    d = shared_delta(mid.shared, before.shared)
    ok = (d["hits"] == BATCH and mid.hits - before.hits == BATCH and after.hits - mid.hits == BATCH
          and after.shared.lookups == mid.shared.lookups)
    return {"shared_s": shared_s, "local_s": local_s, "probe_s": probe_s, "ok": ok,
            "mget_s": d["latency_s"] / max(1, d["round_trips"]), "bytes_per_row": d["bytes_read"] / BATCH,
            "equal": torch.equal(served, want)}


def measure_length(name: str, model, gen: torch.Generator, length: int, repeats: int) -> dict:
    vocab = model.config.vocab_size
    enc = synthetic_batch(gen, BATCH, length, vocab)
    with llmcache.bypass(model):
        for _ in range(2):
            want = model(**enc).last_hidden_state  # warm-up
    llmcache.reset(model)
    model(**enc)  # computes every row, writes them to Redis
    assert llmcache.flush(model, 60)
    a, bc = [], []
    for r in range(repeats):
        probe = synthetic_batch(gen, 1, length, vocab)
        if r % 2 == 0:
            a.append(timed_uncached(model, enc))
            bc.append(timed_shared_then_local(model, enc, probe, want))
        else:
            bc.append(timed_shared_then_local(model, enc, probe, want))
            a.append(timed_uncached(model, enc))
    b, c = [x["shared_s"] for x in bc], [x["local_s"] for x in bc]
    a_s, b_s, c_s = median(a), median(b), median(c)
    mget = median(x["mget_s"] for x in bc)
    mget_max = max(x["mget_s"] for x in bc)
    row = {"model": name, "tokens": length, "uncached_s": a_s, "shared_hit_s": b_s, "local_hit_s": c_s,
           "compute_per_row_s": a_s / BATCH, "shared_per_row_s": b_s / BATCH, "local_per_row_s": c_s / BATCH,
           "compute_over_shared": a_s / b_s, "mget_s": mget, "mget_max_s": mget_max, "mget_per_row_s": mget / BATCH,
           "bytes_per_row": median(x["bytes_per_row"] for x in bc),
           "served_from_redis": all(x["ok"] for x in bc), "bit_identical": all(x["equal"] for x in bc),
           "first_forward_after_reset_s": median(x["probe_s"] for x in bc), "a_all": a, "b_all": b, "c_all": c}
    print(f"[breakeven] {name:9} {length:4} tokens: compute {fmt_ms(row['compute_per_row_s'])} ms/row, "
          f"shared hit {fmt_ms(row['shared_per_row_s'])} ms/row, local hit {fmt_ms(row['local_per_row_s'])} "
          f"ms/row, compute/shared {row['compute_over_shared']:.2f}, MGET {fmt_ms(row['mget_s'])} ms "
          f"({row['bytes_per_row']:.0f} B/row), served {row['served_from_redis']}, identical {row['bit_identical']}",
          flush=True)
    return row


def measure_breakeven(name: str, model, url: str, lengths: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    llmcache.accelerate(model, shared=llmcache.Shared(url, lookup="always", timeout=2.0))
    try:
        return [measure_length(name, model, gen, length, repeats) for length in lengths]
    finally:
        llmcache.disable(model)


def run_second_half(model, batches: list[dict], shared, probe: dict) -> dict:
    """The batches from a cold local bank (timed), after a one-row `probe` outside the stream
    (the model fingerprint, a one-off, is computed there; the counts start after it)."""
    llmcache.accelerate(model, shared=shared, max_bytes=1 << 30)
    try:
        model(**probe)
        llmcache.flush(model, 30)
        before = llmcache.stats(model)
        start = time.perf_counter()
        for enc in batches:
            model(**enc)
        elapsed = time.perf_counter() - start
        st = llmcache.stats(model)
        return {"s": elapsed, **counts_delta(st, before),
                "shared": shared_delta(st.shared, before.shared) if st.shared is not None else None}
    finally:
        llmcache.disable(model)


def measure_auto(name: str, model, tok, server: RedisServer, sentences: list[str], rows: int, repeats: int,
                 rows_table: list[dict]) -> dict:
    """lookup="auto" from a cold local bank against a Redis warm with the stream's first half."""
    from bench.experiments import e2e

    stream = streams.repeat_stream(sentences, rows, 0.7, seed=3)
    batches = e2e.batches(tok, stream, BATCH, "cpu")
    half = len(batches) // 2
    first, second = batches[:half], batches[half:]
    probe = encode(tok, ["a probe sentence, not in the stream, run before the timed part"])
    client = server.client()
    variants = {"auto": lambda: llmcache.Shared(server.url, lookup="auto"),
                "always": lambda: llmcache.Shared(server.url, lookup="always"),
                # (queue=1: the writer takes one entry at a time and the rest are dropped, so this
                # times the lookups without the write path: what the lookup decision is about)
                "always_no_writes": lambda: llmcache.Shared(server.url, lookup="always", queue=1),
                "off": lambda: None}
    runs: dict = {v: [] for v in variants}
    for enc in second[:2]:
        model(**enc)  # warm-up (uncached)
    order = list(variants)
    for r in range(repeats):
        for v in order if r % 2 == 0 else order[::-1]:
            client.flushall()
            llmcache.accelerate(model, shared=llmcache.Shared(server.url, lookup="always"))
            for enc in first:
                model(**enc)
            assert llmcache.flush(model, 60)
            llmcache.disable(model)
            runs[v].append(run_second_half(model, second, variants[v](), probe))
    tokens = [int(m.sum()) for enc in second for m in enc["attention_mask"]]
    mean_tokens = sum(tokens) / len(tokens)
    auto = runs["auto"]
    skipped = median(x["shared"]["skipped"].get("not_worth", 0) for x in auto)
    looked = median(x["shared"]["lookups"] for x in auto)
    lengths = [x["tokens"] for x in rows_table]
    diff = [x["compute_per_row_s"] - x["shared_per_row_s"] for x in rows_table]
    breakeven_worth = diff_at(lengths, diff, mean_tokens) > 0
    auto_looked_up = looked >= skipped
    t = {v: median(x["s"] for x in runs[v]) for v in variants}
    timing_worth = t["always_no_writes"] < t["off"]
    result = {
        "model": name, "rows": sum(len(e["input_ids"]) for e in second), "mean_tokens": mean_tokens,
        "auto_lookups": looked, "auto_skipped_not_worth": skipped,
        "auto_shared_hits": median(x["shared"]["hits"] for x in auto),
        "always_shared_hits": median(x["shared"]["hits"] for x in runs["always"]),
        "always_no_writes_shared_hits": median(x["shared"]["hits"] for x in runs["always_no_writes"]),
        "auto_hits": median(x["hits"] for x in auto), "always_hits": median(x["hits"] for x in runs["always"]),
        "off_hits": median(x["hits"] for x in runs["off"]),
        "auto_compute_s_per_token": median(x["shared"]["compute_s_per_token"] for x in auto),
        "auto_round_trip_s": median(x["shared"]["round_trip_s"] for x in auto),
        "time_s": t, "auto_looked_up": auto_looked_up, "breakeven_says_worth": breakeven_worth,
        "timing_says_worth": timing_worth, "agrees_with_breakeven": auto_looked_up == breakeven_worth,
        "agrees_with_timing": auto_looked_up == timing_worth, "runs": runs,
    }
    print(f"[auto] {name}: looked up {looked} rows, skipped not_worth {skipped}, shared hits "
          f"{result['auto_shared_hits']} (always: {result['always_shared_hits']}); mean {mean_tokens:.1f} tokens/row; "
          f"break-even says {'worth' if breakeven_worth else 'not worth'}; times auto {t['auto']:.3f} s, always "
          f"{t['always']:.3f} s, off {t['off']:.3f} s", flush=True)
    return result


def row_states(model, tok, sentences: list[str]) -> list[bytes]:
    """The bytes an entry holds per row (the last block's output at its real tokens, float32)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), BATCH):
            enc = encode(tok, sentences[i : i + BATCH])
            h = model(**enc).last_hidden_state
            for r, m in enumerate(enc["attention_mask"]):
                out.append(h[r, m.bool()].contiguous().numpy().tobytes())
    return out


def measure_compression(name: str, model, tok, sentences: list[str], server: RedisServer, repeats: int) -> list[dict]:
    codecs = {"zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress)}
    try:
        import lz4.frame

        codecs["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    except ImportError:
        pass
    raw = row_states(model, tok, sentences)
    client = server.client()
    out = []
    for codec, (comp, decomp) in codecs.items():
        packed = [comp(x) for x in raw]
        assert all(decomp(p) == x for p, x in zip(packed, raw))
        tc = median(time_call(lambda comp=comp: [comp(x) for x in raw]) for _ in range(repeats)) / len(raw)
        td = median(time_call(lambda decomp=decomp, packed=packed: [decomp(p) for p in packed])
                    for _ in range(repeats)) / len(raw)
        n = min(BATCH, len(raw))
        keys_raw = [f"bench:raw:{i}".encode() for i in range(n)]
        keys_packed = [f"bench:{codec}:{i}".encode() for i in range(n)]
        client.mset(dict(zip(keys_raw, raw[:n])))
        client.mset(dict(zip(keys_packed, packed[:n])))
        mget_raw, mget_packed = [], []
        for r in range(max(30, repeats)):
            pair = ((keys_raw, mget_raw), (keys_packed, mget_packed))
            for keys, times in pair if r % 2 == 0 else pair[::-1]:
                times.append(time_call(lambda keys=keys: client.mget(keys)))
        saved = (median(mget_raw) - median(mget_packed)) / n
        raw_bytes, packed_bytes = sum(map(len, raw)), sum(map(len, packed))
        row = {"model": name, "codec": codec, "rows": len(raw), "raw_bytes_per_row": raw_bytes / len(raw),
               "ratio": raw_bytes / packed_bytes, "compress_per_row_s": tc, "decompress_per_row_s": td,
               "mget_raw_per_row_s": median(mget_raw) / n, "mget_packed_per_row_s": median(mget_packed) / n,
               "loopback_saved_per_row_s": saved, "read_path_net_s": saved - td, "pays_on_read": saved > td,
               "pays_overall": saved > td + tc}
        out.append(row)
        print(f"[compression] {name} {codec}: ratio {row['ratio']:.3f}, compress {fmt_ms(tc)} ms/row, decompress "
              f"{fmt_ms(td)} ms/row, loopback saved {fmt_ms(saved)} ms/row", flush=True)
    client.delete(*[k for k in client.scan_iter(match="bench:*")])
    return out


def breakeven(args, head: dict) -> dict:
    from bench.experiments import e2e

    models = ["tiny", "minilm"] if args.quick else ["tiny", "minilm", "bert-base"]
    lengths = [8, 32] if args.quick else [8, 32, 128]
    sentences = e2e.stream_sentences(args.data)
    rows, autos, comp = [], [], []
    with redis_server() as server:
        for name in models:
            model, tok = load_model(name, args.data)
            with torch.inference_mode():
                mine = measure_breakeven(name, model, server.url, lengths, args.repeats)
                rows += mine
                if name in ("tiny", "minilm"):
                    autos.append(measure_auto(name, model, tok, server, sentences, 512 if args.quick else 2048,
                                              args.repeats, mine))
            if name in ("minilm", "bert-base"):
                comp += measure_compression(name, model, tok, sentences[: 64 if args.quick else 256], server,
                                            args.repeats)
            del model
    per_model = {}
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        per_model[name] = interpolate_breakeven([r["tokens"] for r in mine],
                                                [r["compute_per_row_s"] - r["shared_per_row_s"] for r in mine])
    table = [{"model": r["model"], "tokens/row": r["tokens"], "compute ms/row": fmt_ms(r["compute_per_row_s"]),
              "shared hit ms/row": fmt_ms(r["shared_per_row_s"]), "local hit ms/row": fmt_ms(r["local_per_row_s"]),
              "compute / shared hit": f"{r['compute_over_shared']:.2f}", "MGET ms (32 rows)": fmt_ms(r["mget_s"]),
              "bytes/row": f"{r['bytes_per_row']:.0f}", "all served from Redis": r["served_from_redis"],
              "bit-identical": r["bit_identical"],
              "break-even tokens/row": (f"{per_model[r['model']]:.1f}" if isinstance(per_model[r["model"]], float)
                                        else per_model[r["model"]])} for r in rows]
    auto_table = [{"model": a["model"], "rows": a["rows"], "mean tokens/row": f"{a['mean_tokens']:.1f}",
                   "auto: looked up": a["auto_lookups"], "auto: skipped not_worth": a["auto_skipped_not_worth"],
                   "auto: shared hits": a["auto_shared_hits"], "always: shared hits": a["always_shared_hits"],
                   "time auto s": f"{a['time_s']['auto']:.3f}", "time always s": f"{a['time_s']['always']:.3f}",
                   "time always, writes dropped s": f"{a['time_s']['always_no_writes']:.3f}",
                   "time off s": f"{a['time_s']['off']:.3f}",
                   "auto's estimates: compute s/token, round trip ms":
                       f"{a['auto_compute_s_per_token']:.2e}, {fmt_ms(a['auto_round_trip_s'])}",
                   "break-even says": "worth" if a["breakeven_says_worth"] else "not worth",
                   "timing says": "worth" if a["timing_says_worth"] else "not worth",
                   "auto did": "look up" if a["auto_looked_up"] else "skip",
                   "agrees (break-even / timing)": f"{a['agrees_with_breakeven']} / {a['agrees_with_timing']}"}
                  for a in autos]
    comp_table = [{"model": c["model"], "codec": c["codec"], "raw B/row": f"{c['raw_bytes_per_row']:.0f}",
                   "ratio": f"{c['ratio']:.3f}", "compress ms/row": fmt_ms(c["compress_per_row_s"], 4),
                   "decompress ms/row": fmt_ms(c["decompress_per_row_s"], 4),
                   "MGET raw ms/row": fmt_ms(c["mget_raw_per_row_s"], 4),
                   "MGET compressed ms/row": fmt_ms(c["mget_packed_per_row_s"], 4),
                   "loopback saved ms/row": fmt_ms(c["loopback_saved_per_row_s"], 4),
                   "pays on read": c["pays_on_read"], "pays overall": c["pays_overall"]} for c in comp]
    pays = [c for c in comp if c["pays_overall"]]
    conclusion = ("compression pays for " + ", ".join(f"{c['model']}/{c['codec']}" for c in pays) if pays else
                  "compression does not pay on loopback for any measured model/codec: the library ships none")
    notes = [
        (f"batch of {BATCH} distinct rows of synthetic token ids (no padding, mask all ones), {args.repeats} repeats, "
        "medians; (a) uncached = llmcache.bypass; (b) every row from Redis (reset, then a 1-row forward of another "
        "row outside the timing so the model fingerprint is not in (b)); (c) the same batch again (local hits); "
        "a and b/c alternate order per repeat. Shared(lookup='always', timeout=2.0) (not the default 50 ms, so "
        "that a slow MGET of a large batch on the busy machine cannot open the breaker mid-measurement); the "
        "slowest MGET measured: " + ", ".join(f"{r['model']}/{r['tokens']} {fmt_ms(r['mget_max_s'], 1)} ms"
                                              for r in rows) + "."),
        ("per-row cost = forward time / 32 (the forward's uncached parts, embeddings, are in every column). "
        "break-even: the row length where (b) = (a), linear between measured lengths; 'always': a shared hit is "
        "cheaper at every measured length, 'never': at none."),
        "the 1-row forward after llmcache.reset (it re-hashes every weight for the model fingerprint): " + ", ".join(
            f"{r['model']} {r['first_forward_after_reset_s']:.3f} s" for r in rows if r["tokens"] == lengths[0]),
        ("auto: repeat_stream (STS-B, 70 % repeats, seed 3); its first half written to Redis by an 'always' replica "
        "before each run (FLUSHALL first); the second half runs from a cold local bank with lookup 'auto', 'always' "
        "and without the shared tier ('off'), and 'always' with Shared(queue=1) so that nearly every write is "
        "dropped (the lookups' cost without the writer's); medians. 'timing says worth': 'always, writes dropped' "
        "is faster than 'off' (neither writes). auto decides by its own estimates: a lookup pays when recent hit "
        "rate x tokens looked up x compute_s_per_token > round_trip_s (SharedStats; the medians are in the table)."),
        f"compression: {conclusion}. Loopback saving = (MGET of 32 raw values - MGET of 32 compressed) / 32, "
        "medians of 30; compress runs on the writer thread, decompress on the read path."
        + ("" if any(c["codec"] == "lz4" for c in comp) else " lz4 is not installed: skipped."),
    ]
    return {"record": {"rows": rows, "breakeven_tokens": per_model, "auto": autos, "compression": comp,
                       "compression_conclusion": conclusion},
            "tables": [("Break-even: compute vs shared hit vs local hit (per row)", table),
                       ("lookup='auto' from a cold local bank against a warm Redis", auto_table),
                       ("Compression of states", comp_table)], "notes": notes}


# ---------------------------------------------------------------- soak
