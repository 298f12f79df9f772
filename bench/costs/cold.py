"""Cold inside a forward: what a host step costs at its first call in a forward beside an immediate
second call, and what an arena write costs into fresh memory beside writing the same rows again.

    python -m bench.costs.cold [--forwards 20] [--threads 1] [--out FILE]

On the tiny-dims twins of `bench.costs.hostpath` (MiniLM 32 x 16, Llama 1 x 128), accelerated, a
new batch per forward (misses into a growing bank, as the host-path bench's misses): each wrapped
step is timed where the forward calls it and then called once more at once with the same
arguments (its result dropped). Steps: the router's batch defaults (`router._fill_defaults`), the
whole-row keys (`rows.row_keys`, MiniLM), the page keys (`rows.page_keys`, Llama) and the arena
write (`PagedArena.write_tokens`: its second call writes the same rows again, already touched).
The gap between the two is what the forward's own work costs the step (its code and data evicted
from the CPU caches; for the write, the first touch of each 4 KiB page of arena memory). Medians
over `--forwards` after three warm-up forwards; µs. It wraps internal functions (bench code may),
so it times this checkout only. Writes JSON to `--out`; nothing asserts.
"""

from __future__ import annotations

import argparse
import time

import torch

import llmcache
from bench.costs.hostpath import twin
from bench.report import header, median, print_table, write_json
from llmcache import router
from llmcache import rows as rows_module
from llmcache.bank.arena import PagedArena

STEPS = [("batch defaults", router, "_fill_defaults"), ("row keys", rows_module, "row_keys"),
         ("page keys", rows_module, "page_keys"), ("arena write", PagedArena, "write_tokens")]


def measure(name: str, batch: int, tokens: int, forwards: int) -> list[dict]:
    model = llmcache.accelerate(twin(name, "cpu"))
    gen = torch.Generator().manual_seed(0)
    times: dict = {step: ([], []) for step, _, _ in STEPS}
    restore = []

    def timed(step: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            first = time.perf_counter() - start
            start = time.perf_counter()
            fn(*args, **kwargs)
            second = time.perf_counter() - start
            if recording:
                times[step][0].append(first)
                times[step][1].append(second)
            return out
        return wrapper

    for step, holder, attr in STEPS:
        original = getattr(holder, attr)
        restore.append((holder, attr, original))
        setattr(holder, attr, timed(step, original))
    recording = False
    try:
        with torch.inference_mode():
            for i in range(3 + forwards):
                recording = i >= 3
                model(input_ids=torch.randint(5, 1000, (batch, tokens), generator=gen))
    finally:
        for holder, attr, original in restore:
            setattr(holder, attr, original)
        llmcache.disable(model)
    return [{"model": name, "rows": batch, "tokens": tokens, "step": step, "calls": len(first),
             "first_us": 1e6 * median(first), "second_us": 1e6 * median(second),
             "first_over_second": median(first) / median(second)}
            for step, (first, second) in times.items() if first]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forwards", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure("minilm", 32, 16, args.forwards) + measure("llama", 1, 128, args.forwards)
    print_table([{"twin": f"{r['model']} {r['rows']} x {r['tokens']}", "step": r["step"], "first us": r["first_us"],
                  "second us": r["second_us"], "first/second": r["first_over_second"]} for r in rows],
                {"first us": ".1f", "second us": ".1f", "first/second": ".2f"}, "llrrr")
    if args.out:
        write_json(args.out, {"header": header(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
