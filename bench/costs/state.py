"""What `llmcache.state` costs per forward: the watch and the state header, in µs.

    python -m bench.costs.state [--calls 2000] [--loops 7] [--models minilm,minilm-lora,smollm2] [--out DIR]

Per model: `ModelState.check()` (what every routed forward runs: where the extension is built,
one C++ call, `watch_stamp`, and a comparison while nothing changed), the stamp alone, and the
Python path a check takes when something changed (`_check`), with its two parts, the watch
(`_look`: identities of every module, parameter and buffer of the tree, each tensor's version
counter and storage, quantized packed weights, merged LoRA adapters; then one comparison) and the
state header (`_header`: dtype, autocast, attention implementation, active adapters, precision
switches, user states), each timed in a loop of `--calls` calls, median of `--loops` loops. The
cost depends on how many modules and tensors the tree has, not on their sizes: a tiny-dims twin
of a model costs what the model costs. Models: the real MiniLM (6 blocks), MiniLM with LoRA
adapters on query/key/value/dense (peft), and SmolLM2-135M (30 blocks; its GGUF takes ~20 s to
load). Writes DIR/state-cpu.json (default bench/out/costs); nothing asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import llmcache
from bench.report import header, median, print_table, write_rows
from llmcache.models import load_minilm, load_smollm2
from llmcache.ops._library import extension


def per_call_us(fn, calls: int, loops: int) -> float:
    times = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return 1e6 * median(times)


def load(name: str):
    if name == "minilm":
        return load_minilm()[0]
    if name == "minilm-lora":
        import peft

        model = load_minilm()[0]
        config = peft.LoraConfig(r=8, target_modules=["query", "key", "value", "dense"])
        model = peft.get_peft_model(model, config, adapter_name="first")
        model.add_adapter("second", config)
        return model.eval()
    if name == "smollm2":
        return load_smollm2()[0]
    raise ValueError(f"unknown model {name!r}")


def measure(name: str, calls: int, loops: int) -> dict:
    model = llmcache.accelerate(load(name))
    state = llmcache.api.owner_of(model).state
    state.check()
    row = {
        "model": name,
        "modules": sum(1 for _ in model.modules()),
        "tensors": len(state.tensors),
        "tuner_layers": len(state.tuners),
        "check_us": per_call_us(state.check, calls, loops),
        "stamp_us": per_call_us(lambda: extension().watch_stamp(state.watched, state.device), calls, loops)
        if extension() is not None else None,
        "changed_check_us": per_call_us(state._check, calls, loops),
        "watch_us": per_call_us(lambda: state._look() == state._seen, calls, loops),
        "header_us": per_call_us(lambda: state._header(state.dtype, state.device), calls, loops),
    }
    llmcache.disable(model)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--loops", type=int, default=7)
    p.add_argument("--models", default="minilm,minilm-lora,smollm2")
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--out", type=Path, default=Path("bench/out/costs"))
    args = p.parse_args(argv)
    rows = [measure(name, args.calls, args.loops) for name in args.models.split(",")]
    print_table([{"model": r["model"], "modules": r["modules"], "tensors": r["tensors"], "LoRA": r["tuner_layers"],
                  "check µs": r["check_us"], "stamp µs": r["stamp_us"], "Python check µs": r["changed_check_us"],
                  "watch µs": r["watch_us"], "header µs": r["header_us"]} for r in rows],
                {"check µs": ".1f", "stamp µs": ".1f", "Python check µs": ".1f", "watch µs": ".1f", "header µs": ".1f"})
    write_rows(args.out / "state-cpu.json", header(args, "cpu", config=repr(llmcache.CacheConfig())), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
