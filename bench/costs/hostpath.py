"""The host path of a forward on tiny-dims twins: what the cache's own work costs when arithmetic
is negligible (as a GPU forward looks from the host).

    python -m bench.costs.hostpath [--grid default|full | --configs TWIN:B:T ...] [--rounds 9] [--threads 1]
                                   [--device cpu|cuda] [--stages] [--ops] [--out FILE]

Twins (random weights, the real models' op graph with tiny widths): MiniLM's shape (BertModel, 6
blocks, hidden 48), BERT-base's (12 blocks, hidden 48) and a Llama (16 blocks, hidden 64). The
default grid: MiniLM at 1 x 16, 32 x 16 and 256 x 16 tokens, BERT-base at 32 x 128, Llama at
1 x 128 and 8 x 128; `--grid full` runs every twin at B in {1, 8, 32, 256} and T in {16, 128,
512} (Llama to B = 32). Per round and config, back to back: the forward uncached (`llmcache.bypass`),
a batch of new rows (a miss: every row computes and is stored), the same batch again (a whole-row
hit), where B > 1 a request as a stream with ~70 % repeats makes it (a mixed batch: the rows just
stored, the last 30 % of them replaced by new rows) beside its ideal (the new rows alone, uncached:
what a cache of final outputs computes), and for the Llama twin a batch whose first 90 % of tokens were cached by an earlier batch (a
prefix hit) beside its ideal (the suffix alone, uncached, against a copy of the prefix's own KV cache:
transformers' prompt-cache recipe without the copy) and one decode step after a prefill (`past_key_values` of T tokens, one new token:
uncached and cached, alternating which goes first). Then, as a long-running server's bank is, a
full bank: the twin accelerated again with a budget of four batches, warmed past it, and per round
the forward uncached beside a batch of new rows (a miss whose entries evict older ones). Medians over `--rounds` rounds, ms per forward, and the ratios to the uncached
forward of the same shape. It uses only `accelerate`, `disable`, `bypass` and `stats`, so the same file times
an older checkout of the package (PYTHONPATH) for a before/after comparison. On CUDA every timed
call is bracketed by a synchronisation. `--stages` adds the cache's own microseconds per
forward by stage (`bench.costs.stages`: it wraps internal functions, so it times this checkout
only; on the CPU the arena writes and reads are device work too). `--ops` adds the torch ops one forward
of each scenario dispatches (`bench.costs.ops`: kernels, i.e. a launch each on a GPU, and views), exact
on any machine. Writes JSON to `--out` (default: stdout only); nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import sys
import time

import torch
import transformers

import llmcache
from bench.report import median, print_table, write_json

DEFAULT_GRID = [("minilm", 1, 16), ("minilm", 32, 16), ("minilm", 256, 16), ("bert-base", 32, 128),
                ("llama", 1, 128), ("llama", 8, 128)]


def full_grid() -> list[tuple[str, int, int]]:
    return [(name, b, t) for name in ("minilm", "bert-base", "llama") for t in (16, 128, 512)
            for b in (1, 8, 32, 256) if not (name == "llama" and b > 32)]


def twin(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in ("minilm", "bert-base"):
        config = transformers.BertConfig(vocab_size=1000, hidden_size=48, num_hidden_layers=6 if name == "minilm" else 12,
                                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=512)
        return transformers.BertModel(config).eval().to(device)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=16, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval().to(device)


def clock(model, batch: dict, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_inputs(model, ids: torch.Tensor) -> dict:
    """One decode step after a prefill of `ids`: the next token with the prefill's KV cache, under
    the name the model takes it (`cache`, or `past_key_values` in older transformers)."""
    with llmcache.bypass(model):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long, device=ids.device)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {"input_ids": ids[:, -1:], "attention_mask": mask, name: cache}


def stage_times(model, new, rows: int, tokens: int, rounds: int, decoder: bool) -> dict:
    """The cache's own microseconds per forward by stage (`bench.costs.stages`), per scenario."""
    from bench.costs import stages

    fixed, out = new(), {}
    with torch.inference_mode():
        model(input_ids=fixed)
        cached = max(1, int(0.9 * tokens))
        batches = {"miss": lambda: new(), "hit": lambda: fixed}
        if rows > 1:
            batches["mixed"] = lambda: mixed(fixed, new())
        if decoder:
            batches["prefix_hit"] = lambda: torch.cat([fixed[:, :cached], new()[:, cached:]], dim=1)
        for scenario, batch in batches.items():
            with stages.timed(model) as timer:
                for _ in range(rounds):
                    ids = batch()
                    with timer.forward():
                        model(input_ids=ids)
            out[scenario] = timer.per_forward()
    return out


def new_rows(rows: int) -> int:
    """How many rows of a mixed batch of `rows` are new: the last 30 %, at least one."""
    return max(1, round(0.3 * rows))


def mixed(stored: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """`stored`'s rows with the last `new_rows` taken from `fresh`: ~70 % repeats."""
    k = new_rows(stored.shape[0])
    return torch.cat([stored[:-k], fresh[-k:]])


def op_counts(model, new, tokens: int, decoder: bool) -> dict:
    """Ops one forward dispatches per scenario (`bench.costs.ops`): {scenario: {"kernels", "views"}}."""
    from bench.costs import ops

    fixed, out = new(), {}
    with torch.inference_mode():
        model(input_ids=fixed)
        cached = max(1, int(0.9 * tokens))
        batches = {"uncached": fixed, "miss": new(), "hit": fixed}
        if fixed.shape[0] > 1:
            batches["mixed"] = mixed(fixed, new())
        if decoder:
            batches["prefix_hit"] = torch.cat([fixed[:, :cached], new()[:, cached:]], dim=1)
        for scenario, batch in batches.items():
            with (llmcache.bypass(model) if scenario == "uncached" else contextlib.nullcontext()), \
                    ops.counted() as count:
                model(input_ids=batch)
            out[scenario] = {"kernels": count.kernels, "views": count.views}
    return out


def measure(name: str, rows: int, tokens: int, rounds: int, gen: torch.Generator, device: str,
            with_stages: bool = False, with_ops: bool = False) -> dict:
    model = llmcache.accelerate(twin(name, device))
    decoder = name == "llama"
    new = lambda: torch.randint(5, 1000, (rows, tokens), generator=gen).to(device)
    times: dict = {"uncached": [], "hit": [], "miss": []}
    if rows > 1:
        times.update({"mixed": [], "mixed_ideal": []})
    if decoder:
        times.update({"prefix_hit": [], "prefix_ideal": [], "decode_uncached": [], "decode": []})
    with torch.inference_mode():
        for _ in range(3):  # warm-up: shapes, arena
            ids = new()
            model(input_ids=ids)
            model(input_ids=ids)
        for _ in range(rounds):
            ids = new()
            with llmcache.bypass(model):
                times["uncached"].append(clock(model, {"input_ids": ids}, device))
            times["miss"].append(clock(model, {"input_ids": ids}, device))
            times["hit"].append(clock(model, {"input_ids": ids}, device))
            if rows > 1:
                batch = mixed(ids, new())
                times["mixed"].append(clock(model, {"input_ids": batch}, device))
                with llmcache.bypass(model):
                    times["mixed_ideal"].append(clock(model, {"input_ids": batch[-new_rows(rows):]}, device))
            if not decoder:
                continue
            cached = max(1, int(0.9 * tokens))
            prefix = torch.cat([ids[:, :cached], new()[:, cached:]], dim=1)  # the first 90 % cached
            times["prefix_hit"].append(clock(model, {"input_ids": prefix}, device))
            # Its ideal: the suffix alone against a copy of the prefix's own KV cache, uncached
            # (what the prompt-cache recipe of transformers runs, the copy made beforehand).
            with llmcache.bypass(model):
                cache = model(input_ids=ids[:, :cached], use_cache=True).past_key_values
                given = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                times["prefix_ideal"].append(clock(model, {"input_ids": prefix[:, cached:], given: cache}, device))
            step = decode_inputs(model, ids)
            # (A step extends the cache it is given: each call its own copy; which goes first alternates.)
            copies = [{k: copy.deepcopy(v) if k in ("cache", "past_key_values") else v for k, v in step.items()}
                      for _ in range(2)]
            for uncached in (True, False) if len(times["decode"]) % 2 else (False, True):
                if uncached:
                    with llmcache.bypass(model):
                        times["decode_uncached"].append(clock(model, copies[0], device))
                else:
                    times["decode"].append(clock(model, copies[1], device))
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    row = {"model": name, "rows": rows, "tokens": tokens, **{f"{k}_ms": v for k, v in ms.items()},
           "hit_over_uncached": ms["hit"] / ms["uncached"], "miss_over_uncached": ms["miss"] / ms["uncached"]}
    if rows > 1:
        row["mixed_over_uncached"] = ms["mixed"] / ms["uncached"]
        row["mixed_ideal_over_uncached"] = ms["mixed_ideal"] / ms["uncached"]
    if decoder:
        row["prefix_hit_over_uncached"] = ms["prefix_hit"] / ms["uncached"]
        row["prefix_ideal_over_uncached"] = ms["prefix_ideal"] / ms["uncached"]
        row["decode_over_uncached"] = ms["decode"] / ms["decode_uncached"]
    s = llmcache.stats(model)
    row.update({"hits": s.hits, "rows_seen": s.rows})
    if with_stages:
        row["stages_us"] = stage_times(model, new, rows, tokens, rounds, decoder)
    if with_ops:
        row["ops"] = op_counts(model, new, tokens, decoder)
    row.update(full_bank(llmcache.disable(model), new, rounds, device))
    return row


def full_bank(model, new, rounds: int, device: str) -> dict:
    """A miss into a full bank (each batch's entries evict older ones) beside the uncached
    forward: `model` accelerated again with a budget of four batches' entries."""
    with torch.inference_mode():
        llmcache.accelerate(model)
        model(input_ids=new())
        per_batch = llmcache.stats(model).bytes
        llmcache.disable(model)
        llmcache.accelerate(model, max_bytes=4 * per_batch)
        for _ in range(6):
            model(input_ids=new())
        times: dict = {"uncached": [], "miss": []}
        for _ in range(rounds):
            ids = new()
            with llmcache.bypass(model):
                times["uncached"].append(clock(model, {"input_ids": ids}, device))
            times["miss"].append(clock(model, {"input_ids": ids}, device))
        evictions = llmcache.stats(model).evictions
        llmcache.disable(model)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    return {"full_uncached_ms": ms["uncached"], "full_miss_ms": ms["miss"],
            "full_miss_over_uncached": ms["miss"] / ms["uncached"], "full_evictions": evictions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("default", "full"), default="default")
    p.add_argument("--configs", nargs="+", default=None, metavar="TWIN:B:T",
                   help="only these shapes (e.g. llama:8:128 minilm:256:16), instead of a grid")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--stages", action="store_true", help="also time the cache's own work by stage (bench.costs.stages)")
    p.add_argument("--ops", action="store_true", help="also count the ops each scenario dispatches (bench.costs.ops)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    grid = DEFAULT_GRID if args.grid == "default" else full_grid()
    if args.configs:
        grid = [(name, int(b), int(t)) for name, b, t in (c.split(":") for c in args.configs)]
    rows = [measure(name, b, t, args.rounds, gen, args.device, args.stages, args.ops) for name, b, t in grid]
    print(f"llmcache from {llmcache.__file__}")
    fmt = lambda v: "-" if v is None else v
    print_table([{"twin": r["model"], "B x T": f"{r['rows']} x {r['tokens']}", "uncached ms": r["uncached_ms"],
                  "hit ms": r["hit_ms"], "miss ms": r["miss_ms"], "hit/unc": r["hit_over_uncached"],
                  "miss/unc": r["miss_over_uncached"], "full miss/unc": r["full_miss_over_uncached"],
                  "mixed/unc": fmt(r.get("mixed_over_uncached")), "its ideal/unc": fmt(r.get("mixed_ideal_over_uncached")),
                  "prefix/unc": fmt(r.get("prefix_hit_over_uncached")),
                  "ideal/unc": fmt(r.get("prefix_ideal_over_uncached")),
                  "decode/unc": fmt(r.get("decode_over_uncached"))} for r in rows],
                {"uncached ms": ".2f", "hit ms": ".2f", "miss ms": ".2f", "hit/unc": ".3f", "miss/unc": ".3f",
                 "full miss/unc": ".3f", "mixed/unc": ".3f", "its ideal/unc": ".3f",
                 "prefix/unc": ".3f", "ideal/unc": ".3f", "decode/unc": ".3f"},
                "lrrrrrrrrrrrr")
    if args.stages:
        names = ["watch", "router", "host_copy", "keys", "index", "upload", "read", "splice", "merge", "commit",
                 "write", "suffix"]
        print_table([{"twin": r["model"], "B x T": f"{r['rows']} x {r['tokens']}", "case": case, "own us": v["own"],
                      "host us": v["host"], **{n: v[n] for n in names}} for r in rows for case, v in r["stages_us"].items()],
                    {n: ".0f" for n in ["own us", "host us"] + names}, "lll" + "r" * (len(names) + 2))
    if args.ops:
        print_table([{"twin": r["model"], "B x T": f"{r['rows']} x {r['tokens']}", "case": case, "kernels": v["kernels"],
                      "views": v["views"], "kernels - uncached": v["kernels"] - r["ops"]["uncached"]["kernels"]}
                     for r in rows for case, v in r["ops"].items()], {}, "lllrrr")
    if args.out:
        write_json(args.out, {"llmcache": llmcache.__file__, "torch": torch.__version__, "threads": args.threads,
                              "device": args.device, "grid": args.grid, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
