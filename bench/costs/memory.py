"""Memory of the exact tier: what a stream of short distinct sentences holds, reserves and costs.

    python -m bench.costs.memory [--rows 2000] [--batch 32] [--device cpu|cuda] [--threads N] [--data DIR] [--out DIR]

The real MiniLM, default CacheConfig (exact tier), `--rows` distinct short sentences: the
shortest distinct rows (by MiniLM token count, [CLS] and [SEP] included) of STS-B's three splits,
in a seeded random order (without the data directory: the packaged demo corpus), in batches of
`--batch` under inference_mode. Every row misses and is inserted, so at the end the cache holds
one entry per row. Reported beside the previous layout's figures (issue 12: per layer, every
entry reserved max_tokens = 64 positions, all allocated at the first insert: 576 MiB of banks for
MiniLM, 1,024 entries at most; `save` wrote 576.5 MiB after two rows; RSS stayed 200 MiB up
after `disable`):

- bytes held (stats.bytes), bytes reserved (stats.bytes_reserved), entries held;
- the bytes of the real-token states stored (sum over held entries of tokens x hidden x element
  size) and held / that (target <= 1.5; pages of `page_tokens` round each entry up);
- held in all (target <= 64 MiB);
- RSS growth of the process over the cached stream (after an uncached pass of the same batches,
  so the allocator and the model's own buffers are warm) against bytes held + 64 MiB;
- the `llmcache.save` file for N and 2N entries (the first half of the stream, then all of it):
  its size should follow the entries held;
- RSS after `llmcache.disable` and gc, against the baseline.

Targets print PASS/SHORT; nothing asserts. Rows and a header (date, machine, versions) go to
DIR/memory-minilm-<device>.json (default bench/out/costs).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.report import header, print_table, print_targets, target, write_rows
from llmcache.models import load_minilm

MIB = 2**20
# The previous layout (issue 12), MiniLM: 6 layers x 1,024 entries x 64 positions x 384 x 4 bytes.
PREVIOUS = {
    "bytes_reserved": 6 * 1024 * 64 * 384 * 4,
    "entries_max": 1024,
    "positions_per_entry": 64,
    "save_after_two_rows": int(576.5 * MIB),
    "rss_after_disable": 200 * MIB,
}


def rss() -> int:
    """Resident set size of this process in bytes (psutil, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read this process's RSS: pip install psutil")


def trimmed_rss() -> int | None:
    """RSS after glibc's malloc_trim(0) hands the heap's free pages back (None off glibc): what
    stays after `disable` but goes here was free memory the allocator kept, not a leak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss()


def distinct_sentences(tok, data: str | None) -> list[tuple[tuple[int, ...], str]]:
    """(token ids, sentence) of every sentence of STS-B's three splits with distinct ids (without
    the data directory: of llmcache's demo corpus), in file order."""
    folder = streams.data_dir(data) / "stsbenchmark"
    sentences = []
    for split in ("train", "dev", "test"):
        if (folder / f"sts-{split}.csv").exists():
            sentences += [s for _, a, b in streams.load_sts(split, data) for s in (a, b)]
    if not sentences:
        from llmcache.demo.texts import load_corpus

        corpus = load_corpus()
        print(f"{folder} has no STS-B split: sentences from llmcache's demo corpus instead", file=sys.stderr)
        sentences = corpus.sentences()
    by_ids = {}
    for sentence, ids in zip(sentences, tok(sentences)["input_ids"]):
        by_ids.setdefault(tuple(ids), sentence)
    return list(by_ids.items())


def short_sentences(tok, rows: int, data: str | None, seed: int = 0) -> list[str]:
    """The `rows` shortest sentences with distinct token ids, in a seeded random order."""
    distinct = distinct_sentences(tok, data)
    random.Random(seed).shuffle(distinct)  # ties of length in random order, then the stream order
    distinct.sort(key=lambda item: len(item[0]))
    if len(distinct) < rows:
        raise ValueError(f"only {len(distinct)} distinct sentences for a stream of {rows}")
    chosen = [sentence for _, sentence in distinct[:rows]]
    random.Random(seed + 1).shuffle(chosen)
    return chosen


def encode(tok, sentences: list[str], size: int, device: str) -> list[dict]:
    """Batches of `size` as the tokenizer gives them (ids, mask, token types), padded, on `device`."""
    return [{k: v.to(device) for k, v in tok(sentences[i : i + size], padding=True, return_tensors="pt").items()}
            for i in range(0, len(sentences), size)]


def run(model, encoded: list[dict], sample=None) -> None:
    for enc in encoded:
        model(**enc)
        if sample is not None:
            sample()


def real_token_bytes(model) -> tuple[int, int]:
    """(tokens, bytes) of the real-token states the held entries stand for: tokens x hidden x size."""
    weight = model.get_input_embeddings().weight
    tokens = sum(len(entry.ids) for entry in llmcache.held(model).entries)
    return tokens, tokens * weight.shape[1] * weight.element_size()


def save_size(model, folder: str, name: str) -> int:
    path = os.path.join(folder, name)
    llmcache.save(model, path)
    return os.path.getsize(path)


def measure(model, encoded: list[dict], config: llmcache.CacheConfig) -> dict:
    """Hold the whole stream, then the first half, and measure what each holds and costs."""
    gc.collect()
    run(model, encoded)  # uncached: the allocator and the model's own buffers warm up
    gc.collect()
    baseline = rss()
    peak = [baseline]
    llmcache.accelerate(model, config)
    start = time.perf_counter()
    run(model, encoded, sample=lambda: peak.append(rss()))
    stream_s = time.perf_counter() - start
    gc.collect()
    after = rss()
    s = llmcache.stats(model)
    tokens, real = real_token_bytes(model)
    with tempfile.TemporaryDirectory() as folder:
        size_2n = save_size(model, folder, "all.safetensors")
        entries_2n = s.entries
        llmcache.disable(model)
        gc.collect()
        after_disable = rss()
        after_trim = trimmed_rss()
        llmcache.accelerate(model, config)
        run(model, encoded[: len(encoded) // 2])
        entries_n = llmcache.stats(model).entries
        tokens_n, real_n = real_token_bytes(model)
        size_n = save_size(model, folder, "half.safetensors")
        llmcache.disable(model)
    return {
        "stream_s": stream_s,
        "rows": s.rows,
        "hits": s.hits,
        "entries": s.entries,
        "insertions": s.insertions,
        "evictions": s.evictions,
        "not_cached": s.not_cached,
        "bytes_held": s.bytes,
        "bytes_reserved": s.bytes_reserved,
        "real_tokens": tokens,
        "real_token_bytes": real,
        "held_over_real": s.bytes / real if real else float("nan"),
        "rss_baseline": baseline,
        "rss_growth": after - baseline,
        "rss_peak_growth": max(peak) - baseline,
        "rss_after_disable_growth": after_disable - baseline,
        "rss_after_trim_growth": None if after_trim is None else after_trim - baseline,
        "save_entries": [entries_n, entries_2n],
        "save_real_token_bytes": [real_n, real],
        "save_tokens": [tokens_n, tokens],
        "save_bytes": [size_n, size_2n],
    }


def table(r: dict, page_tokens: int) -> tuple[list[dict], list[dict]]:
    """Printable rows (metric, now, previous layout) and the targets."""
    mib = lambda b: f"{b / MIB:8.2f} MiB"
    mean_tokens = r["real_tokens"] / max(r["entries"], 1)
    (en, e2n), (sn, s2n) = r["save_entries"], r["save_bytes"]
    size_ratio, entry_ratio = s2n / sn, e2n / en
    rows = [
        {"metric": "entries held", "now": f"{r['entries']}", "previous": f"{PREVIOUS['entries_max']} at most"},
        {"metric": "mean real tokens per entry", "now": f"{mean_tokens:.2f}",
         "previous": f"{PREVIOUS['positions_per_entry']} positions reserved"},
        {"metric": "bytes held (stats.bytes)", "now": mib(r["bytes_held"]), "previous": mib(PREVIOUS["bytes_reserved"])},
        {"metric": "bytes reserved", "now": mib(r["bytes_reserved"]), "previous": mib(PREVIOUS["bytes_reserved"])},
        {"metric": "real-token states stored", "now": mib(r["real_token_bytes"]), "previous": "-"},
        {"metric": "held / real-token states", "now": f"{r['held_over_real']:.3f}",
         "previous": f"{PREVIOUS['positions_per_entry'] / mean_tokens:.1f} per layer (64 / tokens)"},
        {"metric": "RSS growth over the stream", "now": mib(r["rss_growth"]), "previous": "-"},
        {"metric": "RSS peak growth over the stream", "now": mib(r["rss_peak_growth"]), "previous": "-"},
        {"metric": "RSS after disable + gc", "now": mib(r["rss_after_disable_growth"]),
         "previous": mib(PREVIOUS["rss_after_disable"])},
        {"metric": "RSS after disable + malloc_trim", "now": "-" if r["rss_after_trim_growth"] is None
         else mib(r["rss_after_trim_growth"]), "previous": "-"},
        {"metric": f"save file, {en} entries", "now": mib(sn), "previous": mib(PREVIOUS["save_after_two_rows"])},
        {"metric": f"save file, {e2n} entries", "now": mib(s2n), "previous": mib(PREVIOUS["save_after_two_rows"])},
        {"metric": "save size ratio / entries ratio", "now": f"{size_ratio / entry_ratio:.3f}", "previous": "-"},
    ]
    budget = r["bytes_held"] + 64 * MIB
    targets = [
        target("held <= 1.5 x real-token states", r["held_over_real"], 1.5,
               f"{r['bytes_held']} B held for {r['real_token_bytes']} B of states, pages of {page_tokens} tokens",
               below=True),
        target("held <= 64 MiB", r["bytes_held"] / MIB, 64, mib(r["bytes_held"]).strip(), below=True),
        target("RSS growth <= held + 64 MiB", r["rss_growth"] / MIB, budget / MIB,
               f"grew {mib(r['rss_growth']).strip()}, peak {mib(r['rss_peak_growth']).strip()}", below=True),
        # The file holds keys and states of the entries: twice the entries, about twice the bytes.
        target("save size ratio within 10 % of entries ratio", abs(size_ratio / entry_ratio - 1), 0.1,
               f"{sn} B for {en} entries, {s2n} B for {e2n} entries", below=True),
    ]
    return rows, targets


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--batch, --device, --data, --threads and --out: the arguments of a MiniLM run on STS-B sentences."""
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="data directory (default $LLMCACHE_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a machine shared with other jobs, 1 keeps "
                        "one forward from waiting on a descheduled thread)")
    p.add_argument("--out", type=Path, default=Path("bench/out/costs"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    add_run_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_minilm(args.device)
    sentences = short_sentences(tok, args.rows, args.data)
    encoded = encode(tok, sentences, args.batch, args.device)
    config = llmcache.CacheConfig()
    with torch.inference_mode():
        result = measure(model, encoded, config)
    rows, targets = table(result, config.page_tokens)
    print(f"MiniLM, {args.rows} distinct short sentences in batches of {args.batch} on {args.device}, "
          f"exact tier, default config ({result['stream_s']:.1f} s cached)")
    print_table([{"": r["metric"], "now": r["now"], "previous layout (issue 12)": r["previous"]} for r in rows],
                align="lrl")
    if args.device == "cuda":
        print("(on CUDA the states live in GPU memory: RSS rows measure the host side only)")
    print_targets(targets)
    write_rows(args.out / f"memory-minilm-{args.device}.json", header(args, args.device, config=repr(config)),
               [result | {"table": rows}], targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
