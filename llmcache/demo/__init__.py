"""`llmcache demo`: a short tour of what the cache is for, on real models, each part against the
uncached model and its ideal.

    llmcache demo [--part embedding,chat,semantic,shared] [--rows 1024] [--device cpu|cuda]
                  [--out ./llmcache-demo] [--data DIR] [--threads N] [--seed 0]

  1. embedding  MiniLM through sentence-transformers on a query stream with Zipf-distributed
                repeats: throughput off / on beside the ideal, every embedding checked.
  2. chat       SmolLM2, three conversations sharing a system prompt: time to first token per
                prompt off / on, prompt tokens served from cached prefixes, identical answers.
  3. semantic   `llmcache.Semantic(tolerance, max_error)` calibrated on one stream and run on
                held-out text, beside the paper's unchecked thresholds: what it served, the
                bound it keeps, what breaking it would have cost.
  4. shared     two processes on one redis-server (where installed): the second serves what the
                first computed.

Each part writes a figure into --out; the tour prints one table and writes `README.md`,
`index.html` (the table and the figures) and `demo.json` (every number behind them). A part that
cannot run (a model package or redis-server missing) is skipped with the command that installs
it. --rows sets the embedding stream and the shared part's (a quarter of it) and the semantic
held-out stream (a third; calibration on twice that). Timings are one run on whatever else the
machine is doing: read the ratios, measured side by side, not the absolute times. On a CPU the
demo leaves the cores that other processes keep busy alone (--threads overrides): a PyTorch
thread that waits for a busy core stalls every op of the forward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import llmcache

from . import chat, embedding, semantic, shared
from .common import Skipped, load
from .figures import FIGURES
from .index import table, terminal, write
from .texts import load_corpus, sts_corpus, sts_folder

PARTS = ("embedding", "chat", "semantic", "shared")
MODULES = {"embedding": embedding, "chat": chat, "semantic": semantic, "shared": shared}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmcache demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in tour order (default: all of {', '.join(PARTS)})")
    p.add_argument("--rows", type=int, default=1024, help="queries in the embedding stream (default 1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="llmcache-demo", help="folder for the figures and the index (./llmcache-demo)")
    p.add_argument("--data", default=None,
                   help="a folder holding stsbenchmark/ (default: $LLMCACHE_DATA, else ../shared/data; "
                        "without it the bundled corpus)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: its own choice less the cores other processes keep "
                        "busy, sampled at the start: a thread that waits on a busy core stalls every op)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stream")
    args = p.parse_args(argv)
    args.part = [x.strip() for x in args.part.split(",") if x.strip()]
    unknown = [x for x in args.part if x not in PARTS]
    if unknown or not args.part:
        p.error(f"--part takes a comma-separated list of {', '.join(PARTS)}; got {unknown or 'nothing'}")
    args.part = [x for x in PARTS if x in args.part]
    if args.rows < 32:
        p.error("--rows must be >= 32")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    try:
        torch.device(args.device)
    except RuntimeError as error:
        p.error(f"--device: {error}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch")
    return args


class _Tour:
    """The parts, sharing the loaded models and texts."""

    def __init__(self, args: argparse.Namespace):
        self.args, self._sentence_model = args, None
        folder = sts_folder(args.data)
        corpus = sts_corpus(folder, "test") if folder else load_corpus()
        self.sentences, self.source = corpus.sentences(), (corpus.source if folder else "bundled corpus")

    def sentence_model(self):
        from ..models import load_sentence_minilm

        if self._sentence_model is None:
            self._sentence_model = load(load_sentence_minilm, self.args.device)
        return self._sentence_model

    def embedding(self) -> dict:
        a = self.args
        return embedding.run(self.sentence_model(), self.sentences, a.rows, a.device, a.seed, self.source)

    def chat(self) -> dict:
        from ..models import load_smollm2

        model, tokenizer = load(load_smollm2, self.args.device)
        return chat.run(model, tokenizer, self.args.device)

    def semantic(self) -> dict:
        a = self.args
        return semantic.run(self.sentence_model(), max(64, a.rows // 3), a.device, a.data, a.seed)

    def shared(self) -> dict:
        shared.available()
        a = self.args
        return shared.run(self.sentence_model(), self.sentences, max(32, a.rows // 4), a.device, a.seed)


def _note(part: str) -> str:
    """The part module's docstring as one paragraph (what it measures and how)."""
    return " ".join(MODULES[part].__doc__.split())


def _busy_cores(seconds: float = 0.3) -> float:
    """Cores other processes keep busy now: /proc/stat sampled twice (Linux; elsewhere 0)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # user..steal, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def _free_threads() -> int:
    """PyTorch's thread count less the cores other processes keep busy now (at least 1)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - round(_busy_cores())))


@contextmanager
def _quiet(threads: int | None):
    """torch's threads set, library warnings and transformers' notices silenced; all put back after."""
    import transformers

    before_threads, before_verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(threads or _free_threads())
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' and sentence-transformers' deprecation notices
            yield
    finally:
        torch.set_num_threads(before_threads)
        transformers.logging.set_verbosity(before_verbosity)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("llmcache demo draws its figures with matplotlib: pip install matplotlib "
              "(or everything the tour uses: pip install 'llmcache[demo]')", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet(args.threads):
        tour, results, started = _Tour(args), {}, time.perf_counter()
        title = (f"llmcache demo: {args.device}, {torch.get_num_threads()} threads, "
                 f"{platform.processor() or platform.machine()}, llmcache {llmcache.__version__}, "
                 f"torch {torch.__version__}; text: {tour.source}")
        for part in args.part:
            try:
                results[part] = getattr(tour, part)()
            except Skipped as skipped:
                results[part] = {"part": part, "skipped": str(skipped)}
                continue
            FIGURES[part](results[part], out / f"{part}.png")
            results[part]["figure"] = f"{part}.png"
    print(title)
    print(terminal(table(results)))
    write(out, title, results, {part: _note(part) for part in results})
    (out / "demo.json").write_text(json.dumps({
        "title": title, "args": vars(args), "seconds": time.perf_counter() - started, "text": tour.source,
        "build_info": llmcache.build_info(), "results": results}, indent=1, default=str))
    print(f"\nfigures, README.md and index.html in {out}/ ({time.perf_counter() - started:.0f} s)")
    return 0


__all__ = ["PARTS", "main", "parse_args"]
