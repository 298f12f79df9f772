"""The paper's experiments: latency, hit rate by layer depth, and the threshold sweep.

    python -m bench.experiments.paper [latency|hitrate|sweep|heldout|all] [--data DIR] [--out DIR] [--quick]
                                      [--padding auto|exact|masked] [--models a,b]   (latency only)
                                      [--device cpu|cuda] [--threads N]

Each experiment writes DIR/experiments-<name>.json (a header: date, machine, versions,
llmcache.build_info(), arguments; then the rows) and DIR/experiments-<name>.md (the same header
and a table); hitrate and sweep also write a PNG (default DIR: bench/out/experiments). `--quick`
runs tiny sizes (a smoke test; its numbers mean nothing). The data directory defaults to
$LLMCACHE_DATA, else ../shared/data beside the repository (bench.streams.data_dir()).

latency — ms per inference (per row), batches of 32, cache off vs on in the same process
(bench.experiments.e2e.measure: a warm-up pass, a cold pass that allocates the banks, then `repeats`
interleaved off (llmcache.bypass) / on (after llmcache.reset) passes, medians; the ideal speedup
is Amdahl's from the measured per-layer hit rates and each block's share of the uncached time).
Stream: bench.streams.repeat_stream over the STS-B test sentences, 70 % of rows exact repeats
of earlier rows (seed 1). Models: BERT-base, DistilBERT and GPT-2 shapes (transformers' default
configs, random weights, seed 0; token ids from the MiniLM tokenizer; GPT-2 left-padded with
position_ids = cumsum(mask) - 1), and the real all-MiniLM-L6-v2 and SmolLM2-135M. Rows per model:
LATENCY_ROWS (SmolLM2 fewest: 30 layers). Default cache config (exact tier only).

hitrate — per-layer exact and semantic hit rates, semantic tier on at tau = 0.9 (exact tier on),
MiniLM and SmolLM2, banks that hold the whole stream (no eviction), default config otherwise.
Streams (seeded, `mixed_stream`): each row is, with probability 0.3, an exact repeat of a
uniformly chosen earlier row; with probability 0.4 a near duplicate of an earlier row; else (and
whenever no near duplicate is available) a new row.
  * STS-B: new rows are first sentences of the pairs with gold score >= 4 (close paraphrases;
    test, dev and train, as the test split alone has 338), in a seeded order; a near duplicate
    is the pair partner of an earlier row whose partner has not appeared yet (one per pair).
  * WikiText-2: new rows are sentences of wiki.test.raw (lines split at sentence ends, 8 to 48
    words; batches truncate at 64 tokens), in a seeded order; a near duplicate is an earlier new
    row with one uniformly chosen word dropped.
The realised shares of each kind are recorded. An uncached pass over the same stream gives each
row's deviation (1 - cosine of the masked-mean last hidden state of the base model), summarised
per kind of row: which rows the semantic tier changed, and by how much.

sweep — tau in SWEEP_TAUS x mode in {state, residual}, plus the exact-only default: hit rates,
speedup (uncached vs cached forwards over the same stream; off = median of an uncached pass
before and one after all configurations) and accuracy against the uncached model:
  (a) STS-B test, MiniLM: every sentence of the pairs (distinct, seeded shuffle) enters the stream
      once as a new row, with exact repeats of earlier rows at 70 % of rows in between
      (`stream_all`). Each sentence's embedding is its first occurrence's masked mean of the last
      hidden state; Spearman correlation (scipy) of the pairs' cosines with the gold scores;
      drop = uncached - cached, in points (x100).
  (b) WikiText-2 perplexity, SmolLM2: PPL_WINDOWS windows of PPL_TOKENS tokens at seeded
      distinct offsets of wiki.test.raw (tokenised whole, no special tokens), streamed the same
      way; perplexity over the distinct windows' first occurrences (next-token NLL, all tokens
      after the first of each window); rise = cached / uncached - 1, in %.
Every configuration starts from fresh banks (accelerate ... disable) sized to hold every distinct
row of the stream (capacity = distinct rows, max_bytes=None), so hit rates measure reuse, not
eviction. "rows changed" is the share of stream rows whose output moved (STS:
1 - cos > 1e-4; perplexity: mean NLL per token moved by > 1e-3). The frontier PNG plots speedup
against accuracy drop, one marker per (tau, mode) and a star for exact only.

heldout — the defaults on text that is in neither tuning set (the prose sentences of standard-library
docstrings, `heldout_sentences`), MiniLM: a stream with no repeats (the default must change no row)
and one with 70 % exact repeats; the default (exact tier only) beside tau in HELDOUT_TAUS (state
mode): hit rates and per-row fidelity (cosine of the mean-pooled embedding to the uncached one: mean,
minimum, share of rows below 0.99).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import llmcache
from bench import report, streams
from bench.experiments import e2e

BATCH = 32
REPEAT_RATE = 0.7
# Rows of the latency stream per model: about 6 min on 2 busy cores with one torch thread.
LATENCY_ROWS = {"minilm": 1024, "bert-base": 384, "distilbert": 512, "gpt2": 256, "smollm2": 256, "t5-base": 192,
                "vit-base": 96}
HITRATE_ROWS = {"minilm": 1024, "smollm2": 512, "t5-base": 256}
HITRATE_TAU = 0.9
SWEEP_TAUS = (0.75, 0.80, 0.85, 0.90, 0.95)
SWEEP_MODES = ("state", "residual")
PPL_WINDOWS, PPL_TOKENS = 48, 64
HELDOUT_ROWS = 512
HELDOUT_TAUS = (0.99, 0.95, 0.90)
# Held-out text: docstrings of these standard-library modules (CPython 3.11), in neither STS-B nor WikiText.
HELDOUT_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
                   "functools", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "random",
                   "shutil", "socket", "statistics", "subprocess", "tarfile", "textwrap", "threading", "typing",
                   "unittest", "urllib.request", "zipfile")
QUICK = {
    "latency_rows": {"minilm": 64, "bert-base": 64, "distilbert": 64, "gpt2": 64, "smollm2": 64, "t5-base": 32,
                     "vit-base": 32},
    "hitrate_rows": {"minilm": 128, "smollm2": 64, "t5-base": 32},
    "sts_pairs": 32,
    "ppl_windows": 8,
    "ppl_tokens": 16,
    "ppl_batch": 4,  # several batches, so that repeats can hit
    "heldout_rows": 96,
}


# ---------------------------------------------------------------- header and reports


def header(args: argparse.Namespace, device: str) -> dict:
    versions = {}
    for name in ("scipy", "matplotlib"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return report.header(args, device, versions=versions)


def write_report(out: Path, name: str, head: dict, record: dict, table: list[dict], notes: list[str]) -> Path:
    """DIR/experiments-<name>.json (header + record) and .md (header lines, notes, table); prints the table."""
    return report.write_report(out, f"experiments-{name}", head, record, [(None, table)], notes,
                               title=f"llmcache experiment: {name}")


# ---------------------------------------------------------------- models and streams

_MODELS: dict = {}


def load_model(name: str, device: str):
    """(model, tokenizer): the real models are loaded once per process (they are disabled after
    every use, which restores them exactly); the random-weight ones are built on each call."""
    if name in _MODELS:
        return _MODELS[name]
    if name == "distilbert":
        from transformers import DistilBertConfig, DistilBertModel

        tok = e2e.random_weight_tokenizer()  # MiniLM's tokenizer without loading its model
        torch.manual_seed(0)
        return DistilBertModel(DistilBertConfig()).eval().to(device), tok
    loaded = e2e.load(name, device, torch.float32)
    if name in ("minilm", "smollm2"):
        _MODELS[name] = loaded
    return loaded


def sts_sentences(data) -> list[str]:
    rows = streams.load_sts("test", data)
    return [s1 for _, s1, _ in rows] + [s2 for _, _, s2 in rows]


def wiki_sentences(data, min_words: int = 8, max_words: int = 48) -> list[str]:
    """WikiText-2 test lines split at sentence ends, kept when they have min..max words."""
    out = []
    for line in streams.load_wikitext(data):
        for sentence in re.split(r"(?<=[.!?]) (?=[A-Z])", line):
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
    return list(dict.fromkeys(out))


def mixed_stream(new_rows: list[str], near: Callable[[random.Random, str], str | None], length: int, seed: int,
                 repeat: float = 0.3, near_rate: float = 0.4, once: bool = False) -> tuple[list[str], list[str], list[int]]:
    """(rows, kinds, origins): each row is, with probability `repeat`, an exact repeat of a uniformly
    chosen earlier row ("repeat"); with probability `near_rate`, `near(rng, source)` of a uniformly
    chosen earlier new row ("near"; when it gives None or a text already in the stream, or there
    is no source, a new row instead); else the next of `new_rows` ("new"). origins[i] is the index
    of the row that row i repeats or varies (-1 for new rows). `once`: each source gives one near
    duplicate at most."""
    rng = random.Random(seed)
    fresh = iter(new_rows)
    rows: list[str] = []
    kinds: list[str] = []
    origins: list[int] = []
    sources: list[int] = []  # indices of the new rows
    seen: set[str] = set()
    for _ in range(length):
        draw = rng.random()
        text, kind, origin = None, "new", -1
        if rows and draw < repeat:
            origin = rng.randrange(len(rows))
            text, kind = rows[origin], "repeat"
        elif sources and draw < repeat + near_rate:
            pick = rng.randrange(len(sources))
            variant = near(rng, rows[sources[pick]])
            if variant is not None and variant not in seen:
                text, kind, origin = variant, "near", sources[pick]
                if once:
                    sources.pop(pick)
        if text is None:
            text = next(fresh, None)
            while text in seen:  # a new row is new: skip one that a near duplicate already produced
                text = next(fresh, None)
            if text is None:
                raise ValueError(f"mixed_stream: the new rows ran out after {len(rows)} of {length} rows")
            sources.append(len(rows))
        rows.append(text)
        kinds.append(kind)
        origins.append(origin)
        seen.add(text)
    return rows, kinds, origins


def stream_all(items: list, repeat_rate: float, seed: int) -> list:
    """Every item once, in order, as a new row; before each, while a draw is < repeat_rate, an exact
    repeat of a uniformly chosen earlier row (so repeats are about repeat_rate of all rows)."""
    rng = random.Random(seed)
    stream: list = []
    for item in items:
        while stream and rng.random() < repeat_rate:
            stream.append(rng.choice(stream))
        stream.append(item)
    return stream


def mean_pooled(enc: dict, output) -> torch.Tensor:
    """[B, D]: the masked mean of the last hidden state (sentence-transformers' pooling)."""
    mask = enc["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1)


def timed_pass(model, encoded: list[dict], device: str, readout: Callable) -> tuple[float, torch.Tensor]:
    """Seconds spent in the model's forwards over the stream (the readout excluded), and the
    readouts of every row concatenated."""
    spent, outs = 0.0, []
    for enc in encoded:
        e2e.sync(device)
        start = time.perf_counter()
        output = model(**enc)
        e2e.sync(device)
        spent += time.perf_counter() - start
        outs.append(readout(enc, output).float().cpu())
    return spent, torch.cat(outs)


def cached_pass(model, encoded: list[dict], device: str, readout: Callable, config: llmcache.CacheConfig,
                runner=None) -> tuple[float, torch.Tensor, llmcache.CacheStats]:
    """One timed pass with `model` accelerated by `config` from fresh banks, then disabled:
    (seconds, readouts, stats). `runner`: the module to call (default the model itself; e.g. its
    base model to read hidden states)."""
    llmcache.accelerate(model, config)
    try:
        seconds, outputs = timed_pass(runner or model, encoded, device, readout)
        return seconds, outputs, llmcache.stats(model)
    finally:
        llmcache.disable(model)


# ---------------------------------------------------------------- latency


def latency(args, device: str) -> dict:
    rows_per_model = QUICK["latency_rows"] if args.quick else LATENCY_ROWS
    repeats = 1 if args.quick else args.repeats
    sentences = sts_sentences(args.data)
    config = llmcache.CacheConfig(padding=args.padding)
    results, table = [], []
    wanted = args.models.split(",") if args.models else list(rows_per_model)
    for name, rows in ((n, r) for n, r in rows_per_model.items() if n in wanted):
        model, tok = load_model(name, device)
        stream = streams.repeat_stream(sentences, rows, REPEAT_RATE, seed=1)
        encoded = e2e.batches(tok, stream, BATCH, device, model)
        _, _, blocks = llmcache.adapters.resolve(model)
        started = time.perf_counter()
        with torch.inference_mode():
            r = e2e.measure(model, encoded, device, repeats, config)
        r.update(model=name, rows=rows, layers=len(blocks), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                 wall_s=time.perf_counter() - started)
        results.append(r)
        table.append({
            "model": name, "params (M)": f"{r['params_m']:.0f}", "layers": r["layers"], "rows": rows,
            "off ms/row": f"{1e3 * r['off_s'] / rows:.2f}", "on ms/row": f"{1e3 * r['on_s'] / rows:.2f}",
            "speedup": f"{r['speedup']:.2f}x", "ideal": f"{r['ideal_speedup']:.2f}x",
            "of ideal": f"{100 * r['fraction_of_ideal']:.0f}%", "hit rate": f"{100 * r['hit_rate']:.1f}%",
            "bank MiB (allocated)": f"{r['bytes'] / 2**20:.0f}",
        })
        print(f"latency {name}: {r['wall_s']:.0f} s", flush=True)
        del model
    notes = [(f"stream: repeat_stream over STS-B test sentences, {100 * REPEAT_RATE:.0f}% exact repeats, seed 1; "
             f"batch {BATCH}; median of {repeats} off/on pairs; CacheConfig(padding={args.padding!r}) (exact tier)")]
    name = "latency" if args.padding == "auto" else f"latency-padding-{args.padding}"
    write_report(Path(args.out), name, header(args, device), {"config": repr(config), "results": results},
                 table, notes)
    return {"results": results}


# ---------------------------------------------------------------- hit rate by depth


def hitrate_streams(args, tok_name: str) -> dict:
    rows_wanted = (QUICK["hitrate_rows"] if args.quick else HITRATE_ROWS)[tok_name]
    pairs = [(s1, s2) for split in ("test", "dev", "train") for score, s1, s2 in streams.load_sts(split, args.data)
             if score >= 4.0]
    random.Random(2).shuffle(pairs)
    partner = {}
    for s1, s2 in pairs:
        partner.setdefault(s1, s2)
        partner.setdefault(s2, s1)
    sts_new = list(dict.fromkeys(s1 for s1, _ in pairs))

    wiki = wiki_sentences(args.data)
    random.Random(3).shuffle(wiki)

    def drop_word(rng: random.Random, text: str) -> str | None:
        words = text.split()
        del words[rng.randrange(len(words))]
        return " ".join(words)

    return {
        "sts-b": mixed_stream(sts_new, lambda rng, s: partner.get(s), rows_wanted, seed=4, once=True),
        "wikitext-2": mixed_stream(wiki, drop_word, rows_wanted, seed=5),
    }


def hitrate(args, device: str) -> dict:
    results, table = [], []
    for name in ("minilm", "smollm2", "t5-base"):  # T5: its encoder's blocks
        model, tok = load_model(name, device)
        for dataset, (stream, kinds, origins) in hitrate_streams(args, name).items():
            config = cache_config(HITRATE_TAU, capacity=len(stream))
            encoded = e2e.batches(tok, stream, BATCH, device)
            lengths = [int(n) for enc in encoded for n in enc["attention_mask"].sum(1)]
            _, base, _ = llmcache.adapters.resolve(model)  # hidden states, not logits: hit rates are the same
            with torch.inference_mode():
                _, uncached = timed_pass(base, encoded, device, mean_pooled)
                seconds, cached, stats = cached_pass(model, encoded, device, mean_pooled, config, runner=base)
            deviation = 1 - torch.nn.functional.cosine_similarity(cached.double(), uncached.double(), dim=1)
            by_kind = {}
            for kind in ("new", "repeat", "near"):
                rows = torch.tensor([k == kind for k in kinds])
                changed = rows & (deviation > 1e-4)
                by_kind[kind] = {"rows": int(rows.sum()), "changed": int(changed.sum()) / max(int(rows.sum()), 1),
                                 "changed_deviation": float(deviation[changed].mean()) if changed.any() else 0.0}
            depth = len(stats.layers)
            layers = [{
                "layer": s.layer, "depth": s.layer / max(depth - 1, 1), "lookups": s.lookups,
                "exact_rate": s.exact_hits / s.lookups if s.lookups else 0.0,
                "semantic_rate": s.semantic_hits / s.lookups if s.lookups else 0.0,
            } for s in stats.layers]
            near_same_length = _near_same_length(kinds, origins, lengths)
            shares = {k: kinds.count(k) / len(kinds) for k in ("new", "repeat", "near")}
            results.append({"model": name, "dataset": dataset, "config": repr(config), "rows": len(stream), "shares": shares,
                            "near_same_token_count": near_same_length, "seconds": seconds, "by_kind": by_kind,
                            "hit_rate": stats.hit_rate, "layers": layers})
            for row in layers:
                table.append({
                    "model": name, "dataset": dataset, "layer": row["layer"], "depth": f"{row['depth']:.2f}",
                    "exact %": f"{100 * row['exact_rate']:.1f}", "semantic %": f"{100 * row['semantic_rate']:.1f}",
                })
            print(f"hitrate {name} {dataset}: rows {len(stream)} shares "
                  + " ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
                  + f", near duplicates with the source's token count {100 * near_same_length:.0f}%", flush=True)
    out = Path(args.out)
    bits = llmcache.CacheConfig().num_bits
    notes = [(f"tau {HITRATE_TAU} (Hamming radius {llmcache.ops.hamming_radius(HITRATE_TAU, bits)} of {bits} bits), "
              "exact tier on, banks that hold the whole stream (capacity = rows, max_bytes=None), default CacheConfig "
              "otherwise; stream recipe in the docstring")]
    notes += [f"{r['model']} {r['dataset']}: {r['rows']} rows, new/repeat/near "
              + "/".join(f"{100 * r['shares'][k]:.0f}%" for k in ("new", "repeat", "near"))
              + f"; near duplicates with their source's token count: {100 * r['near_same_token_count']:.0f}%; "
              f"all-layer hit rate {100 * r['hit_rate']:.1f}%; rows whose output moved (1 - cos > 1e-4 vs uncached), "
              "new/repeat/near: " + "/".join(f"{100 * r['by_kind'][k]['changed']:.0f}%" for k in ("new", "repeat", "near"))
              + ", their mean 1 - cos: "
              + "/".join(f"{r['by_kind'][k]['changed_deviation']:.3f}" for k in ("new", "repeat", "near"))
              for r in results]
    write_report(out, "hitrate", header(args, device), {"results": results}, table, notes)
    plot_hitrate(results, out / "experiments-hitrate.png")
    return {"results": results}


def _near_same_length(kinds: list[str], origins: list[int], lengths: list[int]) -> float:
    """Share of near duplicates with their source's token count: an upper bound on the near
    duplicates the semantic tier can serve from their source (an entry only answers rows of the
    same token count)."""
    near = [i for i, kind in enumerate(kinds) if kind == "near"]
    return sum(lengths[i] == lengths[origins[i]] for i in near) / len(near) if near else 0.0


def plot_hitrate(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        x = [row["depth"] for row in r["layers"]]
        label = f"{r['model']} / {r['dataset']}"
        ax.plot(x, [100 * row["exact_rate"] for row in r["layers"]], "-", color=color, label=f"{label}: exact")
        ax.plot(x, [100 * row["semantic_rate"] for row in r["layers"]], "--", color=color,
                label=f"{label}: semantic")
    ax.set_xlabel("layer depth (index / (layers - 1))")
    ax.set_ylabel("hit rate (% of lookups)")
    ax.set_title(f"llmcache hit rate by depth (tau = {HITRATE_TAU}, exact tier on)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------- sweep


def cache_config(tau: float | None, mode: str = "state", capacity: int | None = None) -> llmcache.CacheConfig:
    """The config of one run: the per-block tier at threshold `tau` (None: the default, exact tier
    only), entries bounded by `capacity` alone."""
    layerwise = llmcache.Layerwise(threshold=tau, mode=mode) if tau is not None else None
    return llmcache.CacheConfig(layerwise=layerwise, capacity=capacity, max_bytes=None)


def sweep_configs() -> list[tuple[str, float | None, str]]:
    """(label, tau, mode): the exact-only default first, then every (tau, mode)."""
    return [("exact only", None, "state")] + [(f"tau {t:.2f}", t, m) for m in SWEEP_MODES for t in SWEEP_TAUS]


def sweep_task(model, encoded: list[dict], device: str, readout: Callable, capacity: int) -> dict:
    """Uncached reference (timed), every sweep configuration cached from fresh banks (timed, with its
    readouts and stats), then a second uncached pass (timed)."""
    with torch.inference_mode():
        for enc in encoded[:4]:  # warm-up
            model(**enc)
        off_first, reference = timed_pass(model, encoded, device, readout)
        runs = []
        for label, tau, mode in sweep_configs():
            config = cache_config(tau, mode, capacity=capacity)
            seconds, outputs, stats = cached_pass(model, encoded, device, readout, config)
            runs.append({"label": label, "tau": tau, "mode": mode, "on_s": seconds, "outputs": outputs,
                         "hit_rate": stats.hit_rate, "exact_rate": stats.exact_hits / max(stats.lookups, 1),
                         "semantic_rate": stats.semantic_hits / max(stats.lookups, 1),
                         "layer_hit_rates": [s.hit_rate for s in stats.layers]})
            print(f"  {label:10} {mode:8} hit {100 * stats.hit_rate:5.1f}% "
                  f"(semantic {100 * runs[-1]['semantic_rate']:4.1f}%) {seconds:6.1f} s", flush=True)
        off_last, _ = timed_pass(model, encoded, device, readout)
    return {"off_all": [off_first, off_last], "off_s": report.median([off_first, off_last]),
            "reference": reference, "runs": runs}


def sts_task(args, device: str) -> dict:
    from scipy.stats import spearmanr

    pairs = streams.load_sts("test", args.data)
    if args.quick:
        pairs = pairs[: QUICK["sts_pairs"]]
    distinct = list(dict.fromkeys(s for _, s1, s2 in pairs for s in (s1, s2)))
    random.Random(6).shuffle(distinct)
    stream = stream_all(distinct, REPEAT_RATE, seed=7)
    first = {}
    for i, sentence in enumerate(stream):
        first.setdefault(sentence, i)
    model, tok = load_model("minilm", device)
    encoded = e2e.batches(tok, stream, BATCH, device)

    gold = [score for score, _, _ in pairs]
    left = [first[s1] for _, s1, _ in pairs]
    right = [first[s2] for _, _, s2 in pairs]

    def spearman(embeddings: torch.Tensor) -> float:
        cos = torch.nn.functional.cosine_similarity(embeddings[left].double(), embeddings[right].double(), dim=1)
        return float(spearmanr(cos.numpy(), gold).statistic)

    print(f"sweep sts-b/minilm: {len(pairs)} pairs, {len(distinct)} distinct sentences, stream {len(stream)} rows",
          flush=True)
    task = sweep_task(model, encoded, device, mean_pooled, capacity=len(distinct))
    base = spearman(task["reference"])
    for run in task["runs"]:
        outputs = run.pop("outputs")
        run["metric"] = spearman(outputs)
        run["drop"] = 100 * (base - run["metric"])
        deviation = 1 - torch.nn.functional.cosine_similarity(outputs.double(), task["reference"].double(), dim=1)
        run["rows_changed"] = float((deviation > 1e-4).double().mean())
        run["max_deviation"] = float(deviation.max())
    del task["reference"]
    return task | {"task": "sts-b spearman", "model": "minilm", "pairs": len(pairs), "distinct": len(distinct),
                   "rows": len(stream), "uncached": base, "metric_name": "Spearman", "drop_unit": "points"}


def ppl_task(args, device: str) -> dict:
    windows_wanted = QUICK["ppl_windows"] if args.quick else PPL_WINDOWS
    width = QUICK["ppl_tokens"] if args.quick else PPL_TOKENS
    batch_size = QUICK["ppl_batch"] if args.quick else BATCH
    model, tok = load_model("smollm2", device)
    text = (streams.data_dir(args.data) / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    starts = sorted(random.Random(8).sample(range(len(ids) // width), windows_wanted))
    windows = [ids[s * width : (s + 1) * width] for s in starts]
    stream = stream_all(list(range(windows_wanted)), REPEAT_RATE, seed=9)
    first = torch.tensor([stream.index(w) for w in range(windows_wanted)])
    encoded = []
    for i in range(0, len(stream), batch_size):
        batch = torch.stack([windows[w] for w in stream[i : i + batch_size]]).to(device)
        encoded.append({"input_ids": batch, "attention_mask": torch.ones_like(batch)})

    def readout(enc, output):  # summed next-token NLL per row
        logits = output.logits[:, :-1].float()
        targets = enc["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return nll.sum(1)

    tokens = windows_wanted * (width - 1)

    def perplexity(nll: torch.Tensor) -> float:
        return float(torch.exp(nll[first].double().sum() / tokens))

    print(f"sweep wikitext-2/smollm2: {windows_wanted} windows of {width} tokens, stream {len(stream)} rows", flush=True)
    task = sweep_task(model, encoded, device, readout, capacity=windows_wanted)
    base = perplexity(task["reference"])
    for run in task["runs"]:
        outputs = run.pop("outputs")
        run["metric"] = perplexity(outputs)
        run["drop"] = 100 * (run["metric"] / base - 1)
        moved = (outputs.double() - task["reference"].double()).abs() / (width - 1)
        run["rows_changed"] = float((moved > 1e-3).double().mean())
        run["max_deviation"] = float(moved.max())
    del task["reference"]
    return task | {"task": "wikitext-2 perplexity", "model": "smollm2", "windows": windows_wanted, "width": width,
                   "rows": len(stream), "uncached": base, "metric_name": "perplexity", "drop_unit": "%"}


def sweep(args, device: str) -> dict:
    tasks = [sts_task(args, device), ppl_task(args, device)]
    table = []
    for task in tasks:
        for run in task["runs"]:
            run["speedup"] = task["off_s"] / run["on_s"]
            table.append({
                "task": task["task"], "config": run["label"], "mode": run["mode"] if run["tau"] else "-",
                "hit %": f"{100 * run['hit_rate']:.1f}", "exact %": f"{100 * run['exact_rate']:.1f}",
                "semantic %": f"{100 * run['semantic_rate']:.1f}",
                "off ms/row": f"{1e3 * task['off_s'] / task['rows']:.2f}",
                "on ms/row": f"{1e3 * run['on_s'] / task['rows']:.2f}", "speedup": f"{run['speedup']:.2f}x",
                "metric": f"{run['metric']:.4f}",
                "drop": f"{run['drop']:+.2f} {task['drop_unit']}", "rows changed": f"{100 * run['rows_changed']:.1f}%",
            })
    notes = [
        f"{t['task']} ({t['model']}): {t['rows']} stream rows, uncached {t['metric_name']} {t['uncached']:.4f}; "
        f"off = median of {len(t['off_all'])} uncached passes ({', '.join(f'{s:.1f}' for s in t['off_all'])} s)"
        for t in tasks
    ]
    notes.append("drop: Spearman points lost (x100) for STS-B; perplexity rise in % for WikiText-2; "
                 "metric: Spearman or perplexity of the cached run")
    out = Path(args.out)
    write_report(out, "sweep", header(args, device), {"tasks": tasks}, table, notes)
    plot_frontier(tasks, out / "experiments-sweep.png")
    return {"tasks": tasks}


def plot_frontier(tasks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2))
    markers = {"state": "o", "residual": "^"}
    for ax, task in zip(np.atleast_1d(axes), tasks):
        for mode in SWEEP_MODES:
            runs = [r for r in task["runs"] if r["tau"] is not None and r["mode"] == mode]
            ax.plot([r["speedup"] for r in runs], [r["drop"] for r in runs], marker=markers[mode], linestyle="none",
                    label=f"mode {mode}")
            for r in runs:
                ax.annotate(f"{r['tau']:.2f}", (r["speedup"], r["drop"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        exact = [r for r in task["runs"] if r["tau"] is None]
        ax.plot([r["speedup"] for r in exact], [r["drop"] for r in exact], "k*", markersize=11, label="exact only")
        ax.axhline(0, color="grey", linewidth=0.6)
        if max(abs(r["drop"]) for r in task["runs"]) > 100:
            ax.set_yscale("symlog", linthresh=1.0)  # a perplexity rise can span 0 to 10^4 %
            ax.set_ylim(bottom=-0.5)
        ax.set_xlabel("speedup (uncached / cached time)")
        ax.set_ylabel(f"{task['metric_name']} drop ({task['drop_unit']})" if task["drop_unit"] == "points"
                      else f"{task['metric_name']} rise ({task['drop_unit']})")
        ax.set_title(f"{task['task']} ({task['model']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("llmcache: speed vs accuracy, tau annotated")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------- held-out text


def heldout_sentences() -> list[str]:
    """Prose sentences from the docstrings of HELDOUT_MODULES and their public members: 6 to 40
    words, starting with a capital letter, mostly letters, no code (>>>, =, ::, backticks), distinct."""
    import importlib
    import inspect
    import warnings

    out = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)]
        with warnings.catch_warnings():  # typing.io and typing.re warn when touched
            warnings.simplefilter("ignore", DeprecationWarning)
            for attr in sorted(vars(module)):
                member = getattr(module, attr)
                if not attr.startswith("_") and getattr(member, "__module__", None) == module.__name__:
                    docs.append(inspect.getdoc(member))
        for doc in filter(None, docs):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?]) (?=[A-Z])", text):
                    letters = sum(c.isalpha() or c.isspace() for c in sentence)
                    if (6 <= len(sentence.split()) <= 40 and sentence[0].isupper() and letters >= 0.9 * len(sentence)
                            and not any(mark in sentence for mark in (">>>", "=", "::", "`"))):
                        out.append(sentence)
    return list(dict.fromkeys(out))


def heldout(args, device: str) -> dict:
    """The defaults on text in neither tuning set: how many rows come back changed."""
    rows = QUICK["heldout_rows"] if args.quick else HELDOUT_ROWS
    sentences = heldout_sentences()
    model, tok = load_model("minilm", device)
    configs = [("default (exact only)", None)] + [(f"tau {t:.2f}", t) for t in HELDOUT_TAUS]
    table, results = [], []
    for stream_name, stream in (
        ("no repeats", streams.unique_stream(sentences, rows, seed=11)),
        ("70% repeats", streams.repeat_stream(streams.unique_stream(sentences, rows, seed=12), rows, REPEAT_RATE, seed=13)),
    ):
        encoded = e2e.batches(tok, stream, BATCH, device)
        with torch.inference_mode():
            for enc in encoded[:4]:  # warm-up
                model(**enc)
            off_s, reference = timed_pass(model, encoded, device, mean_pooled)
            for label, tau in configs:
                config = cache_config(tau, capacity=rows)
                on_s, outputs, stats = cached_pass(model, encoded, device, mean_pooled, config)
                fidelity = torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=1)
                below = float((fidelity < 0.99).double().mean())
                results.append({"stream": stream_name, "config": label, "tau": tau, "rows": len(stream),
                                "hit_rate": stats.hit_rate, "semantic_rate": stats.semantic_hits / max(stats.lookups, 1),
                                "fidelity_mean": float(fidelity.mean()), "fidelity_min": float(fidelity.min()),
                                "below_099": below, "off_s": off_s, "on_s": on_s})
                table.append({"stream": stream_name, "config": label, "hit %": f"{100 * stats.hit_rate:.1f}",
                              "semantic %": f"{100 * results[-1]['semantic_rate']:.1f}",
                              "fidelity mean": f"{fidelity.mean():.5f}", "fidelity min": f"{fidelity.min():.5f}",
                              "rows < 0.99": f"{100 * below:.2f}%", "speedup": f"{off_s / on_s:.2f}x"})
                print(f"  {stream_name:11} {label:20} hit {100 * stats.hit_rate:5.1f}%  min fidelity "
                      f"{fidelity.min():.4f}  below 0.99 {100 * below:.2f}%", flush=True)
    notes = [(f"MiniLM, {len(sentences)} distinct held-out sentences (docstrings of {len(HELDOUT_MODULES)} standard-"
              f"library modules of Python {platform.python_version()}), streams of {rows} rows in batches of {BATCH}; "
              "fidelity: cosine of each row's mean-pooled embedding cached vs uncached; banks hold the whole stream"),
             "speedup: one timed pass each (indicative on a shared CPU)"]
    write_report(Path(args.out), "heldout", header(args, device), {"runs": results}, table, notes)
    return {"runs": results}


# ---------------------------------------------------------------- main

EXPERIMENTS = {"latency": latency, "hitrate": hitrate, "sweep": sweep, "heldout": heldout}


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", default="all", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--data", default=None, help="data directory (default $LLMCACHE_DATA or ../shared/data)")
    p.add_argument("--out", default="bench/out/experiments")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--repeats", type=int, default=3, help="off/on pairs per model in latency")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a shared, busy machine)")
    p.add_argument("--padding", default="auto", choices=["auto", "exact", "masked"],
                   help="latency: CacheConfig.padding (not auto: written as experiments-latency-padding-<it>)")
    p.add_argument("--models", default=None, help="latency: a comma-separated subset of its models")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    args.data = str(streams.data_dir(args.data))
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        for name in names:
            started = time.perf_counter()
            EXPERIMENTS[name](args, args.device)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting
    return 0


if __name__ == "__main__":
    sys.exit(main())
